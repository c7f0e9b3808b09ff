"""Remote cells on a CUDA GPU worker (CuPy); run only where a GPU is usable."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu
cupy = pytest.importorskip("cupy")

import jupyter_mesh as jm  # noqa: E402


@pytest.fixture(scope="module")
def mesh():
    if not cupy.is_available():
        pytest.skip("no CUDA GPU usable by CuPy")
    m = jm.Mesh.local(cpu=1, gpu=1, tpu=0, set_current=False)
    yield m
    m.close()


def test_on_gpu_runs_cupy_on_the_gpu_worker(mesh):
    r = mesh.run_cell(
        "import cupy\nx = cupy.arange(10)\n(int(x.sum()), x.device.id)", on="gpu", value=True
    )
    assert (r.kind, r.backend) == ("gpu", "cupy")
    assert r.value[0] == 45


def test_state_and_pull_of_a_device_array(mesh):
    mesh.run_cell("import cupy\ny = cupy.ones((1000, 1000)) * 2", on="gpu")
    r = mesh.run_cell("total = float(y.sum())", on="gpu", pull=["total", "y"])
    assert r.pulled["total"] == 2_000_000.0
    assert float(cupy.asarray(r.pulled["y"]).sum()) == 2_000_000.0
