"""Closing a local mesh that still holds routed results (a mesh of its own: closing
it must not close another test module's)."""

from __future__ import annotations

import time

import pytest

from .meshes import fresh_local_mesh, kill_worker
from .test_router_live import pipeline


def test_a_closing_mesh_announces_no_fallback_for_results_it_still_holds(caplog):
    # the routed results live on the JAX worker; losing it while they are still held
    # means running them again elsewhere (a fallback, announced), but not when the mesh
    # is closing: close first tells the scheduler to forget its routed work. (Dask's
    # own order on close varies, so here the worker is made to leave after that.)
    with fresh_local_mesh(cpu=1, jax_cpu=1) as m:
        with m.route("cpu:jax"):
            p = pipeline().persist()
        calls = []
        forget = m._forget_routes
        m._forget_routes = lambda: (calls.append("forget"), forget())
        m._forget_routes()
        with caplog.at_level("WARNING", logger="jupyter_mesh"):
            m.scale(jax_cpu=0)
            time.sleep(0.5)
        assert "no live" not in caplog.text and "re-routed" not in caplog.text
        del p
        m.close()
        assert calls == ["forget", "forget"]  # close forgets before the workers go


def test_closing_a_mesh_ends_its_persistent_route():
    # plain Dask calls must not go on routing to a closed mesh (and %mesh route off
    # could not clear it then: there is no active mesh)
    import dask
    import dask.array as da

    import jupyter_mesh as jm
    from jupyter_mesh.router import api

    before = dask.config.get("scheduler", None)
    m = jm.Mesh.local(cpu=1, jax_cpu=0, gpu=0, tpu=0, set_current=False)
    try:
        api.set_route(m, "auto")
        assert isinstance(dask.config.get("scheduler"), api._RoutedScheduler)
    finally:
        m.close()
    assert m.route_mode == "off"
    assert dask.config.get("scheduler", None) is before
    assert da.ones(10, chunks=5).sum().compute(scheduler="threads") == 10


def test_a_mesh_closed_inside_a_route_block_leaves_plain_dask_working():
    # the block ends after its mesh: Dask's config must be what it was before, not the
    # closed client's "dask.distributed" that the block found when it began
    import dask
    import dask.array as da

    before = dask.config.get("scheduler", None)
    with fresh_local_mesh(cpu=1) as m:
        with m.route("auto"):
            m.close()
        assert m.route_mode == "off"
    assert dask.config.get("scheduler", None) == before
    assert da.ones(10, chunks=5).sum().compute() == 10


def test_routes_that_end_out_of_order_leave_the_last_one_set():
    # a kernel route set inside a block holds after the block; one cleared inside it
    # stays cleared; nothing stale is left in Dask's config
    import dask
    import dask.array as da

    from jupyter_mesh.router import api

    with fresh_local_mesh(cpu=1) as m:
        before = dask.config.get("scheduler", None)  # the mesh's client's
        x = da.ones((40, 40), chunks=20)
        try:
            api.set_route(m, "cpu")
            with m.route("auto"):
                api.set_route(m, "off")
                assert m.route_mode == "auto"  # the block's route while it lasts
            assert m.route_mode == "off"
            assert dask.config.get("scheduler", None) == before
            report = m.last_report
            assert x.sum().compute() == 1600
            assert m.last_report is report  # not routed
            with m.route("off"):
                api.set_route(m, "auto")
                assert m.route_mode == "off"
                assert dask.config.get("scheduler", None) == before
            assert m.route_mode == "auto"
            assert x.sum().compute() == 1600
            assert m.last_report is not report and m.last_report.plan.route == "auto"
            # two blocks that end in the other order
            outer = m.route("cpu")
            inner = m.route("off")
            outer.__enter__()
            inner.__enter__()
            outer.__exit__(None, None, None)
            assert m.route_mode == "off"  # the inner block is still there
            inner.__exit__(None, None, None)
            assert m.route_mode == "auto"  # the kernel's again
        finally:
            api.set_route(m, "off")
        assert m.route_mode == "off"
        assert dask.config.get("scheduler", None) == before


def test_plain_dask_works_after_a_replaced_mesh_and_its_successor_closed():
    # the second mesh's client starts while the first's is open and, closing last,
    # would put back the "dask.distributed" it found: no client would be left for it
    import dask
    import dask.array as da

    import jupyter_mesh as jm

    with fresh_local_mesh(cpu=1) as first:
        second = jm.Mesh.local(cpu=1, gpu=0, tpu=0, jax_cpu=0, replace=True)
        assert first.closed and jm.current() is second
        second.close()
    assert dask.config.get("scheduler", None) != "dask.distributed"
    assert da.ones(10, chunks=5).sum().compute() == 10


def test_routing_ends_with_the_route_under_a_users_own_dask_config():
    # the user's dask.config.set around a route block puts back the router's scheduler
    # when it ends; once the kernel's route is off it must route nothing
    import dask
    import dask.array as da

    from jupyter_mesh.router import api

    with fresh_local_mesh(cpu=1) as m:
        plain = dask.config.get("scheduler", None)
        x = da.ones((40, 40), chunks=20)
        api.set_route(m, "auto")
        with dask.config.set(scheduler="threads"):
            with m.route("cpu"):
                assert m.route_mode == "cpu"
        api.set_route(m, "off")
        assert m.route_mode == "off"
        report = m.last_report
        assert x.sum().compute() == 1600
        assert m.last_report is report  # nothing routed
        assert dask.config.get("scheduler", None) == plain
        assert dask.config.get("array_optimize", None) is None


def test_a_route_kept_across_a_replace_ends_with_its_mesh():
    # %mesh route auto, %mesh start --replace, %mesh close: the new client put back the
    # router's scheduler it found; plain Dask must work, unrouted, after all of it
    import dask
    import dask.array as da

    import jupyter_mesh as jm
    from jupyter_mesh.router import api

    with fresh_local_mesh(cpu=1) as first:
        api.set_route(first, "auto")
        second = jm.Mesh.local(cpu=1, gpu=0, tpu=0, jax_cpu=0, replace=True)
        assert second.route_mode == "off" and first.closed
        x = da.ones((40, 40), chunks=20)
        assert x.sum().compute() == 1600
        assert second.last_report is None  # the new mesh ran it unrouted
        second.close()
    assert not isinstance(dask.config.get("scheduler", None), api._RoutedScheduler)
    assert dask.config.get("array_optimize", None) is None
    assert da.ones(10, chunks=5).sum().compute() == 10


def test_turning_routing_off_for_one_mesh_leaves_anothers_route():
    from jupyter_mesh.router import api

    with fresh_local_mesh(cpu=1) as a:
        b = jm_local_unset()
        try:
            api.set_route(b, "auto")
            api.set_route(a, "off")
            assert b.route_mode == "auto" and a.route_mode == "off"
        finally:
            api.set_route(b, "off")
            b.close()


def jm_local_unset():
    import jupyter_mesh as jm

    return jm.Mesh.local(cpu=1, gpu=0, tpu=0, jax_cpu=0, set_current=False)


def _slow_block(block):
    time.sleep(0.2)
    return block


def _closed_meanwhile(call, after):
    """Run ``call(mesh)`` in a thread on a fresh mesh, close the mesh ``after`` seconds
    into it; the mesh and what the call raised."""
    import threading

    caught: list[BaseException] = []
    with fresh_local_mesh(cpu=1, threads_per_worker=1) as m:
        def run():
            try:
                call(m)
            except BaseException as exc:  # noqa: BLE001 (what the thread saw)
                caught.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(after)
        m.close()
        worker.join(60)
    (exc,) = caught
    return m, exc


@pytest.mark.parametrize("route", ["auto", "off"])
def test_a_mesh_closed_in_another_thread_fails_its_computation_in_one_line(route):
    # it raised AttributeError: 'NoneType' object has no attribute ... (the closed
    # client's scheduler)
    import dask.array as da

    from jupyter_mesh import MeshError

    y = da.ones((40, 10), chunks=(1, 10)).map_blocks(_slow_block).sum()
    m, exc = _closed_meanwhile(lambda m: m.compute(y, route=route), after=1.5)
    assert isinstance(exc, MeshError), repr(exc)
    assert str(exc) == (f"the mesh at {m.address} was closed while this computation ran "
                        f"(mesh.close or %mesh close, in another thread or cell): start or "
                        f"connect a mesh, then compute again")


@pytest.mark.parametrize("call", ["dask", "submit"])
def test_plain_dask_work_cut_off_by_a_closing_mesh_says_why(call):
    # a plain .compute() (the mesh's client is Dask's default) or a mesh.submit future
    # waited on in another thread, or a cell the sidebar's stop cut off: Dask said
    # "... cancelled for reason: unknown."
    import dask.array as da
    from distributed.client import FutureCancelledError

    y = da.ones((40, 10), chunks=(1, 10)).map_blocks(_slow_block).sum()
    _, exc = _closed_meanwhile(
        (lambda m: y.compute()) if call == "dask"
        else (lambda m: m.submit(time.sleep, 5).result()), after=1.5)
    assert isinstance(exc, FutureCancelledError), repr(exc)
    assert str(exc).endswith("cancelled for reason: the mesh was closed.\n"
                             "Start or connect a mesh (%mesh start), then compute again.")


def test_closing_while_a_computation_reads_pending_persisted_data_is_quiet(caplog, capfd):
    # Dask's cancel of the persisted keys (which the pending sum reads) failed on the
    # scheduler, in the kernel for a local mesh: two AssertionError tracebacks
    import logging

    import dask.array as da
    from distributed.client import FutureCancelledError

    def run(m):
        kept = da.ones((40, 10), chunks=(1, 10)).map_blocks(_slow_block).persist()
        return m.client.compute(kept.sum()).result()

    with caplog.at_level(logging.ERROR):
        _, exc = _closed_meanwhile(run, after=1.5)
    assert isinstance(exc, FutureCancelledError), repr(exc)
    assert str(exc).endswith("cancelled for reason: the mesh was closed.\n"
                             "Start or connect a mesh (%mesh start), then compute again.")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "AssertionError" not in capfd.readouterr().err


@pytest.mark.parametrize("step, call", [("planning", "compute"), ("planning", "explain"),
                                        ("submitting", "compute")])
def test_a_mesh_closed_while_a_computation_starts_fails_it_in_one_line(monkeypatch, step,
                                                                         call):
    # closed from another thread while the first plan measured Dask's costs on the
    # workers, or while the plan was being handed to the scheduler: Dask's client
    # failed in its own ways (FuturesCancelledError, ClosedClientError and 40 lines)
    import dask.array as da

    from jupyter_mesh import MeshError
    from jupyter_mesh.router import api, calibrate

    y = da.ones((40, 10), chunks=(10, 10)).sum()
    with fresh_local_mesh(cpu=1, threads_per_worker=1) as m:
        if step == "planning":
            measure = calibrate.measure

            def closing(client, *args, **kwargs):
                m.close()  # (as another thread would, just now)
                return measure(client, *args, **kwargs)

            m._calibration = None
            monkeypatch.setattr(calibrate, "measure", closing)
        else:
            m.compute(y, route="auto")  # measured and planned once: past the probe
            register = api._register

            def closing(mesh, payload):
                m.close()
                return register(mesh, payload)

            monkeypatch.setattr(api, "_register", closing)
        with pytest.raises(MeshError) as info:
            m.compute(y, route="auto") if call == "compute" else m.explain(y)
        assert str(info.value) == (
            f"the mesh at {m.address} was closed while this computation ran (mesh.close "
            f"or %mesh close, in another thread or cell): start or connect a mesh, then "
            f"compute again")


def test_a_scheduler_lost_as_it_is_handed_a_plan_says_so(monkeypatch):
    # a scheduler that went away as the plan was handed to it was said to "not route
    # (is jupyter_mesh installed there?)", after a warning that it went away
    import dask.array as da

    from jupyter_mesh import MeshError
    from jupyter_mesh.router import api

    y = da.ones((40, 10), chunks=(10, 10)).sum()
    with fresh_local_mesh(cpu=1, threads_per_worker=1) as m:
        class Gone:
            def __getattr__(self, name):
                async def call(**kwargs):
                    raise OSError(f"Timed out trying to connect to {m.address} after 10 s")
                return call

        monkeypatch.setattr(api, "_scheduler", lambda mesh: Gone())
        with pytest.raises(MeshError) as info:
            m.compute(y, route="auto")
        assert str(info.value) == (f"the scheduler at {m.address} is not reachable: run "
                                   f"%mesh close, then %mesh start or %mesh connect ADDRESS")


def test_route_mode_says_how_plain_calls_are_routed_and_is_not_set_by_hand():
    # assigning it changed nothing but what it said
    import dask.array as da

    from jupyter_mesh import MeshError

    with fresh_local_mesh(cpu=1, threads_per_worker=1) as m:
        with pytest.raises(MeshError, match=r"^route_mode only says how plain Dask calls are "
                                            r"routed: set it with %mesh route auto, or route "
                                            r"a block with `with mesh.route\(...\):`$"):
            m.route_mode = "auto"
        assert m.route_mode == "off"
        m.last_plan = None
        assert da.ones(10, chunks=5).sum().compute() == 10
        assert m.last_plan is None  # not routed
        with m.route("auto"):
            assert m.route_mode == "auto"


def _die(block):
    import os

    if block.size:  # (not for Dask's look at a 0-size block, here in the test)
        os._exit(1)  # as a worker that runs out of memory is killed
    return block


@pytest.mark.parametrize("route", ["auto", "off"])
def test_workers_that_die_running_a_task_get_a_note_on_dasks_error(route):
    # Dask's KilledWorker says "... on 1 different workers", never why they die
    import dask
    import dask.array as da
    from distributed.scheduler import KilledWorker

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with fresh_local_mesh(cpu=1, threads_per_worker=1) as m:
            with pytest.raises(KilledWorker) as info:
                m.compute(da.ones(4, chunks=2).map_blocks(_die, dtype=float).sum(),
                          route=route)
    (note,) = info.value.__notes__
    assert note.startswith("jupyter_mesh: the workers that ran this task died while "
                           "running it; out of memory is the usual cause")


def test_a_remote_cell_on_a_mesh_closed_meanwhile_says_so():
    # it said the worker "died while running the cell ... the next cell picks another
    # worker": the whole mesh was gone

    _, exc = _closed_meanwhile(lambda m: m.run_cell("import time\ntime.sleep(10)"), after=2.0)
    assert "the mesh was closed while the cell ran on cpu-0" in str(exc), repr(exc)


def test_a_routed_computation_waits_for_a_worker_its_nanny_restarts():
    # a worker killed (for its memory, say) and restarting: the router said "no live
    # workers" at once, where plain Dask waits for it
    import dask.array as da

    with fresh_local_mesh(cpu=1, threads_per_worker=1) as m:
        (dev,) = m.inventory()
        m.compute(da.ones(4, chunks=2).sum())  # (the mesh has had workers)
        kill_worker(m, dev)
        assert not len(m.inventory())  # gone, and not back yet
        assert m.compute(da.ones(4, chunks=2).sum()) == (4.0,)
        assert m.submit(sum, [1, 2], needs="reduction").result() == 3


def test_a_mesh_whose_nannies_all_stopped_is_not_waited_for():
    # nothing restarts its workers: "no live workers" at once, not after fallback-timeout
    import dask
    import dask.array as da

    from jupyter_mesh import MeshError

    with dask.config.set({"mesh.fallback-timeout": 30}):
        with fresh_local_mesh(cpu=1, threads_per_worker=1) as m:
            (dev,) = m.inventory()
            kill_worker(m, dev, stand_down=True)
            t0 = time.monotonic()
            with pytest.raises(MeshError, match="no live workers"):
                m.compute(da.ones(4, chunks=2).sum())
            assert time.monotonic() - t0 < 10


def test_what_a_closed_mesh_computed_says_the_mesh_is_closed():
    # a mesh.submit future's result(), done or not, and what the mesh's client
    # gathers, after mesh.close(): Dask said "IOLoop is closed"
    from jupyter_mesh import MeshError

    with fresh_local_mesh(cpu=1, threads_per_worker=1) as m:
        done = m.submit(sum, [1, 2])
        assert done.result() == 3
        pending = m.submit(time.sleep, 30)
        client = m.client
    for call in (done.result, pending.result, lambda: client.gather([done])):
        with pytest.raises(MeshError, match=r"^the mesh this came from is closed, and what "
                           r"it computed went with it: start or connect a mesh \(%mesh "
                           r"start\), then compute or submit again$"):
            call()
