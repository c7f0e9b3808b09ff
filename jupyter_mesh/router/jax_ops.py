"""The JAX op table: which Dask chunk functions have a JAX equivalent, and what it is.

JAX arrays implement neither ``__array_function__`` nor ``__array_ufunc__``, so NumPy
functions handed JAX arrays silently compute on the host. A task runs on a JAX device
only through this table; a function outside it is never placed on JAX (the planner asks
:func:`supported`, which imports nothing).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

#: Python operators that JAX arrays implement themselves
_OPERATORS = {
    "add", "sub", "mul", "truediv", "floordiv", "pow", "neg", "pos", "abs", "mod",
    "matmul", "lt", "le", "gt", "ge", "eq", "ne", "and_", "or_", "xor", "invert", "getitem",
}
#: NumPy functions (by name) whose jax.numpy namesake has the same meaning here
_NUMPY_FUNCS = {
    "sum", "prod", "max", "min", "amax", "amin", "mean", "transpose", "dot", "matmul",
    "tensordot", "where", "clip", "squeeze", "abs", "absolute", "sqrt", "exp", "log",
    "sin", "cos", "tan", "tanh", "square", "negative", "maximum", "minimum", "multiply",
    "add", "subtract", "divide", "true_divide", "power", "conj", "real", "imag",
}
_FFT_FUNCS = {"fft", "ifft", "rfft", "irfft", "fft2", "ifft2", "fftn", "ifftn", "rfft2",
              "irfft2", "rfftn", "irfftn", "hfft", "ihfft"}
_UFUNCS_WITHOUT_JAX = {"isnat", "spacing"}
#: Dask's own chunk helpers with a JAX version below
_DASK_HELPERS = {
    ("dask.array.routines", "_matmul"),
    ("dask.array.routines", "_chunk_sum"),
    ("dask.array.routines", "_tensordot"),
    ("dask.array.core", "_concatenate2"),
    ("dask.array.reductions", "chunk_max"),
    ("dask.array.reductions", "chunk_min"),
}


def _parts(func: Any) -> list[Any] | None:
    """The plain functions inside partials and Compose, or None for an unknown wrapper."""
    if isinstance(func, functools.partial):
        return _parts(func.func)
    if _is_compose(func):
        out: list[Any] = []
        for f in _compose_order(func):
            sub = _parts(f)
            if sub is None:
                return None
            out.extend(sub)
        return out
    return [func]


def _is_compose(func: Any) -> bool:
    return type(func).__name__ == "Compose" and hasattr(func, "first")


def _compose_order(func: Any) -> list[Any]:
    """toolz.Compose calls ``first`` and then each of ``funcs`` in turn."""
    return [func.first, *func.funcs]


def _one_supported(f: Any) -> bool:
    if isinstance(f, np.ufunc):
        return f.__name__ not in _UFUNCS_WITHOUT_JAX
    mod = getattr(f, "__module__", None) or ""
    name = getattr(f, "__name__", "")
    if mod in ("_operator", "operator"):
        return name in _OPERATORS
    if mod == "numpy.fft" or mod.startswith("numpy.fft"):
        return name in _FFT_FUNCS
    if mod == "numpy" or mod.startswith("numpy._core") or mod.startswith("numpy.core"):
        return name in _NUMPY_FUNCS
    return (mod, name) in _DASK_HELPERS


def supported(func: Any) -> bool:
    """Whether every part of ``func`` has a JAX version (imports nothing)."""
    parts = _parts(func)
    if not parts:
        return False
    return all(_one_supported(f) for f in parts)


def translate(func: Any) -> Callable[..., Any] | None:
    """The JAX version of ``func`` (same signature), or None when there is none."""
    if not supported(func):
        return None
    return _translate(func)


def _translate(func: Any) -> Callable[..., Any]:
    if isinstance(func, functools.partial):
        inner = _translate(func.func)
        return functools.partial(inner, *func.args, **_jax_kwargs(func.keywords))
    if _is_compose(func):
        fs = [_translate(f) for f in _compose_order(func)]

        def composed(*args: Any, **kwargs: Any) -> Any:
            out = fs[0](*args, **kwargs)
            for f in fs[1:]:
                out = f(out)
            return out

        return composed
    import jax.numpy as jnp

    if isinstance(func, np.ufunc):
        return _no_out(getattr(jnp, func.__name__))
    mod = getattr(func, "__module__", None) or ""
    name = func.__name__
    if mod in ("_operator", "operator"):
        return func
    if mod.startswith("numpy.fft"):
        return _no_out(getattr(jnp.fft, name))
    if mod.startswith("numpy"):
        return _no_out(getattr(jnp, name))
    return _HELPERS[name]


def _jax_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if k != "out"}


def _no_out(f: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("out", None)
        if kwargs.get("dtype") is not None:
            kwargs["dtype"] = np.dtype(kwargs["dtype"])
        return f(*args, **kwargs)

    call.__name__ = getattr(f, "__name__", "jax_op")
    return call


# ---------------------------------------------------------------- Dask helper versions
def _matmul(a: Any, b: Any) -> Any:
    import jax.numpy as jnp

    return jnp.matmul(a, b)[..., None, :]


def _chunk_sum(a: Any, axis: Any = None, dtype: Any = None, keepdims: Any = None) -> Any:
    import jax.numpy as jnp

    if type(a) is list:
        out = a[0]
        for x in a[1:]:
            out = jnp.add(out, x)
        if dtype is not None:
            out = out.astype(dtype)
    else:
        out = a
    if keepdims:
        return out
    return jnp.squeeze(out, axis=axis[0])


def _tensordot(a: Any, b: Any, axes: Any, is_sparse: bool = False) -> Any:
    import jax.numpy as jnp

    x = jnp.tensordot(a, b, axes=axes)
    ind: list[Any] = [slice(None)] * x.ndim
    for ax in sorted(axes[0]):
        ind.insert(ax, None)
    return x[tuple(ind)]


def _concatenate2(arrays: Any, axes: Any = None) -> Any:
    import jax.numpy as jnp

    axes = list(axes or [])
    if not axes:
        return arrays[0] if isinstance(arrays, list) else arrays
    if not isinstance(arrays, (list, tuple)):
        arrays = list(arrays)
    if len(axes) > 1:
        arrays = [_concatenate2(a, axes[1:]) for a in arrays]
    return jnp.concatenate([jnp.asarray(a) for a in arrays], axis=axes[0])


def _chunk_max(x: Any, axis: Any = None, keepdims: Any = None) -> Any:
    import jax.numpy as jnp

    return jnp.max(x, axis=axis, keepdims=bool(keepdims))


def _chunk_min(x: Any, axis: Any = None, keepdims: Any = None) -> Any:
    import jax.numpy as jnp

    return jnp.min(x, axis=axis, keepdims=bool(keepdims))


_HELPERS: dict[str, Callable[..., Any]] = {
    "_matmul": _matmul,
    "_chunk_sum": _chunk_sum,
    "_tensordot": _tensordot,
    "_concatenate2": _concatenate2,
    "chunk_max": _chunk_max,
    "chunk_min": _chunk_min,
}
