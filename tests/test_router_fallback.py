"""Fallback: a device kind lost mid-computation; nothing waits forever in no-worker."""

from __future__ import annotations

import os
import signal
import threading
import time

import dask
import dask.array as da
import numpy as np
import pytest
from distributed.core import Status

from jupyter_mesh import MeshError
from jupyter_mesh.router.api import MeshFallbackWarning

from .meshes import fresh_local_mesh


@pytest.fixture(scope="module")
def mesh():
    with dask.config.set({"mesh.fallback-timeout": 1.0}):
        with fresh_local_mesh(cpu=1, jax_cpu=1, site="lab") as m:
            yield m


def slow_pipeline():
    x = da.random.random((1200, 1200), chunks=150)
    return ((x @ x.T) + 1).sum(axis=0)


def _kill_jax_worker(mesh) -> None:
    """SIGKILL the jax worker process; its nanny (in this process) is made to stand
    down first, as if it had been killed too, so nothing restarts the worker."""
    jax_dev = next(d for d in mesh.inventory() if d.backend == "jax")
    pid = jax_dev.extra["pid"]
    for name, nanny in mesh.cluster.workers.items():
        if name.startswith("jax-cpu"):
            nanny.status = Status.closing_gracefully
    os.kill(pid, signal.SIGKILL)


def compute_losing_jax(mesh, y):
    """``mesh.compute(y, route="cpu:jax")`` while the JAX worker is SIGKILLed as soon
    as it runs a task; expects the fallback warning and returns the result."""

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
