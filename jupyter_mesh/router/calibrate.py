"""What Dask itself costs on a live mesh, measured: per task, per dependency and per
transfer.

The cost model charges Dask's own costs in three parts:

* ``mesh.task-overhead``: what dispatching a task costs the worker that runs it, time it
  cannot spend on other tasks;
* ``mesh.dependency-latency``: how long after an input's end a task that waits for it
  can start (the worker tells the scheduler, the scheduler sends the task): a delay
  that does not occupy the worker, which runs other tasks meanwhile;
* ``mesh.links.network-latency``: what a transfer between two workers adds to that.

Dask's documentation puts the first at up to 1 ms; on a loaded laptop or a small
shared hub each is several times that. With them at ``auto`` (the default), the router
measures them on the mesh it plans for, once, at its first routed plan
(``Mesh.calibrate()`` measures again), so its estimates and its trade-offs (split a
chain across devices, or keep it on one worker) use what this mesh really costs.

The probe is plain Dask work, about half a second on a small mesh:

* **dispatch**: ``n`` independent no-op tasks held to one worker, all sent at once so
  that its queue is full, and, alone, one; the difference of the two walls (which
  cancels the submission and the round trip both pay) times the worker's threads, over
  ``n - 1``: seconds per task per thread.
* **pace**: no-op tasks in chains of four (each waits for the one before it, as the
  tasks of an array graph wait for their inputs) on up to four workers at once (one of
  each site and target first), and one alone: the difference of the walls over ``n -
  1`` is the mesh's pace, one task every so many seconds. The estimate of a plan made
  per task is never below the tasks it dispatches at that pace.
  (Until 2026-11-29 the probe ran chains of tasks on all of them at once and the cost
  model charged the result as the workers' own time: that timed the round trips of
  the chains and, on a machine with few cores, the scheduler's pace with every worker
  busy. Routed work whose tasks leave the CPU free, as an accelerator's do, was planned
  as if dispatch took four to six times as long as it does, and kept on slow devices
  to avoid it.)
* **CPU**: the CPU seconds the scheduler and every worker spent while the pace probe
  ran, per task; where they all run on one host (a local mesh), its tasks' own work and
  Dask's share that host's cores, and on a small machine Dask's part is no small share:
  a plan's estimate is never below what both need of those cores (see
  ``placement.cpu_floor``).
* **dependency**: a chain of no-op tasks on one worker, each waiting for the one before
  it, and one task alone: per step, the difference of the walls, less the dispatch.
* **transfer**: a chain of tasks that alternates between two workers of one site, and
  the same chain on one worker; the difference of the two walls over the chain's length
  is what moving a small result between workers adds to each step.
* **bandwidth**: the same two chains with a result of ``PAYLOAD`` bytes at each step
  (for ``mesh.links.network-bandwidth: auto``): what each step adds beyond the small
  transfer is the time those bytes take between the two workers, Dask's serialization
  and the copies on both ends included (on one machine, loopback and pickling set it,
  far below a network's figure).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import MeshError
from ..inventory import format_ms

if TYPE_CHECKING:
    from distributed import Client

#: what the cost model uses where nothing was measured (a modelled inventory)
DEFAULT_TASK_OVERHEAD = 1e-3
DEFAULT_NETWORK_LATENCY = 2e-4
DEFAULT_DEPENDENCY_LATENCY = 0.0
DEFAULT_NETWORK_BANDWIDTH = 1.25e9
#: bytes each step of the bandwidth probe hands over (an array block of a typical size)
PAYLOAD = 8 << 20
#: a measured bandwidth is never taken above this (bytes/s; noise can make the time of a
#: transfer vanish)
_MAX_BANDWIDTH = 1e11
#: measured figures are never taken below these (noise can make a difference negative)
_FLOOR = 1e-4


@dataclass(frozen=True)
class Calibration:
    """Dask's own costs on one mesh, as measured by :func:`measure`."""

    #: seconds of Dask's dispatch per task (per worker thread)
    task_overhead: float
    #: seconds a transfer between two workers of one site adds; None where the mesh has
    #: no two workers at one site (the configured or default figure is used)
    network_latency: float | None
    #: the probe: tasks it ran, workers it ran them on, and its wall seconds
    tasks: int
    workers: int
    seconds: float
    #: seconds from an input's end until a task waiting for it starts on the same
    #: worker, beyond ``task_overhead`` (the round trip through the scheduler)
    dependency_latency: float = DEFAULT_DEPENDENCY_LATENCY
    #: seconds per task of the whole mesh with work queued on several workers at once:
    #: the scheduler (and, on a machine with few cores, every process) sees to one task
    #: at a time, so no computation dispatches its tasks faster than this
    task_interval: float = 0.0
    #: bytes per second between two workers of one site, Dask's serialization
    #: included; None where the mesh has no two workers at one site
    network_bandwidth: float | None = None
    #: CPU seconds the scheduler and the workers (and a client in the scheduler's
    #: process) spend per task between them, measured while the pace probe ran
    cpu_per_task: float = 0.0
    #: the cores of the one host that the scheduler and every worker run on (a local
    #: mesh): its tasks' own work and Dask's share them; None where they span hosts or
    #: did not say
    host_cores: int | None = None

    def __repr__(self) -> str:
        hop = ("no two workers at one site to time a transfer"
               if self.network_latency is None else
               f"{format_ms(self.network_latency)} more per transfer between workers")
        if self.network_bandwidth is not None:
            hop += f" and {format_rate(self.network_bandwidth)} between them"
        if self.host_cores:
            hop += (f"; {format_ms(self.cpu_per_task)} of CPU per task on the "
                    f"{self.host_cores} core{'s' * (self.host_cores != 1)} of the one host "
                    f"the scheduler and the workers share")
        return (f"Calibration: {format_ms(self.task_overhead)} of Dask dispatch per task "
                f"(one task every {format_ms(self.task_interval)} on the whole mesh), "
                f"{format_ms(self.dependency_latency)} from a task's end to the start of "
                f"one waiting for it, "
                f"{hop} (measured on {self.workers} worker{'s' * (self.workers != 1)} "
                f"with {self.tasks} tasks "
                f"in {self.seconds:.2f} s)")

    def _repr_html_(self) -> str:
        import html

        return f"<code>{html.escape(repr(self))}</code>"


def _noop(*_: Any) -> int:
    return 0


def _process_cpu() -> tuple[str, float, int]:
    """This process's (host name, CPU seconds so far, cores it may use)."""
    import socket

    from ..devices import _detect

    return socket.gethostname(), time.process_time(), _detect.cpu_cores()


def _mesh_cpu(client: Client, workers: list[str], timeout: float
              ) -> dict[str, tuple[str, float, int]] | None:
    """:func:`_process_cpu` of the scheduler and of ``workers``, or None where one
    cannot say within ``timeout`` seconds (then no CPU figure is measured; the other
    figures stand)."""
    try:
        got = dict(client.sync(client._run, _process_cpu, workers=workers,
                               callback_timeout=timeout))
        got["scheduler"] = client.sync(client._run_on_scheduler, _process_cpu,
                                       callback_timeout=timeout)
    except Exception:
        return None
    return got


def _one_host(client: Client, devices: list[Any]) -> bool:
    """Whether the scheduler and every worker listen on one host's address (loopback
    counts as one: a worker reaches a scheduler there only from its own machine)."""
    from distributed.comm import get_address_host

    loopback = {"127.0.0.1", "localhost", "::1"}
    address = getattr(client.scheduler, "address", None)
    if not isinstance(address, str):
        return False
    try:
        hosts = {get_address_host(address)}
    except Exception:
        return False
    hosts |= {d.host or get_address_host(d.worker) for d in devices}
    return len(hosts) == 1 or hosts <= loopback


def _cpu_per_task(before: dict[str, tuple[str, float, int]] | None,
                  after: dict[str, tuple[str, float, int]] | None, tasks: int
                  ) -> tuple[float, int | None]:
    """(CPU seconds per task of the processes in both readings, the cores of the one
    host they all run on or None)."""
    if not before or not after or tasks < 1:
        return 0.0, None
    common = [k for k in after if k in before]
    if "scheduler" not in common:
        return 0.0, None
    spent = sum(max(after[k][1] - before[k][1], 0.0) for k in common)
    hosts = {after[k][0] for k in after}
    cores = max(after[k][2] for k in after) if len(hosts) == 1 else None
    return spent / tasks, (cores if cores and cores > 0 else None)


_PAYLOADS: dict[int, Any] = {}


def _payload(nbytes: int, *_: Any) -> Any:
    """A fresh copy of ``nbytes`` random bytes (made once per worker): nothing a
    compressing comm could shrink, and memory really written, as a result's is."""
    import numpy as np

    block = _PAYLOADS.get(nbytes)
    if block is None:
        block = _PAYLOADS[nbytes] = np.random.default_rng(0).integers(
            0, 256, nbytes, dtype=np.uint8)
    return block.copy()


def format_rate(bytes_per_second: float) -> str:
    """``1.1 GB/s``, ``350 MB/s``."""
    if bytes_per_second >= 99.5e9:
        return f"{bytes_per_second / 1e9:.0f} GB/s"
    # (the cut-offs where the rounded figure changes unit: 999.6 MB/s is "1 GB/s",
    # not "1e+03 MB/s")
    if bytes_per_second >= 999.5e6:
        return f"{bytes_per_second / 1e9:.2g} GB/s"
    if bytes_per_second >= 99.95e3:
        return f"{bytes_per_second / 1e6:.3g} MB/s"
    return f"{bytes_per_second / 1e3:.3g} kB/s"


def _wait(client: Client, futures: list[Any], timeout: float) -> None:
    from distributed.client import _wait as wait_async

    try:
        # this client's loop, which need not be the default client's
        client.sync(wait_async, futures, timeout=timeout)
        failed = next((f for f in futures if f.status == "error"), None)
        if failed is not None:  # e.g. workers without jupyter_mesh installed
            exc = failed.exception()
            why = (str(exc).splitlines() or [""])[0]
            raise MeshError(f"the calibration probe failed on a worker "
                            f"({type(exc).__name__}: {why}): set mesh.task-overhead, "
                            f"mesh.dependency-latency, mesh.links.network-latency and "
                            f"mesh.links.network-bandwidth")
    except TimeoutError:
        raise MeshError(f"the mesh did not run the calibration probe within {timeout:g} s "
                        f"(are its workers busy or gone?): call mesh.calibrate() later, or "
                        f"set mesh.task-overhead, mesh.dependency-latency, "
                        f"mesh.links.network-latency and mesh.links.network-bandwidth"
                        ) from None
    finally:
        for f in futures:
            f.release()


def _wall(client: Client, graph: dict[Any, Any], keys: list[Any], workers: list[str],
          timeout: float) -> float:
    t0 = time.perf_counter()
    _wait(client, client.get(graph, keys, sync=False, workers=workers,
                             allow_other_workers=False), timeout)
    return time.perf_counter() - t0


def _walls(client: Client, workers: list[str], n: int, depth: int, timeout: float
           ) -> tuple[float, float]:
    """Wall seconds of one no-op task, and of ``n`` in chains of ``depth`` (each waits
    for the one before it, as the tasks of an array graph wait for their inputs; 1:
    independent tasks), held to ``workers``: all sent at once, so that their queues are
    full."""
    from dask._task_spec import Task, TaskRef

    token = uuid.uuid4().hex
    one = {f"jm-probe-one-{token}": Task(f"jm-probe-one-{token}", _noop)}
    many: dict[str, Task] = {}
    for i in range(n):
        k = f"jm-probe-{token}-{i}"
        dep = (TaskRef(f"jm-probe-{token}-{i - 1}"),) if i % depth else ()
        many[k] = Task(k, _noop, i, *dep)
    return (_wall(client, one, list(one), workers, timeout),
            _wall(client, many, list(many), workers, timeout))


#: the pace probe's tasks form chains of this many: each task waits for the one before
#: it, as in an array graph (a dependency costs the scheduler transitions and a round
#: trip that independent tasks do not)
DEPTH = 4


def _steps(client: Client, worker: str, length: int, timeout: float) -> float:
    """Wall seconds of a chain of ``length`` no-op tasks on ``worker``, each waiting for
    the one before it (submitted at once, as a graph: nothing waits for the client)."""
    from dask._task_spec import Task, TaskRef

    token = uuid.uuid4().hex
    keys = [f"jm-probe-chain-{token}-{i}" for i in range(length)]
    graph = {k: Task(k, _noop, i, *((TaskRef(keys[i - 1]),) if i else ()))
             for i, k in enumerate(keys)}
    return _wall(client, graph, keys[-1:], [worker], timeout)


#: the pace probe runs on this many workers at most (on a large mesh, probing every
#: worker would take long)
PROBE_WORKERS = 4


def _probe_workers(devices: list[Any]) -> list[Any]:
    """Up to ``PROBE_WORKERS`` workers, one of each (site, target) first."""
    ordered = sorted(devices, key=lambda d: d.worker)
    first: dict[tuple[str, str], Any] = {}
    for d in ordered:
        first.setdefault((d.site, d.target), d)
    picked = list(first.values())[:PROBE_WORKERS]
    picked += [d for d in ordered if d not in picked][:PROBE_WORKERS - len(picked)]
    return picked


def _chain(client: Client, workers: list[str], length: int, timeout: float,
           nbytes: int = 0) -> float:
    """Wall seconds of a chain of ``length`` no-op tasks, step i on workers[i % k], each
    giving a result of ``nbytes`` bytes (0: a small number)."""
    t0 = time.perf_counter()
    futures: list[Any] = []
    for i in range(length):
        args = tuple(futures[-1:])
        fn, head = (_payload, (nbytes,)) if nbytes else (_noop, ())
        futures.append(client.submit(fn, *head, *args, workers=[workers[i % len(workers)]],
                                     allow_other_workers=False, pure=False))
    _wait(client, futures[-1:], timeout)
    return time.perf_counter() - t0


def _pair(devices: list[Any]) -> list[str] | None:
    """Two workers of one site (the probe's transfer runs between them), or None;
    workers of one kind where there are (a hop like a routed one within a pool)."""
    by_site: dict[tuple[str, str], list[str]] = {}
    for d in sorted(devices, key=lambda d: d.worker):
        by_site.setdefault((d.site, d.target), []).append(d.worker)
    pairs = [ws for ws in by_site.values() if len(ws) >= 2]
    if not pairs:
        by_site = {}
        for d in sorted(devices, key=lambda d: d.worker):
            by_site.setdefault((d.site, ""), []).append(d.worker)
        pairs = [ws for ws in by_site.values() if len(ws) >= 2]
    return pairs[0][:2] if pairs else None


def measure(client: Client, devices: list[Any], *, tasks_per_thread: int = 16,
            chain: int = 8, repeats: int = 2, timeout: float = 5.0,
            bandwidth: bool = True) -> Calibration:
    """Measure Dask's dispatch cost per task (on one worker, and on the whole mesh), the
    latency of a dependency, and the transfer latency and (with ``bandwidth``) bandwidth
    between two workers of one site (``devices``: the mesh's inventory) on the mesh
    behind ``client``, from the least of ``repeats`` walls of each kind. MeshError when
    the probe does not finish within ``timeout`` seconds."""
    if not devices:
        raise MeshError("the mesh has no workers to calibrate on: add some (e.g. "
                        "mesh.scale(cpu=2)), then call mesh.calibrate() again")
    probe = _probe_workers(devices)
    t0 = time.perf_counter()
    tasks = 0

    def best(workers: list[str], n: int) -> tuple[float, float]:
        # the least of each wall over the repeats: noise only adds to a wall, but it
        # can shrink a difference of two walls
        walls = [_walls(client, workers, n, 1, timeout) for _ in range(repeats)]
        return min(w[0] for w in walls), min(w[1] for w in walls)

    # what a task costs the worker that runs it: the first probe worker, queue full
    first = probe[0]
    threads = max(int(first.nthreads), 1)
    n = max(tasks_per_thread * threads, 16)
    one, many = best([first.worker], n)
    overhead = max((many - one) * threads / (n - 1), _FLOOR)
    tasks += repeats * (n + 1)
    # the mesh's pace: tasks with inputs, in chains, on every probe worker at once
    total = sum(max(int(d.nthreads), 1) for d in probe)
    n_all = max(tasks_per_thread // 2 * total, 16)
    # (and what the scheduler and the workers spend of their host's CPU on each task)
    everyone = [d.worker for d in devices]
    cpu_before = _mesh_cpu(client, everyone, timeout)
    walls = [_walls(client, [d.worker for d in probe], n_all, DEPTH, timeout)
             for _ in range(repeats)]
    cpu, host_cores = _cpu_per_task(cpu_before, _mesh_cpu(client, everyone, timeout),
                                    repeats * (n_all + 1))
    if host_cores is not None and not _one_host(client, devices):
        host_cores = None  # one host name, but not one machine's addresses
    interval = (min(w[1] for w in walls) - min(w[0] for w in walls)) / (n_all - 1)
    tasks += repeats * (n_all + 1)
    # a chain on the first probe worker: each step is a task's dispatch and the wait
    # for the scheduler to send the next one
    steps = min(_steps(client, first.worker, chain, timeout) for _ in range(repeats))
    dependency = max((steps - one) / (chain - 1) - overhead, 0.0)
    tasks += repeats * chain
    latency = None
    rate = None
    pair = _pair(devices)
    if pair is not None:
        hops = [(_chain(client, pair, chain, timeout), _chain(client, pair[:1], chain, timeout))
                for _ in range(repeats)]
        extra = min(h[0] for h in hops) - min(h[1] for h in hops)
        latency = max(extra / (chain - 1), _FLOOR)  # chain - 1 hand-overs between the two
        tasks += repeats * 2 * chain
        # (twice at most: on a loaded host, noise can leave the chain across the two
        # workers no slower than the one on one worker, which measures nothing)
        for _ in range(2 if bandwidth else 0):
            try:
                big = [(_chain(client, pair, chain, timeout, PAYLOAD),
                        _chain(client, pair[:1], chain, timeout, PAYLOAD))
                       for _ in range(repeats)]
            except MeshError:  # what was measured above stands; the bandwidth stays unknown
                break
            tasks += repeats * 2 * chain
            per_hop = (min(b[0] for b in big) - min(b[1] for b in big)) / (chain - 1)
            moving = per_hop - latency
            # noise can leave the bytes no time of their own: then at least the whole
            # step's, never "free"
            spent = moving if moving > 0 else per_hop
            if spent > 0:
                rate = min(PAYLOAD / spent, _MAX_BANDWIDTH)
                break
    used = len({d.worker for d in probe} | set(pair or ()))
    return Calibration(overhead, latency, tasks, used, time.perf_counter() - t0,
                       dependency_latency=dependency, task_interval=max(interval, 0.0),
                       network_bandwidth=rate, cpu_per_task=cpu, host_cores=host_cores)
