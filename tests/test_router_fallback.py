"""Fallback: a device kind lost mid-computation; nothing waits forever in no-worker."""

from __future__ import annotations

import threading
import time

import dask
import dask.array as da
import numpy as np
import pytest

from jupyter_mesh import MeshError
from jupyter_mesh.router.api import FallbackNotices, MeshFallbackWarning

from .meshes import fresh_local_mesh, kill_jax_worker_when_busy


@pytest.fixture(scope="module")
def mesh():
    with dask.config.set({"mesh.fallback-timeout": 1.0}):
        with fresh_local_mesh(cpu=1, jax_cpu=1, site="lab") as m:
            # Dask's costs measured now: the first routed plan runs no probe whose
            # tasks the killer would take for the computation's
            m.calibrate()
            yield m


def slow_pipeline():
    x = da.random.random((1200, 1200), chunks=150)
    return ((x @ x.T) + 1).sum(axis=0)


def compute_losing_jax(mesh, y):
    """``mesh.compute(y, route="cpu:jax")`` while the JAX worker is SIGKILLed as soon
    as it runs a task; expects the fallback warning and returns the result."""

    killer = threading.Thread(target=kill_jax_worker_when_busy, args=(mesh,))
    with pytest.warns(MeshFallbackWarning, match="cpu:jax") as shown:
        killer.start()
        (got,) = mesh.compute(y, route="cpu:jax")
        # the scheduler's event of the same fallback arrives too: it is not shown again
        notices = FallbackNotices.of(mesh)
        deadline = time.monotonic() + 10
        while notices.received < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert notices.received >= 1
    killer.join()
    fallbacks = [w for w in shown if issubclass(w.category, MeshFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in fallbacks]
    # it points at the user's line, not into jupyter_mesh or Dask
    assert fallbacks[0].filename == __file__
    return got


def test_sigkill_jax_worker_mid_computation_falls_back(mesh):
    y = slow_pipeline()
    expected = y.compute(scheduler="sync")
    got = compute_losing_jax(mesh, y)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    report = mesh.last_report
    assert report.fallbacks and "re-routed" in report.fallbacks[0]
    assert "numpy" in report.ran_on("matmul")
    assert not [d for d in mesh.inventory() if d.backend == "jax"]


def test_forced_missing_kind_is_an_error_at_once(mesh):
    with pytest.raises(MeshError, match="no live cpu:jax worker"):
        mesh.compute(slow_pipeline(), route="cpu:jax")


def test_auto_plans_only_over_live_kinds(mesh):
    plan = mesh.explain(slow_pipeline())
    assert {p.backend for p in plan.pools} == {"numpy"}
    (got,) = mesh.compute(slow_pipeline())
    assert got.shape == (1200,)
