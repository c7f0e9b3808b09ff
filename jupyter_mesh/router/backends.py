"""Array backends the router can place work on: NumPy, CuPy and JAX.

A backend knows whether it can run in this process, how to move an array onto its device
and back to host memory, and its array namespace. Backends are registered objects,
found by name and through the ``jupyter_mesh.backends`` entry-point group; CuPy and JAX
are imported only when a backend is used.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from typing import Any

from ..errors import MeshError

ENTRY_POINT_GROUP = "jupyter_mesh.backends"


class Backend:
    """One array library that drives a device kind.

    Subclasses set :attr:`name` and :attr:`kinds` and implement the conversions.
    """

    name: str = ""
    #: device kinds this backend can drive
    kinds: tuple[str, ...] = ()
    #: op classes whose tasks run natively in this backend (others run on host NumPy)
    op_classes: frozenset[str] = frozenset()

    def available(self) -> bool:
        """Whether this backend can run in this process."""
        raise NotImplementedError

    def namespace(self) -> Any:
        """The backend's array module (``numpy``, ``cupy``, ``jax.numpy``)."""
        raise NotImplementedError

    def is_device_array(self, x: Any) -> bool:
        """Whether ``x`` is an array of this backend."""
        raise NotImplementedError

    def to_device(self, x: Any) -> Any:
        """``x`` (a host or other-backend array) as an array of this backend."""
        raise NotImplementedError

    def to_host(self, x: Any) -> Any:
        """``x`` as a NumPy array in host memory (other objects pass through)."""
        return x

    # what a backend from the entry-point group may override (the built-in ones have
    # their own detection and probes)
    def runs(self, func: Any) -> bool:
        """Whether a task of ``func`` (a Dask chunk function) runs natively here, its
        inputs converted by :meth:`to_device`. By default: NumPy's functions, Python's
        operators and Dask's own, which reach the arrays only through NumPy's API (a
        backend whose arrays implement ``__array_function__`` and ``__array_ufunc__``,
        as CuPy's do); a user's own function may call anything, so it gets host arrays."""
        return dispatches_through_numpy(func)

    def holds(self, x: Any) -> bool:
        """Whether the device holds the array ``x`` as it is (its dtype): a task with
        an input it does not hold runs NumPy on the host of the worker instead (so
        placement never fails a task that NumPy runs). By default every array."""
        return True

    def model(self) -> str:
        """What the device is, as the mesh shows it."""
        return f"{self.name} device"

    def synchronize(self) -> None:
        """Wait for work queued on the device (timing needs it)."""

    def measure(self, budget: float) -> Any:
        """The device's :class:`~jupyter_mesh.devices._profile.Profile`, measured within
        about ``budget`` seconds through :meth:`namespace`: a matmul per float width
        and an array copy."""
        from ..devices._profile import measure_namespace

        return measure_namespace(self.namespace(), self.synchronize, budget, self.name)

    def _fail(self, what: str, exc: BaseException) -> MeshError:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return MeshError(f"backend {self.name!r}: {what} failed: {why}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


# op classes (see classify.py)
ALL_OPS = frozenset(
    {"matmul", "linalg", "fft", "elementwise", "reduction", "creation", "movement", "other"}
)


class NumpyBackend(Backend):
    """Host memory and NumPy: every Dask array op runs here."""

    name = "numpy"
    kinds = ("cpu",)
    op_classes = ALL_OPS

    def available(self) -> bool:
        return True

    def namespace(self) -> Any:
        import numpy

        return numpy

    def is_device_array(self, x: Any) -> bool:
        import numpy

        return isinstance(x, numpy.ndarray)

    def to_device(self, x: Any) -> Any:
        return to_host_any(x)

    def to_host(self, x: Any) -> Any:
        return to_host_any(x)


class CupyBackend(Backend):
    """CUDA GPUs through CuPy, which dispatches NumPy's protocols (so Dask's chunk
    functions run on it as they are)."""

    name = "cupy"
    kinds = ("gpu",)
    op_classes = frozenset({"matmul", "linalg", "fft", "elementwise", "reduction", "movement"})

    def available(self) -> bool:
        from ..devices._detect import cuda_available

        return cuda_available()

    def namespace(self) -> Any:
        try:
            import cupy
        except Exception as exc:
            raise self._fail("import cupy", exc) from None
        return cupy

    def is_device_array(self, x: Any) -> bool:
        return type(x).__module__.startswith("cupy") and hasattr(x, "__cuda_array_interface__")

    def holds(self, x: Any) -> bool:
        """CuPy has booleans and numbers only (no object, string, datetime or
        structured dtypes) and no extended precision (``longdouble``)."""
        return self.is_device_array(x) or _numeric(x)

    def to_device(self, x: Any) -> Any:
        if self.is_device_array(x) or not _is_array(x):
            return x
        cupy = self.namespace()
        try:
            return cupy.asarray(to_host_any(x))
        except Exception as exc:
            raise self._fail("copy to GPU", exc) from None

    def to_host(self, x: Any) -> Any:
        if self.is_device_array(x):
            try:
                return x.get()
            except Exception as exc:
                raise self._fail("copy to host", exc) from None
        return x

    def synchronize(self) -> None:
        """Wait for the work queued on this worker's GPU (CuPy runs asynchronously: a
        task's measured seconds would be its launches alone)."""
        import cupy

        cupy.cuda.get_current_stream().synchronize()


class JaxBackend(Backend):
    """JAX devices (TPUs, or the CPU when testing the JAX path). JAX arrays implement
    neither ``__array_function__`` nor ``__array_ufunc__``: tasks run through the op
    table in :mod:`jupyter_mesh.router.jax_ops`."""

    name = "jax"
    kinds = ("tpu", "cpu", "gpu")
    op_classes = frozenset({"matmul", "fft", "elementwise", "reduction"})

    def available(self) -> bool:
        return importlib.util.find_spec("jax") is not None

    def namespace(self) -> Any:
        try:
            import jax.numpy as jnp
        except Exception as exc:
            raise self._fail("import jax", exc) from None
        return jnp

    def is_device_array(self, x: Any) -> bool:
        mod = type(x).__module__
        return (mod.startswith("jax") or mod.startswith("jaxlib")) and hasattr(x, "devices")

    def holds(self, x: Any) -> bool:
        """JAX has booleans and numbers only (no object, string, datetime or structured
        dtypes) and no extended precision (``longdouble``). (Routed tasks go further:
        :func:`jax_ops.same_numbers` keeps them to dtypes where JAX gives NumPy's
        numbers.) With its 64-bit mode off (JAX_ENABLE_X64=0) it has 32 bits at most:
        a float64 array would become float32 on the way in."""
        if self.is_device_array(x):
            return True
        if not _numeric(x):
            return False
        dtype = getattr(x, "dtype", None)
        if dtype is not None and getattr(dtype, "itemsize", 0) > 4 and (
                getattr(dtype, "kind", "") != "c" or dtype.itemsize > 8):
            import jax

            return bool(jax.config.read("jax_enable_x64"))
        return True

    def to_device(self, x: Any) -> Any:
        if self.is_device_array(x) or not _is_array(x):
            return x
        jnp = self.namespace()
        try:
            return jnp.asarray(to_host_any(x))
        except Exception as exc:
            raise self._fail("copy to device", exc) from None

    def to_host(self, x: Any) -> Any:
        if self.is_device_array(x):
            import numpy

            try:
                # a copy: numpy.asarray gives a read-only view of JAX's buffer, and a
                # user's function that writes into its block (map_blocks) failed
                return numpy.array(x)
            except Exception as exc:
                raise self._fail("copy to host", exc) from None
        return x


def _numeric(x: Any) -> bool:
    """Whether ``x``'s dtype is one a device library has: booleans and numbers, up to
    64-bit (128-bit complex); True where ``x`` has no NumPy dtype (its own conversion
    decides)."""
    import numpy

    dtype = getattr(x, "dtype", None)
    if not isinstance(dtype, numpy.dtype):
        return True
    return dtype.kind in "biufc" and dtype.itemsize <= (16 if dtype.kind == "c" else 8)


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, type)


def is_any_device_array(x: Any) -> bool:
    """Whether ``x`` is an array of a device backend (CuPy's, JAX's or a plugin's),
    which :func:`to_host_any` copies to the host."""
    import numpy

    if isinstance(x, numpy.ndarray) or not _is_array(x):
        return False
    mod = type(x).__module__
    if mod.startswith(("cupy", "jax", "jaxlib")):
        return True
    return any(b.is_device_array(x) for b in plugin_backends())


def to_host_any(x: Any) -> Any:
    """Any backend's array as a NumPy array; NumPy arrays and other objects pass through."""
    import numpy

    if isinstance(x, numpy.ndarray) or not _is_array(x):
        return x
    mod = type(x).__module__
    if mod.startswith("cupy"):
        return x.get()
    if mod.startswith("jax") or mod.startswith("jaxlib"):
        return numpy.array(x)  # writable (numpy.asarray: a read-only view)
    for b in plugin_backends():
        try:
            mine = b.is_device_array(x)
        except Exception as exc:  # (a plugin's failure to tell is its own, not every
            _said_once(b.name, exc)  # array's: said once)
            continue
        if mine:
            return b.to_host(x)
    return x


_failing: set[str] = set()


def _said_once(name: str, exc: Exception) -> None:
    if name not in _failing:
        _failing.add(name)
        import warnings

        warnings.warn(f"jupyter_mesh: backend {name!r}'s is_device_array() failed "
                      f"({type(exc).__name__}: {exc}): arrays are not checked against it",
                      RuntimeWarning, stacklevel=3)


def dispatches_through_numpy(func: Any) -> bool:
    """Whether ``func`` is NumPy's, Python's operators' or Dask's own (inside partials
    and compositions, and every function a partial passes on: ``map_blocks`` with
    ``enforce_ndim`` wraps the user's in Dask's own ``apply_and_enforce``): code that
    reaches arrays only through NumPy's API. Not ``numpy.ma`` (masked arrays are NumPy
    arrays of their own, which a device array is not), nor a ufunc that is not
    NumPy's own (SciPy's ``scipy.special.erf``: a device array's ``__array_ufunc__``
    finds it no namesake)."""
    import numpy

    parts = _called(func)
    if not parts:
        return False
    for f in parts:
        if isinstance(f, numpy.ufunc):
            if getattr(numpy, str(getattr(f, "__name__", "")), None) is not f:
                return False
            continue
        mod = getattr(f, "__module__", None) or ""
        if mod == "numpy.ma" or mod.startswith("numpy.ma."):
            return False
        if not (mod in ("_operator", "operator") or mod == "numpy" or mod == "dask"
                or mod.startswith(("numpy.", "dask."))):
            return False
    return True


def _called(func: Any) -> list[Any] | None:
    """The functions a task of ``func`` may call: the plain ones inside partials and
    compositions, and those a partial passes on as arguments (None for an unknown
    wrapper)."""
    import functools

    from .jax_ops import _parts

    parts = _parts(func)
    if parts is None:
        return None
    out = list(parts)
    stack = [func]
    while stack:
        f = stack.pop()
        if isinstance(f, functools.partial):
            stack.append(f.func)
            for a in (*f.args, *f.keywords.values()):
                if callable(a) and not isinstance(a, type):
                    sub = _called(a)
                    if sub is None:
                        return None
                    out.extend(sub)
    return out


_BUILTIN: dict[str, type[Backend]] = {
    "numpy": NumpyBackend,
    "cupy": CupyBackend,
    "jax": JaxBackend,
}
_registry: dict[str, Backend] = {}
#: entry points of the group that failed to load: name -> why
_broken: dict[str, str] = {}


#: what a backend must define itself (the rest has defaults)
_REQUIRED = ("available", "namespace", "is_device_array", "to_device")


def check_backend(backend: Any) -> None:
    """Refuse what is no usable backend (MeshError, saying what is missing): one that
    is half written broke every routed plan (its ``op_classes`` were read) and every
    ``mesh.submit`` (its ``is_device_array`` was asked of every result)."""
    if not isinstance(backend, Backend):
        raise MeshError(f"{backend!r} is not a jupyter_mesh.router.backends.Backend: "
                        f"subclass it")
    if not isinstance(backend.name, str) or not backend.name.strip():
        raise MeshError(f"a backend needs a name: {backend!r}")
    kinds = backend.kinds
    if (not isinstance(kinds, (tuple, list)) or not kinds
            or any(k not in ("cpu", "gpu", "tpu") for k in kinds)):
        raise MeshError(f"backend {backend.name!r}: kinds must name the device kinds it "
                        f"drives, some of cpu, gpu, tpu, not {kinds!r}")
    if not isinstance(backend.op_classes, (frozenset, set, tuple, list)):
        raise MeshError(f"backend {backend.name!r}: op_classes must be a set of op classes, "
                        f"not {backend.op_classes!r}")
    missing = [m for m in _REQUIRED if getattr(type(backend), m) is getattr(Backend, m)]
    if missing:
        raise MeshError(f"backend {backend.name!r} does not define {', '.join(missing)}")


def register_backend(backend: Backend) -> None:
    """Register (or replace) a backend under its name (MeshError where it is no usable
    backend: see :func:`check_backend`)."""
    check_backend(backend)
    _registry[backend.name] = backend


def _discover() -> None:
    from importlib.metadata import EntryPoint, entry_points

    eps: Iterable[EntryPoint]
    try:
        eps = entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # pragma: no cover - broken metadata
        eps = ()
    for ep in eps:
        if ep.name in _registry:
            continue
        try:
            cls = ep.load()
            backend = cls()
            check_backend(backend)
            if type(backend).to_host is Backend.to_host:  # (the built-in NumPy's needs none)
                raise MeshError(f"backend {backend.name!r} does not define to_host")
            if backend.name in _BUILTIN:
                raise MeshError(f"its name {backend.name!r} is a built-in backend's: name "
                                f"it otherwise")
            register_backend(backend)
        except Exception as exc:
            # a broken plugin must not hide the built-in backends; asked for by name,
            # it says why it is not there
            _broken[ep.name] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def broken_backends() -> dict[str, str]:
    """Entry points of the group that did not load, and why (in a line)."""
    _ensure()
    return dict(_broken)


def plugin_backends() -> list[Backend]:
    """The registered backends beyond NumPy, CuPy and JAX (entry points, or
    :func:`register_backend`)."""
    _ensure()
    return [b for name, b in sorted(_registry.items()) if name not in _BUILTIN]


def backend_names() -> list[str]:
    """Names of every registered backend (built-in and entry points)."""
    _ensure()
    return sorted(_registry)


def get_backend(name: str) -> Backend:
    """The backend called ``name``, or :class:`MeshError` naming those that exist."""
    _ensure()
    try:
        return _registry[name]
    except KeyError:
        if name in _broken:
            raise MeshError(
                f"backend {name!r} is installed (entry point of {ENTRY_POINT_GROUP}) but "
                f"did not load ({_broken[name]}): fix or reinstall its package; the "
                f"registered backends are {', '.join(sorted(_registry))}") from None
        raise MeshError(
            f"unknown backend {name!r}: the registered backends are {', '.join(sorted(_registry))}"
        ) from None


def _ensure() -> None:
    if not _registry:
        for cls in _BUILTIN.values():
            register_backend(cls())
        _discover()
