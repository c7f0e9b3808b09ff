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
    "tensordot", "where", "squeeze", "abs", "absolute", "sqrt", "exp", "log",
    "sin", "cos", "tan", "tanh", "square", "negative", "maximum", "minimum", "multiply",
    "add", "subtract", "divide", "true_divide", "power", "conj", "real", "imag",
}
_FFT_FUNCS = {"fft", "ifft", "rfft", "irfft", "fft2", "ifft2", "fftn", "ifftn", "rfft2",
              "irfft2", "rfftn", "irfftn", "hfft", "ihfft"}
#: ufuncs that JAX lacks, or computes other numbers with: exp2 is not exact at integer
#: exponents (exp2(3.0) is 7.999999999999998, 2**-126 in float32 is 0), arcsin of a
#: number just above the smallest normal is 0
_UFUNCS_WITHOUT_JAX = {"isnat", "spacing", "exp2", "arcsin",
                       # tens to hundreds of ulps off on ordinary numbers: log1p near
                       # -0.4, arctanh below 0.41, sinh and cosh of large arguments
                       "log1p", "arctanh", "sinh", "cosh"}
#: functions that JAX computes less exactly than NumPy, or with NaN, for complex
#: input: sinh and cosh of small arguments (the real part of sinh lost in complex64),
#: expm1, and 0j raised to a finite power (nan+nanj where NumPy gives 0); and those
#: with a branch cut, where NumPy takes the side the sign of a zero part says and XLA
#: does not (sqrt(-4-0j) is -2j, on JAX +2j; arctan(nan+nanj) has a finite part there)
_COMPLEX_DIFFERS = frozenset({"sinh", "cosh", "expm1", "power", "float_power", "pow",
                              "sqrt", "arccos", "arccosh", "arcsinh", "arctan",
                              "arctanh",
                              # logarithms: complex log1p of small numbers (NumPy's is
                              # the less exact, by up to 10%), log's real part near
                              # |z| = 0.75 (60 ulps)
                              "log", "log2", "log10", "log1p"})
#: NumPy functions that make a strong (64-bit) array of a Python number beside a
#: 32-bit one (np.dot(x32, 2.0) is float64), where JAX takes the number as weak
#: (float32); np.where and the ufuncs take it as weak in both
_ARRAY_OF_NUMBERS = frozenset({"dot", "tensordot"})
#: functions that divide: XLA divides by a broadcast divisor as a product with its
#: reciprocal, which is flushed to 0 past 2**126 (float32) or 2**1022 (float64), and
#: the quotient with it
_DIVIDES = frozenset({"truediv", "floordiv", "divide", "true_divide", "floor_divide",
                      "mod", "remainder", "fmod", "divmod"})
#: Dask's own chunk helpers with a JAX version below
_DASK_HELPERS = {
    ("dask.array.routines", "_matmul"),
    ("dask.array.routines", "_chunk_sum"),
    ("dask.array.routines", "_tensordot"),
    ("dask.array.core", "_concatenate2"),
    ("dask.array.reductions", "chunk_max"),
    ("dask.array.reductions", "chunk_min"),
    # a mean's per-chunk step (its count and sum), with Dask's own sum and count only
    # (nanmean's passes nansum: see _keywords_supported)
    ("dask.array.reductions", "mean_chunk"),
    # its op is checked where it runs (same_numbers, which has its arguments)
    ("dask.array.core", "_enforce_dtype"),
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
        # NumPy's own (SciPy's ufuncs, scipy.special.erf say, have no jnp namesake)
        name = str(getattr(f, "__name__", ""))
        return getattr(np, name, None) is f and name not in _UFUNCS_WITHOUT_JAX
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
    return all(_one_supported(f) for f in parts) and _keywords_supported(func)


def _keywords_supported(func: Any) -> bool:
    """Whether the functions that partials pass a helper are those its JAX version
    computes: ``mean_chunk`` with NumPy's sum and Dask's count (nanmean passes
    nansum and a count of non-NaN numbers)."""
    if isinstance(func, functools.partial):
        if getattr(func.func, "__name__", None) == "mean_chunk":
            total, count = func.keywords.get("sum"), func.keywords.get("numel")
            if total is not None and total is not np.sum:
                return False
            if count is not None and (getattr(count, "__module__", None),
                                      getattr(count, "__name__", None)) != (
                    "dask.array.reductions", "numel"):
                return False
        return _keywords_supported(func.func)
    if _is_compose(func):
        return all(_keywords_supported(f) for f in _compose_order(func))
    return True


#: dtypes whose arithmetic JAX (in 64-bit mode) does as NumPy does, promotion included
#: (Python scalars are weak in both); integer and bool arithmetic differs (division by
#: zero, int64 against uint64, sums of bools, float32 from integers), so it stays NumPy
_SAME_DTYPES = frozenset(np.dtype(t) for t in ("float32", "float64", "complex64",
                                               "complex128"))
#: the same with JAX's 64-bit mode off (a worker started with JAX_ENABLE_X64=0): JAX
#: would compute float64 work in float32, so that runs NumPy
_SAME_DTYPES_32 = frozenset(np.dtype(t) for t in ("float32", "complex64"))


def _same_dtypes() -> frozenset[np.dtype[Any]]:
    import jax

    return _SAME_DTYPES if jax.config.read("jax_enable_x64") else _SAME_DTYPES_32


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


#: NumPy's functions whose dispatch looks inside the sequence they are given (a
#: device array in the list decides the implementation)
_SEQUENCE_DISPATCH = frozenset({"concatenate", "stack", "vstack", "hstack", "dstack",
                                "column_stack", "block"})


def lists_as_arrays(func: Any, args: tuple[Any, ...]) -> bool:
    """Whether a list or tuple among ``args`` goes to one of NumPy's own functions that
    takes it as one array (``np.sum([a, b])`` of a delayed call stacks them, in NumPy
    itself): device arrays inside it would reach NumPy, which refuses them. Operators
    and Dask's helpers take lists as they are, and ``np.concatenate`` and its kin
    dispatch on the arrays inside."""
    parts = _parts(func) or []
    if not parts or not all(
            isinstance(f, np.ufunc) or (getattr(f, "__module__", "") or "").startswith("numpy")
            for f in parts):
        return False
    if all(getattr(f, "__name__", "") in _SEQUENCE_DISPATCH for f in parts):
        return False
    return any(isinstance(a, (list, tuple)) and not hasattr(a, "_fields") for a in args)


def same_numbers(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether JAX gives what NumPy gives for this call of ``func``: some array, every
    array (and NumPy scalar) of a dtype in ``_SAME_DTYPES`` (``_SAME_DTYPES_32`` with
    JAX's 64-bit mode off) and not empty (JAX's max
    of nothing fails where Dask's chunk helpers return an empty result), no list
    passed to a NumPy function as an array (``np.sum([a, b])`` of a delayed call),
    and, for a ufunc, NumPy's loop in the inputs' own dtype."""
    if getattr(func, "__name__", None) == "_enforce_dtype":
        # Dask's wrapper of an elementwise op with a 0-d array operand: its op's
        # numbers, in a result dtype that JAX has as NumPy does
        inner = kwargs.get("enforce_dtype_function")
        rest = {k: v for k, v in kwargs.items()
                if k not in ("enforce_dtype", "enforce_dtype_function")}
        dtype = _numpy_dtype(kwargs.get("enforce_dtype"))
        return (inner is not None and supported(inner) and dtype in _same_dtypes()
                and same_numbers(inner, args, rest))
    # NumPy's own functions take a list or tuple as an array (np.sum([a, b]) stacks
    # them); JAX's refuse it. Operators (x[(0, slice(None))]) and Dask's helpers
    # (_concatenate2 of a list of blocks) take them as they are
    as_array = all(isinstance(f, np.ufunc) or (getattr(f, "__module__", "") or "")
                   .startswith("numpy") for f in (_parts(func) or []))
    found = [False]
    #: a Python number given to a function that makes an array of it, and an array
    #: of a 32-bit float type (NumPy's np.dot(x32, 2.0) is float64, JAX's float32)
    python_number = [False]
    narrow = [False]
    same = _same_dtypes()
    x64 = same is _SAME_DTYPES
    weak = all(isinstance(f, np.ufunc) or getattr(f, "__module__", "") in ("operator",
                                                                          "_operator")
               for f in (_parts(func) or [func]))

    def ok(x: Any, top: bool) -> bool:
        if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
            if top and as_array:
                return False
            return all(ok(v, False) for v in x)
        if isinstance(x, dict):
            return all(ok(v, False) for v in x.values())
        if type(x) is int and not _INT64_MIN <= x <= _INT64_MAX:
            return False  # NumPy takes it (as an object or a float); JAX overflows
        dtype = getattr(x, "dtype", None)
        if dtype is None or not hasattr(x, "shape"):
            if (top and not weak and type(x) is not bool
                    and isinstance(x, (int, float, complex))):
                # a function that makes an array of it (np.where(x32, 1.1, 0.0) is
                # float64 in NumPy), which JAX without 64-bit mode makes 32-bit, and
                # JAX with it takes as weak beside a 32-bit array; operators and
                # ufuncs take Python numbers as weak in both
                if not x64:
                    return False
                python_number[0] = True
            return not isinstance(x, (np.generic,))
        found[0] = True
        narrow[0] = narrow[0] or _numpy_dtype(dtype) in (np.dtype("float32"),
                                                         np.dtype("complex64"))
        return _numpy_dtype(dtype) in same and getattr(x, "size", 1) != 0

    good = all(ok(a, True) for a in args) and all(ok(v, False) for v in kwargs.values())
    if good and python_number[0] and narrow[0] and _named(func, _ARRAY_OF_NUMBERS):
        return False
    asked = _asked_dtype(func, kwargs)
    if good and asked is not None:
        # a result dtype asked for (sum(dtype=...), a mean's per-chunk step; Dask's
        # reductions put it in a partial): one JAX computes as NumPy does (float64
        # with JAX's 64-bit mode off would be float32)
        try:
            good = _numpy_dtype(asked) in same
        except Exception:
            good = False
    if good and isinstance(func, np.ufunc):
        good = _ufunc_keeps_dtypes(func, args)
    if good and complex_differs(func) and _any_complex(args, kwargs):
        # JAX orders complex numbers its own way where one is NaN (its max, min and
        # maximum skip a complex NaN that NumPy's return), and computes others otherwise
        return False
    if good and _named(func, _DIVIDES) and _huge_divisor(args):
        return False
    if good and _named(func, _GETITEM) and _takes_by_number(args):
        # JAX clamps an index out of bounds (x[10] of 3 rows gave the last row) where
        # NumPy raises IndexError: by a number or an array of numbers, NumPy takes it
        return False
    return good and found[0]


_GETITEM = frozenset({"getitem"})


def _takes_by_number(args: tuple[Any, ...]) -> bool:
    """Whether a ``getitem`` call indexes by a whole number or an array of them (not
    only by slices, None and Ellipsis)."""
    if len(args) < 2:
        return False
    index = args[1]
    parts = index if isinstance(index, tuple) else (index,)
    return not all(p is None or p is Ellipsis or isinstance(p, slice) for p in parts)


def _asked_dtype(func: Any, kwargs: dict[str, Any]) -> Any:
    """The ``dtype=`` a call passes: in its keyword arguments, or in a partial's."""
    if kwargs.get("dtype") is not None:
        return kwargs["dtype"]
    while isinstance(func, functools.partial):
        if func.keywords.get("dtype") is not None:
            return func.keywords["dtype"]
        func = func.func
    return None


def _named(func: Any, names: frozenset[str]) -> bool:
    return any(str(getattr(f, "__name__", "")) in names for f in (_parts(func) or [func]))


def _huge_divisor(args: tuple[Any, ...]) -> bool:
    """Whether an input that is broadcast (a number, or an array of another shape than
    the result's) is so large that its reciprocal is below the smallest normal number of its
    type, which XLA flushes to 0: ``x / 1e38`` in float32 gave 0. Only the broadcast
    ones: a divisor of the result's own shape is divided as it is."""
    arrays = [a for a in args if hasattr(a, "shape") and hasattr(a, "dtype")]
    try:
        result = np.broadcast_shapes(*(tuple(a.shape) for a in arrays))
    except Exception:
        return True  # (shapes that do not broadcast: NumPy says so, in its words)
    floats = [d for a in arrays
              if (d := _numpy_dtype(a.dtype)) is not None and d.kind in "fc"]
    # a Python number computes in the arrays' type (it is weak in both)
    work = _huge_for(np.result_type(*floats)) if floats else None
    for a in args:
        if isinstance(a, (float, complex)) and not isinstance(a, bool):
            if work is not None and abs(a) > work:
                return True
            continue
        dtype = _numpy_dtype(getattr(a, "dtype", None))
        if dtype is None or dtype.kind not in "fc" or tuple(a.shape) == result:
            continue
        limit = _huge_for(dtype)
        if limit is None:
            continue
        try:
            # (any() of a comparison: a NaN among them made np.max NaN, and NaN > limit
            # False, so x / [huge, nan] ran JAX and gave 0 for x / huge)
            if int(getattr(a, "size", 1)) and bool((np.abs(np.asarray(a)) > limit).any()):
                return True
        except Exception:
            return True  # (cannot tell: NumPy, whose numbers are NumPy's)
    return False


#: per float type, the magnitude past which a number's reciprocal is below the smallest
#: normal number
_HUGE = {t: float(1 / np.finfo(t).tiny) for t in (np.float16, np.float32, np.float64)}


def _huge_for(dtype: np.dtype[Any]) -> float | None:
    """The limit of :data:`_HUGE` for a float or complex dtype (a complex one's parts)."""
    real = np.dtype(dtype.char.lower()) if dtype.kind == "c" else dtype
    return _HUGE.get(real.type)


#: words in the names of functions that order numbers (max, argmin, maximum, sort,
#: clip, median...): with complex input they run NumPy
_ORDERING = ("max", "min", "sort", "partition", "clip", "ptp", "median", "percentile",
             "quantile", "greater", "less")


def _numpy_dtype(dtype: Any) -> np.dtype[Any] | None:
    """``dtype`` as NumPy's, or None where it is none of NumPy's: pandas' own (its
    text, categories, nullable integers, dates with a time zone), which JAX never
    takes (NumPy runs them)."""
    if dtype is None or isinstance(dtype, np.dtype):
        return dtype
    try:
        return np.dtype(dtype)
    except TypeError:
        return None


def complex_differs(func: Any) -> bool:
    """Whether JAX gives other numbers than NumPy for ``func`` of complex input
    (``_COMPLEX_DIFFERS``, or an ordering function): such a task runs NumPy there."""
    return _named(func, _COMPLEX_DIFFERS) or _orders(func)


def _orders(func: Any) -> bool:
    return any(any(w in str(getattr(f, "__name__", "")).lower() for w in _ORDERING)
               for f in (_parts(func) or [func]))


def _any_complex(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    def cx(x: Any) -> bool:
        if isinstance(x, (list, tuple)):
            return any(cx(v) for v in x)
        if isinstance(x, dict):
            return any(cx(v) for v in x.values())
        dtype = _numpy_dtype(getattr(x, "dtype", None))
        return dtype is not None and dtype.kind == "c"

    return cx(args) or cx(kwargs)


def _ufunc_keeps_dtypes(func: np.ufunc, args: tuple[Any, ...]) -> bool:
    """Whether NumPy's loop for these inputs computes in their own (promoted) dtype,
    as JAX does: ``float_power`` of float32, say, computes in float64."""
    ins: list[Any] = []
    for a in args[:func.nin]:
        dtype = getattr(a, "dtype", None)
        ins.append(np.dtype(dtype) if dtype is not None else type(a))
    try:
        loop = func.resolve_dtypes((*ins, *([None] * func.nout)))
        promoted = np.result_type(*[d for d in ins if isinstance(d, np.dtype)])
    except Exception:
        return False
    return all(d == promoted for d in loop[:func.nin])


#: functions that give a 0-d array, not a scalar, where NumPy's result has no
#: dimensions (checked against NumPy); JAX gives 0-d arrays for everything
_ZERO_D_ARRAYS = frozenset({"tensordot", "where", "_tensordot", "_matmul", "_chunk_sum",
                            "_concatenate2"})
#: functions that give what they were given: a scalar for a NumPy scalar, a 0-d array
#: for a 0-d array (``np.transpose(x.sum())`` of a Dask reduction's scalar is a scalar)
_LIKE_INPUT = frozenset({"squeeze", "transpose", "real", "imag"})


def gives_scalar(func: Any, scalar_input: bool = False) -> bool:
    """Whether NumPy's ``func`` gives a NumPy scalar where its result has no dimensions
    (reductions, ufuncs and operators do), so the JAX version's 0-d array must be one;
    ``scalar_input``: NumPy would have a scalar as the call's first argument."""
    parts = _parts(func)
    if not parts:
        return False
    name = getattr(parts[-1], "__name__", "")
    if name in _LIKE_INPUT:
        return scalar_input
    return name not in _ZERO_D_ARRAYS


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
        # as Dask's: added in ``dtype`` (not added, then cast)
        if dtype is not None:
            a = [jnp.asarray(x).astype(dtype) for x in a]
        out = a[0]
        for x in a[1:]:
            out = jnp.add(out, x)
    else:
        out = a
    if keepdims:
        return out
    return jnp.squeeze(out, axis=axis[0])


def _enforce_dtype(*args: Any, enforce_dtype: Any, enforce_dtype_function: Any,
                   **kwargs: Any) -> Any:
    """Dask's ``_enforce_dtype`` with its op's JAX version: the result converted to
    the dtype Dask inferred, as Dask's does (refused as Dask refuses it)."""
    out = translate(enforce_dtype_function)(*args, **kwargs)  # type: ignore[misc]
    dtype = np.dtype(enforce_dtype)
    if hasattr(out, "dtype") and np.dtype(out.dtype) != dtype and dtype != np.dtype(object):
        if not np.can_cast(np.dtype(out.dtype), dtype, casting="same_kind"):
            raise ValueError(
                f"Inferred dtype from function {getattr(enforce_dtype_function, '__name__', '?')!r}"
                f" was {str(dtype)!r} but got {str(out.dtype)!r}, which can't be cast using "
                f"casting='same_kind'")
        out = out.astype(dtype)
    return out


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


def _mean_chunk(x: Any, sum: Any = None, numel: Any = None, dtype: Any = "f8",
                computing_meta: bool = False, **kwargs: Any) -> Any:
    """Dask's ``mean_chunk``: the chunk's count (a NumPy array, as Dask's count gives
    it; it depends on the shape alone) and its sum in ``dtype``, on the device."""
    import jax.numpy as jnp
    from dask.array.reductions import numel as count

    if computing_meta:
        return x
    shape_only = np.broadcast_to(np.empty((), dtype=bool), tuple(x.shape))
    n = count(shape_only, dtype=dtype, **kwargs)
    return {"n": n, "total": jnp.sum(x, dtype=np.dtype(dtype), **kwargs)}


_HELPERS: dict[str, Callable[..., Any]] = {
    "_matmul": _matmul,
    "_chunk_sum": _chunk_sum,
    "_tensordot": _tensordot,
    "_concatenate2": _concatenate2,
    "chunk_max": _chunk_max,
    "chunk_min": _chunk_min,
    "_enforce_dtype": _enforce_dtype,
    "mean_chunk": _mean_chunk,
}
