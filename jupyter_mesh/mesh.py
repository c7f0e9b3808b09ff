"""The :class:`Mesh`: one Dask cluster of heterogeneous devices, used as one computer."""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import html
import logging
import math
import operator
import os
import re
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Literal, overload

import dask
from distributed import Client, Nanny, Scheduler, SpecCluster
from distributed.comm import parse_address
from distributed.comm.addressing import parse_host_port

from . import _config, _state
from ._links import browser_link
from ._scheduler_plugin import MeshSchedulerPlugin
from .devices import _detect, _profile, _tpu
from .devices._worker_plugin import MeshWorkerPlugin
from .errors import (
    MeshConfigError,
    MeshError,
    callers_level,
    check_flag,
    keywords_checked,
    said,
    shorten_ours,
    shorten_ours_in_dask,
)
from .inventory import ERROR_COLOUR, Inventory, colour_style, format_bytes, plural
from .router.history import RunHistory

#: worker-spec name prefix per local worker family
FAMILIES: dict[str, dict[str, Any]] = {
    "cpu": {"kind": "cpu", "backend": "numpy"},
    "jax_cpu": {"kind": "cpu", "backend": "jax"},
    "gpu": {"kind": "gpu", "backend": "cupy"},
    "tpu": {"kind": "tpu", "backend": "jax"},
}
_SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")
#: what a mesh connects over (Dask's inproc:// is one process's own, and ucx:// needs
#: UCX-Py, which jupyter_mesh does not install)
_SCHEMES = ("tcp", "tls", "ws", "wss")


def bracketed(host: str) -> str:
    """An IPv6 address as Dask's addresses hold it, in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def check_own_host(host: str, what: str) -> None:
    """MeshError where this machine cannot listen on ``host`` (a name that does not
    resolve, another machine's address), naming ``what`` gave it: Dask would say only
    that its scheduler or worker failed to start, or could not reach the scheduler."""
    import socket

    try:
        infos = socket.getaddrinfo(host.strip("[]"), 0, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind(sockaddr)
    except (OSError, UnicodeError) as exc:
        # (a name with an empty or over-long label fails IDNA encoding: UnicodeError)
        error = MeshConfigError if what.startswith("config ") else MeshError
        reason = getattr(exc, "strerror", None) or (
            "not a valid host name" if isinstance(exc, UnicodeError) else exc)
        raise error(f"{what} {host} is not an address of this machine "
                        f"({reason}): give one of its interface addresses "
                        f"(127.0.0.1 for this machine only)") from None


def _secure_form(address: str) -> str:
    """``address`` in its TLS scheme: tcp:// as tls://, ws:// as wss://."""
    scheme, _, rest = str(address).partition("://")
    return f"{'wss' if scheme == 'ws' else 'tls'}://{rest}"


def is_encrypted(address: str) -> bool:
    """Whether ``address`` is one of Dask's TLS schemes (``tls://``, ``wss://``): it
    needs Dask's TLS settings (a ``Security``)."""
    return str(address).startswith(("tls://", "wss://"))


@overload
def check_count(name: str, value: Any, *, allow_auto: Literal[False] = False) -> int: ...


@overload
def check_count(name: str, value: Any, *, allow_auto: bool) -> int | str: ...


def check_count(name: str, value: Any, *, allow_auto: bool = False) -> int | str:
    """Validate a device count: a non-negative int, or ``"auto"`` where allowed."""
    if allow_auto and isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    elif not isinstance(value, (bool, int)) and hasattr(value, "__index__"):
        with contextlib.suppress(TypeError):
            value = operator.index(value)  # NumPy's integers (np.int64(2)) too
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        allowed = "a whole number >= 0" + (" or 'auto'" if allow_auto else "")
        raise MeshError(f"{name} must be {allowed}, not {value!r}")
    return value


def most_local_workers() -> int:
    """The most workers of a family a local mesh starts on this machine: four per core
    (a typo must not fork thousands of processes), as the Mesh sidebar allows."""
    return 4 * _detect.cpu_cores()


def check_local_count(name: str, value: Any) -> int:
    """A count of local worker processes: a whole number from 0 to four per core."""
    n = check_count(name, value)
    top = most_local_workers()
    if n > top:
        raise MeshError(f"{name} must be a whole number from 0 to {top} (four workers per "
                        f"core here), not {value!r}")
    return n


def check_cpu_total(cpu: int, jax_cpu: int) -> None:
    """At most four CPU worker processes per core, NumPy and JAX ones together."""
    top = most_local_workers()
    if cpu + jax_cpu > top:
        raise MeshError(f"cpu and jax_cpu together must be at most {top} workers (four CPU "
                        f"workers per core here), not {cpu} + {jax_cpu}: use fewer")


def _no_stale_distributed_scheduler() -> None:
    """Once no default client is left, plain Dask calls must not ask for one.

    A default Dask client restores, when it closes last, the ``scheduler`` setting it
    found; one started while another was still open (``Mesh.local(replace=True)`` starts
    the new mesh before it closes the old, to keep the old one if the new one fails)
    found ``"dask.distributed"``, so plain ``.compute()`` would fail ("no Client
    active") after both closed."""
    import dask.config
    from distributed.client import _get_global_client

    api = sys.modules.get("jupyter_mesh.router.api")
    if api is not None:  # a router's scheduler that the client put back, with no route
        api.ROUTES.sync()
    if dask.config.get("scheduler", None) == "dask.distributed" and _get_global_client() is None:
        dask.config.config.pop("scheduler", None)


def _dashboard_missing(client: Client) -> bool:
    """Whether the scheduler serves no dashboard although Dask gives a link to one: a
    scheduler started with ``--no-dashboard`` still runs its HTTP server (health,
    metrics), which Dask reports as the dashboard. One HEAD request, answered 404 there;
    anything else (no answer, another status) keeps the link."""
    import urllib.error
    import urllib.request

    try:
        link = _client_dashboard(client)
    except Exception:
        return False
    if not link or not link.startswith("http://"):
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(link, method="HEAD"), timeout=1.0)
    except urllib.error.HTTPError as exc:
        return exc.code == 404
    except Exception:
        return False
    return False


def check_replace(replace: Any) -> bool:
    """``replace=`` is True or False: a truthy ``"no"`` must not close the mesh in use."""
    return check_flag("replace", replace)


#: the least memory limit a worker is given (a Python worker process alone takes about
#: 100 MiB; below it, its nanny restarts it over and over)
MIN_WORKER_MEMORY = 256 * 2**20


def check_memory_limit(value: Any) -> Any:
    """``"auto"``, a number of bytes, or a size such as ``"4 GiB"``."""
    from dask.utils import parse_bytes

    if value == "auto":
        return value
    parsed: Any = None
    fraction = False  # a number (as text too) up to 1 is a share of the host's memory
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        parsed, fraction = value, True
    elif isinstance(value, str) and value.strip():
        try:  # a number as text is a number to Dask too (up to 1: a fraction)
            parsed, fraction = float(value), True
        except ValueError:
            try:  # a size ('1B' is a byte: Dask reads a share only from a number)
                parsed = parse_bytes(value)
            except (ValueError, TypeError):
                pass
    if parsed is None or not math.isfinite(parsed) or parsed < 0:
        raise MeshError(f"memory_limit must be 'auto', a number of bytes or a size like "
                        f"'4 GiB', not {value!r}")
    # (0 is no limit; up to 1, a fraction of the host's memory, as Dask reads it)
    size = parsed
    if fraction and 0 < parsed <= 1:
        from distributed.system import MEMORY_LIMIT

        size = parsed * MEMORY_LIMIT
    if 0 < size < MIN_WORKER_MEMORY:
        share = f" of this host's {format_bytes(MEMORY_LIMIT)}" if size != parsed else ""
        raise MeshError(
            f"memory_limit {value!r} is {format_bytes(size)}{share}, less than a worker "
            f"process needs (at least {format_bytes(MIN_WORKER_MEMORY)}; its nanny would "
            f"restart it for ever): give a size like '4 GiB' (a bare number counts bytes, "
            f"one up to 1 a share of the host's memory)")
    return parsed


def check_site(site: Any, spell: Callable[[Any], str] = said) -> str:
    """``site`` where it is a valid site name; ``spell`` writes values in the error
    (:func:`said` as Python does, :func:`said_json` for a REST body)."""
    if not isinstance(site, str) or not _SITE_RE.match(site):
        raise MeshError(
            f"site must be a name of letters, digits, {spell('.')}, {spell('_')} or "
            f"{spell('-')} (like {spell('local')} or {spell('edge-lab')}), starting with a "
            f"letter or digit, at most 63 characters, not {spell(site)}"
        )
    if site == "unknown":
        # (router.placement.PLAIN_SITE) workers there were taken for plain ones: a
        # computation could not be kept to them, and errors listed no site
        raise MeshError(
            f"site {spell(site)} is where the mesh shows plain Dask workers (which have no "
            f"site): name yours otherwise, like {spell('lab')}"
        )
    return site


def check_address(address: Any, spell: Callable[[Any], str] = said) -> str:
    """Normalise a scheduler address (``host:port`` means ``tcp://host:port``);
    ``spell`` writes values in the error, as in :func:`check_site`."""
    if not isinstance(address, str) or not address.strip():
        raise MeshError(f"malformed address {spell(address)}: use tcp://HOST:PORT or tls://HOST:PORT")
    address = address.strip()
    if "://" not in address:
        address = "tcp://" + address
    scheme, rest = address.split("://", 1)
    if scheme.lower() not in _SCHEMES:
        # http:// (a dashboard's address), ucx://...: not a protocol the mesh speaks
        raise MeshError(f"{spell(address)}: a Dask scheduler's address starts with "
                        f"{' or '.join(f'{s}://' for s in sorted(_SCHEMES))}, not "
                        f"{spell(scheme)}: use tcp://HOST:PORT or tls://HOST:PORT")
    address = f"{scheme.lower()}://{rest}"  # TCP://host:1 as Dask takes it
    try:
        scheme, loc = parse_address(address)
        if scheme not in _SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}")
        host, port = parse_host_port(loc)
        if not host or not port or not 0 < int(port) < 65536:
            raise ValueError("no port")
        host.encode("idna")  # a name no resolver takes ('\ud800')
    except Exception:
        raise MeshError(
            f"malformed address {spell(address)}: use tcp://HOST:PORT or tls://HOST:PORT"
        ) from None
    return address


def visible_gpu(index: int, visible: str | None = None) -> str:
    """What a GPU worker's ``CUDA_VISIBLE_DEVICES`` must say for the ``index``-th GPU
    this process sees: where this process sees only some GPUs (a hub giving it GPUs 2
    and 3, or GPU UUIDs), the index counts those, not the machine's."""
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return str(index)
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    return ids[index] if index < len(ids) else str(index)


def _local_security() -> Any:
    """TLS for a local mesh: a CA and certificate made for it, held in memory (Dask's
    ``Security.temporary``), so that only this process and the workers it starts can
    connect (other users of a shared machine reach its 127.0.0.1 ports too)."""
    from distributed.security import Security

    try:
        return Security.temporary()
    except ImportError as exc:  # Dask makes the certificate with `cryptography`
        raise MeshError(f"mesh.local.tls needs the cryptography package ({exc}): pip "
                        f"install cryptography, or set mesh.local.tls: false") from None


def _tls_options(security: Any) -> dict[str, Any]:
    return {} if security is None else {"security": security, "protocol": "tls://"}


def jax_cpu_sets(jax_n: int, other_threads: int, nthreads: int,
                 pin: bool | str = "auto") -> list[list[int]]:
    """The cores each of a local mesh's ``jax_n`` JAX CPU workers is pinned to (empty
    lists: not pinned).

    XLA computes on a thread pool as wide as the cores its process may use, so an
    unpinned JAX worker competes for every core with the other CPU workers' threads. Each
    JAX worker gets the cores those ``other_threads`` leave, shared out, and at least its
    own ``nthreads``: on 16 cores beside two five-thread NumPy workers, six. Cores are
    taken from the end of the ones this process may use, JAX workers side by side,
    wrapping round where they must share. ``pin`` (``mesh.local.pin-jax``): ``"auto"``
    pins where the other threads leave each JAX worker at least one core of its own,
    and fewer than all: on 2 cores beside one one-thread NumPy worker, one core (a
    routed matmul pipeline ran 11% faster pinned there). Where they leave none (2 cores
    beside two one-thread NumPy workers), the threads outnumber the cores either way and
    the cost model shares them out; pinning would only confine the worker's own Dask
    work to a core the others use too (P1 ran 3% slower pinned). True pins there too;
    False never pins. Nothing is pinned where this system cannot pin a process
    (macOS)."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if not jax_n or getaffinity is None or pin is False:
        return [[] for _ in range(jax_n)]
    cores = sorted(getaffinity(0))
    count = min(_detect.cpu_cores(), len(cores))  # a cgroup quota may allow fewer
    width = min(count, max(nthreads, (count - other_threads) // jax_n, 1))
    if pin == "auto" and not (count - other_threads >= jax_n and width < count):
        return [[] for _ in range(jax_n)]
    sets = []
    for i in range(jax_n):
        start = len(cores) - width * (i + 1)
        sets.append(sorted(cores[(start + j) % len(cores)] for j in range(width)))
    return sets


def worker_memory(memory_limit: Any, workers: int) -> Any:
    """Each local worker's ``memory_limit``: ``"auto"`` is the host's memory over the
    mesh's ``workers``, as Dask's LocalCluster shares it; anything else as given."""
    if memory_limit != "auto":
        return memory_limit
    from distributed.worker_memory import parse_memory_limit

    return parse_memory_limit("auto", 1, max(workers, 1), logger=logging.getLogger(
        "jupyter_mesh"))


def _set_memory_limit(dask_worker: Any, limit: int) -> None:
    """(In a worker, or with ``nanny=True`` its nanny) its memory limit is now ``limit``,
    and a worker's spill buffer spills past its target share of it."""
    manager = dask_worker.memory_manager
    manager.memory_limit = limit
    target = getattr(manager, "memory_target_fraction", None)
    data: Any = getattr(dask_worker, "data", None)
    if target and hasattr(data, "n"):  # (zict's Buffer: a SpillBuffer's fast part)
        data.n = int(limit * target)


def _set_scheduler_memory_limits(dask_scheduler: Any, limit: int,
                                 addresses: list[str]) -> None:
    """The scheduler's view of the memory limit of the workers at ``addresses``, and
    the mesh inventory's memory of each CPU worker of them, are now ``limit``."""
    from ._scheduler_plugin import EXTENSION_NAME, worker_record
    from .devices._worker_plugin import METADATA_KEY

    plugin = dask_scheduler.extensions.get(EXTENSION_NAME)
    for addr in addresses:
        ws = dask_scheduler.workers.get(addr)
        if ws is None:  # (gone meanwhile)
            continue
        if ws.memory_limit != limit:
            dask_scheduler.total_memory += limit - (ws.memory_limit or 0)
            ws.memory_limit = limit
        meta = ws.extra.get(METADATA_KEY)
        if meta and meta.get("kind") == "cpu":
            meta["memory"] = limit
        if plugin is not None and addr in plugin.devices:
            plugin.devices[addr] = worker_record(ws)


class MeshNanny(Nanny):
    """Dask's Nanny, whose worker processes never see the kernel's Ctrl-C.

    A kernel interrupt goes to the kernel's whole process group (Jupyter signals the
    group), which holds a local mesh's worker processes: a worker still importing its
    modules died of it, printing its traceback into the cell (once up, its plugin
    ignores SIGINT). The nanny starts its workers from its event loop's thread; with
    SIGINT blocked in that thread, the threads that spawn the workers block it too, and
    so do the workers, from their first instruction. The kernel's own Ctrl-C is
    unchanged: Python handles signals in the main thread, where nothing is blocked."""

    #: every MeshNanny of this process (a cluster lists its workers only once started)
    made: weakref.WeakSet[MeshNanny] = weakref.WeakSet()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        MeshNanny.made.add(self)

    async def start_unsafe(self) -> Any:
        _block_sigint_here()
        return await super().start_unsafe()


def _spawned(nannies: Any) -> list[int]:
    """The process ids of the workers these nannies have spawned so far."""
    pids = []
    for nanny in list(nannies):
        process = getattr(getattr(nanny, "process", None), "process", None)
        with contextlib.suppress(Exception):
            if process is not None and process.pid:
                pids.append(int(process.pid))
    return pids


class _InterruptedGathers(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" of a Dask client's gather
    that Ctrl-C stopped (``distributed.client.AllExit``: Dask's way to end the wait):
    the cell said ``KeyboardInterrupt`` already, and this came as a traceback under it;
    and of a worker's start that Ctrl-C stopped (``MeshNanny failed to start.``, two
    tracebacks under "interrupted: no mesh started"). Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if type(exc).__name__ == "AllExit" and type(exc).__module__ == "distributed.client":
            return False
        # the start of a worker that Ctrl-C left behind (Mesh.local said "interrupted:
        # no mesh started", and a start that fails says why in one line)
        return not (isinstance(exc, RuntimeError)
                    and str(exc) == f"{MeshNanny.__name__} failed to start."
                    and record.getMessage().startswith("Task exception was never retrieved"))


def _quiet_interrupted_gathers() -> None:
    """Install :class:`_InterruptedGathers` on asyncio's logger (once a process)."""
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, _InterruptedGathers) for f in log.filters):
        log.addFilter(_InterruptedGathers())


_QUIET_LOCK = threading.Lock()
#: the local meshes of this process that keep Dask's logs quiet, and how to put the
#: log levels back once none does
_QUIET: dict[str, Any] = {"holders": 0, "restore": None}


def _hold_quiet() -> Any:
    """Dask's and Bokeh's logs at WARNING while any local mesh of this process lives
    (a kernel's, or the server's several): the first one silences them, and only the
    last to close puts them back (closing one of two turned Dask's INFO logs on under
    the other). Returns the release, which runs once."""
    from distributed.utils import silence_logging_cmgr

    with _QUIET_LOCK:
        if _QUIET["holders"] == 0:
            stack = contextlib.ExitStack()
            for root in ("distributed", "bokeh"):
                stack.enter_context(silence_logging_cmgr(logging.WARNING, root=root))
            _QUIET["restore"] = stack
        _QUIET["holders"] += 1
    released = threading.Event()

    def release() -> None:
        with _QUIET_LOCK:
            if released.is_set():
                return
            released.set()
            _QUIET["holders"] -= 1
            if _QUIET["holders"] == 0 and _QUIET["restore"] is not None:
                _QUIET["restore"].close()
                _QUIET["restore"] = None

    return release


class _QuietAWhile(logging.Filter):
    """Drops Dask's and Bokeh's records below WARNING until ``until`` (monotonic)."""

    until = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or time.monotonic() > self.until


_QUIET_A_WHILE = _QuietAWhile()
#: how long after a start that failed or was stopped its pieces' INFO logs are dropped
QUIET_AFTER_FAILED_START = 5.0


def _keep_quiet(cluster: Any) -> None:
    """Before closing a cluster whose start failed or was stopped (Ctrl-C). Its pieces
    log their ends at INFO, some after its close (nannies that find their workers
    killed), into whatever cell runs then: those are dropped for a few seconds. And
    Dask's log levels are put back as they were before it now: where its close did
    not get that far, its finalizer put them back later, under the next mesh (Dask's
    INFO logs in every cell)."""
    _QUIET_A_WHILE.until = time.monotonic() + QUIET_AFTER_FAILED_START
    for root in ("distributed", "bokeh"):
        for handler in logging.getLogger(root).handlers:
            if isinstance(handler, logging.StreamHandler) and \
                    _QUIET_A_WHILE not in handler.filters:
                handler.addFilter(_QUIET_A_WHILE)
    with contextlib.suppress(Exception):
        cluster._SpecCluster__exit_stack.close()


def _kill_left(pids: list[int]) -> None:
    """Kill those of ``pids`` still running as this process's children: a start
    interrupted while a worker was still starting left it running after the close
    (it never sees the Ctrl-C, see MeshNanny), and nothing would stop it."""
    import psutil

    for pid in set(pids):
        with contextlib.suppress(psutil.Error, OSError):
            process = psutil.Process(pid)
            if process.ppid() == os.getpid():
                process.kill()


def _scheduler_of(cluster: Any) -> str | None:
    """The address of a cluster's scheduler, None before it has one."""
    try:
        return str(cluster.scheduler.address)
    except Exception:
        return None


def _block_sigint_here() -> None:
    """Block SIGINT in the calling thread, never in the main one (see MeshNanny)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() and \
            hasattr(signal, "pthread_sigmask"):
        if os.name == "posix":
            # multiprocessing's resource tracker, started with the first worker, blocks
            # SIGINT for its own start (as here, for its child) and unblocks it after:
            # started first, it leaves this thread's mask alone
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


#: the HTTP routes of a local mesh's scheduler and workers with its dashboard off:
#: health checks only (Dask's others, served with no login, show any local user the
#: running tasks, their code's call stacks, the logs and the metrics)
HEALTH_ONLY = ["distributed.http.health"]


def _worker_spec(family: str, index: int, site: str, nthreads: int, host: str,
                 memory_limit: Any, security: Any = None,
                 cpus: list[int] | None = None, health_only: bool = False
                 ) -> dict[str, Any]:
    fam = FAMILIES[family]
    env: dict[str, str] = {}
    if family == "gpu":
        env["CUDA_VISIBLE_DEVICES"] = visible_gpu(index)
    if family == "jax_cpu":
        env.update(JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1")
    if family == "tpu":
        # one chip each: a worker that saw every chip would hold them all
        env.update(JAX_PLATFORMS="tpu", JAX_ENABLE_X64="1", **_tpu.worker_env(index))
    return {
        "cls": MeshNanny,
        "options": {
            "nthreads": nthreads,
            "host": host,
            "memory_limit": memory_limit,
            "env": env,
            "dashboard": False,
            "silence_logs": logging.WARNING,
            "plugins": [MeshWorkerPlugin(site=site, kind=fam["kind"], backend=fam["backend"],
                                         cpus=cpus, quiet_failures=True)],
            **_tls_options(security),
            # (the nanny merges only the top level of what it is given into Dask's
            # config: the whole of the "distributed" section, with the routes)
            **({"config": {"distributed": dask.config.merge(
                dask.config.get("distributed"),
                {"worker": {"http": {"routes": HEALTH_ONLY}}})}} if health_only else {}),
        },
    }


def found_accelerators(gpu: int | str, tpu: int | str
                       ) -> tuple[list[Any], list[Any], str | None]:
    """The CUDA GPUs and TPU chips a local mesh of ``gpu`` and ``tpu`` workers (counts
    or "auto", checked) would use, and why there are no TPUs where there are none;
    MeshError where a count asks for more than this host has."""
    gpus = _detect.cuda_devices() if gpu != 0 else []
    if gpu != "auto" and int(gpu) > len(gpus):
        why = _detect.cuda_why_none() if not gpus else f"CuPy sees {len(gpus)}"
        raise MeshError(
            f"no CUDA GPU found for gpu={int(gpu)} ({why}): use gpu=0 "
            f"or 'auto', jax_cpu=N to test the accelerator path on the CPU, or "
            f"connect to a mesh whose workers have GPUs"
        )
    tpus, tpu_why = _tpu.chips() if tpu != 0 else ([], None)
    if tpu != "auto" and int(tpu) > len(tpus):
        why = f" ({tpu_why})" if tpu_why else ""
        raise MeshError(
            f"no TPU found for tpu={int(tpu)} (this host has {len(tpus)} TPU chips"
            f"{why}): use tpu=0 or 'auto', or jax_cpu=N to run the JAX path on the CPU"
        )
    return gpus, tpus, tpu_why


def _spec_name(family: str, index: int) -> str:
    return f"{family.replace('_', '-')}-{index}"


#: held while a mesh closes: Dask's cluster and the mesh's own quieting restore, as
#: they close, the log levels they found, so a mesh started while another closed (from
#: another thread) had Dask's INFO logs in its cell; a start waits for a close under way
_CLOSING = threading.RLock()


def _not_while_a_worker_starts() -> None:
    """A script that starts a mesh at its top level runs again in each worker process
    as it starts (Python's "spawn" re-runs the main module there), and each start there
    failed in 200 lines of multiprocessing's and Dask's tracebacks: the worker process
    says what to do in one line and ends; the script's own start then says that its
    workers did not start."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        print("jupyter_mesh: Mesh.local ran again in a worker process as it started: in "
              "a script, start the mesh under `if __name__ == \"__main__\":`",
              file=sys.stderr, flush=True)
        raise SystemExit(1)


class MeshClient(Client):
    """Dask's client of a mesh: once it is closed, a call that waits through it (a
    ``mesh.submit`` future's ``result()``, ``client.gather``) says that the mesh is
    closed and what to do, where Dask says "IOLoop is closed"."""

    def sync(self, func: Any, *args: Any, asynchronous: Any = None,
             callback_timeout: Any = None, **kwargs: Any) -> Any:
        loop = getattr(self, "loop", None)
        asyncio_loop = getattr(loop, "asyncio_loop", None)
        if self.status == "closed" and asyncio_loop is not None and asyncio_loop.is_closed():
            raise MeshError(
                "the mesh this came from is closed, and what it computed went with it: "
                "start or connect a mesh (%mesh start), then compute or submit again"
            )
        return super().sync(func, *args, asynchronous=asynchronous,
                            callback_timeout=callback_timeout, **kwargs)


class MeshVersionWarning(UserWarning):
    """The scheduler of a mesh runs a jupyter_mesh that speaks another protocol."""


class Mesh:
    """A heterogeneous Dask cluster used from a notebook as one computer.

    Create one with :meth:`Mesh.local` (an embedded mesh on this machine) or
    :meth:`Mesh.connect` (an existing Dask scheduler). The newest mesh becomes the
    process's current mesh (:func:`jupyter_mesh.current`) and its client the default
    Dask client, so plain ``.compute()`` calls run on it.
    """

    def __init__(self, client: Client, cluster: SpecCluster | None = None, *,
                 site: str = "local", options: dict[str, Any] | None = None,
                 set_current: bool = True) -> None:
        self.client = client
        self.cluster = cluster
        self.site = site
        self.options = dict(options or {})
        self.closed = False
        #: how plain Dask calls are routed now (see route_mode)
        self._route_mode: Any = "off"
        self._last_report: Any = None
        self._last_plan: Any = None
        #: the names of the workers ``scale`` took away (and has not started again): a
        #: remote cell that ran on one says so, not that it died
        self._scaled_away: set[str] = set()
        #: lists that each routed computation's report is appended to while they are
        #: here (a %%mesh cell collects the reports of its computations this way)
        self.report_sinks: list[list[Any]] = []
        self._scheduler_plugin = True
        #: the dashboard link the scheduler plugin last gave (where Dask's is no URL)
        self._scheduler_dashboard: str | None = None
        #: (the workers' make-up, Dask's costs measured on them): see calibrate
        self._calibration: tuple[Any, Any] | None = None
        #: what routed computations measured, for later estimates (mesh.router.learn)
        self.history = RunHistory()
        self._address = self.address  # still known once the scheduler is gone
        #: what this mesh changed for its lifetime (the log levels of a local mesh)
        self._quiet = contextlib.ExitStack()
        _quiet_interrupted_gathers()
        shorten_ours_in_dask()
        atexit.register(_close_at_exit, weakref.ref(self))
        if set_current:
            self._make_current()
        else:
            _state.notify("open", self)

    def _make_current(self) -> None:
        """Make this the process's current mesh (the one ``%mesh`` and jm.current() use,
        and the kernel's registration for the sidebar)."""
        _state.set_current(self)
        _state.notify("open", self)

    # ------------------------------------------------------------------ creation
    @classmethod
    @keywords_checked
    def local(
        cls,
        cpu: int = 2,
        gpu: int | str = "auto",
        tpu: int | str = "auto",
        jax_cpu: int = 0,
        site: str = "local",
        *,
        threads_per_worker: int | None = None,
        memory_limit: str | int | float = "auto",
        host: str | None = None,
        replace: bool = False,
        set_current: bool = True,
    ) -> Mesh:
        """Start an embedded mesh: a Dask scheduler and one worker process per device.

        Parameters
        ----------
        cpu:
            Number of CPU worker processes (each one ``cpu`` device, NumPy backend).
        gpu:
            Number of CUDA GPU workers, or ``"auto"``: one per GPU CuPy can use.
        tpu:
            Number of TPU workers, or ``"auto"``: one per TPU JAX can see.
        jax_cpu:
            Number of CPU workers driven by JAX (kind ``cpu``, backend ``jax``).
        site:
            Site label of every worker.
        threads_per_worker:
            Threads per worker; default: the cores shared out among CPU workers.
        memory_limit:
            Per-worker memory limit, as Dask's ``memory_limit``; ``"auto"``: the host's
            memory shared evenly among the mesh's workers, as Dask's LocalCluster
            shares it (a GPU worker, with its one thread, gets as much as a CPU worker;
            a worker added by :meth:`scale` gets its share of the new make-up).
        host:
            Interface to listen on; default ``mesh.local.host`` (127.0.0.1).
        replace:
            Close the current mesh first instead of refusing to start a second one.
        set_current:
            Make this mesh the process's current mesh and its client the default Dask
            client (False for servers that hold several meshes, like the sidebar's).
        """
        _not_while_a_worker_starts()
        check_replace(replace)
        check_flag("set_current", set_current)
        cpu_n = check_local_count("cpu", cpu)
        jax_n = check_local_count("jax_cpu", jax_cpu)
        check_cpu_total(cpu_n, jax_n)
        gpu_req = check_count("gpu", gpu, allow_auto=True)
        tpu_req = check_count("tpu", tpu, allow_auto=True)
        site = check_site(site)
        if threads_per_worker is not None:
            try:
                threads = check_count("threads_per_worker", threads_per_worker)
            except MeshError:
                threads = -1  # (said with the range below)
            if not 1 <= threads <= most_local_workers():
                raise MeshError(f"threads_per_worker must be a whole number from 1 to "
                                f"{most_local_workers()} (four per core here), not "
                                f"{threads_per_worker!r}")
            threads_per_worker = threads  # ("2" and np.int64(2) as 2: Dask takes ints)
        memory_limit = check_memory_limit(memory_limit)
        if host is not None and not _config.is_host(host):
            raise MeshError(f"host must be an interface address like '127.0.0.1', not {host!r}")
        # the mesh.* config the scheduler and workers read, checked before they start
        given = host is not None
        host = host or _config.get_host()
        check_own_host(host, "host" if given else "config mesh.local.host")
        host = bracketed(host)
        dashboard = _config.dashboard_options(host)
        dash_at = dashboard["dashboard_address"]
        dash_host = dash_at[0] if isinstance(dash_at, tuple) else dash_at.rsplit(":", 1)[0]
        if dash_host.strip("[]") != host.strip("[]"):
            # (Dask said only "Cluster failed to start: [Errno 99] Cannot assign ...")
            check_own_host(dash_host, "config mesh.local.dashboard-address: its host")
        security = _local_security() if _config.local_tls() else None
        if security is None and not _loopback(host):
            # (asked for, so not refused; but a worker runs whatever code it is sent)
            warnings.warn(
                f"jupyter_mesh: this mesh will listen on {host} over plain tcp: anyone who "
                f"reaches its ports can run code on its workers as you; set "
                f"mesh.local.tls: true for TLS with certificates, or keep the host "
                f"127.0.0.1", UserWarning, stacklevel=callers_level())
        pin_jax = _config.pin_jax()
        _config.check_sections()
        _profile.check_config()
        _config.warn_unknown_keys()
        # and what the kernel reads from the mesh's first inventory on: a bad one said
        # now, not by the first call after the workers started
        _config.get_seconds("connect-timeout", allow_zero=False)
        _config.get_seconds("fallback-timeout")
        if set_current:
            _refuse_if_active(replace)

        gpus, tpus, tpu_why = found_accelerators(gpu_req, tpu_req)
        if gpu_req == "auto":
            gpu_n = len(gpus)
            if not gpus and _detect.nvidia_driver_present():
                warnings.warn(f"jupyter_mesh: no GPU workers: {_detect.cuda_why_none()}",
                              stacklevel=callers_level())
        else:
            gpu_n = int(gpu_req)
        if tpu_req == "auto":
            tpu_n = len(tpus)
            if tpu_why:
                warnings.warn(f"jupyter_mesh: no TPU workers: {tpu_why}", stacklevel=callers_level())
        else:
            tpu_n = int(tpu_req)
        if jax_n:
            import importlib.util

            if importlib.util.find_spec("jax") is None:
                raise MeshError("jax_cpu needs JAX: pip install 'jupyter_mesh[tpu]'")
        if cpu_n + jax_n + gpu_n + tpu_n == 0:
            raise MeshError("a mesh needs at least one device: use cpu=1 or more")

        # "auto": the host's memory shared evenly, as Dask's LocalCluster shares it (each
        # worker's own "auto" would be its threads' share of the cores: a GPU worker,
        # with one thread, would get a sixteenth of a 16-core host's memory)
        memory_each = worker_memory(memory_limit, cpu_n + jax_n + gpu_n + tpu_n)
        host_cpu_workers = max(cpu_n + jax_n, 1)
        nthreads = threads_per_worker or max(1, _detect.cpu_cores() // host_cpu_workers)
        counts = {"cpu": cpu_n, "jax_cpu": jax_n, "gpu": gpu_n, "tpu": tpu_n}
        pins = jax_cpu_sets(jax_n, cpu_n * nthreads, nthreads, pin_jax)
        workers = {}
        for family, n in counts.items():
            for i in range(n):
                workers[_spec_name(family, i)] = _worker_spec(
                    family, i, site, 1 if family in ("gpu", "tpu") else nthreads, host,
                    memory_each, security, pins[i] if family == "jax_cpu" else None,
                    health_only=not dashboard.get("dashboard", True),
                )
        scheduler = {
            "cls": Scheduler,
            "options": {
                "host": host,
                **dashboard,
                "plugins": [MeshSchedulerPlugin()],
                **_tls_options(security),
            },
        }
        # a mesh closing now (from another thread) finishes first, and one that starts
        # to close meanwhile waits: a close restores the log levels it found; another
        # start waits too, so what is new below is this start's
        _quiet_interrupted_gathers()  # (a start that Ctrl-C stops leaves tasks behind)
        # Dask's logs quiet while this mesh lives, from before its cluster silences them
        # (what it finds then is what comes back once no local mesh is left)
        release = _hold_quiet()
        with _CLOSING:
            before = set(SpecCluster._instances)
            nannies_before = set(MeshNanny.made)
            try:
                routes = ({"distributed.scheduler.http.routes": HEALTH_ONLY}
                          if not dashboard.get("dashboard", True) else {})
                with dask.config.set(routes):  # (read as the scheduler starts)
                    cluster = SpecCluster(
                        workers=workers, scheduler=scheduler, name="jupyter-mesh",
                        silence_logs=logging.WARNING, security=security,
                    )
            except BaseException:
                # interrupted (Ctrl-C) or failed while starting: what it started goes
                # too, the workers still starting with it (only this start's: another
                # mesh may be scaling meanwhile)
                new = set(SpecCluster._instances) - before
                ours = {_scheduler_of(c) for c in new} - {None}

                def mine() -> list[Any]:
                    return [n for n in set(MeshNanny.made) - nannies_before
                            if getattr(n, "scheduler_addr", None) in ours]

                spawned = _spawned(mine())
                for started in new:
                    _keep_quiet(started)
                    with contextlib.suppress(Exception):
                        started.close()
                _kill_left(spawned + _spawned(mine()))
                release()
                raise
        # the scheduler runs in this process (the kernel's) and hooks Python's garbage
        # collector to log long collections; a Ctrl-C that lands in that hook is
        # swallowed ("Exception ignored in ... _gc_callback"), and the interrupted cell
        # runs on to its end: no hook in the kernel
        from distributed.gc import disable_gc_diagnosis

        disable_gc_diagnosis()
        try:
            client = MeshClient(cluster, set_as_default=set_current, security=security)
        except BaseException:
            _keep_quiet(cluster)
            cluster.close()
            release()
            raise
        options = {"cpu": cpu_n, "gpu": gpu_n, "tpu": tpu_n, "jax_cpu": jax_n,
                   "threads_per_worker": nthreads, "host": host, "memory_limit": memory_limit,
                   "dashboard": dashboard.get("dashboard", True), "security": security}
        try:
            mesh = cls(client, cluster, site=site, options=options, set_current=False)
        except BaseException:
            with contextlib.suppress(Exception):
                client.close()
            cluster.close()
            release()
            raise
        mesh._quiet.callback(release)  # (when it closes)
        try:
            mesh._wait_for(len(workers))
        except BaseException:
            _keep_quiet(cluster)
            mesh.close()  # a mesh that did not come up leaves no processes behind
            raise
        # (before it is made current: the kernel's registration reads the link then)
        mesh._read_dashboard()
        if set_current:
            # only now that the new mesh is up: a failure above loses nothing
            try:
                _close_active()
            except Exception as exc:  # e.g. its scheduler gone: the new mesh is up
                warnings.warn(f"jupyter_mesh: the mesh it replaces did not close cleanly "
                              f"({type(exc).__name__}: {exc})", stacklevel=callers_level())
            finally:
                # even after Ctrl-C while the old one closed: the new mesh runs, and
                # nothing may run that %mesh and jm.current() cannot reach
                mesh._make_current()
        return mesh

    @classmethod
    @keywords_checked
    def connect(
        cls,
        address: str,
        security: Any = None,
        timeout: float | None = None,
        *,
        replace: bool = False,
        set_current: bool = True,
    ) -> Mesh:
        """Attach to a running Dask scheduler (``tcp://`` or ``tls://``).

        Parameters
        ----------
        address:
            The scheduler address; ``HOST:PORT`` means ``tcp://HOST:PORT``.
        security:
            A :class:`distributed.security.Security` for ``tls://`` schedulers.
        timeout:
            Seconds to wait for the scheduler to answer; default
            ``mesh.connect-timeout``. A port where the host refuses connections, or a
            host name that does not resolve, fails at once (nothing can answer there).
        """
        check_replace(replace)
        check_flag("set_current", set_current)
        address = check_address(address)
        _config.check_sections()
        _config.warn_unknown_keys()
        if timeout is None:
            timeout = _config.get_seconds("connect-timeout", allow_zero=False)
            if timeout > MAX_CONNECT_TIMEOUT:
                raise MeshConfigError(f"config mesh.connect-timeout must be at most "
                                      f"{MAX_CONNECT_TIMEOUT} s (a day), not {timeout:g}")
        elif (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
              or not math.isfinite(timeout) or timeout <= 0):
            raise MeshError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if timeout > MAX_CONNECT_TIMEOUT:
            raise MeshError(f"timeout must be at most {MAX_CONNECT_TIMEOUT} s (a day), "
                            f"not {timeout:g}")
        if security is not None:
            from distributed.security import Security

            if not isinstance(security, Security):
                raise MeshError(
                    f"security must be a distributed.security.Security, not "
                    f"{type(security).__name__}"
                )
        encrypted = is_encrypted(address)
        if security is not None and not encrypted and not any(
                getattr(security, a, None) for a in _TLS_FIELDS) and not getattr(
                security, "require_encryption", False):
            security = None  # Security() without files: nothing to use on tcp://
        if security is not None:
            if not encrypted:
                raise MeshError(f"{address} is not a TLS address, but TLS files were given: "
                                f"use {_secure_form(address)}, or leave out the TLS files")
            _check_tls_files(security)
        if encrypted and security is None:
            # a mesh of this user's over TLS (mesh.local.tls): its certificate is in
            # this user's private registrations
            from . import discovery

            security = discovery.security_for(address)
        if encrypted and security is None:
            # nothing listening there (a mesh of this user's that closed, with its
            # registration) is said as for tcp://: no certificate would help
            asked = time.monotonic()
            try:
                _check_listening(address, timeout)
            except Exception as exc:
                raise _could_not_connect(address, timeout, exc,
                                         waited=time.monotonic() - asked) from None
            raise MeshError(
                f"{address} uses TLS: give its certificates (%mesh connect {address} "
                f"--tls-ca-file F --tls-cert F --tls-key F; from Python, "
                f"security=Security(tls_ca_file=..., tls_client_cert=..., "
                f"tls_client_key=..., require_encryption=True))"
            )
        if set_current:
            active = _state.active()
            if (replace and active is not None and active.address == address
                    and active._client_up()):
                # replacing would close the very mesh this connects to (one whose
                # scheduler went away is replaced: a scheduler back at that address is
                # connected to, and none there is said as for any address)
                raise MeshError(f"{address} is the current mesh already: keep using it "
                                f"(jm.current()), or %mesh close it first")
            _refuse_if_active(replace)
        asked = time.monotonic()
        try:
            _check_listening(address, timeout)
            ident = _probe_scheduler(address, security, timeout)
        except Exception as exc:
            raise _could_not_connect(address, timeout, exc,
                                     waited=time.monotonic() - asked) from None
        if set_current and replace:
            active = _state.active()
            if active is not None and ident.get("id") is not None and (
                    str(ident["id"]) == _scheduler_id(active)):
                # the same scheduler under another name (localhost for 127.0.0.1):
                # replacing would close the very mesh this connects to
                raise MeshError(f"{address} is the current mesh already (as "
                                f"{active.address}): keep using it (jm.current()), or "
                                f"%mesh close it first")
        try:
            client = MeshClient(
                address, security=security, timeout=timeout, set_as_default=set_current
            )
        except Exception as exc:
            raise _could_not_connect(address, timeout, exc,
                                     waited=time.monotonic() - asked) from None
        if set_current:
            try:
                _close_active()
            except BaseException:
                client.close()  # e.g. Ctrl-C while the old mesh closed: no stray client
                raise
        mesh = cls(client, None, site="remote", set_current=set_current)
        if _dashboard_missing(client):
            mesh.options["dashboard"] = False  # no link to a page that is not there
        try:
            client.register_plugin(MeshSchedulerPlugin(), name=MeshSchedulerPlugin.name)
        except Exception:
            # e.g. a scheduler without jupyter_mesh installed: inventory falls back to
            # scheduler_info, which carries the same worker metadata.
            mesh._scheduler_plugin = False
        else:
            mesh._check_protocol()
        mesh._read_dashboard()
        if client.status != "running":  # the scheduler went away as it connected
            with contextlib.suppress(Exception):
                mesh.close()
            raise MeshError(f"the scheduler at {address} went away as the connection was "
                            f"made: check that it runs, then connect again")
        return mesh

    def _read_dashboard(self) -> None:
        """Where Dask's own dashboard link is no URL (an IPv6 host, which Dask writes
        unbracketed), ask the scheduler plugin for it now: a mesh's link is read by the
        sidebar and the kernel's registration right after it starts."""
        if self.options.get("dashboard") is False or not self._scheduler_plugin:
            return
        try:
            if browser_link(_client_dashboard(self.client)) is not None:
                return
        except Exception:
            pass
        with contextlib.suppress(Exception):
            self.inventory()  # (it keeps the plugin's link)

    def _check_protocol(self) -> None:
        """Warn when the scheduler's jupyter_mesh speaks another protocol than this
        kernel's (a scheduler started by another version keeps its own plugin)."""
        from ._scheduler_plugin import PROTOCOL

        scheduler = self.client.scheduler
        if scheduler is None:
            return
        try:
            info = self._ask_inventory(scheduler, _config.get_seconds(
                "connect-timeout", allow_zero=False))
        except Exception:
            return  # inventory() says what is wrong when it is asked
        theirs = info.get("protocol") if isinstance(info, dict) else None
        if theirs == PROTOCOL:
            return
        from ._version import __version__

        version = info.get("version") if isinstance(info, dict) else None
        warnings.warn(
            f"jupyter_mesh: the scheduler at {self.address} runs "
            f"{'jupyter_mesh ' + str(version) if version else 'an older jupyter_mesh'} "
            f"(protocol {theirs or 1}) and this kernel {__version__} (protocol {PROTOCOL}): "
            f"routed reports and fallback may fail; install the same jupyter_mesh where "
            f"the scheduler runs and restart it", MeshVersionWarning, stacklevel=callers_level())

    # ------------------------------------------------------------------ queries
    @property
    def address(self) -> str:
        scheduler = self.client.scheduler  # None once the client lost its scheduler
        address = scheduler.address if scheduler is not None else None
        return address if address is not None else self._address

    @property
    def dashboard_link(self) -> str | None:
        """The scheduler's dashboard, as a browser can open it: on a JupyterHub (with
        jupyter-server-proxy) a loopback dashboard is given as the hub's proxy path."""
        if self.options.get("dashboard") is False:
            return None  # mesh.local.dashboard-address: null (Dask's HTTP server has none)
        try:
            link = browser_link(_client_dashboard(self.client))
        except Exception:
            link = None
        if link is None and self._scheduler_dashboard:
            # the one the scheduler plugin gave with the last inventory
            link = browser_link(self._scheduler_dashboard)
        return link

    @property
    def owns_cluster(self) -> bool:
        """Whether this mesh started its scheduler and workers (and may scale them)."""
        return self.cluster is not None

    @keywords_checked
    def inventory(self) -> Inventory:
        """The mesh's devices and their load, from the scheduler in one round trip."""
        self._check_open()
        self._check_reachable()
        scheduler = self.client.scheduler  # not None: _check_reachable says so
        if self._scheduler_plugin and scheduler is not None:
            timeout = _config.get_seconds("connect-timeout", allow_zero=False)
            try:
                info = self._ask_inventory(scheduler, timeout)
                self._scheduler_dashboard = info.get("dashboard")
                dashboard = (None if self.options.get("dashboard") is False
                             else self.dashboard_link)
                return Inventory.from_records(info["devices"], info["address"], dashboard)
            except (TimeoutError, asyncio.TimeoutError):
                # a scheduler that stopped answering (overloaded, or its process paused)
                raise MeshError(
                    f"the scheduler at {self.address} did not answer within {timeout:g} s "
                    f"(mesh.connect-timeout): it may be overloaded or stopped; try again, "
                    f"or %mesh close"
                ) from None
            except Exception:
                self._scheduler_plugin = False
        return self._inventory_from_scheduler_info()

    def _ask_inventory(self, scheduler: Any, timeout: float) -> Any:
        """The scheduler plugin's inventory answer, within ``timeout`` seconds."""

        async def ask() -> Any:
            return await asyncio.wait_for(scheduler.jupyter_mesh_inventory(), timeout)

        return self.client.sync(ask)

    def _inventory_from_scheduler_info(self) -> Inventory:
        from ._scheduler_plugin import METADATA_KEY

        info = self.client.scheduler_info(n_workers=-1)
        records = []
        for addr, w in info.get("workers", {}).items():
            meta = w.get(METADATA_KEY) or {
                "kind": "cpu", "backend": "numpy", "model": "unknown (plain Dask worker)",
                "memory": w.get("memory_limit", 0), "site": "unknown", "profile": None,
                "managed": False,
            }
            rec = dict(meta)
            rec.update(worker=addr, name=str(w.get("name", "")), nthreads=w.get("nthreads", 1),
                       tasks=(w.get("metrics") or {}).get("executing", 0),
                       memory_used=(w.get("metrics") or {}).get("memory", 0))
            records.append(rec)
        return Inventory.from_records(records, info.get("address", ""), self.dashboard_link)

    def _wait_for(self, n: int, timeout: float = 60) -> None:
        if not n:
            return
        try:
            self.client.wait_for_workers(n, timeout=timeout)
        except TimeoutError:
            have = len(self.client.scheduler_info(n_workers=-1).get("workers", {}))
            raise MeshError(
                f"only {have} of {n} workers started within {timeout:g} s: this machine may "
                f"be short of memory or cores; ask for fewer workers"
            ) from None

    # ------------------------------------------------------------------ scaling
    @keywords_checked
    def scale(self, **counts: int) -> Inventory:
        """Set the number of local workers per family: ``cpu``, ``jax_cpu``, ``gpu``, ``tpu``.

        Only a mesh started by :meth:`local` can scale.
        """
        self._check_open()
        if not self.owns_cluster:
            raise MeshError(
                "this mesh was connected to, not started here: scale it where it was started"
            )
        unknown = set(counts) - set(FAMILIES)
        if unknown:
            raise MeshError(
                f"cannot scale {', '.join(sorted(unknown))}: use {', '.join(FAMILIES)}"
            )
        if not counts:  # (it did nothing, without a word)
            raise MeshError(f"say how many workers of which kind: mesh.scale(cpu=2), with "
                            f"any of {', '.join(FAMILIES)}")
        checked = {
            fam: check_local_count(fam, n) if fam in ("cpu", "jax_cpu") else
            int(check_count(fam, n))
            for fam, n in counts.items()
        }
        gpus = _detect.cuda_devices()
        if checked.get("gpu", 0) > len(gpus):
            if not gpus:
                raise MeshError(f"no CUDA GPU found for gpu={checked['gpu']} "
                                f"({_detect.cuda_why_none()}): use gpu=0")
            raise MeshError(f"only {len(gpus)} CUDA GPU{'s' * (len(gpus) != 1)} here (as "
                            f"CuPy sees them), not {checked['gpu']}: use gpu={len(gpus)} "
                            f"or fewer")
        if checked.get("tpu", 0):
            tpus, why = _tpu.chips()
            if checked["tpu"] > len(tpus):
                fewer = f"tpu={len(tpus)} or fewer" if tpus else "tpu=0"
                raise MeshError(f"no TPU found for that many tpu workers (this host has "
                                f"{len(tpus)} TPU chips{f': {why}' if why else ''}): "
                                f"use {fewer}")
        if checked.get("jax_cpu", 0):
            import importlib.util

            if importlib.util.find_spec("jax") is None:
                raise MeshError("jax_cpu needs JAX: pip install 'jupyter_mesh[tpu]'")
        _profile.check_config()  # what a new worker reads, before it starts
        assert self.cluster is not None
        self._forget_dead_workers(set(checked))
        spec = self.cluster.worker_spec
        after = {fam: sum(1 for name in spec if _family_of(name) == fam) for fam in FAMILIES}
        after.update(checked)
        if "cpu" in checked or "jax_cpu" in checked:
            check_cpu_total(after["cpu"], after["jax_cpu"])
        if sum(after.values()) == 0:
            raise MeshError("a mesh needs at least one device: keep cpu=1 or more")
        nthreads = self.options.get("threads_per_worker", 1)
        # a new JAX CPU worker is pinned as one of a mesh of this new make-up would be
        pins = jax_cpu_sets(after["jax_cpu"], after["cpu"] * nthreads, nthreads,
                            _config.pin_jax())
        # Ctrl-C waits for the change to be whole (stopped half-way, the spec, the
        # options and the workers that run disagreed, and new workers went on starting
        # outside the spec), then stops the cell
        with _interrupt_after("scaling the mesh"):
            before = {fam: self.options.get(fam, 0) for fam in checked}
            added: list[str] = []
            for fam, want in checked.items():
                names = sorted((n for n in spec if _family_of(n) == fam), key=_index_of)
                for name in names[want:]:
                    del spec[name]
                    self._scaled_away.add(name)
                used = {_index_of(n) for n in names[:want]}
                i = 0
                while sum(1 for n in spec if _family_of(n) == fam) < want:
                    if i not in used:
                        added.append(_spec_name(fam, i))
                        self._scaled_away.discard(_spec_name(fam, i))
                        spec[_spec_name(fam, i)] = _worker_spec(
                            fam, i, self.site, 1 if fam in ("gpu", "tpu") else nthreads,
                            self.options.get("host", "127.0.0.1"),
                            worker_memory(self.options.get("memory_limit", "auto"),
                                          sum(after.values())),
                            self.options.get("security"),
                            pins[i % len(pins)] if fam == "jax_cpu" and pins else None,
                            health_only=not self.options.get("dashboard", True),
                        )
                    i += 1
                self.options[fam] = want
            try:
                self.cluster.sync(self.cluster._correct_state)
            except Exception as exc:
                # the new workers did not start (a bad preload, no memory...): the mesh
                # keeps those it had, and says so in one line
                self._drop_unstarted(added)
                self.options.update(before)
                why = (str(exc).strip().splitlines() or [""])[0]
                n = len(self.cluster.workers)
                raise MeshError(
                    f"the new workers did not start ({type(exc).__name__}: {why}); the mesh "
                    f"keeps its {n} worker{'s' * (n != 1)}: the log of this process (or the "
                    f"terminal that runs Jupyter) has the workers' own messages") from None
            # a dead worker of a kind not scaled stays in the spec: nothing waits for it
            self._wait_for(len(spec) - len(self._dead_workers()))
            if self.options.get("memory_limit", "auto") == "auto":
                # the host's memory over the mesh's workers, for those it had too (each
                # kept its share of the smaller mesh: together more than the host has, and
                # Dask's spilling and pausing no longer kept the host from running out)
                share = worker_memory("auto", sum(after.values()))
                for worker in spec.values():
                    worker.setdefault("options", {})["memory_limit"] = share  # (restarts)
                self._share_memory(int(share))
        remote = self.__dict__.get("_remote")
        if remote is not None:
            # a kind scaled away is gone on purpose: a remote cell asking for it fails
            # at once, without waiting for it to come back as after a restart (a kind
            # still here is waited for: its worker may be restarting)
            remote.forget_kinds_but(
                [(FAMILIES[f]["kind"], FAMILIES[f]["backend"]) for f, n in after.items()
                 if n > 0])
        inventory = self.inventory()
        self._warn_if_route_stranded(inventory)
        return inventory

    def _drop_unstarted(self, names: list[str]) -> None:
        """Take the workers ``names`` that did not start out of the cluster's spec (and
        close what is left of them), so that nothing tries to start them again."""
        assert self.cluster is not None
        for name in names:
            self.cluster.worker_spec.pop(name, None)
            worker = self.cluster.workers.pop(name, None)
            if worker is not None:
                with contextlib.suppress(Exception):
                    self.cluster.sync(worker.close)

    def _share_memory(self, limit: int) -> None:
        """Give every running worker of this local mesh the memory limit ``limit``, in
        the worker, its nanny and the scheduler's view (and the inventory's, for CPU
        workers: a device worker's memory is its device's)."""
        assert self.cluster is not None
        # only the mesh's own: a worker that joined from outside (jupyter-mesh worker,
        # another machine's) keeps the limit it was given
        ours = [a for a in (getattr(w, "worker_address", None)
                            for w in list(self.cluster.workers.values())) if a]
        if not ours:
            return
        try:
            self.client.run(_set_memory_limit, limit=limit, workers=ours)
            self.client.run(_set_memory_limit, limit=limit, nanny=True, workers=ours)
            self.client.run_on_scheduler(_set_scheduler_memory_limits, limit=limit,
                                         addresses=ours)
        except Exception:  # a worker that went meanwhile keeps nothing to fix
            logging.getLogger(__name__).debug("sharing memory after a scale", exc_info=True)

    def _warn_if_route_stranded(self, inventory: Inventory) -> None:
        """Warn where the route in force for this mesh (``%mesh route cpu:jax``, a
        ``with mesh.route(...)`` block) names a target none of its workers has any
        more: every plain Dask call would then fail until it changes."""
        from .router import api
        from .targets import Target

        for where, held in (("the kernel's route", api.ROUTES.kernel),
                            ("the route of the block in force",
                             api.ROUTES.blocks[-1] if api.ROUTES.blocks else None)):
            if held is None or held.mesh is not self or not isinstance(held.route, Target):
                continue
            route = held.route
            if not any(route.matches(d.kind, d.backend) for d in inventory):
                warnings.warn(
                    f"jupyter_mesh: {where} is {route}, and the mesh has no {route} worker "
                    f"now: plain Dask calls will fail until you scale it back or change the "
                    f"route (%mesh route auto)", UserWarning, stacklevel=callers_level())

    def _dead_workers(self) -> list[str]:
        """The names in the cluster's spec of workers whose nanny has stopped (its
        worker died and nothing restarts it)."""
        from distributed.core import Status

        assert self.cluster is not None
        gone = (Status.closing, Status.closed, Status.closing_gracefully, Status.failed)
        return [name for name, w in list(self.cluster.workers.items())
                if name in self.cluster.worker_spec and getattr(w, "status", None) in gone]

    def _live_counts(self) -> dict[str, int]:
        """Per family (``cpu``, ``jax_cpu``, ``gpu``, ``tpu``), the workers of this
        local mesh that run or are being restarted: those asked for, less those whose
        nanny stopped (what a scale counts, see ``_forget_dead_workers``)."""
        counts = {fam: int(self.options.get(fam, 0) or 0) for fam in FAMILIES}
        if self.cluster is not None and not self.closed:
            with contextlib.suppress(Exception):
                for name in self._dead_workers():
                    fam = _family_of(name)
                    if fam in counts:
                        counts[fam] = max(0, counts[fam] - 1)
        return counts

    def _forget_dead_workers(self, families: set[str]) -> None:
        """Take the dead workers of ``families`` (see ``_dead_workers``) out of the
        cluster's spec, so that scaling them counts only live workers and starts new
        ones in their place (they would otherwise stay in the spec, counted, and a scale
        to the same number would start nothing). Kinds not being scaled keep their spec
        as it is."""
        assert self.cluster is not None
        dead = [n for n in self._dead_workers() if _family_of(n) in families]
        if not dead:
            return
        for name in dead:
            del self.cluster.worker_spec[name]
        # their names are free again once the cluster has let them go
        self.cluster.sync(self.cluster._correct_state)

    # ------------------------------------------------------------------ calibration
    @property
    def calibration(self) -> Any:
        """Dask's own costs measured on this mesh (a ``Calibration``), or None before
        the first routed plan measured them (or with both figures set in config)."""
        return self._calibration[1] if self._calibration else None

    def forget_history(self) -> None:
        """Forget the task times earlier routed computations measured: later plans go by
        the devices' profiles alone until new computations measure again (see
        ``mesh.router.learn``)."""
        self.history.forget()

    @keywords_checked
    def calibrate(self) -> Any:
        """Measure now what Dask itself costs on this mesh: seconds of dispatch per task,
        from a task's end to the start of one waiting for it, and more per transfer
        between two workers of one site, with the bytes per second between them (a probe
        of about a second on a small mesh).

        The router's cost model uses these where ``mesh.task-overhead``,
        ``mesh.dependency-latency``, ``mesh.links.network-latency`` or
        ``mesh.links.network-bandwidth`` is ``auto`` (the default). It measures once on
        its own, at the first routed plan, and again when the mesh's workers change;
        call this after the machine's load changed a lot.
        """
        self._check_open()
        return self._measure(list(self.inventory()))

    def _measure(self, devices: list[Any]) -> Any:
        from .router.calibrate import measure
        from .router.cost import network_bandwidth_auto

        # the bandwidth probe only where the figure is to be measured
        try:
            cal = measure(self.client, devices, bandwidth=network_bandwidth_auto())
        except BaseException as exc:
            from .router.api import _say_why

            _say_why(self, exc)  # closed from another thread meanwhile: one line
            raise
        self._calibration = (_make_up(devices), cal)
        return cal

    def _calibration_for(self, devices: list[Any]) -> Any:
        """The calibration of these workers: the one measured, while the mesh's make-up
        (workers per site, kind and threads) is the same, else measured now (None: it
        failed for this make-up before; MeshError: it fails now)."""
        make_up = _make_up(devices)
        if self._calibration is not None and self._calibration[0] == make_up:
            # None: the probe failed on these workers; it is not tried before each plan
            return self._calibration[1]
        try:
            return self._measure(devices)
        except MeshError:
            self._calibration = (make_up, None)
            raise

    # ------------------------------------------------------------------ lifetime
    @keywords_checked
    def close(self) -> None:
        """Close the client and, for a local mesh, its scheduler and workers."""
        if self.closed:
            return
        # routes to this mesh (a %mesh route, a block it closes inside) end with it, before
        # its client goes: plain Dask calls must not go on routing to a closed mesh
        api = sys.modules.get("jupyter_mesh.router.api")  # nothing routed if not loaded
        if api is not None:
            api.forget_routes(self)
        self._close_remote_cells()
        if self.cluster is not None:
            self._forget_routes()
        self.closed = True
        with _CLOSING:
            self._close_now()

    def _close_now(self) -> None:
        """Close the client and cluster; say that the mesh closed."""
        try:
            if getattr(self.client, "status", "running") == "running":
                self._cancel_pending()
                self.client.close()
            else:
                # its scheduler went away: Dask's client, still trying to reconnect,
                # logs its cancelled attempt as an ERROR with two tracebacks
                with _silenced("distributed.client"):
                    self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()
            self._quiet.close()
            _no_stale_distributed_scheduler()
            if _state._current is self:
                _state.set_current(None)
            _state.notify("close", self)

    def _cancel_pending(self) -> None:
        """Cancel what is still computing with a reason that says so: a plain Dask
        ``.compute()`` or a ``mesh.submit`` future waited on in another thread (or cell,
        when the sidebar stops the mesh) otherwise fails with Dask's "cancelled for
        reason: unknown". On this client only: closing it releases the work on the
        scheduler, and Dask's own cancel of a persisted key that a pending computation
        reads failed there with an AssertionError (the dependents that no client
        wants), whose tracebacks a local mesh's scheduler printed in the notebook."""
        client = self.client
        pending = [state for state in list(client.futures.values()) if not state.done()]
        if not pending:
            return

        async def cancel() -> None:  # on the client's event loop, which waits on them
            for state in pending:
                state.cancel(reason="the mesh was closed",
                             msg="Start or connect a mesh (%mesh start), then compute again.")

        try:
            client.sync(cancel)
        except Exception:  # a mesh must close even when its client does not answer
            logging.getLogger(__name__).debug("could not cancel pending work", exc_info=True)

    def _forget_routes(self) -> None:
        """Tell the scheduler to drop this mesh's routed computations before its workers
        go, so closing announces no fallback for results still held."""
        import asyncio

        from .router._scheduler import FORGET_HANDLER

        scheduler = self.client.scheduler
        if scheduler is None:
            return

        async def forget() -> Any:
            return await asyncio.wait_for(getattr(scheduler, FORGET_HANDLER)(), 2.0)

        try:
            self.client.sync(forget)
        except Exception:  # a mesh must close even when its scheduler does not answer
            logging.getLogger(__name__).debug(
                "the scheduler did not forget routed work", exc_info=True)

    def _check_open(self) -> None:
        if self.closed:
            raise MeshError("this mesh is closed: start a new one with %mesh start")

    def _client_up(self) -> bool:
        """Whether Dask's client still holds its scheduler (see _check_reachable)."""
        return (getattr(self.client, "status", "running") == "running"
                and self.client.scheduler is not None)

    def _check_reachable(self) -> None:
        """A scheduler that went away is said at once (Dask's client would otherwise
        wait to reconnect, and its cached view shows no workers)."""
        status = getattr(self.client, "status", "running")
        if status != "running" or self.client.scheduler is None:
            self._check_open()  # (closed meanwhile, from another thread: said as such)
            raise MeshError(
                f"the scheduler at {self.address} is not reachable (Dask's client is "
                f"{status}): run %mesh close, then %mesh start or %mesh connect ADDRESS"
            )

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ display
    def __repr__(self) -> str:
        if self.closed:
            return "<Mesh (closed)>"
        try:
            inv = self.inventory()
            return f"<Mesh {self.address}: {plural(len(inv), 'device')} ({inv.summary()})>"
        except Exception:
            return f"<Mesh {self.address}>"

    def _repr_html_(self) -> str:
        if self.closed:
            return "<b>Mesh</b> (closed)"
        e = html.escape
        try:
            inv = self.inventory()
        except Exception as exc:  # its scheduler gone: what is known, and why no more
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return (f"<b>Mesh</b> <code>{e(str(self.address))}</code>: "
                    f"<span style='{colour_style(ERROR_COLOUR)}'>{e(why)}</span>")
        groups = "".join(
            f"<li>{len(devs)} &times; <b>{e(kind)}</b> @ {e(site)}: "
            f"{e(', '.join(sorted({d.model for d in devs})))} "
            f"({format_bytes(sum(d.memory for d in devs))})</li>"
            for (kind, site), devs in inv.groups().items()
        )
        link = self.dashboard_link
        dash = f" &middot; <a href='{e(link)}' target='_blank' rel='noopener noreferrer'>dashboard</a>" if link else ""
        cal = self.calibration
        costs = f"<div>{e(repr(cal))}</div>" if cal is not None else ""
        return (
            f"<div class='jupyter-mesh'><b>Mesh</b> <code>{e(self.address)}</code>: "
            f"{plural(len(inv), 'device')}{dash}<ul>{groups}</ul>{costs}</div>"
        )

    # ------------------------------------------------------------------ remote cells
    @keywords_checked
    def run_cell(
        self,
        code: str,
        on: str | None = None,
        site: str | None = None,
        all: bool = False,
        push: dict[str, Any] | None = None,
        pull: Any = None,
        timeout: float | None = None,
        *,
        value: bool = False,
        filename: str | None = None,
        first_line: int = 1,
    ) -> Any:
        """Run Python source on a worker, in this notebook's namespace there.

        Later calls with the same ``on``/``site`` go to the same worker while it lives;
        its namespace persists between calls. Output (``print``, ``display()``) streams
        into the calling cell while the code runs. Ctrl-C (a kernel interrupt) stops
        the remote code and leaves the worker usable.

        Parameters
        ----------
        code:
            Python source; it must compile (checked before anything is sent).
        on:
            Target of the worker: ``cpu``, ``gpu``, ``tpu``, ``cpu:jax``, ...
        site:
            Site of the worker.
        all:
            Run on every matching worker; returns one result per worker.
        push:
            Names and values to define in the remote namespace first.
        pull:
            Names (a list, or ``"a,b"``) whose values come back in ``result.pulled``.
        timeout:
            Seconds after which the remote code is stopped.
        value:
            Bring back the last expression's value itself as ``result.value``.
        filename:
            The name tracebacks show for the cell.
        first_line:
            The number tracebacks give the code's first line (a ``%%mesh`` cell's
            code begins on the notebook cell's line 2).

        Returns
        -------
        CellResult, or a list of them with ``all=True``.

        Raises
        ------
        RemoteCellError
            The code raised on a worker (or ran past ``timeout``); it renders the
            remote traceback with the worker and its kind.
        CellSyntaxError
            The code does not compile (a MeshError; nothing was sent).
        MeshError
            Misuse: an unknown target or site, a bad timeout, a value that cannot be
            sent, a pulled name the worker does not have.
        """
        return self._remote_cells().run(
            code, on=on, site=site, all=all, push=push, pull=pull, timeout=timeout,
            want_value=value, filename=filename, first_line=first_line,
        )

    @keywords_checked
    def reset_remote(self) -> list[str]:
        """Drop this notebook's remote namespaces; return the workers that had one."""
        remote = self._remote_cells()
        # a scheduler that is gone: said, as every other call says it (it said "No remote
        # namespaces to reset" after waiting for workers it could not reach)
        self._check_reachable()
        return remote.reset()["workers"]

    def _remote_cells(self) -> Any:
        self._check_open()
        remote = self.__dict__.get("_remote")
        if remote is None:
            from .remote import RemoteCells

            remote = self.__dict__["_remote"] = RemoteCells(self)
        return remote

    def _close_remote_cells(self) -> None:
        # A local mesh's workers end with it; a connected mesh's workers outlive this
        # notebook, so drop its namespaces there.
        remote = self.__dict__.get("_remote")
        if remote is not None and self.cluster is None:
            try:
                remote.reset()
            except Exception:
                pass

    # ================================================================== notebook display
    # ipywidgets panel (jupyter_mesh/widgets.py); progress bars live in progress.py.
    @keywords_checked
    def widget(self, refresh: float = 2.0) -> Any:
        """An ipywidgets panel: devices by kind and site, refreshed every ``refresh``
        seconds (0: never) until it or the mesh closes; scale controls for a local mesh;
        a route selector that routes plain Dask calls as ``%mesh route`` does."""
        from .widgets import MeshPanel

        self._check_open()
        self._check_reachable()  # (it showed a panel of no workers)
        return MeshPanel(self, refresh=refresh)
    # ================================================================== end notebook display

    # ================================================================== routing
    # The device-aware router (jupyter_mesh/router). Keep this section last in the class.
    @keywords_checked
    def explain(self, *collections: Any, route: Any = "auto", site: str | None = None,
                pin: dict[str, Any] | None = None) -> Any:
        """The router's :class:`~jupyter_mesh.router.Plan` for Dask collections.

        Parameters
        ----------
        *collections:
            Dask collections (arrays, delayed, ...).
        route:
            ``"auto"`` (the router chooses per op), ``"off"``, or a target such as
            ``"gpu"`` or ``"cpu:jax"``.
        site:
            Keep every task at this site (data residency).
        pin:
            ``{site: collection or list of collections}``: pin the data of inputs to
            sites, as in
            :meth:`compute`.
        """
        from .router import api

        self._check_open()
        return api.explain(self, collections, route, site, pin)

    def compute(self, *collections: Any, route: Any = "auto", fallback: bool = True,
                site: str | None = None, pin: dict[str, Any] | None = None,
                **dask_options: Any) -> tuple[Any, ...]:
        """Compute Dask collections with each op routed to a device kind.

        Returns a tuple of results, as :func:`dask.compute` does, and leaves a
        :class:`~jupyter_mesh.router.Report` in :attr:`last_report` (``route="off"``
        routes nothing and leaves None there; a computation that fails while it runs
        leaves its plan in :attr:`last_plan` and None in :attr:`last_report`; one refused
        before anything runs, in one line (bad input, a target or site the mesh lacks),
        leaves both as they were, as every bad input leaves what was there). With ``fallback``
        (the default), tasks of a device kind lost mid-computation are re-routed to what
        is left after ``mesh.fallback-timeout`` seconds, with a warning; with
        ``fallback=False`` the computation fails with :class:`MeshError` instead.

        ``site="edge-lab"`` keeps every task at that site. ``pin={"edge-lab": x}``
        (or ``{"edge-lab": [x, w]}``) pins the data of input ``x`` (a Dask collection
        the computation reads) to a site:
        the tasks that produce ``x`` and every task that reads them run there, so that
        data never leaves the site, not even when a fallback re-routes (the
        computation fails rather than move it); only the results you ask for come
        back to you. ``mesh.compute(y, pin={"edge-lab": x})``.
        """
        from .router import api

        if dask_options:  # dask.compute's own (optimize_graph=, retries=...), or a typo
            raise api.dask_options_refused("mesh.compute", dask_options,
                                           ("route", "fallback", "site", "pin"))
        self._check_open()
        from dask.utils import shorten_traceback

        # a task's error shows the user's call and the user's function, not the
        # router's frames between them, nor Dask's, nor this one (Dask's shortening
        # first, which keeps the first frame, this one; then ours, which drops it)
        with shorten_ours(drop_first=True), shorten_traceback():
            return api.compute(self, collections, route, fallback, site, pin)

    @property
    def last_plan(self) -> Any:
        """The :class:`~jupyter_mesh.router.Plan` of the routed computation that started
        last, or of the last :meth:`explain` (None before any). With several threads
        computing at once, take a report's own plan as ``report.plan``."""
        return self._last_plan

    @last_plan.setter
    def last_plan(self, plan: Any) -> None:
        self._last_plan = plan

    @property
    def last_report(self) -> Any:
        """The :class:`~jupyter_mesh.router.Report` of the routed computation that
        finished last: per operation, the workers and backends that ran it and the
        measured seconds, next to the plan (None before any)."""
        return self._last_report

    @last_report.setter
    def last_report(self, report: Any) -> None:
        self._last_report = report

    @property
    def route_mode(self) -> Any:
        """How plain Dask calls of this kernel are routed now: ``"off"``, or the route
        of ``%mesh route`` or of the innermost ``with mesh.route(...)`` block."""
        return self._route_mode

    @route_mode.setter
    def route_mode(self, value: Any) -> None:
        raise MeshError("route_mode only says how plain Dask calls are routed: set it with "
                        f"%mesh route {value if isinstance(value, str) else 'TARGET'}, or "
                        f"route a block with `with mesh.route(...):`")

    @keywords_checked
    def route(self, mode: Any = "auto", *, fallback: bool = True) -> Any:
        """Context manager: plain ``.compute()`` calls inside the block are routed.

        ``with mesh.route("auto"): y.compute()``. Inside the block Dask's array
        fusion is off (it would merge ops placed on different kinds).
        """
        from .router import api

        self._check_open()
        return api.route_context(self, mode, fallback)

    def submit(self, fn: Any, /, *args: Any, on: Any = None, needs: Any = None,
               site: str | None = None, convert: bool = True, pure: bool = True,
               **kwargs: Any) -> Any:
        """Submit ``fn(*args, **kwargs)`` to a device: ``on=`` a target (``"gpu"``,
        ``"cpu:jax"``), or ``needs=`` a capability (``"matmul"``, ``"fft"``,
        ``"elementwise"``, ``"reduction"``, ``"linalg"``) for which the mesh picks the
        fastest target; ``site=`` keeps it at a site. With ``convert=True`` (the
        default) array arguments are moved to the backend of the worker it runs on
        (CuPy on a GPU, JAX on a TPU) and array results come back as NumPy arrays;
        ``convert=False`` passes everything as it is. ``pure=True`` (the default, as
        Dask's ``client.submit``): the same call while its result is still held gives
        that result again; ``pure=False`` for a function that gives something new each
        time (random numbers, the time). Returns a Future."""
        from .router import api

        self._check_open()
        return api.submit(self, fn, args, on, needs, site, kwargs, convert, pure)
    # ================================================================== end routing


def _client_dashboard(client: Any) -> str | None:
    """The dashboard link of ``client``'s scheduler, from what the scheduler said when
    the client connected: no round trip (Dask's own ``client.dashboard_link`` asks the
    scheduler again, and waits out the connect timeout where it has gone)."""
    from distributed.comm import get_address_host
    from distributed.utils import format_dashboard_link

    cluster = getattr(client, "cluster", None)
    if cluster is not None:
        link = str(cluster.dashboard_link)
        server = getattr(getattr(cluster, "scheduler", None), "http_server", None)
        if link and server is not None:
            # Dask's link names the scheduler's host; a mesh listening on another
            # interface (host="0.0.0.0" for remote workers) keeps its dashboard where
            # mesh.local.dashboard-address says (127.0.0.1), where that link is dead:
            # the host it listens on, in Dask's template (distributed.dashboard.link)
            from ._scheduler_plugin import listening_host

            bound = listening_host(server)
            if bound:
                host = f"[{bound}]" if ":" in bound else bound
                return str(format_dashboard_link(host, server.port))
        return link
    ident = getattr(client, "_scheduler_identity", None) or {}
    port = (ident.get("services") or {}).get("dashboard")
    scheduler = getattr(client, "scheduler", None)
    address = getattr(scheduler, "address", None) or ident.get("address")
    if port is None or not address:
        return None
    host = get_address_host(address)
    if ":" in host:  # IPv6: bracketed in a URL (Dask writes it bare: no URL)
        host = f"[{host}]"
    return str(format_dashboard_link(host, port))


async def _identity(address: str, security: Any, timeout: float, role: str = "client"
                    ) -> dict[str, Any]:
    from distributed.comm import connect
    from distributed.security import Security

    args = (security or Security()).get_connection_args(role)
    try:
        comm = await connect(address, timeout=timeout, **args)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()
    except (OSError, asyncio.TimeoutError, asyncio.CancelledError):
        raise
    except Exception as exc:
        # bytes that are no Dask message (an SSH or HTTP server, in the handshake or
        # the answer): Dask's reader fails on them in its own ways ("Unable to
        # allocate 2.82 EiB ...", the length it read from "SSH-2.0-"); kept as the
        # cause, for _could_not_connect to find a TLS error under it
        raise OSError("this is not a Dask scheduler (it answered in another "
                      "protocol)") from exc


#: the longest ``Mesh.connect`` waits (longer ones overflow the event loop's clock)
MAX_CONNECT_TIMEOUT = 86400


class _Unreachable(OSError):
    """Nothing can answer at an address: known at once, without waiting."""


def _check_listening(address: str, timeout: float) -> None:
    """Fail at once where nothing can answer at ``address``: a host name that does not
    resolve, or a port where the host refuses connections (Dask's own connect retries
    those until its timeout). A host that does not answer at all is left to the probe,
    which waits for it."""
    import socket

    scheme, loc = parse_address(address)
    if scheme not in ("tcp", "tls", "ws", "wss"):
        return
    host, port = parse_host_port(loc)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise _Unreachable(f"host {host!r} not found: {exc.strerror or exc}") from None
    refused = None
    for family, kind, proto, _, where in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(min(timeout, 2.0))
            try:
                sock.connect(where)
                return
            except ConnectionRefusedError as exc:
                refused = exc
            except OSError:
                return  # unreachable or slow: the probe waits for it
    if refused is not None:
        raise _Unreachable(f"connection refused: nothing listens on port {port} of {host}")


#: the TLS files a distributed.security.Security may hold for a client
_TLS_FIELDS = ("tls_ca_file", "tls_client_cert", "tls_client_key")
#: what an error says where the TLS handshake failed (the certificates do not fit)
_TLS_WORDS = ("certificate", "ssl", "tlsv1", "handshake", "decrypt_error", "unknown_ca")


def _ssl_cause(exc: BaseException) -> Any:
    """The :class:`ssl.SSLError` in ``exc``'s chain of causes, if there is one (Dask
    wraps it in a comm error whose text says nothing of it)."""
    import ssl

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def _plain_speaker(exc: BaseException) -> str | None:
    """What in ``exc``'s chain says the peer spoke plain tcp to a TLS client: OpenSSL's
    wrong version number (it read Dask's bytes as a TLS record), or Tornado refusing to
    start TLS on a stream the peer already wrote to (a Dask server speaks first)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = str(cur)
        if "WRONG_VERSION_NUMBER" in text.upper() or "cannot convert to SSL" in text:
            return (text.splitlines() or [type(cur).__name__])[0]
        cur = cur.__cause__ or cur.__context__
    return None


def _speaks_tls(address: str, timeout: float = 2.0) -> bool:
    """Whether the server at ``address`` answers a TLS handshake (verifying nothing:
    only whether it speaks TLS at all). A Dask scheduler with TLS resets a connection
    that speaks plain tcp to it, which says nothing of why."""
    import socket
    import ssl

    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw:
            with ctx.wrap_socket(raw):
                return True
    except ssl.SSLError as exc:
        # it answered in TLS, and refused this side (no certificate of its own, say)
        return "ALERT" in str(getattr(exc, "reason", "") or "").upper()
    except (OSError, ValueError):
        return False


def _plain_form(address: str) -> str:
    return "tcp://" + address.split("://", 1)[-1]


def _loopback(host: str) -> bool:
    """Whether ``host`` (a name or address, maybe in brackets) is this machine's
    loopback: reachable from this machine alone."""
    import ipaddress

    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # a host name: where it points is not loopback, as a rule
        return False


def _could_not_connect(address: str, timeout: float, exc: Exception,
                       waited: float | None = None) -> MeshError:
    """``waited``: seconds it tried; "within the timeout" only where it waited that
    long (a connection reset at once, by a TLS scheduler spoken to in plain tcp, say,
    did not wait)."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    # Dask prefixes a comm's error with the comm: "in <TCP (closed) local=... remote=
    # ...>: ConnectionResetError: ..." (the address is said already)
    reason = re.sub(r"^in <[^>]*>: ", "", reason)
    tls = _ssl_cause(exc)
    plain = _plain_speaker(exc)
    if plain is not None:
        return MeshError(
            f"{address} does not answer in TLS ({plain}): the scheduler there listens "
            f"in plain tcp, as far as this can tell; use {_plain_form(address)}, or "
            f"start the scheduler with TLS")
    if tls is not None:
        said = str(getattr(tls, "verify_message", "") or getattr(tls, "reason", "") or tls)
        if "expired" in said.lower() or "not yet valid" in said.lower():
            return MeshError(
                f"the TLS handshake with {address} failed ({said}): a certificate is out "
                f"of its validity dates; renew it (and check this machine's clock)")
        reason = said or reason
    if is_encrypted(address) and (tls is not None or any(
            w in reason.lower() for w in _TLS_WORDS)):
        return MeshError(
            f"the TLS handshake with {address} failed ({reason}): the certificates do "
            f"not fit; check that the CA file is the one that signed the scheduler's "
            f"certificate, and that your certificate and key come from a CA the "
            f"scheduler trusts"
        )
    if (tls is None and not is_encrypted(address) and any(
            w in reason.lower() for w in ("reset by peer", "stream is closed", "eof"))
            and _speaks_tls(address)):
        return MeshError(
            f"{address} does not answer in plain tcp ({reason}): the scheduler there "
            f"speaks TLS, as far as this can tell; use {_secure_form(address)} with its "
            f"CA file and your certificate and key (--tls-ca-file, --tls-cert, "
            f"--tls-key; from Python, security=Security(...))")
    within = "" if isinstance(exc, _Unreachable) or (
        waited is not None and waited < 0.9 * timeout) else f" within {timeout:g} s"
    # (a timeout shorter than a connection takes is said first: a scheduler does listen)
    longer = "give it longer (timeout=, --timeout), or " if within and timeout < 1 else ""
    return MeshError(
        f"could not connect to {address}{within} ({reason}): {longer}check that a "
        f"Dask scheduler listens there and the protocol (tcp/tls) is right"
    )


def _known_scheduler_id(mesh: Any) -> str | None:
    """The id of the scheduler ``mesh`` is connected to, as its client learnt it when it
    connected, whatever name its address gives the host; None where unknown (never a
    call to the scheduler: the server runs this on its event loop)."""
    ident = getattr(getattr(mesh, "client", None), "_scheduler_identity", None)
    sid = ident.get("id") if isinstance(ident, dict) else None
    return None if sid is None else str(sid)


def _scheduler_id(mesh: Any) -> str | None:
    """:func:`_known_scheduler_id`, else asked of the scheduler; None where unknown."""
    sid = _known_scheduler_id(mesh)
    if sid is None:
        try:
            sid = mesh.client.scheduler_info(n_workers=0).get("id")
        except Exception:
            return None
    return None if sid is None else str(sid)


def _probe_scheduler(address: str, security: Any, timeout: float) -> dict[str, Any]:
    """Ask ``address`` who it is, never waiting longer than ``timeout``.

    ``Client`` itself can wait forever on a port that accepts connections but never
    speaks Dask; this probe gives up in time and says what it found.
    """
    import asyncio
    import concurrent.futures

    async def probe() -> dict[str, Any]:
        return await asyncio.wait_for(_identity(address, security, timeout), timeout)

    future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(asyncio.run(probe()))
        except BaseException as exc:
            future.set_exception(exc)

    # a daemon thread of its own: Ctrl-C stops the wait at once (an executor's exit
    # would wait for the probe's own timeout), and the probe gives up by itself
    threading.Thread(target=run, name="jupyter-mesh-probe", daemon=True).start()
    # waited for in short steps: an interrupt that is not a real signal (a kernel's
    # interrupt_main) is seen between them
    deadline = time.monotonic() + timeout + 5
    while True:
        try:
            ident = future.result(0.1)
            break
        except (concurrent.futures.TimeoutError, asyncio.TimeoutError):
            # (one class since Python 3.11): the probe's own timeout, or still waiting
            if future.done() or time.monotonic() > deadline:
                raise OSError(f"no Dask scheduler answered within {timeout:g} s") from None
    return _a_scheduler(ident)


def _a_scheduler(ident: Any) -> dict[str, Any]:
    """``ident``, an answer to Dask's ``identity`` request, if a scheduler gave it; else
    an OSError that says what answered."""
    if not isinstance(ident, dict) or ident.get("type") != "Scheduler":
        found = ident.get("type") if isinstance(ident, dict) else type(ident).__name__
        raise OSError(f"this is not a Dask scheduler (it answered as {found})")
    return ident


def _make_up(devices: list[Any]) -> tuple[tuple[tuple[str, str, int], int], ...]:
    """How many workers of each (site, target, threads) a mesh has."""
    counts = collections.Counter((d.site, d.target, int(d.nthreads)) for d in devices)
    return tuple(sorted(counts.items()))


@contextlib.contextmanager
def _interrupt_after(what: str) -> Any:
    """Inside, Ctrl-C (SIGINT, in the main thread) is held until the block ends, then
    raised: for changes that must not stop half-way. Elsewhere, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    asked: list[bool] = []

    def hold(signum: int, frame: Any) -> None:
        if not asked:
            print(f"jupyter_mesh: {what}; it stops once that is done", file=sys.stderr,
                  flush=True)
        asked.append(True)

    try:
        previous = signal.signal(signal.SIGINT, hold)
    except ValueError:  # (no signals here after all)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if asked:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _silenced(name: str) -> Any:
    """Nothing from logger ``name`` while inside."""
    logger = logging.getLogger(name)
    before = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = before


def _family_of(name: str) -> str:
    return name.rsplit("-", 1)[0].replace("-", "_")


def _index_of(name: str) -> int:
    try:
        return int(name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def _refuse_if_active(replace: bool) -> None:
    check_replace(replace)
    existing = _state.active()
    if existing is not None and not replace:
        raise MeshError(
            f"a mesh is already active at {existing.address}: close it first "
            f"(%mesh close / mesh.close()) or pass --replace / replace=True"
        )


def _check_tls_files(security: Any) -> None:
    """MeshError (one line) where ``security`` lacks the CA or the client certificate
    that Dask's TLS needs, or where those given as files cannot be read as PEM (a
    connect would otherwise fail later, saying only that nothing answered, or that TLS
    "expects an ssl_context"). Certificates held in memory (``Security.temporary()``)
    are Dask's to check."""
    ca, cert, key = (getattr(security, a, None)
                     for a in ("tls_ca_file", "tls_client_cert", "tls_client_key"))
    if not ca or not cert:
        missing = " and ".join(n for n, v in (("tls_ca_file", ca), ("tls_client_cert", cert))
                               if not v)
        raise MeshError(f"security has no {missing}: a tls:// scheduler needs "
                        f"Security(tls_ca_file=..., tls_client_cert=..., tls_client_key=...)")

    def on_disk(value: Any) -> Any:
        return None if isinstance(value, str) and "-----BEGIN" in value else value

    if on_disk(ca) is None or on_disk(cert) is None:
        return
    check_tls_files(ca, cert, on_disk(key))


def check_tls_files(ca: str | None, cert: str | None, key: str | None) -> None:
    """MeshError (one line, naming the file) where a TLS CA, certificate or key file is
    missing or cannot be read as PEM."""
    import ssl

    for path in (ca, cert, key):
        if path and os.path.isdir(path):
            raise MeshError(f"TLS file {path} is a folder: give the PEM file in it")
        if path and not os.path.isfile(path):
            raise MeshError(f"TLS file not found: {path}: give the path of a PEM file")
    suspects = ca
    asked: list[bool] = []

    def passphrase() -> str:
        # OpenSSL asks for it on the terminal (and waits for ever); Dask has no way to
        # pass one
        asked.append(True)
        raise ValueError("the key is encrypted")

    try:
        context = ssl.create_default_context(cafile=ca) if ca else None
        suspects = " and ".join(p for p in dict.fromkeys((cert, key)) if p)
        if cert and context is not None:
            context.load_cert_chain(cert, key, password=passphrase)
    except (ssl.SSLError, OSError, ValueError) as exc:
        if asked:
            raise MeshError(f"the TLS key {key or cert} is encrypted with a passphrase, "
                            f"which Dask cannot give: use an unencrypted copy of it (e.g. "
                            f"openssl pkey -in KEY -out KEY2), readable by you "
                            f"alone") from None
        reason = getattr(exc, "reason", None) or (str(exc).splitlines() or [""])[0]
        if reason == "KEY_VALUES_MISMATCH":
            raise MeshError(f"the TLS key {key or cert} is not the key of the certificate "
                            f"{cert}: give the key made with that certificate") from None
        alone = (" (with no key file, the certificate file must hold the key too)"
                 if cert and not key and suspects != ca else "")
        raise MeshError(f"the TLS files could not be read ({reason or type(exc).__name__}): "
                        f"the CA, certificate and key must be PEM files; check "
                        f"{suspects}{alone}") from None
    if cert:
        _check_dates(cert)


def _check_dates(cert: str) -> None:
    """MeshError where the certificate in ``cert`` is out of its validity dates: the
    scheduler refuses it during the handshake, and the client often sees no more of it
    than the connection closing (which reads as certificates that do not fit)."""
    import datetime

    try:
        from cryptography import x509

        with open(cert, "rb") as f:
            c = x509.load_pem_x509_certificate(f.read())
        start, end = c.not_valid_before_utc, c.not_valid_after_utc
    except Exception:  # (read by OpenSSL above: its own checks stand)
        return
    now = datetime.datetime.now(datetime.timezone.utc)
    if not start <= now <= end:
        when = (f"expired on {end:%Y-%m-%d %H:%M} UTC" if now > end
                else f"is valid only from {start:%Y-%m-%d %H:%M} UTC")
        raise MeshError(f"the TLS certificate {cert} {when}: renew it (and check this "
                        f"machine's clock)")


def _close_active() -> None:
    existing = _state.active()
    if existing is not None:
        existing.close()


def _close_at_exit(ref: weakref.ref) -> None:
    mesh = ref()
    if mesh is not None and not mesh.closed:
        try:
            mesh.close()
        except BaseException:  # a second Ctrl-C as the process ends (make lab under a
            pass               # supervisor): no traceback of an exit hook


@keywords_checked
def current() -> Mesh:
    """The active mesh of this process, or :class:`MeshError` saying how to start one."""
    return _state.current()
