"""The router with CuPy GPUs (skipped where no GPU is usable)."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

import jupyter_mesh as jm
from jupyter_mesh import _state

pytestmark = pytest.mark.gpu
cupy = pytest.importorskip("cupy")


@pytest.fixture(scope="module")
def mesh():
    if not cupy.is_available():
        pytest.skip("no CUDA GPU usable by CuPy")
    active = _state.active()
    if active is not None:
        active.close()
    m = jm.Mesh.local(cpu=1, gpu=1, tpu=0, jax_cpu=0, site="gpu-lab")
    yield m
    m.close()


def pipeline():
    x = da.random.random((2000, 2000), chunks=1000)
    return ((x @ x.T) + 1).sum(axis=0)


def test_gpu_pipeline_equals_numpy_and_gpu_ran_the_matmul(mesh):
    y = pipeline()
    expected = y.compute(scheduler="sync")
    (got,) = mesh.compute(y, route="gpu")
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, expected, rtol=1e-8)
    assert mesh.last_report.ran_on("matmul") == ["cupy"]


def test_gpu_other_ops_same_numbers(mesh):
    rng = np.random.default_rng(0)
    sq = da.from_array(rng.random((400, 400)), chunks=200)
    u, s, v = da.linalg.svd(da.from_array(rng.random((400, 100)), chunks=(100, 100)))
    colls = (s, da.fft.fft(sq.rechunk((200, 400)), axis=1), sq[10:70, ::3] * 2, sq + sq.T,
             np.sin(sq).max() + sq.mean())
    expected = dask.compute(*colls, scheduler="sync")
    for route in ("gpu", "auto"):
        got = mesh.compute(*colls, route=route)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-8, atol=1e-10)


def test_gpu_data_stays_on_device_between_gpu_ops(mesh):
    plan = mesh.explain(pipeline(), route="gpu")
    m = plan.model
    labels = [plan.pools[p].label for p in plan.pool_of]
    consumers = m.consumers()
    for i, flag in enumerate(plan.to_host):
        if labels[i] == "gpu:cupy" and consumers[i] and m.keys[i] not in set(m.outputs):
            if all(labels[c] == "gpu:cupy" for c in consumers[i]):
                assert flag is False


def test_the_gpu_pool_knows_the_devices_memory(mesh):
    from jupyter_mesh.router import build_pools

    (gpu,) = [p for p in build_pools(mesh.inventory()) if p.kind == "gpu"]
    total = cupy.cuda.runtime.getDeviceProperties(0)["totalGlobalMem"]
    assert gpu.device_memory == total
    # a forced route whose blocks could not fit says so at once, before anything runs
    n = int((total / 8) ** 0.5) + 1
    big = da.zeros((n, n), chunks=n)
    with pytest.raises(jm.MeshError, match="device memory"):
        mesh.explain(big + 1, route="gpu")


def test_numpy_scalars_and_0d_inputs_promote_as_numpy_does_on_the_gpu(mesh):
    # NumPy 2 (NEP 50): a NumPy scalar or a 0-d array keeps its dtype, so a float32
    # block times np.float64(2) is float64; CuPy 14 agrees (the gpu extra needs it)
    x = da.random.random((400, 400), chunks=200).astype("float32")
    colls = (x * np.float64(2), x - x.mean(), x + np.float32(1), (x > 0.5) * np.int64(3))
    expected = dask.compute(*colls, scheduler="sync")
    got = mesh.compute(*colls, route="gpu")
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype
        # (float32: a mean summed in another order differs in its last bits, which
        # is all of x - mean where x is near the mean)
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)
