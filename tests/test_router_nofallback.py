"""fallback=False: a routed computation that loses its device kind fails with MeshError
after mesh.fallback-timeout instead of being re-routed."""

from __future__ import annotations

import threading
import time

import dask
import dask.array as da
import pytest

from jupyter_mesh import MeshError

from .meshes import fresh_local_mesh, kill_jax_worker_when_busy


@pytest.fixture(scope="module")
def mesh():
    with dask.config.set({"mesh.fallback-timeout": 1.0}):
        with fresh_local_mesh(cpu=1, jax_cpu=1, site="lab") as m:
            # Dask's costs measured now: the first routed plan runs no probe whose
            # tasks the killer would take for the computation's
            m.calibrate()
            yield m


def test_lost_kind_without_fallback_is_a_mesh_error(mesh, caplog):
    x = da.random.random((1200, 1200), chunks=150)
    y = ((x @ x.T) + 1).sum(axis=0)

    mesh.compute(x.sum(), route="cpu:jax")
    assert mesh.last_report is not None
    killer = threading.Thread(target=kill_jax_worker_when_busy, args=(mesh,))
    killer.start()
    t0 = time.time()
    with pytest.raises(MeshError, match=r"^no live cpu:jax worker for 1 s and fallback=False: "
                       r"the computation cannot finish as routed; bring such workers back "
                       r"\(mesh.scale on a mesh started here, jupyter-mesh worker "
                       r"elsewhere\) and compute again, or compute with fallback=True or "
                       r"another route$"), \
            caplog.at_level("WARNING", logger="jupyter_mesh"):
        mesh.compute(y, route="cpu:jax", fallback=False)
    killer.join()
    # the scheduler's log says what it waits for: a failure, not a re-route
    assert "waiting 1 s before failing them (fallback=False)" in caplog.text
    assert "before re-routing them" not in caplog.text
    assert time.time() - t0 < 60  # it fails; it does not wait forever
    # the failed computation's plan is kept, and no earlier report passes for its own
    assert mesh.last_plan is not None and mesh.last_plan.route == "cpu:jax"
    assert any(r["op"] == "matmul" for r in mesh.last_plan.rows)
    assert mesh.last_report is None
    # the mesh still works on what is left
    (got,) = mesh.compute(x.sum())
    assert got == pytest.approx(float(x.sum().compute(scheduler="sync")))


def test_a_persist_that_loses_its_kind_without_fallback_fails_at_once(mesh):
    # a persist gathers nothing: its failure must not wait for the data's first use
    # the worker the test above killed (its nanny stood down) is replaced: a scale to
    # the number the mesh had counts only live workers; scaling another kind leaves
    # its spec alone
    jax_spec = sorted(n for n in mesh.cluster.worker_spec if n.startswith("jax-cpu"))
    mesh.scale(cpu=1)
    assert sorted(n for n in mesh.cluster.worker_spec if n.startswith("jax-cpu")) == jax_spec
    mesh.scale(jax_cpu=1)
    assert [d.backend for d in mesh.inventory()].count("jax") == 1
    x = da.random.random((1200, 1200), chunks=150)
    killer = threading.Thread(target=kill_jax_worker_when_busy, args=(mesh,))
    killer.start()
    with pytest.raises(MeshError, match=r"^no live cpu:jax worker for 1 s and "
                                        r"fallback=False") as err:
        with mesh.route("cpu:jax", fallback=False):
            ((x @ x.T) + 1).persist()
    killer.join()
    assert "\n" not in str(err.value)
    (got,) = mesh.compute(x.sum())  # the mesh goes on with what is left
    assert got == pytest.approx(float(x.sum().compute(scheduler="sync")))
