"""Inputs a device has no dtype for: the task runs NumPy on the worker's host instead.

There is no GPU here: CuPy's rules (which dtypes it has) are checked with a stand-in
for CuPy's conversions (a NumPy subclass that marks arrays "on the device"), so only
the decision is tested, not CuPy itself; the ``gpu``-marked tests run the real thing.
"""

from __future__ import annotations

import operator

import numpy as np
import pytest

from jupyter_mesh.router import _device, backends


class OnStandIn(np.ndarray):
    """An array "on the device" of the stand-in backend (host memory, labelled)."""


class StandInCupy(backends.CupyBackend):
    """CuPy's rules of what the device holds, with NumPy standing in for its arrays."""

    def is_device_array(self, x):
        return isinstance(x, OnStandIn)

    def to_device(self, x):
        if isinstance(x, np.ndarray) and not isinstance(x, OnStandIn):
            if not self.holds(x):
                raise TypeError(f"CuPy has no {x.dtype} arrays")  # as cupy.asarray fails
            return x.view(OnStandIn)
        return x

    def to_host(self, x):
        return np.asarray(x) if isinstance(x, OnStandIn) else x


@pytest.fixture
def on_a_gpu_worker(monkeypatch):
    monkeypatch.setattr(_device, "worker_backend", lambda: "cupy")
    monkeypatch.setattr(_device, "worker_kind", lambda: "gpu")
    standin = StandInCupy()
    monkeypatch.setattr(_device, "get_backend", lambda name: standin)
    yield
    _device.pop_records("p")


@pytest.mark.parametrize("dtype", ["float32", "float64", "int8", "uint64", "bool",
                                   "complex128", "float16"])
def test_numbers_run_on_the_device(on_a_gpu_worker, dtype):
    a = np.arange(6).astype(dtype)
    out = _device.DeviceCall(operator.add, "k", "p", True, frozenset({"cupy"}))(a, a)
    assert _device.pop_records("p")["k"][0] == "cupy"
    assert type(out) is np.ndarray and np.array_equal(out, a + a)


@pytest.mark.parametrize("make", [
    lambda: np.array(["a", "bc"], dtype=object),
    lambda: np.array(["a", "bc"]),
    lambda: np.array(["2026-11-29", "2026-11-30"], dtype="datetime64[D]"),
    lambda: np.arange(2, dtype=np.longdouble),
])
def test_an_input_the_device_has_no_dtype_for_runs_numpy_on_the_host(on_a_gpu_worker, make):
    a = make()
    if np.dtype(np.longdouble).itemsize <= 8 and a.dtype == np.longdouble:
        pytest.skip("longdouble is float64 on this platform: CuPy has it")
    expected = np.concatenate([a, a])
    call = _device.DeviceCall(np.concatenate, "k", "p", True, frozenset({"cupy"}))
    out = call([a, a])  # in a list, as Dask passes a concatenation's blocks
    assert _device.pop_records("p")["k"][0] == "numpy"
    assert np.array_equal(out, expected) and out.dtype == expected.dtype


def test_submit_leaves_arrays_the_device_has_no_dtype_for_on_the_host(on_a_gpu_worker):
    names = np.array(["x", "y"], dtype=object)
    values = np.arange(2.0)

    def where(n, v):
        return type(n).__name__, type(v).__name__

    assert _device.SubmitCall(where, "cupy")(names, values) == ("ndarray", "OnStandIn")


@pytest.mark.parametrize("asked, kind, moved", [
    (None, None, False), ("numpy", "cpu", False), ("cupy", "gpu", True),
    # on="gpu": the GPU worker's own backend; a worker of another kind (a fallback)
    # gives host NumPy
    (_device.ANY_BACKEND, "gpu", True), (_device.ANY_BACKEND, "tpu", False)])
def test_submit_moves_arguments_only_to_the_backend_asked_for(on_a_gpu_worker, asked,
                                                               kind, moved):
    # mesh.submit(f, a) with no target, or on="cpu", may land on a device worker: f
    # still gets host NumPy there, so its numbers never depend on where it ran
    def where_is(a):
        return type(a).__name__

    assert _device.SubmitCall(where_is, asked, kind)(np.arange(3.0)) == (
        "OnStandIn" if moved else "ndarray")


def test_a_masked_array_runs_numpy_on_the_host_and_keeps_its_mask(on_a_gpu_worker):
    # a device array has no mask: converting would drop it and change the numbers
    a = np.ma.masked_greater(np.arange(6.0), 3.0)
    out = _device.DeviceCall(np.sum, "k", "p", True, frozenset({"cupy"}))(a)
    assert _device.pop_records("p")["k"][0] == "numpy"
    assert out == 0.0 + 1.0 + 2.0 + 3.0


def test_another_librarys_array_runs_numpy_on_the_host(on_a_gpu_worker):
    class Sparse:  # an array-like of its own (SciPy's sparse matrices are such)
        shape, dtype = (2,), np.dtype("float64")

        def __add__(self, other):
            return "added on the host"

    out = _device.DeviceCall(operator.add, "k", "p", True, frozenset({"cupy"}))(Sparse(), 1)
    assert _device.pop_records("p")["k"][0] == "numpy"
    assert out == "added on the host"


def test_a_list_that_numpy_takes_as_one_array_runs_numpy(on_a_gpu_worker):
    # np.sum([a, b]) of a delayed call stacks them in NumPy itself, which refuses device
    # arrays; np.concatenate dispatches on the arrays inside, so it runs on the device
    a, b = np.arange(3.0), np.ones(3)
    out = _device.DeviceCall(np.sum, "k", "p", True, frozenset({"cupy"}))([a, b], axis=0)
    assert _device.pop_records("p")["k"][0] == "numpy"
    assert np.array_equal(out, a + b)
    out = _device.DeviceCall(np.concatenate, "c", "p", True, frozenset({"cupy"}))([a, b])
    assert _device.pop_records("p")["c"][0] == "cupy"
    assert np.array_equal(out, np.concatenate([a, b]))


def test_a_result_kept_on_the_device_is_waited_for_before_its_time_is_taken(
        on_a_gpu_worker, monkeypatch):
    # CuPy runs asynchronously: without a wait the measured seconds are the launch's
    waits = []
    monkeypatch.setattr(StandInCupy, "synchronize", lambda self: waits.append(1))
    a = np.arange(4.0)
    kept = _device.DeviceCall(operator.add, "k", "p", False, frozenset({"cupy"}))(a, a)
    assert type(kept) is _device.OnDevice and waits == [1]
    # handed to the host, the copy waits for it
    _device.DeviceCall(operator.add, "h", "p", True, frozenset({"cupy"}))(a, a)
    assert waits == [1]


def test_only_numpys_own_code_runs_on_a_device_backend():
    from functools import partial

    import dask.array as da
    import scipy.special

    from jupyter_mesh.router.classify import model_collections, native_backends

    # NumPy's ufuncs run there; SciPy's have no CuPy namesake
    assert "cupy" in native_backends("elementwise", np.exp)
    assert "cupy" not in native_backends("elementwise", scipy.special.erf)
    # numpy.ma makes masked arrays, which no device array is
    assert "cupy" not in native_backends("elementwise", np.ma.masked_greater)
    # a user's function that Dask's own passes on (map_blocks with enforce_ndim hands
    # it to apply_and_enforce as an argument) is the user's
    from dask.array.core import apply_and_enforce

    def block_sum(block):  # named like a reduction: classified as one
        return np.asarray(block).sum(axis=0, keepdims=True)

    assert "cupy" not in native_backends("reduction", partial(apply_and_enforce,
                                                              _func=block_sum))
    assert "cupy" not in native_backends("reduction", apply_and_enforce, (block_sum,))
    assert "cupy" in native_backends("reduction", partial(np.sum, axis=0))
    assert "cupy" in native_backends("reduction", apply_and_enforce, (np.sum,))
    x = da.ones((4, 4), chunks=2)
    model = model_collections([x.map_blocks(block_sum, enforce_ndim=True)])
    (op,) = [op for op in model.ops if "block_sum" in op.label]
    assert op.op_class == "reduction" and op.passes == (block_sum,)
    assert "cupy" not in op.native


def test_a_users_function_passed_as_an_argument_gets_host_arrays(on_a_gpu_worker):
    from dask.array.core import apply_and_enforce

    seen = []

    def block_sum(block):
        seen.append(type(block))
        return block.sum(axis=0, keepdims=True)

    a = np.arange(4.0).reshape(2, 2)
    call = _device.DeviceCall(apply_and_enforce, "k", "p", True, frozenset({"cupy"}))
    out = call(a, _func=block_sum, expected_ndim=2)
    assert _device.pop_records("p")["k"][0] == "numpy" and seen == [np.ndarray]
    assert np.array_equal(out, a.sum(axis=0, keepdims=True))


class LacksMedian(OnStandIn):
    """A stand-in device array whose library lacks np.median, as CuPy lacks some of
    NumPy's functions: its ``__array_function__`` declines it."""

    def __array_function__(self, func, types, args, kwargs):
        if func is np.median:
            return NotImplemented
        return super().__array_function__(func, types, args, kwargs)


def test_a_numpy_function_the_device_lacks_runs_numpy_on_the_host(on_a_gpu_worker,
                                                                 monkeypatch):
    # NumPy finds no implementation for the device's arrays and says so; the task runs
    # NumPy on the worker's host instead of failing
    standin = _device.get_backend("cupy")
    monkeypatch.setattr(standin, "to_device",
                        lambda x: x.view(LacksMedian) if type(x) is np.ndarray else x)
    monkeypatch.setattr(standin, "is_device_array",
                        lambda x: isinstance(x, LacksMedian))
    a = np.arange(7.0)
    out = _device.DeviceCall(np.median, "k", "p", True, frozenset({"cupy"}))(a)
    assert _device.pop_records("p")["k"][0] == "numpy"
    assert out == 3.0 and type(out) is np.float64
    # a function it has still runs on the device; other errors still fail the task
    out = _device.DeviceCall(np.sum, "k", "p", True, frozenset({"cupy"}))(a)
    assert _device.pop_records("p")["k"][0] == "cupy" and out == 21.0
    with pytest.raises(TypeError, match="did not contain a loop"):
        _device.DeviceCall(operator.add, "k", "p", True, frozenset({"cupy"}))(a, "x")


def test_device_arrays_in_a_named_tuple_come_back_to_the_host(on_a_gpu_worker):
    # NumPy 2's linalg functions return named tuples (SVDResult, QRResult...): a result
    # handed to the host has host arrays inside one too, and stays a named tuple
    a = np.arange(6.0).reshape(3, 2)
    out = _device.DeviceCall(np.linalg.qr, "k", "p", True, frozenset({"cupy"}))(a)
    assert _device.pop_records("p")["k"][0] == "cupy"
    assert type(out).__name__ == "QRResult"
    assert all(type(x) is np.ndarray for x in out)
    np.testing.assert_allclose(out.Q @ out.R, a)


def _on_a_jax_worker(code: str, x64: str) -> str:
    """Run ``code`` in a process that is a JAX (CPU) worker as far as routed tasks can
    tell, with JAX's 64-bit mode as ``x64`` says; its stdout."""
    import os
    import subprocess
    import sys

    prelude = ("import operator, numpy as np\n"
               "from jupyter_mesh.router import _device\n"
               "_device._local.device = ('cpu', 'jax')\n")
    env = {**os.environ, "JAX_ENABLE_X64": x64, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_result_kept_on_jax_keeps_numpys_type_in_the_next_op():
    # jnp.where(x32, 1.1, 0.0) is a *weak* float64 in JAX (its dtype came from Python
    # scalars); kept on the device, the next op met it with float32 and gave float32,
    # where NumPy's float64 gives float64 (and float32's precision)
    out = _on_a_jax_worker("""
x = np.linspace(0.1, 1.0, 16, dtype=np.float32).reshape(4, 4)
kept = _device.DeviceCall(np.where, "k1", "p", False, frozenset({"jax"}))(x, 1.1, 0.0)
assert type(kept) is _device.OnDevice, kept
got = _device.DeviceCall(operator.add, "k2", "p", True, frozenset({"jax"}))(kept, x)
want = np.where(x, 1.1, 0.0) + x
print(got.dtype, want.dtype, np.array_equal(got, want),
      *sorted(b for b, _ in _device.pop_records("p").values()))
""", "1")
    assert out.split() == ["float64", "float64", "True", "jax", "jax"]


def test_jax_with_its_64_bit_mode_off_gets_no_64_bit_work():
    # a worker started with JAX_ENABLE_X64=0 (dask worker --preload keeps what the
    # environment says): JAX would make float64 blocks float32 on the way in, so 64-bit
    # work runs NumPy there, exactly; 32-bit work still runs JAX
    out = _on_a_jax_worker("""
from jupyter_mesh.router.backends import get_backend
jax = get_backend("jax")
a = np.linspace(0, 1, 16).reshape(4, 4) + 1 / 3
print([jax.holds(a.astype(t)) for t in ("float64", "complex128", "int64", "float32",
                                        "complex64", "int32")])
call = _device.DeviceCall(operator.mul, None, "p", True, frozenset({"jax"}))
for t in ("float64", "complex128", "float32"):
    b = a.astype(t)
    _device.thread_state.key = t
    got = call(b, b)
    print(t, got.dtype, np.array_equal(got, b * b), _device.pop_records("p")[t][0])
# Python numbers: a function that makes an array of them may make it 64-bit in NumPy;
# operators, ufuncs and arguments such as axis= keep 32-bit work on JAX
x = a.astype("float32")
for name, f, args, kw in [("where", np.where, (x, 1.1, 0.0), {}),
                          ("mul", operator.mul, (x, 2.0), {}),
                          ("pow", np.power, (x, 2), {}),
                          ("sum", np.sum, (x,), {"axis": (0,), "keepdims": True}),
                          ("index", operator.getitem, (x, (0, slice(None))), {})]:
    _device.thread_state.key = name
    got = _device.DeviceCall(f, None, "p", True, frozenset({"jax"}))(*args, **kw)
    want = f(*args, **kw)
    print(name, got.dtype == want.dtype, np.allclose(got, want),
          _device.pop_records("p")[name][0])
""", "0")
    lines = out.splitlines()
    assert lines[0] == "[False, False, False, True, True, True]"
    assert lines[1:] == ["float64 float64 True numpy", "complex128 complex128 True numpy",
                         "float32 float32 True jax", "where True True numpy",
                         "mul True True jax", "pow True True jax", "sum True True jax",
                         "index True True numpy"]  # (by number: JAX clamps, see jax_ops)


def test_a_tuple_subclass_passes_through_the_device_wrapper_as_it_can():
    # Dask's CombinedOutput (a DataFrame's neighbouring partitions) must stay one; a
    # subclass rebuilt otherwise than from its items comes as a plain tuple of them
    class Items(tuple):
        pass

    class Point(tuple):
        def __new__(cls, *xs):
            return super().__new__(cls, xs)

    kept = _device._map(lambda v: v, Items([1, 2]))
    assert type(kept) is Items and kept == (1, 2)
    plain = _device._map(lambda v: v, Point(1, 2))
    assert type(plain) is tuple and plain == (1, 2)
