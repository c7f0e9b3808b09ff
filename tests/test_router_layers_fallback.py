"""Fallback on the per-layer fast path: the jax worker lost mid-computation."""

from __future__ import annotations

import threading
import time

import dask
import numpy as np
import pytest

from jupyter_mesh.router.api import MeshFallbackWarning
from jupyter_mesh.router.layers import LayerPlan

from .meshes import fresh_local_mesh
from .test_router_fallback import _kill_jax_worker, slow_pipeline


@pytest.fixture(scope="module")
def mesh():
    with dask.config.set({"mesh.fallback-timeout": 1.0,
                          "mesh.router.layer-plan-threshold": 10}):
        with fresh_local_mesh(cpu=1, jax_cpu=1, site="lab") as m:
            yield m


def test_layer_plan_falls_back_when_the_jax_worker_dies(mesh):
    y = slow_pipeline()
    expected = y.compute(scheduler="sync")

    def kill_when_busy():
        deadline = time.time() + 30
        while time.time() < deadline:
            if any(d.backend == "jax" and d.tasks for d in mesh.inventory()):
                break
            time.sleep(0.05)
        _kill_jax_worker(mesh)

    killer = threading.Thread(target=kill_when_busy)
    with pytest.warns(MeshFallbackWarning, match="cpu:jax"):
        killer.start()
        (got,) = mesh.compute(y, route="cpu:jax")
    killer.join()
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    report = mesh.last_report
    assert isinstance(report.plan, LayerPlan)
    assert report.fallbacks and "re-routed" in report.fallbacks[0]
    assert "numpy" in report.ran_on("matmul")
