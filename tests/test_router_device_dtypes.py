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
