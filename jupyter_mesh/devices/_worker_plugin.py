"""The worker side of the mesh: detect this worker's device and advertise it.

The plugin runs in :meth:`setup` before the worker registers with the scheduler, so the
Dask resources it sets and the metadata it publishes (through
``worker.startup_information``, which lands in the scheduler's ``WorkerState.extra``)
are there from the first moment the scheduler sees the worker. This works with any
Dask scheduler, with or without the mesh's scheduler plugin.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from ..errors import MeshError
from ..targets import DEFAULT_BACKEND, backend_resource, kind_resource, site_resource
from . import _detect, _profile

logger = logging.getLogger("jupyter_mesh")

METADATA_KEY = "jupyter-mesh"
EXTENSION_NAME = "jupyter-mesh"


def _describe_plugin(plugin: Any, kind: str | None, memory: int | None) -> tuple[
    _detect.DeviceInfo, _profile.Profile
]:
    """:func:`describe_device` for a backend from the entry-point group: what its own
    code says fails in one line naming the backend and the method (a worker that failed
    in it logged a page of Dask's tracebacks)."""
    name = plugin.name

    def cannot(why: str) -> MeshError:
        return MeshError(f"jupyter_mesh: backend {name!r} cannot drive this worker: {why}")

    def failed(method: str, exc: Exception) -> MeshError:
        return cannot(f"its {method}() failed ({type(exc).__name__}: "
                      f"{(str(exc).splitlines() or [''])[0]})")

    kind = kind or plugin.kinds[0]
    if kind not in plugin.kinds:
        raise cannot(f"it drives {', '.join(plugin.kinds)}, not {kind}")
    try:
        available = plugin.available()
    except Exception as exc:
        raise failed("available", exc) from None
    if not available:
        raise cannot("it is not available in this process")
    try:
        model = str(plugin.model())
    except Exception as exc:
        raise failed("model", exc) from None

    def measure(budget: float) -> _profile.Profile:
        try:
            profile = plugin.measure(budget)
        except Exception as exc:
            raise failed("measure", exc) from None
        if not isinstance(profile, _profile.Profile):
            raise cannot(f"its measure() gave a {type(profile).__name__}, not a Profile")
        problem = _profile.profile_problem(profile)
        if problem is not None:
            raise cannot(f"its measure() gave a Profile with {problem}")
        return profile

    info = _detect.DeviceInfo(kind=kind, backend=name, model=model,
                              memory=int(memory or _detect.host_memory()))
    key = _profile.cache_key(info.kind, info.backend, info.model)
    return info, _profile.cached_or_measure(key, measure)


def describe_device(kind: str | None, backend: str | None, memory: int | None) -> tuple[
    _detect.DeviceInfo, _profile.Profile
]:
    """Detect the device this process drives and its profile.

    ``kind=None`` detects: a CUDA GPU through CuPy when one is usable, else a TPU, else
    the CPU. ``backend="jax"`` drives whatever JAX sees first.
    """
    plugin = _plugin_backend(backend)
    if plugin is not None:
        return _describe_plugin(plugin, kind, memory)
    # NumPy drives the CPU and CuPy a GPU, whatever else the host has
    own = {"numpy": "cpu", "cupy": "gpu"}.get(backend or "")
    if own is not None:
        if kind not in (None, own):
            raise MeshError(f"jupyter_mesh: backend {backend!r} drives a {own}, not a "
                               f"{kind}: leave out the backend or the kind")
        kind = own
    if backend == "jax":
        # float64 stays float64 on the JAX path, so routed results match NumPy
        os.environ.setdefault("JAX_ENABLE_X64", "1")
        info = _detect.jax_device(memory)
        if kind not in (None, info.kind):
            # (a plain `pip install jax` has no CUDA: JAX falls back to the CPU)
            extra = {"gpu": "jax[cuda12]", "tpu": "jax[tpu]"}.get(kind)
            raise MeshError(
                f"jupyter_mesh: asked for a {kind} worker through JAX, but JAX sees "
                f"{info.extra.get('jax_platform', info.kind)} only"
                f"{f': install {extra} for it' if extra else ''}, or leave out --jax")
    elif kind == "gpu" or (kind is None and _detect.cuda_available()):
        gpus = _detect.cuda_devices()
        if not gpus:
            raise MeshError("jupyter_mesh: asked for a gpu worker but CuPy sees no CUDA GPU "
                            "here: ask for a CPU worker instead")
        info = gpus[0]
    elif kind == "tpu" or (kind is None and _detect.tpu_devices()):
        tpus = _detect.tpu_devices()
        if not tpus:
            raise MeshError("jupyter_mesh: asked for a tpu worker but JAX sees no TPU here: "
                            "install jax[tpu] where there is one, or ask for a CPU worker")
        info = tpus[0]
    else:
        info = _detect.cpu_device(memory)

    profile = _profile.lookup_known(info.model) if info.kind != "cpu" else None
    if profile is None:
        measure = {
            "numpy": _profile.measure_numpy,
            "jax": _profile.measure_jax,
            "cupy": _profile.measure_cupy,
        }[info.backend]
        # XLA's CPU pool is as wide as the cores the process may use: a JAX CPU worker
        # pinned to fewer cores (a local mesh's) has a profile of its own
        cores = _detect.cpu_cores() if (info.kind, info.backend) == ("cpu", "jax") else None
        key = _profile.cache_key(info.kind, info.backend, info.model, cores)
        profile = _profile.cached_or_measure(key, measure)
    return info, profile


def _plugin_backend(name: str | None) -> Any:
    """The backend called ``name`` when it is one from the ``jupyter_mesh.backends``
    entry-point group (not NumPy, CuPy or JAX), else None."""
    if name is None or name in ("numpy", "cupy", "jax"):
        return None
    from ..router.backends import get_backend

    return get_backend(name)


class _NoComputeFailed(logging.Filter):
    """Drops Dask's "Compute Failed" record of a task that raised (the computation
    raises the same exception where it was asked for), and its "failed during get
    data" record, with two tracebacks, of a worker that died while this one sent it
    data (the scheduler sees the death; a routed computation says what it did about
    it in one warning)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("Compute Failed"):
            return False
        if msg.startswith("failed during get data") and record.exc_info:
            from distributed.comm.core import CommClosedError

            return not isinstance(record.exc_info[1], (CommClosedError, OSError))
        return True


class _NoNameTaken(logging.Filter):
    """Drops Dask's error records (and their tracebacks) of a worker whose name the
    scheduler refused: two workers started at once under one ``--name`` both passed
    the check before they start, and the one that lost printed ~80 lines of them
    before the CLI's one line that says so."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        text = record.getMessage()
        exc = record.exc_info[1] if record.exc_info else None
        seen: set[int] = set()
        while exc is not None and "name taken" not in text and id(exc) not in seen:
            seen.add(id(exc))
            text, exc = str(exc), exc.__cause__ or exc.__context__
        return "name taken" not in text


def quiet_name_taken() -> None:
    """Install :class:`_NoNameTaken` on the loggers of Dask's worker and nanny."""
    for name in ("distributed.worker", "distributed.nanny"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _NoNameTaken) for f in log.filters):
            log.addFilter(_NoNameTaken())


class MeshWorkerPlugin(WorkerPlugin):
    """Make a Dask worker a mesh device.

    Parameters
    ----------
    site:
        Label of where this worker is (``"local"``, ``"us-east"``, ``"edge-lab"``).
    kind:
        ``"cpu"``, ``"gpu"``, ``"tpu"`` or ``None`` to detect.
    backend:
        ``"numpy"``, ``"cupy"``, ``"jax"``, the name of a backend from the
        ``jupyter_mesh.backends`` entry-point group, or ``None`` for the kind's default.
    watch_parent:
        Close the worker when the process that started it (its nanny) is gone, so no
        worker outlives a killed kernel.
    cpus:
        Cores to pin the worker process to before it measures its device (Linux), or
        None to leave its affinity alone. A local mesh pins its JAX CPU workers to their
        share of the cores: XLA computes on a thread pool as wide as the cores it may use.
    quiet_failures:
        Leave out Dask's "Compute Failed" log of a task that raised. A local mesh's
        workers write to the kernel's output, so the notebook would show each failure
        twice: the log, and the exception the computation raises in the cell (which
        carries the same message and traceback).
    """

    name = "jupyter-mesh"
    idempotent = True

    def __init__(
        self,
        site: str = "local",
        kind: str | None = None,
        backend: str | None = None,
        watch_parent: bool = True,
        cpus: list[int] | None = None,
        quiet_failures: bool = False,
    ) -> None:
        self.site = site
        self.kind = kind
        self.backend = backend
        self.watch_parent = watch_parent
        self.cpus = list(cpus) if cpus else None
        self.quiet_failures = quiet_failures
        self.device: dict[str, Any] | None = None
        self._watchdog: asyncio.Task | None = None

    def setup(self, worker: Any) -> None:
        cpus = getattr(self, "cpus", None)  # None from a plugin pickled before cpus=
        if cpus:
            _detect.pin_process(cpus)  # before JAX starts its thread pool
        quiet_name_taken()  # (this process's own records: its nanny's are the CLI's)
        if getattr(self, "quiet_failures", False):
            log = logging.getLogger("distributed.worker")
            if not any(isinstance(f, _NoComputeFailed) for f in log.filters):
                log.addFilter(_NoComputeFailed())
        memory = getattr(worker.memory_manager, "memory_limit", None)
        info, profile = describe_device(self.kind, self.backend, memory)
        backend = info.backend or DEFAULT_BACKEND[info.kind]
        nthreads = worker.state.nthreads
        self.device = {
            "kind": info.kind,
            "backend": backend,
            "model": info.model,
            "memory": info.memory,
            "site": self.site,
            "profile": profile.to_dict(),
            "host": worker.ip if hasattr(worker, "ip") else "",
            "nthreads": nthreads,
            # cores this process may use (affinity and cgroup quota): CPU workers on one
            # host with more threads than that share them, which the cost model allows
            "cores": _detect.cpu_cores(),
            # and which: workers pinned to different cores do not share them
            "cpus": _detect.cpu_set(),
            "pid": os.getpid(),
            **info.extra,
        }
        if info.kind == "cpu" and backend != "numpy":
            # it runs NumPy tasks too, where NumPy is the faster of the two for an op
            # (the cost model compares them; cached, as a NumPy worker's profile is)
            key = _profile.cache_key("cpu", "numpy", info.model)
            self.device["numpy_profile"] = _profile.cached_or_measure(
                key, _profile.measure_numpy).to_dict()
        resources = {kind_resource(info.kind): nthreads,
                     backend_resource(info.kind, backend): nthreads,
                     site_resource(self.site): nthreads}
        for name, amount in resources.items():
            worker.state.total_resources[name] = amount
            worker.state.available_resources[name] = amount
        worker.startup_information[METADATA_KEY] = lambda w: dict(self.device or {})
        worker.extensions[EXTENSION_NAME] = self
        if getattr(worker, "nanny", None) and threading.current_thread() is threading.main_thread():
            # A kernel interrupt goes to the kernel's whole process group, which holds
            # the worker processes of a local mesh: it must stop the notebook's code,
            # not kill the mesh (the nanny still closes this process).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.watch_parent and getattr(worker, "nanny", None):
            self._parent = os.getppid()
            self._watchdog = asyncio.ensure_future(self._watch(worker))
        logger.info(
            "jupyter_mesh device: %s:%s %s at site %s", info.kind, backend, info.model, self.site
        )

    async def _watch(self, worker: Any) -> None:
        while True:
            await asyncio.sleep(1.0)
            if os.getppid() != self._parent:
                logger.warning("jupyter_mesh: the nanny is gone; closing this worker")
                await worker.close(nanny=False, executor_wait=False, timeout=5)
                os._exit(0)

    def teardown(self, worker: Any) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
