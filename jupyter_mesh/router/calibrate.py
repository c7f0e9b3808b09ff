"""What Dask itself costs on a live mesh, measured: per dispatched task and per transfer.

The cost model adds a dispatch cost to every task (``mesh.task-overhead``) and a
latency to every transfer between workers (``mesh.links.network-latency``). Dask's
documentation puts the first at up to 1 ms; on a loaded laptop or a small shared hub it
is several times that, and a worker-to-worker transfer of a small array costs a few
milliseconds more. With both at ``auto`` (the default), the router measures them on the
mesh it plans for, once, at its first routed plan (``Mesh.calibrate()`` measures again),
so its estimates and its trade-offs (split a chain across devices, or keep it on one
worker) use what this mesh really costs.

The probe is plain Dask work, about 0.2-0.5 s on a small mesh:

* **dispatch**: ``n`` no-op tasks in chains of four (each waits for the one before it,
  as the tasks of an array graph wait for their inputs: every dependency costs a round
  trip through the scheduler) and, alone, one, on up to four workers (one of each site
  and target first); the difference of the two walls (which cancels the submission and
  the round trip both pay) times their threads, over ``n - 1``: seconds per task per
  thread. (Until 2026-11-28 the tasks were independent, which Dask dispatches two to
  three times as fast as tasks with inputs: estimates came out far below wall time.)
* **transfer**: a chain of tasks that alternates between two workers of one site, and
  the same chain on one worker; the difference of the two walls over the chain's length
  is what moving a small result between workers adds to each step.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import MeshError

if TYPE_CHECKING:
    from distributed import Client

#: what the cost model uses where nothing was measured (a modelled inventory)
DEFAULT_TASK_OVERHEAD = 1e-3
DEFAULT_NETWORK_LATENCY = 2e-4
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

    def __repr__(self) -> str:
        hop = ("no two workers at one site to time a transfer"
               if self.network_latency is None else
               f"{self.network_latency * 1e3:.2g} ms per transfer between workers")
        return (f"Calibration: {self.task_overhead * 1e3:.2g} ms of Dask dispatch per task, "
                f"{hop} (measured on {self.workers} worker{'s' * (self.workers != 1)} "
                f"with {self.tasks} tasks "
                f"in {self.seconds:.2f} s)")

    def _repr_html_(self) -> str:
        import html

        return f"<code>{html.escape(repr(self))}</code>"


def _noop(*_: Any) -> int:
    return 0


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
                            f"({type(exc).__name__}: {why}): set mesh.task-overhead and "
                            f"mesh.links.network-latency")
    except TimeoutError:
        raise MeshError(f"the mesh did not run the calibration probe within {timeout:g} s "
                        f"(are its workers busy or gone?): call mesh.calibrate() later, or "
                        f"set mesh.task-overhead and mesh.links.network-latency") from None
    finally:
        for f in futures:
            f.release()


def _wall(client: Client, graph: dict[Any, Any], keys: list[Any], workers: list[str],
          timeout: float) -> float:
    t0 = time.perf_counter()
    _wait(client, client.get(graph, keys, sync=False, workers=workers,
                             allow_other_workers=False), timeout)
    return time.perf_counter() - t0


def _dispatch(client: Client, workers: list[str], n: int, timeout: float
              ) -> tuple[float, float]:
    """Wall seconds of one no-op task, and of ``n``, on ``workers``."""
    from dask._task_spec import Task, TaskRef

    token = uuid.uuid4().hex
    one = {f"jm-probe-one-{token}": Task(f"jm-probe-one-{token}", _noop)}
    many: dict[str, Task] = {}
    for i in range(n):
        k = f"jm-probe-{token}-{i}"
        dep = (TaskRef(f"jm-probe-{token}-{i - 1}"),) if i % DEPTH else ()
        many[k] = Task(k, _noop, i, *dep)
    return (_wall(client, one, list(one), workers, timeout),
            _wall(client, many, list(many), workers, timeout))


#: the dispatch probe's tasks form chains of this many: each task waits for the one
#: before it, as in an array graph (a dependency costs Dask a round trip through the
#: scheduler that independent tasks do not)
DEPTH = 4

#: the dispatch probe runs on this many workers at most: on a large mesh, thousands of
#: no-op tasks would time the scheduler's throughput over all of them, not what a task
#: costs a worker, and would take long
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


def _chain(client: Client, workers: list[str], length: int, timeout: float) -> float:
    """Wall seconds of a chain of ``length`` no-op tasks, step i on workers[i % k]."""
    t0 = time.perf_counter()
    futures: list[Any] = []
    for i in range(length):
        args = tuple(futures[-1:])
        futures.append(client.submit(_noop, *args, workers=[workers[i % len(workers)]],
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


def measure(client: Client, devices: list[Any], *, tasks_per_thread: int = 8,
            chain: int = 8, repeats: int = 2, timeout: float = 5.0) -> Calibration:
    """Measure Dask's dispatch cost per task and its transfer latency between two
    workers of one site (``devices``: the mesh's inventory) on the mesh behind
    ``client``, from the least of ``repeats`` walls of each kind.
    MeshError when the probe does not finish within ``timeout`` seconds."""
    if not devices:
        raise MeshError("the mesh has no workers to calibrate on: add some (e.g. "
                        "mesh.scale(cpu=2)), then call mesh.calibrate() again")
    probe = _probe_workers(devices)
    workers = [d.worker for d in probe]
    threads = sum(max(int(d.nthreads), 1) for d in probe)
    n = max(tasks_per_thread * threads, 8)
    t0 = time.perf_counter()
    # the least of each wall over the repeats, then their difference: noise only adds
    # to a wall, but it can shrink a difference of two walls
    walls = [_dispatch(client, workers, n, timeout) for _ in range(repeats)]
    one, many = min(w[0] for w in walls), min(w[1] for w in walls)
    overhead = (many - one) * threads / (n - 1)
    latency = None
    pair = _pair(devices)
    tasks = repeats * (n + 1)
    if pair is not None:
        hops = [(_chain(client, pair, chain, timeout), _chain(client, pair[:1], chain, timeout))
                for _ in range(repeats)]
        extra = min(h[0] for h in hops) - min(h[1] for h in hops)
        latency = max(extra / chain, _FLOOR)
        tasks += repeats * 2 * chain
    used = len(set(workers) | set(pair or ()))
    return Calibration(max(overhead, _FLOOR), latency, tasks, used, time.perf_counter() - t0)
