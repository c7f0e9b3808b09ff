"""The device wrapper that every routed task carries, and what it records on workers.

It runs on the worker: it converts the task's inputs to the backend of the worker it
actually runs on (which is the planned one unless a fallback moved it), runs the op
(through the JAX op table on JAX workers), and hands a host array to consumers of
another kind. So placement never decides correctness.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
from distributed.worker import thread_state

from .backends import get_backend, is_any_device_array, to_host_any

_local = threading.local()
_lock = threading.Lock()
#: plan id -> {key: (backend, seconds)}: the records of device calls run outside a
#: worker's task (called directly); inside one they travel with the task's result
RECORDS: dict[str, dict[Any, tuple[str, float]]] = {}
#: the records of a routed task travel to the scheduler in its task metadata under this
#: key, a list of (plan id, key, backend, seconds): one per device call, the members of
#: a fused task each under its own key (see RouterState.transition)
METADATA_KEY = "jupyter-mesh"
#: most plans whose records RECORDS keeps
MAX_RECORDED_PLANS = 64
_registered_lookups = False


def worker_backend() -> str:
    """The backend of the worker this runs on (``numpy`` outside a mesh worker)."""
    return _worker_device()[1]


def worker_kind() -> str:
    """The device kind of the worker this runs on (``cpu`` outside a mesh worker)."""
    return _worker_device()[0]


def _worker_device() -> tuple[str, str]:
    cached = getattr(_local, "device", None)
    if cached is not None:
        return cached
    device = ("cpu", "numpy")
    try:
        from distributed import get_worker

        ext = get_worker().extensions.get("jupyter-mesh")
        if ext is not None and ext.device:
            device = (ext.device.get("kind", "cpu"), ext.device.get("backend", "numpy"))
    except Exception:
        pass
    _local.device = device
    return device


def _map(fn: Any, x: Any) -> Any:
    """``fn`` applied to every leaf of lists, tuples and dict values in ``x``."""
    if isinstance(x, list):
        return [_map(fn, v) for v in x]
    if isinstance(x, tuple):
        if hasattr(x, "_fields"):  # a namedtuple (NumPy's SVDResult...) stays one
            return type(x)(*(_map(fn, v) for v in x))
        items = [_map(fn, v) for v in x]
        if type(x) is not tuple:  # a subclass stays one (Dask's CombinedOutput)...
            try:
                again = type(x)(items)
                # ...where it is rebuilt from its items, as they are
                if len(again) == len(items) and all(
                        a is b for a, b in zip(again, items, strict=True)):
                    return again
            except Exception:
                pass
        return tuple(items)
    if isinstance(x, dict):
        return {k: _map(fn, v) for k, v in x.items()}
    return fn(x)


class LayerKeys:
    """A :class:`DeviceCall`'s ``key`` for every task of one Blockwise layer that Dask
    may have fused into another layer's tasks (the router fuses the Blockwise layers a
    plan puts on one pool): the report's key is the layer's name with the block index
    the task would have had unfused, read from the index of the task that runs it.
    ``positions``: for a member fused into another layer's task, where each of its
    index's entries is in that task's index (a transposed member reads them swapped,
    a broadcast one fewer of them); None: the running task's own index (its own layer,
    or a member whose index Dask's fusion does not give: then the running task's)."""

    __slots__ = ("name", "positions")

    def __init__(self, name: str, positions: tuple[int, ...] | None = None) -> None:
        self.name = name
        self.positions = positions

    def __reduce__(self) -> Any:
        return (LayerKeys, (self.name, self.positions))

    def __dask_tokenize__(self) -> Any:
        return ("jupyter_mesh.LayerKeys", self.name, self.positions)

    def __eq__(self, other: object) -> bool:
        return (type(other) is LayerKeys and other.name == self.name
                and other.positions == self.positions)

    def __hash__(self) -> int:
        return hash(("LayerKeys", self.name, self.positions))

    def key_of(self, running: Any) -> Any:
        if not isinstance(running, tuple):
            return self.name
        index = running[1:]
        if self.positions is not None and all(p < len(index) for p in self.positions):
            return (self.name, *(index[p] for p in self.positions))
        return (self.name, *index)


class DeviceCall:
    """Callable that runs one task's function on the worker's device backend.

    Parameters
    ----------
    func:
        The task's original function.
    key:
        The task's key (for the report); None: read it from the worker's thread state,
        so one wrapper can serve every task of an op; a :class:`LayerKeys`: that
        layer's key for the running task's index.
    plan_id:
        Which routed computation the task belongs to.
    to_host:
        Return a host array (a consumer lives on another kind, or it is an output).
    native:
        Backends that run ``func`` natively; on any other backend it runs on host NumPy.
    """

    __slots__ = ("func", "key", "plan_id", "to_host", "native")

    def __init__(self, func: Any, key: Any, plan_id: str, to_host: bool,
                 native: frozenset[str]) -> None:
        self.func = func
        self.key = key
        self.plan_id = plan_id
        self.to_host = to_host
        self.native = native

    def __reduce__(self) -> Any:
        return (DeviceCall, (self.func, self.key, self.plan_id, self.to_host, self.native))

    def __dask_tokenize__(self) -> Any:
        # Dask names a task by tokenizing it; without this it would pickle the wrapper
        # (two or three times, to check that the pickle is deterministic)
        from dask.tokenize import normalize_token

        return ("jupyter_mesh.DeviceCall", normalize_token(self.func),
                normalize_token(self.key), self.plan_id, self.to_host, sorted(self.native))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        raw_args, raw_kwargs = args, kwargs
        # NumPy would have a scalar here (a reduction's result kept on the device)
        scalar_in = bool(args) and (isinstance(args[0], np.generic) or (
            type(args[0]) is OnDevice and args[0].scalar))
        args = _map(_unwrap, args)
        kwargs = {k: _map(_unwrap, v) for k, v in kwargs.items()}
        name = worker_backend()
        func = self.func
        used = "numpy"
        if name != "numpy" and name in self.native:
            if name == "jax":
                from . import jax_ops

                func = jax_ops.translate(self.func)
                if func is not None and not jax_ops.same_numbers(self.func, args, kwargs):
                    func = None  # NumPy, on the host of this worker
            elif func is not None:
                from . import jax_ops

                if jax_ops.lists_as_arrays(func, args):
                    func = None  # NumPy's own would get the device's arrays in a list
                elif not _passes_only_numpys(get_backend(name), args, kwargs):
                    func = None  # a user's function passed on gets host arrays
            if func is not None:
                backend = get_backend(name)
                if not _all_held(backend, args, kwargs):
                    # an input the device has no dtype for, or that a device array would
                    # not be (a masked array, a sparse matrix): NumPy on the host
                    func = None
            if func is not None:
                args = _map(backend.to_device, args)
                kwargs = {k: _map(backend.to_device, v) for k, v in kwargs.items()}
                used = name
            else:
                func = self.func
        if used == "numpy":
            args = _map(_host_arg, raw_args)
            kwargs = {k: _map(_host_arg, v) for k, v in raw_kwargs.items()}
        refused = False
        try:
            out = func(*args, **kwargs)
        except Exception:
            if used == "numpy":
                raise
            refused = True
        if refused:
            # the device's library refused it (a NumPy function it does not have, or
            # arguments NumPy takes or refuses in its own words: JAX says TypeError
            # where NumPy says ValueError of shapes that do not broadcast): NumPy on
            # this worker's host, as for an input the device cannot hold, whose answer
            # or error is the one the computation gives unrouted (outside the except:
            # NumPy's error is not chained to the device library's)
            used, func = "numpy", self.func
            out = func(*_map(_host_arg, raw_args),
                       **{k: _map(_host_arg, v) for k, v in raw_kwargs.items()})
        scalar = False
        if used != "numpy":
            from .jax_ops import gives_scalar

            # JAX's and CuPy's reductions give 0-d arrays where NumPy's give scalars
            scalar = gives_scalar(self.func, scalar_in)
        if self.to_host and used != "numpy":
            out = _map(get_backend(used).to_host, out)
            if scalar:
                out = _map(_scalar, out)
        elif used != "numpy":
            backend = get_backend(used)
            if used == "jax":
                out = _map(_strong, _block(out))
            else:  # CuPy's work is asynchronous: the seconds measured are its own
                backend.synchronize()
            out = _map(lambda x: OnDevice(x, used, scalar and getattr(x, "ndim", 1) == 0)
                       if backend.is_device_array(x) else x, out)
        key = self.key
        if key is None:
            key = getattr(thread_state, "key", None)
        elif type(key) is LayerKeys:
            key = key.key_of(getattr(thread_state, "key", None))
        _record(self.plan_id, key, used, time.perf_counter() - t0)
        return out

    def __repr__(self) -> str:
        return f"DeviceCall({getattr(self.func, '__name__', self.func)!r})"


class OnDevice:
    """A task's result kept in device memory for the next op of the same device on
    the same worker, which gets the array itself, with no copy.

    Moved to another worker (a fallback relaxed where its consumer runs) or spilled
    to disk, it is pickled as the host NumPy array: the receiver needs neither the
    device nor its library, and a JAX array is not rebuilt as float32 in a process
    where JAX's 64-bit mode is off (as it is on a NumPy worker). So placement, even a
    fallback's, never decides correctness."""

    __slots__ = ("array", "backend", "scalar")

    def __init__(self, array: Any, backend: str, scalar: bool = False) -> None:
        self.array = array
        self.backend = backend
        #: a 0-d array where NumPy's function gives a scalar: on the host, it is one
        self.scalar = scalar

    def host(self) -> Any:
        out = get_backend(self.backend).to_host(self.array)
        return _scalar(out) if self.scalar else out

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.host().__reduce_ex__(protocol)

    def __sizeof__(self) -> int:
        return int(getattr(self.array, "nbytes", 0)) + 64

    def __repr__(self) -> str:
        return f"OnDevice({self.backend}, {type(self.array).__name__})"


def routed_chain(*args: Any) -> Any:
    """The function of a task that runs a fused chain of routed tasks (see
    ``rewrite._fuse_chains``): Dask's own runner of a fused subgraph, under a name that
    says what the task is, in Dask's logs and dashboard as in :class:`SharedKeyFilter`."""
    from dask._task_spec import _execute_subgraph

    return _execute_subgraph(*args)


#: how the key of a batch of routed tasks begins (see ``rewrite.worker_batches``): a key
#: of its own, new in every routed computation
BATCH_PREFIX = "jupyter-mesh-batch-"


def routed_batch(members: tuple[Any, ...], outkeys: tuple[Any, ...],
                 inkeys: tuple[Any, ...], *values: Any) -> tuple[Any, ...]:
    """The function of a task that runs a batch of routed tasks one after another on
    one worker (see ``rewrite.worker_batches``): each member (a routed task, or a fused
    chain of them) in the plan's order, given the batch's inputs and the results of
    the members before it; returns the results its consumers outside need, in
    ``outkeys``' order."""
    cache = dict(zip(inkeys, values, strict=True))
    # what is left to use each value: a member's result that nothing later in the
    # batch needs, and nothing outside, is freed as soon as it has been used
    uses: dict[Any, int] = dict.fromkeys(outkeys, 1)
    for node in members:
        for k in node.dependencies:
            uses[k] = uses.get(k, 0) + 1
    for node in members:
        deps = node.dependencies
        cache[node.key] = node({k: cache[k] for k in deps})
        for k in deps:
            uses[k] -= 1
            if not uses[k]:
                del cache[k]
    return tuple(cache[k] for k in outkeys)


#: what the text of a routed task (its repr, as Dask logs it) shows
ROUTED_MARKS = ("DeviceCall(", "SubmitCall(", f"{routed_chain.__name__}(",
                f"{routed_batch.__name__}(")


class SharedKeyFilter(logging.Filter):
    """Keeps Dask's warning about a key submitted twice with different dependencies
    (dask/dask#9888) out of the scheduler's log where either task is routed.

    A routed graph runs the same tasks as Dask's own under the same keys, but split and
    fused its own way, so a plain graph that shares keys with a routed persist (or a
    routed computation that shares keys with a plain persist) makes Dask warn, in
    several lines ending in "This can cause failures and deadlocks", that their
    dependencies differ. Dask keeps the task it already has, which for a routed one is
    safe: both compute the same values; a routed persist's tasks hand over host arrays
    (``rewrite(host_results=True)``), as plain tasks expect; and a kept task depends
    only on tasks kept with it. (A routed *compute* hands results kept on a device only
    to its own next tasks; a plain task submitted while it still runs that reads one of
    them is made to read it as a host array, see :func:`on_host`, with the same
    dependencies.) A collision of plain tasks alone still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if record.levelno < logging.WARNING or not isinstance(msg, str):
            return True
        if not msg.startswith("Detected different `run_spec`"):
            return True
        specs = [line for line in msg.splitlines()
                 if line.lstrip().startswith(("old run_spec:", "new run_spec:"))]
        if not any(mark in line for line in specs for mark in ROUTED_MARKS):
            return True
        logging.getLogger("jupyter_mesh").debug(
            "jupyter_mesh: a graph shares keys with a routed computation; Dask keeps the "
            "tasks it has, which compute the same values: %s", msg.split(" between")[0])
        return False


def quiet_shared_keys(logger_name: str = "distributed.scheduler") -> None:
    """Install :class:`SharedKeyFilter` on the scheduler's logger (once a process)."""
    log = logging.getLogger(logger_name)
    if not any(isinstance(f, SharedKeyFilter) for f in log.filters):
        log.addFilter(SharedKeyFilter())


def _all_held(backend: Any, args: Any, kwargs: dict[str, Any]) -> bool:
    """Whether ``backend`` holds every array among the task's inputs (in lists and
    tuples too) as the array it is (see :func:`_plain`)."""
    bad: list[Any] = []

    def check(x: Any) -> Any:
        if not bad and hasattr(x, "dtype") and hasattr(x, "shape") and not (
                _plain(backend, x) and backend.holds(x)):
            bad.append(x)
        return x

    _map(check, args)
    _map(check, kwargs)
    return not bad


def _passes_only_numpys(backend: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                        ) -> bool:
    """Whether every function among the task's arguments is one ``backend`` runs (a
    user's own, passed on to Dask's ``apply_and_enforce`` by ``map_blocks`` with
    ``enforce_ndim``, may call anything)."""
    return all(backend.runs(v) for v in (*args, *kwargs.values())
               if callable(v) and not isinstance(v, type))


def _plain(backend: Any, x: Any) -> bool:
    """Whether ``x`` reaches the device as the array it is: a NumPy array (a memory
    map too) or scalar, or a device array (this backend's, or another's through the
    host). Not a NumPy subclass that means more than its numbers (a masked array's
    mask, ``np.matrix``'s products), nor another library's array (SciPy's sparse
    matrices): a device array would drop what they add, or fail to take them."""
    if backend.is_device_array(x):
        return True
    if isinstance(x, np.ndarray):
        return type(x) is np.ndarray or type(x) is np.memmap
    if isinstance(x, (np.generic, type)):
        return True
    return is_any_device_array(x)


def _scalar(x: Any) -> Any:
    """A 0-d NumPy array as the NumPy scalar that NumPy's own function gives."""
    return x[()] if type(x).__name__ == "ndarray" and x.ndim == 0 else x


def _unwrap(x: Any) -> Any:
    return x.array if type(x) is OnDevice else x


def _host_arg(x: Any) -> Any:
    """An argument as NumPy has it: a result kept on a device as the host array (or
    the scalar NumPy's function would have given)."""
    return x.host() if type(x) is OnDevice else to_host_any(x)


def _kept_as_host(x: Any) -> Any:
    return x.host() if type(x) is OnDevice else x


def on_host(node: Any, keys: tuple[Any, ...], *values: Any) -> Any:
    """Run ``node`` (a task of a graph that is not routed: another thread's plain
    ``.compute()``, another notebook's client) with its inputs as host arrays: it
    reads a routed task's result, which a routed computation may keep on a device
    (:class:`OnDevice`) for its own next op. Dask gives every graph the task it holds
    for a key, so a plain graph that shares keys with a routed one reads those."""
    return node({k: _map(_kept_as_host, v) for k, v in zip(keys, values, strict=True)})


class Unwrapping:
    """A function of a task nested in a routed task's arguments (Dask evaluates those
    before the routed task's wrapper sees anything): it gets the device arrays of
    :class:`OnDevice` results, as it did before they were kept in one."""

    __slots__ = ("func",)

    def __init__(self, func: Any) -> None:
        self.func = func

    def __reduce__(self) -> Any:
        return (Unwrapping, (self.func,))

    def __dask_tokenize__(self) -> Any:
        from dask.tokenize import normalize_token

        return ("jupyter_mesh.Unwrapping", normalize_token(self.func))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*_map(_unwrap, args),
                         **{k: _map(_unwrap, v) for k, v in kwargs.items()})

    def __repr__(self) -> str:
        return f"Unwrapping({getattr(self.func, '__name__', self.func)!r})"


#: SubmitCall's backend for a target of a device kind alone (``on="gpu"``): whichever
#: backend drives the worker that runs it
ANY_BACKEND = "*"


class SubmitCall:
    """What ``mesh.submit`` runs on the worker: on a worker driven by ``backend`` (the
    one the request asked for or the mesh picked), array arguments (NumPy, CuPy or JAX,
    also inside lists, tuples and dict values) are moved to that backend, and array
    results come back as host (NumPy) arrays, so a function written with array
    operators runs on the device the mesh picked. On any other worker (no target was
    asked for, or the task fell back to what was left) ``func`` gets host NumPy arrays,
    whichever backend drives that worker: its numbers never depend on where it ran."""

    __slots__ = ("func", "backend", "kind")

    def __init__(self, func: Any, backend: str | None = None, kind: str | None = None
                 ) -> None:
        self.func = func
        self.backend = backend
        #: with ``ANY_BACKEND``: the device kind asked for (a worker of another kind,
        #: after a fallback, gives host NumPy)
        self.kind = kind

    def __reduce__(self) -> Any:
        return (SubmitCall, (self.func, self.backend, self.kind))

    def __dask_tokenize__(self) -> Any:
        from dask.tokenize import normalize_token

        return ("jupyter_mesh.SubmitCall", normalize_token(self.func), self.backend,
                self.kind)

    def _moves_to(self, name: str) -> bool:
        if name == "numpy":
            return False
        if self.backend == ANY_BACKEND:
            return worker_kind() == self.kind
        return name == self.backend

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        name = worker_backend()
        if not self._moves_to(name):
            name = "numpy"
            move = to_host_any
        else:
            backend = get_backend(name)

            def move(x: Any) -> Any:
                # an array the device has no dtype for, or that a device array would
                # not be (np.matrix, whose * is a matrix product; a masked array's
                # mask), stays a host array, as routed tasks keep such inputs
                return (backend.to_device(x) if _plain(backend, x) and backend.holds(x)
                        else to_host_any(x))
        args = _map(move, args)
        kwargs = _map(move, kwargs)
        out = self.func(*args, **kwargs)
        if name == "jax":
            out = _map(_block, out)
        return _map(_result_to_host, out)

    def __repr__(self) -> str:
        return f"SubmitCall({getattr(self.func, '__name__', self.func)!r}, {self.backend!r})"


def _result_to_host(x: Any) -> Any:
    """A result as NumPy has it: a device array as a NumPy array, and a 0-d device
    array (CuPy and JAX reduce to those) as a NumPy scalar, as NumPy's reductions give
    (``(a @ a).sum()`` is ``np.float64`` on every worker)."""
    import numpy

    host = to_host_any(x)
    if host is not x and isinstance(host, numpy.ndarray) and host.ndim == 0:
        return host[()]
    return host


def _strong(x: Any) -> Any:
    """A JAX array as NumPy would type it: JAX marks a result that took its dtype from
    Python scalars *weak* (``jnp.where(x32, 1.1, 0.0)`` is a weak float64), and a weak
    float64 met with float32 gives float32 in the next op, where NumPy's float64 array
    gives float64. Kept for the next op on the device, it loses the mark."""
    if getattr(x, "weak_type", False):
        import jax.numpy as jnp

        return jnp.asarray(x, dtype=x.dtype)
    return x


def _block(out: Any) -> Any:
    """Wait for JAX's asynchronous dispatch so measured seconds are real (the arrays
    inside a list, tuple or dict too: a mean's per-chunk step gives a dict)."""
    def wait(x: Any) -> Any:
        ready = getattr(x, "block_until_ready", None)
        if ready is not None:
            ready()
        return x

    return _map(wait, out)


def _record(plan_id: str, key: Any, backend: str, seconds: float) -> None:
    """Note which backend ran ``key`` and for how long: in the metadata of the worker's
    task that runs it, which Dask sends to the scheduler with the task's end (no extra
    message, and no round trip to every worker afterwards); else in RECORDS."""
    ts = _running_task()
    if ts is not None:
        ts.metadata.setdefault(METADATA_KEY, []).append((plan_id, key, backend, seconds))
        return
    with _lock:
        RECORDS.setdefault(plan_id, {})[key] = (backend, seconds)
        while len(RECORDS) > MAX_RECORDED_PLANS:
            del RECORDS[next(iter(RECORDS))]


def _running_task() -> Any:
    """The worker's state of the task this thread runs, or None outside one."""
    running = getattr(thread_state, "key", None)
    if running is None:
        return None
    try:
        from distributed import get_worker

        worker = get_worker()
    except ValueError:  # not in a worker
        return None
    state = getattr(worker, "state", None)
    return state.tasks.get(running) if state is not None else None


def pop_records(plan_id: str, dask_worker: Any = None) -> dict[Any, tuple[str, float]]:
    """Run on each worker through ``client.run``: the records of one plan, forgotten."""
    with _lock:
        return RECORDS.pop(plan_id, {})
