"""Fallback on the per-layer fast path: the jax worker lost mid-computation."""

from __future__ import annotations

import dask
import numpy as np
import pytest

from jupyter_mesh.router.layers import LayerPlan

from .meshes import fresh_local_mesh
from .test_router_fallback import compute_losing_jax, slow_pipeline


@pytest.fixture(scope="module")
def mesh():
    with dask.config.set({"mesh.fallback-timeout": 1.0,
                          "mesh.router.layer-plan-threshold": 10}):
        with fresh_local_mesh(cpu=1, jax_cpu=1, site="lab") as m:
            # Dask's costs measured now: the first routed plan runs no probe whose
            # tasks the killer would take for the computation's
            m.calibrate()
            yield m


def test_layer_plan_falls_back_when_the_jax_worker_dies(mesh):
    y = slow_pipeline()
    expected = y.compute(scheduler="sync")
    got = compute_losing_jax(mesh, y)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    report = mesh.last_report
    assert isinstance(report.plan, LayerPlan)
    assert report.fallbacks and "re-routed" in report.fallbacks[0]
    assert "numpy" in report.ran_on("matmul")
