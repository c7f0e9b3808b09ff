"""mesh.submit under the fallback: a task whose kind is lost runs on what is left."""

from __future__ import annotations

import re
import threading
import time
import warnings

import dask
import pytest

from jupyter_mesh import MeshError, MeshFallbackWarning

from .meshes import fresh_local_mesh, kill_jax_worker_when_busy, kill_worker


@pytest.fixture(scope="module")
def mesh():
    with dask.config.set({"mesh.fallback-timeout": 1.0}):
        with fresh_local_mesh(cpu=1, jax_cpu=1, site="lab") as m:
            yield m


def slow_backend_name(seconds, key=None, retries=None):
    """Sleep, then say which backend's worker ran this (and the keyword arguments
    that Dask's own submit would have taken for itself)."""
    from distributed import get_worker

    time.sleep(seconds)
    return get_worker().extensions["jupyter-mesh"].device["backend"], key, retries


def test_keyword_arguments_named_like_dasks_options_reach_the_function(mesh):
    fut = mesh.submit(slow_backend_name, 0, key="mine", retries=3, on="cpu:numpy")
    assert fut.result(timeout=30) == ("numpy", "mine", 3)
    # the same call on another target is another task, not the first one's result
    other = mesh.submit(slow_backend_name, 0, key="mine", retries=3, on="cpu:jax")
    assert other.key != fut.key
    assert other.result(timeout=30)[0] == "jax"


def test_a_submitted_task_whose_kind_is_lost_runs_on_what_is_left(mesh):
    killer = threading.Thread(target=kill_jax_worker_when_busy, args=(mesh,))
    killer.start()
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        fut = mesh.submit(slow_backend_name, 3.0, on="cpu:jax")
        killer.join()
        # the JAX worker died while running it: after mesh.fallback-timeout (1 s here)
        # it runs on the NumPy worker instead of waiting for a JAX worker for ever
        backend, _, _ = fut.result(timeout=60)
        # and the notebook is told (no compute waits here to report it)
        deadline = time.monotonic() + 10
        while not _fallbacks(shown) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert backend == "numpy"
    (message,) = _fallbacks(shown)
    assert "lost every cpu:jax worker: 1 routed tasks re-routed after 1 s" in message
    assert not [d for d in mesh.inventory() if d.backend == "jax"]
    # a kind that is gone is refused at once
    with pytest.raises(MeshError, match="no live cpu:jax worker"):
        mesh.submit(slow_backend_name, 0, on="cpu:jax")


def _fallbacks(shown):
    return [str(w.message) for w in shown if issubclass(w.category, MeshFallbackWarning)]


def test_an_unrouted_computation_with_no_worker_left_fails_rather_than_waits(mesh):
    # the last worker goes (its nanny stands down, as if killed too): route="off" is
    # plain Dask, which would wait for a worker for ever
    (dev,) = mesh.inventory()
    # a submit with no target, running there: it fails too, once the fallback's
    # timeout has passed with no worker (it waited for ever)
    held = mesh.submit(time.sleep, 60, pure=False)
    deadline = time.monotonic() + 30
    while not mesh.client.processing().get(dev.worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_worker(mesh, dev, stand_down=True)
    t0 = time.monotonic()
    with pytest.raises(Exception, match="no live worker left for 1 s"):
        held.result(timeout=30)
    assert time.monotonic() - t0 < 20
    x = dask.delayed(sum)([1, 2, 3])
    t0 = time.monotonic()
    # not after the progress bar's threshold either (its wait checks too)
    with pytest.raises(MeshError, match=r"no live worker left for 1 s: .* mesh.scale"), \
            dask.config.set({"mesh.progress-after": 60}):
        mesh.compute(x, route="off")
    assert time.monotonic() - t0 < 20
    # and the routed way fails as clearly, at once
    with pytest.raises(MeshError):
        mesh.compute(x)


def test_a_submit_to_a_mesh_without_workers_says_so_at_once(no_mesh):
    # with no target it waited for ever (a routed compute says so at once)
    from distributed import LocalCluster

    import jupyter_mesh as jm

    with LocalCluster(n_workers=0, processes=False, protocol="tcp://", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        empty = jm.Mesh.connect(cluster.scheduler_address, set_current=False)
        try:
            t0 = time.monotonic()
            with pytest.raises(MeshError, match=rf"^no live workers to run _add on: add one "
                                                rf"\(jupyter-mesh worker "
                                                rf"{re.escape(cluster.scheduler_address)} on "
                                                rf"a machine of the mesh\), or wait for the "
                                                rf"mesh's to come back, then submit again$"):
                empty.submit(_add, 1, 2)
            assert time.monotonic() - t0 < 10
            # a routed computation or its plan: what to do, too (it said only "the
            # mesh has no live workers to route to")
            import dask.array as da

            y = da.ones(10, chunks=5).sum()
            for call in (empty.compute, empty.explain):
                with pytest.raises(MeshError, match=r"^no live workers to route this "
                                                    r"computation to: add one \(jupyter-mesh "
                                                    r"worker .*then compute again$"):
                    call(y)
        finally:
            empty.close()


def _add(a, b):
    return a + b


@pytest.mark.parametrize("how", ["submit", "compute", "route"])
def test_a_task_the_workers_cannot_unpickle_is_named_as_a_likely_cause(tmp_path, monkeypatch,
                                                                       how):
    # a function from a module only this process can import: Dask's worker fails to
    # unpickle the task and closes for good (plain Dask then waits for ever); the
    # mesh's "no live worker left" said to add workers, which would die the same way.
    # A plan that restricts nothing (every mesh of NumPy workers alone) waited for ever
    # too: Dask queues its tasks, which the scheduler plugin does not watch
    import dask.array as da

    (tmp_path / "only_here_mod.py").write_text("def inc(x):\n    return x + 1\n")
    with dask.config.set({"mesh.fallback-timeout": 1.0}), \
            fresh_local_mesh(cpu=1, jax_cpu=0) as m:
        monkeypatch.syspath_prepend(str(tmp_path))
        import only_here_mod

        with pytest.raises(MeshError) as err:
            if how == "submit":
                m.submit(only_here_mod.inc, 1).result(timeout=60)
            else:
                y = da.ones(4, chunks=2).map_blocks(only_here_mod.inc)
                if how == "compute":
                    m.compute(y)
                else:
                    with m.route("auto"):
                        y.compute()
    message = str(err.value)
    assert "no live worker left for 1 s" in message and "\n" not in message
    assert re.search(r"left unexpectedly while running \(?'?inc-\w+.*: killed, or it could "
                     r"not unpickle the task, e\.g\. a function from a module the workers "
                     r"cannot import; the worker's log says which\); once the cause is "
                     r"fixed, start workers again", message), message


def test_the_hint_names_only_an_unexpected_departure_with_tasks_running():
    from jupyter_mesh.router._scheduler import _last_lost

    class Sched:
        def __init__(self, *msgs):
            self.msgs = msgs

        def get_events(self, topic):
            assert topic == "all"
            return tuple((float(i), m) for i, m in enumerate(self.msgs))

    gone = {"action": "remove-worker", "expected": False, "processing-tasks": {"f-1"}}
    assert "while running f-1: killed, or" in _last_lost(Sched(gone))
    # the last to leave was scaled away, or ran nothing: no guess
    assert _last_lost(Sched(gone, {**gone, "expected": True})) == ""
    assert _last_lost(Sched(gone, {**gone, "processing-tasks": set()})) == ""
    # other events after it do not hide it; no event log at all says nothing
    assert _last_lost(Sched(gone, {"action": "add-client"})).startswith(" (the last")
    assert _last_lost(object()) == ""
