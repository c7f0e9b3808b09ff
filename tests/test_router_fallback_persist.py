"""Data persisted under a route and lost later: recomputed on what is left, and the
notebook is told, although no compute of the router waits for it."""

from __future__ import annotations

import os
import signal
import time
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
from distributed.core import Status

from jupyter_mesh.router.api import FallbackNotices, MeshFallbackWarning

from .meshes import fresh_local_mesh


@pytest.fixture(scope="module")
def mesh():
    with dask.config.set({"mesh.fallback-timeout": 1.0}):
        with fresh_local_mesh(cpu=1, jax_cpu=1) as m:
            yield m


def test_persisted_data_lost_with_its_kind_is_recomputed_with_a_warning(mesh):
    a = np.random.default_rng(0).random((300, 300))
    x = da.from_array(a, chunks=150)
    with mesh.route("cpu:jax"):
        y = (x @ x.T).persist()
    jax_dev = next(d for d in mesh.inventory() if d.backend == "jax")
    assert jax_dev.extra["pid"] and mesh.client.has_what()[jax_dev.worker]
    # the JAX worker holding the data dies, its nanny with it
    for name, nanny in mesh.cluster.workers.items():
        if name.startswith("jax-cpu"):
            nanny.status = Status.closing_gracefully
    os.kill(jax_dev.extra["pid"], signal.SIGKILL)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        # plain Dask, no route: the lost blocks are computed again; their tasks were
        # routed to cpu:jax, so the router's fallback moves them after 1 s
        got = y.sum(axis=0).compute()
        deadline = time.monotonic() + 10
        while not _fallbacks(shown) and time.monotonic() < deadline:
            time.sleep(0.05)
    np.testing.assert_allclose(got, (a @ a.T).sum(axis=0), rtol=1e-10)
    (message,) = _fallbacks(shown)
    assert message.startswith("jupyter_mesh fallback: lost every cpu:jax worker")
    assert "to what is left (cpu:numpy)" in message
    (event,) = FallbackNotices.of(mesh).events
    assert event["message"] in message and not event["failed"]


def test_another_clients_fallback_is_not_shown_here(mesh):
    notices = FallbackNotices.of(mesh)
    before = list(notices.events)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        notices.handle((time.time(), {"plan": "someone-elses", "message": "lost it",
                                      "failed": False}))
        notices.handle((time.time(), "not an event of ours"))
    assert not _fallbacks(shown) and notices.events == before


def _fallbacks(shown):
    return [str(w.message) for w in shown if issubclass(w.category, MeshFallbackWarning)]


def test_a_failure_of_tracked_work_is_shown_as_such(mesh):
    notices = FallbackNotices.of(mesh)
    notices.track("a-plan-of-ours")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        notices.handle((time.time(), {"plan": "a-plan-of-ours", "failed": True,
                                      "message": "no live worker at site 'edge'"}))
    assert _fallbacks(shown) == [
        "a routed computation cannot finish: no live worker at site 'edge'"]


def test_a_failed_submit_is_said_by_its_future_alone():
    # a submit that lost its site= showed the warning, then the same error again
    notices = FallbackNotices(mesh=None)
    notices.plans["submit-0123"] = None  # (as track() leaves it)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        notices.handle((time.time(), {"plan": "submit-0123", "failed": True,
                                      "message": "no live worker at site 'edge'"}))
        # a fallback of one is still said: nothing else tells of it
        notices.handle((time.time(), {"plan": "submit-0123", "failed": False,
                                      "message": "lost every cpu:jax worker"}))
    assert _fallbacks(shown) == ["jupyter_mesh fallback: lost every cpu:jax worker"]
    assert [e["failed"] for e in notices.events] == [True, False]


def test_a_fallback_that_comes_while_a_compute_fetches_its_results_is_shown_once():
    # the compute asked for its plan's status already; the scheduler's event comes
    # before the compute ends: it is held, then shown and handed back to the report
    notices = FallbackNotices(mesh=None)
    notices.plans["p1"] = None
    notices.waiting.add("p1")
    message = "lost every cpu:jax worker: 3 routed tasks re-routed"
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        notices.handle((1.0, {"plan": "p1", "message": message}))
        assert _fallbacks(shown) == []  # not while the compute waits
        late = notices.reported("p1", [])
        assert late == [message]
        assert _fallbacks(shown) == [f"jupyter_mesh fallback: {message}"]
        # one the compute reported itself is not shown again, held or late
        notices.plans["p2"] = None
        notices.waiting.add("p2")
        notices.handle((2.0, {"plan": "p2", "message": message}))
        assert notices.reported("p2", [message]) == []
        notices.handle((3.0, {"plan": "p2", "message": message}))
        assert len(_fallbacks(shown)) == 1
