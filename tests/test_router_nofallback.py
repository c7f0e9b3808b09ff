"""fallback=False: a routed computation that loses its device kind fails with MeshError
after mesh.fallback-timeout instead of being re-routed."""

from __future__ import annotations

import os
import signal
import threading
import time

import dask
import dask.array as da
import pytest
from distributed.core import Status

from jupyter_mesh import MeshError

from .meshes import fresh_local_mesh


@pytest.fixture(scope="module")
def mesh():
    with dask.config.set({"mesh.fallback-timeout": 1.0}):
        with fresh_local_mesh(cpu=1, jax_cpu=1, site="lab") as m:
            yield m


def test_lost_kind_without_fallback_is_a_mesh_error(mesh):
    x = da.random.random((1200, 1200), chunks=150)
    y = ((x @ x.T) + 1).sum(axis=0)

    def kill_when_busy():
        deadline = time.time() + 30
        while time.time() < deadline:
            if any(d.backend == "jax" and d.tasks for d in mesh.inventory()):
                break
            time.sleep(0.05)
        jax_dev = next(d for d in mesh.inventory() if d.backend == "jax")
        for name, nanny in mesh.cluster.workers.items():
            if name.startswith("jax-cpu"):
                nanny.status = Status.closing_gracefully
        os.kill(jax_dev.extra["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    t0 = time.time()
    with pytest.raises(MeshError, match=r"no live cpu:jax worker for 1 s and fallback=False"):
        mesh.compute(y, route="cpu:jax", fallback=False)
    killer.join()
    assert time.time() - t0 < 60  # it fails; it does not wait forever
    # the mesh still works on what is left
    (got,) = mesh.compute(x.sum())
    assert got == pytest.approx(float(x.sum().compute(scheduler="sync")))
