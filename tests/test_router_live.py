"""The router on a real mesh: NumPy workers and JAX (CPU backend) workers."""

from __future__ import annotations

import re
import sys
import time

import dask
import dask.array as da
import numpy as np
import pytest

import jupyter_mesh as jm
from jupyter_mesh import MeshError
from jupyter_mesh.router import api

from .meshes import fresh_local_mesh, tasks_of_left


@pytest.fixture(scope="module")
def mesh():
    with fresh_local_mesh(cpu=1, jax_cpu=1, site="lab") as m:
        yield m


def pipeline():
    x = da.random.random((600, 600), chunks=300, )
    return ((x @ x.T) + 1).sum(axis=0)


def test_cpu_jax_pipeline_equals_numpy_and_jax_ran_the_matmul(mesh):
    y = pipeline()
    expected = y.compute(scheduler="sync")
    (got,) = mesh.compute(y, route="cpu:jax")
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    report = mesh.last_report
    assert report.ran_on("matmul") == ["jax"]
    assert report.ran_on("add") == ["jax"]
    assert report.ran_on("random_sample") == ["numpy"]
    rows = report.rows
    for r in rows:
        assert set(r) >= {"op", "target", "tasks", "est_seconds", "bytes_moved", "backends",
                          "workers", "seconds"}
    assert "jax-cpu-0" in {w for r in rows for w in r["workers"]}
    assert "<table>" in report._repr_html_() and "matmul" in repr(report)


def test_plans_after_the_first_go_ahead_of_their_graph_on_the_clients_stream(
        mesh, monkeypatch):
    # the first routed compute of a client asks the scheduler (a round trip) whether it
    # routes; later ones send their plan on the client's stream, ahead of the graph,
    # with no wait, and the plan still holds: JAX ran the matmul, the timeline is there
    y = pipeline()
    expected = y.compute(scheduler="sync")
    mesh.compute(y, route="cpu:jax")
    sent = []
    real = mesh.client._send_to_scheduler
    monkeypatch.setattr(mesh.client, "_send_to_scheduler",
                        lambda msg: (sent.append(msg["op"]), real(msg))[1])
    for _ in range(2):
        (got,) = mesh.compute(y, route="cpu:jax")
        np.testing.assert_allclose(got, expected, rtol=1e-10)
        assert mesh.last_report.ran_on("matmul") == ["jax"]
        assert mesh.last_report.timeline
        assert sent.index("jupyter-mesh-route") < sent.index("update-graph")
        sent.clear()


def test_a_plan_the_scheduler_did_not_take_is_said(mesh):
    # the stream handler failed on the scheduler (it logs why there): the computation
    # runs as Dask places it, right, and the notebook is told, not left to guess
    from jupyter_mesh import MeshFallbackWarning
    from jupyter_mesh.router._scheduler import ROUTE_STREAM

    y = pipeline()
    expected = y.compute(scheduler="sync")
    mesh.compute(y, route="cpu:jax")  # (the first compute of a client asks)

    def drop(dask_scheduler, on):
        handlers = dask_scheduler.stream_handlers
        if on:
            handlers["_kept"], handlers[ROUTE_STREAM] = handlers[ROUTE_STREAM], (
                lambda **msg: None)
        else:
            handlers[ROUTE_STREAM] = handlers.pop("_kept")

    mesh.client.run_on_scheduler(drop, on=True)
    try:
        with pytest.warns(MeshFallbackWarning, match=r"did not take this computation's "
                                                     r"plan \(its log says why\): it ran "
                                                     r"unrouted"):
            (got,) = mesh.compute(y, route="cpu:jax")
    finally:
        mesh.client.run_on_scheduler(drop, on=False)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    (got,) = mesh.compute(y, route="cpu:jax")  # and the next one is routed again
    assert mesh.last_report.ran_on("matmul") == ["jax"]


def test_outputs_held_already_give_no_false_word_of_a_plan_not_taken(mesh):
    # nothing had to run (this client holds y's outputs): the computation was over
    # before its plan, on the client's stream, reached the scheduler, and the question
    # for its records, on another connection, overtook it ("did not take this plan")
    import warnings

    from jupyter_mesh import MeshFallbackWarning

    y = (da.random.default_rng(0).random((200, 200), chunks=100) + 1).sum(axis=0)
    expected = y.compute(scheduler="sync")
    held = y.persist()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", MeshFallbackWarning)
            for _ in range(6):
                (got,) = mesh.compute(y)
                np.testing.assert_allclose(got, expected)
    finally:
        del held


def ran_as_planned(report):
    """Check that every task of a routed computation ran on a worker of the pool its
    plan chose, with the backend the plan said; per op label, how many tasks ran on the
    workers of each backend (``{"matmul": {"jax": 19, "numpy": 8}}``)."""
    plan = report.plan
    m = plan.model
    on: dict = {}
    for i, key in enumerate(m.keys):
        rec = report.records.get(key)
        if rec is None:  # not a task (an alias)
            continue
        p = plan.pool_of[i]
        pool = plan.pools[p]
        addr, backend, _ = rec
        assert addr in pool.workers
        assert backend == ("numpy" if plan.runs_numpy(m.layer[i], p) else pool.backend)
        counts = on.setdefault(m.ops[m.layer[i]].label, {"jax": 0, "numpy": 0})
        counts[pool.backend] += 1
    return on


def test_a_jax_cpu_worker_runs_numpy_tasks_where_numpy_is_faster(mesh):
    # the JAX CPU worker measured NumPy too (the NumPy worker's cached profile): it is
    # never planned slower than a NumPy worker, and runs each task with what its plan
    # says, its own NumPy where that is the faster of the two for the op
    from jupyter_mesh.router.cost import build_pools

    inv = list(mesh.inventory())
    numpy_dev = next(d for d in inv if d.backend == "numpy")
    jax_dev = next(d for d in inv if d.backend == "jax")
    assert jax_dev.extra["numpy_profile"] == numpy_dev.profile.to_dict()
    assert numpy_dev.extra.get("numpy_profile") is None
    assert next(p for p in build_pools(inv) if p.backend == "jax").numpy_profile
    y = pipeline()
    expected = y.compute(scheduler="sync")
    # "cpu": either pool, each task restricted to the one its plan chose
    (got,) = mesh.compute(y, route="cpu")
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    report = mesh.last_report
    plan = report.plan
    m = plan.model
    on = ran_as_planned(report)
    assert sum(c["jax"] for c in on.values()), "the plan used the JAX worker"
    jax_pool, numpy_pool = (next(p for p in plan.pools if p.backend == b)
                            for b in ("jax", "numpy"))
    for op in m.ops:
        assert plan.cost.exec_time(op, jax_pool) <= plan.cost.exec_time(op, numpy_pool) * (
            1 + 1e-9)
    # the rows say which pool ran what with NumPy
    labels = {r["target"] for r in plan.rows}
    assert any("cpu:jax" in t for t in labels), labels


def test_the_report_has_every_task_and_leaves_nothing_on_the_workers(mesh):
    # what ran each task reaches the scheduler with the task's end (its metadata); the
    # report gets it there in the same call as the plan's status: no round trip to
    # every worker afterwards, and nothing left behind on them
    from jupyter_mesh.router import _device

    y = pipeline()
    mesh.compute(y, route="cpu:jax")
    report = mesh.last_report
    model = report.plan.model
    assert set(report.records) == set(model.keys)  # fused members each under its own key
    names = {d.worker for d in mesh.inventory()}
    assert {addr for addr, _, _ in report.records.values()} <= names
    assert all(s >= 0 for _, _, s in report.records.values())
    assert {b for _, b, _ in report.records.values()} == {"numpy", "jax"}
    left = mesh.client.run(lambda: len(_device.RECORDS))
    assert set(left.values()) == {0}
    # the scheduler keeps none of them either, once reported
    st = mesh.client.run_on_scheduler(
        lambda dask_scheduler: sum(len(ps.records) for ps in dask_scheduler.extensions[
            "jupyter-mesh"].router.plans.values()))
    assert st == 0
    # nor in the metadata of the tasks it keeps (a routed persist: its keys stay)
    with mesh.route("cpu:jax"):
        z = pipeline().persist()
    assert mesh.last_report.ran_on("matmul") == ["jax"]
    kept = mesh.client.run_on_scheduler(
        lambda dask_scheduler: [k for k, ts in dask_scheduler.tasks.items()
                                if ts.metadata and "jupyter-mesh" in ts.metadata])
    assert kept == []
    del z


def test_a_routed_compute_asks_for_the_inventory_once(mesh, monkeypatch):
    # the report names workers from the inventory the plan was made with (one round
    # trip to the scheduler fewer per computation); a worker it does not know (one
    # that joined since) makes it ask again
    asked = []
    real = type(mesh).inventory

    def counting(self):
        asked.append(1)
        return real(self)

    monkeypatch.setattr(type(mesh), "inventory", counting)
    mesh.compute(pipeline(), route="cpu:jax")
    assert len(asked) == 1
    assert "jax-cpu-0" in {w for r in mesh.last_report.rows for w in r["workers"]}
    assert mesh.last_plan.worker_names and mesh.last_plan.worker_names == {
        d.worker: d.name for d in real(mesh)}
    from jupyter_mesh.router import api

    plan = mesh.explain(pipeline(), route="cpu:jax")
    plan.worker_names = {"tcp://gone:1": "left-since"}  # as if every worker were new
    asked.clear()
    api.run_plan(mesh, plan)
    assert len(asked) == 1 and "jax-cpu-0" in {
        w for r in mesh.last_report.rows for w in r["workers"]}
    # the names of workers that left since are kept (a fallback's report names them)
    assert mesh.last_report.worker_names["tcp://gone:1"] == "left-since"
    # and the kinds of the workers it did not know, for the report's picture
    ran = {addr for addr, _, _ in mesh.last_report.records.values()}
    assert {mesh.last_report.worker_kinds[a] for a in ran} == {"cpu"}


def test_plain_dask_right_after_a_routed_compute_runs_its_own_tasks(mesh):
    # Dask keeps the task of a key it still knows when another graph brings the same
    # key (dask/dask#9888): right after mesh.compute(y), plain y.compute() got the
    # routed tasks, whose results may be kept on the JAX device, and failed
    # ("Cannot cast ufunc 'add' input 1 from dtype('O')"). A routed compute returns
    # once the scheduler forgot what it released
    from distributed import Client

    y = pipeline()
    expected = y.compute(scheduler="sync")
    other = Client(mesh.address, set_as_default=False)  # another notebook, say
    try:
        for _ in range(3):
            (a,) = mesh.compute(y, route="cpu:jax")
            b = mesh.client.compute(y, sync=True)
            (c,) = mesh.compute(y, route="auto")
            # nothing of it is left on the scheduler when it returns
            st = mesh.client.run_on_scheduler(
                lambda keys, dask_scheduler: [k for k in keys if k in dask_scheduler.tasks],
                mesh.last_plan.model.keys)
            assert st == []
            d = other.compute(y, sync=True)
            e = y.compute()
            for got in (a, b, c, d, e):
                np.testing.assert_allclose(got, expected, rtol=1e-10)
    finally:
        other.close()


def _read_on_host_wraps(dask_scheduler):
    """(routed tasks made to read on the host, plain tasks made so more than once)"""
    import functools

    from jupyter_mesh._scheduler_plugin import EXTENSION_NAME
    from jupyter_mesh.router._device import on_host

    def wrapped(spec):
        func = getattr(spec, "func", None)
        return type(func) is functools.partial and func.func is on_host

    routed = dask_scheduler.extensions[EXTENSION_NAME].router.owner
    return (sum(wrapped(ts.run_spec) for k, ts in dask_scheduler.tasks.items()
                if k in routed),
            sum(wrapped(ts.run_spec) and wrapped(ts.run_spec.func.args[0])
                for ts in dask_scheduler.tasks.values()))


def _n_scheduler_tasks(dask_scheduler):
    return len(dask_scheduler.tasks)


def test_one_collection_computed_two_ways_at_once_leaves_nothing_on_the_scheduler():
    # two threads (or notebooks) computing the same collection, routed and plain, or
    # on two routes: the graphs share their outputs, whose task the scheduler keeps,
    # and the other graph's own tasks under them (split or fused its own way) stayed
    # on the scheduler for ever, from_array's blocks with their data (+32 a round);
    # a later computation of the collection then ran those and reported nothing
    import threading

    own = jm.Mesh.local(cpu=1, jax_cpu=1, gpu=0, tpu=0, threads_per_worker=1,
                        set_current=False)
    try:
        for second in ("plain", "cpu:jax"):
            for it in range(3):
                x = da.from_array(np.arange(360000.0).reshape(600, 600) / 3e5,
                                  chunks=150, name=f"twice-{second}-{it}")
                y = ((x @ x.T) + 1).sum(axis=0)
                want = y.compute(scheduler="sync")
                got = {}

                def routed(y=y, got=got):
                    got["auto"] = own.compute(y, route="auto")[0]

                def other(y=y, got=got, second=second):
                    got[second] = (own.client.compute(y, sync=True) if second == "plain"
                                   else own.compute(y, route=second)[0])

                threads = [threading.Thread(target=routed), threading.Thread(target=other)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(120)
                assert len(got) == 2, got
                for value in got.values():
                    np.testing.assert_allclose(value, want, rtol=1e-10)
                deadline = time.monotonic() + 10
                while own.client.run_on_scheduler(_n_scheduler_tasks) and \
                        time.monotonic() < deadline:
                    time.sleep(0.1)
                assert own.client.run_on_scheduler(_n_scheduler_tasks) == 0, (second, it)
    finally:
        own.close()


def test_plain_dask_sharing_a_routed_persists_tasks_gets_host_arrays(caplog):
    # Dask keeps the tasks behind persisted data (to compute it again if a worker is
    # lost), and a plain graph that shares their keys gets them in place of its own
    # (dask/dask#9888); a routed persist's tasks therefore hand over host arrays, not
    # results kept on the JAX device (which failed: "Cannot cast ufunc 'add' input 0
    # from dtype('O')", "zero-dimensional arrays cannot be concatenated")
    # (a mesh of its own: Dask's bookkeeping of such colliding keys leaves some of them
    # on the scheduler for good, which other tests here would see)
    x = da.random.random((600, 600), chunks=300)
    m = x @ x.T
    y = (m + 1).sum(axis=0)
    own = jm.Mesh.local(cpu=1, jax_cpu=1, gpu=0, tpu=0, site="lab", set_current=False)
    try:
        with caplog.at_level("WARNING", logger="distributed.scheduler"):
            with own.route("cpu:jax"):
                kept = y.persist()
            assert own.last_report.ran_on("matmul") == ["jax"]
            for expr in ((m + 1).sum(axis=0), m.sum(), y * 2):
                np.testing.assert_allclose(own.client.compute(expr, sync=True),
                                           expr.compute(scheduler="sync"), rtol=1e-10)
            np.testing.assert_allclose(own.client.compute(kept, sync=True),
                                       y.compute(scheduler="sync"), rtol=1e-10)
            for _ in range(3):  # (each plain graph wrapped the held tasks once more)
                own.client.compute((m + 1).sum(axis=0), sync=True)
            # the routed tasks kept behind the persist are not made to read on the host,
            # and a plain task is made so once (200 plain computes nested it 200 deep:
            # past pickling's depth, and a lost worker then took the whole mesh down)
            assert own.client.run_on_scheduler(_read_on_host_wraps) == (0, 0)
            del kept
            # the other way round: plain data persisted, a routed graph sharing its keys
            z = (x @ x.T) - 1
            plain = z.persist()
            for route in ("auto", "cpu:jax"):
                got = own.compute(z.sum(axis=1), route=route)[0]
                np.testing.assert_allclose(got, z.sum(axis=1).compute(scheduler="sync"),
                                           rtol=1e-10)
            del plain
        # Dask keeps the task it has, which computes the same values, so its warning
        # that the two graphs' dependencies differ (several lines ending in "This can
        # cause failures and deadlocks") says nothing a user must act on: not shown
        assert "run_spec" not in caplog.text
    finally:
        own.close()


def test_the_shared_key_filter_drops_only_collisions_with_a_routed_task():
    import logging

    from jupyter_mesh.router._device import SharedKeyFilter, routed_chain

    def record(old: str, new: str, level: int = logging.WARNING) -> logging.LogRecord:
        msg = ("Detected different `run_spec` for key ('a-1', 0) between two consecutive "
               "calls to `update_graph`. This can cause failures and deadlocks down the "
               "line.\n    Debugging information\n    ---------------------\n"
               f"    old task state: released\n    old run_spec: {old}\n"
               f"    new run_spec: {new}\n    old dependencies: set()\n")
        return logging.LogRecord("distributed.scheduler", level, __file__, 1, msg, (), None)

    f = SharedKeyFilter()
    plain = "<Task ('a-1', 0) _execute_subgraph(...)>"
    wrapped = "<Task ('a-1', 0) DeviceCall('matmul')(...)>"
    chain = f"<Task ('a-1', 0) {routed_chain.__name__}(...)>"
    assert f.filter(record(plain, plain))  # Dask's own collision: still warned about
    assert not f.filter(record(wrapped, plain))  # a routed persist, then plain Dask
    assert not f.filter(record(plain, chain))  # plain persist, then a routed graph
    assert f.filter(record(wrapped, chain, logging.DEBUG))  # Dask's own debug lines
    other = logging.LogRecord("distributed.scheduler", logging.WARNING, __file__, 1,
                              "Unexpected worker DeviceCall(", (), None)
    assert f.filter(other)


def test_auto_equals_numpy(mesh):
    y = pipeline()
    expected = y.compute(scheduler="sync")
    got, total = mesh.compute(y, y.sum())
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert total == pytest.approx(expected.sum())
    assert mesh.last_report.plan.route == "auto"


def test_auto_splits_a_pipeline_where_one_worker_is_faster_at_matmul(mesh, monkeypatch):
    # both workers of this mesh are CPUs alike, so `auto` alone restricts nothing here;
    # with the JAX worker's profile modelled as an accelerator's (30x the matmul
    # throughput: a model, said as such in its source, the computation itself real)
    # `auto` sends the matmuls to JAX and the random creation, which JAX has no
    # translation for, to NumPy: a mixed placement, live, with the same numbers
    import dataclasses

    real = type(mesh).inventory

    def faster_jax(self):
        inv = real(self)
        return type(inv)([
            dataclasses.replace(d, profile=dataclasses.replace(
                d.profile, flops32=d.profile.flops32 * 30, flops64=d.profile.flops64 * 30,
                method="model", source="a test's modelled accelerator"),
                extra={**d.extra, "numpy_profile": None})
            if d.backend == "jax" else d for d in inv])

    monkeypatch.setattr(type(mesh), "inventory", faster_jax)
    x = da.random.random((1200, 1200), chunks=400)
    y = ((x @ x.T) + 1).sum(axis=0)
    expected = y.compute(scheduler="sync")
    plan = mesh.explain(y)
    rows = {r["op"]: r for r in plan.rows}
    assert "cpu:jax" in rows["matmul"]["target"], rows["matmul"]
    assert rows["random_sample"]["target"] == "cpu:numpy"
    (got,) = mesh.compute(y)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    report = mesh.last_report
    assert report.plan.route == "auto"
    on = ran_as_planned(report)
    # (how many matmuls go where depends on Dask's costs as measured on this mesh now,
    # against which a task on the modelled accelerator saves only milliseconds)
    assert on["matmul"]["jax"] > 0, on
    assert on["random_sample"]["jax"] == 0 and on["random_sample"]["numpy"] == 9
    # data crossed between the kinds: the plan says how much
    assert report.plan.bytes_moved > 0


def test_forced_numpy_and_off(mesh):
    y = pipeline()
    expected = y.compute(scheduler="sync")
    (a,) = mesh.compute(y, route="cpu:numpy")
    assert mesh.last_report.ran_on("matmul") == ["numpy"]
    (b,) = mesh.compute(y, route="off")
    assert mesh.last_report is None and mesh.last_plan is None  # nothing was routed
    np.testing.assert_allclose(a, expected)
    np.testing.assert_allclose(b, expected)


def other_ops():
    """svd, svd_compressed, fft, slicing, x + x.T and reductions, with their unrouted
    (synchronous) results."""
    rng = np.random.default_rng(0)
    x = da.from_array(rng.random((200, 60)), chunks=(50, 60))
    sq = da.from_array(rng.random((120, 120)), chunks=60)
    s = da.linalg.svd(x)[1]
    comp = da.linalg.svd_compressed(sq, k=5, seed=1)[1]
    f = da.fft.fft(sq.rechunk((60, 120)), axis=1)
    sl = sq[10:70, ::3] * 2
    xt = sq + sq.T
    red = np.sin(sq).max() + sq.mean()
    colls = (s, comp, f, sl, xt, red)
    return colls, dask.compute(*colls, scheduler="sync")


def assert_all_close(got, expected):
    for g, e in zip(got, expected, strict=True):
        # host values, whichever backend ran the op: the client need not have JAX
        assert isinstance(g, np.ndarray | np.generic | float), type(g)
        np.testing.assert_allclose(g, e, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("route", ["auto", "cpu:jax"])
def test_other_ops_same_numbers_routed(mesh, route):
    colls, expected = other_ops()
    assert_all_close(mesh.compute(*colls, route=route), expected)


def numpy_semantics_cases():
    """Calls where JAX's own arithmetic differs from NumPy's (type promotion, integer
    division by zero, sums of bools, int64 against uint64, float_power, 0-d results)
    or where JAX has no version (SciPy's ufuncs, object and datetime dtypes, empty
    blocks, lists as arrays, tasks nested in a task's arguments, masked arrays)."""
    import scipy.special

    rs = np.random.RandomState(0)
    xi = da.from_array(rs.randint(-50, 50, (60, 40)).astype(np.int32), chunks=20)
    cnan = da.from_array(np.array([1 + 1j, np.nan + 0j, 3 + 0j, 2 + 2j]), chunks=2)
    xf = da.from_array(rs.standard_normal((60, 40)).astype(np.float32), chunks=20)
    x = da.from_array(rs.standard_normal((60, 40)), chunks=20)
    xb = x > 0
    huge = da.from_array(np.array([3e38, 1e38, 2e38], np.float32), chunks=3)
    huge2 = da.from_array(np.array([[3e38, 1e38], [2e38, 3e38]], np.float32), chunks=2)
    small_c = da.from_array(np.array([1e-8 - 3e-8j, 1e-5 + 1e-5j], np.complex64))
    cut = da.from_array(np.array([4 + 0j, 9 + 0j, 2.5 + 0j]), chunks=3)
    return {
        "int32 + float32": xi + xf,
        "sqrt of int8": da.sqrt(xi.astype(np.int8)),
        "int32 / int32": xi / (xi + 100),
        "reciprocal of int32": da.reciprocal(xi + 100),
        "int32 // 0": xi // (xi * 0),
        "int32 @ float32": xi @ xf.T,
        "bool @ bool": xb @ xb.T,
        "int64 == uint64": (da.from_array(np.array([2**53 + 1], np.int64))
                            == da.from_array(np.array([2**53], np.uint64))),
        "fft of int32": da.fft.fft(xi.rechunk((20, 40))),
        "float_power of float32": da.float_power(xf, xf * 0 + 2),
        "full sum": x.sum(),
        "norm, ord=1": da.linalg.norm(x, ord=1),
        "max with empty blocks": (lambda a: a[a > 85].max())(da.arange(100.0, chunks=10)),
        "scipy.special.erf": scipy.special.erf(x),
        "clip, a_min/a_max": x.map_blocks(np.clip, a_min=-1, a_max=1),
        "object sum": da.from_array(np.array([1, 2.5, 3, 4], dtype=object), chunks=2).sum(),
        "datetime max": da.from_array(np.arange("2020-01-01", "2020-01-09",
                                                dtype="datetime64[D]"), chunks=4).max(),
        "np.sum of a list, delayed": dask.delayed(np.sum)([1, 2, 3]),
        # a Python int beyond int64: NumPy takes it, JAX would overflow
        "x + 2**63": x + 2**63,
        "float32 * 2**70": x.astype("float32") * 2**70,
        # NumPy's transpose and squeeze of a reduction's scalar give a scalar
        "transpose of a sum": x.sum().T,
        "squeeze of a max": da.squeeze(x.astype("float32").max()),
        # a masked array's mask, which a device array does not have
        "masked sum": da.ma.filled(da.ma.masked_greater(x, 0.5).sum(axis=0), 0.0),
        # JAX's max, min and maximum of complex numbers skip a NaN that NumPy's return
        "complex max with a nan": cnan.max(),
        "complex min with a nan": cnan.min(),
        "complex maximum with a nan": da.maximum(cnan, cnan[::-1]),
        # XLA divides by a broadcast divisor as a product with its reciprocal, flushed
        # to 0 past 2**126 in float32 (or 2**1022 in float64): the quotient was 0
        "float32 / 1e38": huge / 1e38,
        "float64 / 1e308": huge.astype(np.float64) * 1e270 / 1e308,
        "float32 / its max, broadcast": huge2 / huge2.max(axis=0, keepdims=True),
        "float32 // its first": huge // huge[:1],
        # both broadcast, the divisor as large as the other: (1, 4) / (4, 1)
        "float32 (1, 4) / (4, 1)": (da.from_array(np.full((1, 4), 3e38, np.float32))
                                    / da.from_array(np.full((4, 1), 1e38, np.float32))),
        # JAX computes these other numbers: exp2 at integer exponents (exp2(3.0) was
        # 7.999999999999998), arcsin just above the smallest normal (0), sinh and cosh
        # of small complex numbers, 0j to a finite power (nan+nanj)
        "exp2 of integers": da.exp2(da.from_array(np.array([3.0, 30.0, 100.0]))),
        "arcsin near the smallest normal": da.arcsin(
            da.from_array(np.array([1.2e-38, 2e-38, 1e-30], np.float32))),
        "complex64 sinh of small numbers": da.sinh(small_c),
        "complex64 cosh of small numbers": da.cosh(small_c),
        "0j ** (0.5+0.5j)": da.from_array(np.array([0j, 4 + 0j])) ** (0.5 + 0.5j),
        # on a branch cut NumPy takes the side the sign of a zero part says, XLA does
        # not: sqrt(-(4+0j)) is -2j, and JAX gave +2j
        "complex sqrt on its branch cut": da.sqrt(-cut),
        "complex64 sqrt on its branch cut": da.sqrt(-cut.astype(np.complex64)),
        "complex arccos on its branch cut": da.arccos(cut.conj() / 2),
        "complex arccosh on its branch cut": da.arccosh(-cut),
        "complex arcsinh on its branch cut": da.arcsinh(-(cut * 1j)),
    }


@pytest.mark.parametrize("route", ["cpu:jax", "auto"])
def test_the_jax_path_gives_what_numpy_gives(mesh, route):
    # placement never decides correctness: same values, dtypes and types of result
    cases = numpy_semantics_cases()
    # one at a time: Dask 2026.8's dask.compute(array, delayed, array) gives the
    # delayed's result last, out of order
    expected = {k: dask.compute(v, scheduler="sync")[0] for k, v in cases.items()}
    got = dict(zip(cases, mesh.compute(*cases.values(), route=route), strict=True))
    for name, want in expected.items():
        g = got[name]
        assert type(g) is type(want), (name, type(g), type(want))
        assert getattr(g, "dtype", None) == getattr(want, "dtype", None), name
        if getattr(want, "dtype", np.dtype(object)).kind in "fc":
            np.testing.assert_allclose(g, want, rtol=1e-10, err_msg=name)
        else:
            np.testing.assert_array_equal(g, want, err_msg=name)
    if route == "cpu:jax":
        # float work still runs on JAX; integer work there runs NumPy, and says so
        assert mesh.last_report.ran_on("matmul") == ["numpy"]
        f = da.from_array(np.random.default_rng(1).random((60, 40)), chunks=20)
        mesh.compute(f @ f.T, route="cpu:jax")
        assert mesh.last_report.ran_on("matmul") == ["jax"]
        # a division by an ordinary number, broadcast, still runs on JAX
        mesh.compute(f / 3.0 + f / f.max(axis=0, keepdims=True), route="cpu:jax")
        assert mesh.last_report.ran_on("truediv") == ["jax"]
        # and so do elementwise ops with a 0-d array operand, which Dask wraps to
        # enforce their dtype (they ran NumPy): the same numbers and dtype
        for e in ((f - f.mean()) / f.std(), f.astype(np.float32) - f.astype(np.float32).max()):
            (got,) = mesh.compute(e, route="cpu:jax")
            want = e.compute(scheduler="sync")
            assert got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=1e-6)
            assert mesh.last_report.ran_on("sub") == ["jax"]
        # an integer one still runs NumPy (JAX's integer arithmetic is not NumPy's)
        xi = da.from_array(np.arange(12).reshape(3, 4), chunks=2)
        (got,) = mesh.compute(xi - xi.sum(), route="cpu:jax")
        np.testing.assert_array_equal(got, (xi - xi.sum()).compute(scheduler="sync"))
        assert mesh.last_report.ran_on("sub") == ["numpy"]


def test_a_mean_runs_its_per_chunk_step_on_jax(mesh):
    # mean_chunk (a chunk's count and sum) ran NumPy under cpu:jax, said as a note
    rng = np.random.default_rng(2)
    x = da.from_array(rng.random((7, 9)), chunks=(3, 4))
    z = da.from_array(rng.random((7, 9)) + 1j * rng.random((7, 9)), chunks=(3, 4))
    for y in (x.mean(), x.mean(axis=0), x.mean(axis=1, keepdims=True),
              x.astype(np.float32).mean(), z.mean(axis=0), x.mean(dtype=np.float32)):
        (got,) = mesh.compute(y, route="cpu:jax")
        want = y.compute(scheduler="sync")
        assert type(got) is type(want) and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-6 if want.dtype.itemsize <= 4
                                   else 1e-12)
        assert mesh.last_report.ran_on("mean_chunk") == ["jax"], mesh.last_report
        assert not any("mean_chunk" in n for n in mesh.last_report.plan.notes)
    # nanmean's step counts and sums what is not NaN: NumPy, said as such
    (got,) = mesh.compute(da.nanmean(x), route="cpu:jax")
    assert got == pytest.approx(float(np.nanmean(x.compute())))
    assert mesh.last_report.ran_on("mean_chunk") == ["numpy"]
    assert any("mean_chunk (no translation" in n for n in mesh.last_report.plan.notes)


def test_route_off_releases_its_results_when_it_returns(mesh):
    # a wait of a few seconds left a cycle of frames that held the futures: the
    # results stayed on the workers (and were reused) until Python's cycle collector ran
    import gc

    x = dask.delayed(time.sleep)(3.5, dask_key_name="off-released")
    gc.disable()
    try:
        mesh.compute(x, route="off")
        time.sleep(1)  # (a release goes through the client's event loop)
        assert "off-released" not in mesh.client.refcount
    finally:
        gc.enable()


def _bad_block(block):
    raise ValueError("bad block")


@pytest.mark.parametrize("call", ["compute", "persist"])
def test_a_routed_tasks_error_shows_no_frame_of_the_router(mesh, call):
    # a routed persist's error went through 7 of jupyter_mesh's and Dask's worker frames
    # (a compute's showed the user's call and function only)
    import traceback

    bad = da.ones(4, chunks=2).map_blocks(_bad_block, dtype=float)
    with pytest.raises(ValueError, match="bad block") as info, mesh.route("auto"):
        getattr(bad, call)()
    files = [f.filename for f in traceback.extract_tb(info.tb)]
    assert not [f for f in files if "jupyter_mesh" in f], files
    # nor Dask's worker frames (Dask's compute leaves them out, its persist not)
    assert not [f for f in files if "worker.py" in f or "_task_spec" in f], files
    assert files[-1] == __file__  # the user's function, where it raised


def test_slices_of_device_results_come_back_as_host_arrays(mesh):
    # plain slicing makes an alias of its input's task: no wrapper of its own runs, so
    # the task it points at must hand back a host array
    x = da.random.random((400, 400), chunks=200)
    colls = ((x + 1)[0:200, 0:200], (x @ x.T)[:, :200], (x + 1).sum(axis=0)[0:200])
    for c in colls:
        got = mesh.compute(c, route="cpu:jax")
        assert any("jax" in r["backends"] for r in mesh.last_report.rows)
        assert_all_close(got, [c.compute(scheduler="sync")])


def _add_one(a):
    return a + 1


def test_a_loop_of_delayed_calls_is_one_row(mesh):
    # each dask.delayed call is a layer of its own, named with a UUID: the plan and the
    # report show one row per function, not one per call
    total = dask.delayed(sum)([dask.delayed(_add_one, pure=False)(i) for i in range(30)])
    rows = {r["op"]: r for r in mesh.explain(total).rows}
    assert set(rows) == {"_add_one", "sum"} and rows["_add_one"]["tasks"] == 30
    (got,) = mesh.compute(total)
    assert got == sum(range(1, 31))
    ran = {r["op"]: r for r in mesh.last_report.rows}
    assert ran["_add_one"]["tasks"] == 30 and ran["_add_one"]["backends"] == ["numpy"]
    assert ran["_add_one"]["seconds"] > 0 and len(ran["_add_one"]["workers"]) >= 1
    assert repr(mesh.last_report).count("_add_one") == 1


def test_route_context_routes_plain_compute(mesh):
    y = pipeline()
    expected = y.compute(scheduler="sync")
    mesh.last_report = None
    with mesh.route("cpu:jax") as m:
        assert m.route_mode == "cpu:jax"
        got = y.compute()
    assert mesh.route_mode == "off"
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert mesh.last_report is not None
    assert mesh.last_report.ran_on("matmul") == ["jax"]
    # a block of unrouted work: the routed computation's report does not pass for its
    with mesh.route("off"):
        np.testing.assert_allclose(y.compute(), expected, rtol=1e-10)
        assert mesh.last_report is None and mesh.last_plan is None


def test_persist_under_routing_keeps_the_data_on_the_workers(mesh, caplog):
    # as Dask's own persist on a cluster: the routed results stay on the workers, and
    # the persisted collection computes from them (nothing copied into the notebook)
    from distributed import Future

    y = pipeline()
    expected = y.compute(scheduler="sync")
    mesh.last_report = None
    with mesh.route("cpu:jax"):
        p = y.persist()
        assert mesh.last_report is not None and mesh.last_report.ran_on("matmul") == ["jax"]
        p2, total = dask.persist(y + 1, y.sum())
    values = dict(p.__dask_graph__()).values()
    assert values and all(isinstance(v, Future) for v in values)
    assert all(isinstance(v, Future) for v in dict(total.__dask_graph__()).values())
    with caplog.at_level("WARNING", logger="distributed.scheduler"):
        np.testing.assert_allclose(mesh.compute(p, route="off")[0], expected, rtol=1e-10)
        np.testing.assert_allclose(p2.compute(), expected + 1, rtol=1e-10)
        assert total.compute() == pytest.approx(expected.sum())
    assert "run_spec" not in caplog.text
    with mesh.route("auto"), pytest.raises(MeshError, match="persist under routing takes no"):
        y.persist(retries=2)
    assert mesh.compute(p.sum())[0] == pytest.approx(expected.sum())  # still usable
    # the ops whose results were there already ran nowhere: the report says why
    report = mesh.last_report
    idle = [r["op"] for r in report.rows if not r["backends"]]
    assert idle and all(r["seconds"] == 0 for r in report.rows if r["op"] in idle)
    assert report.notes == [
        f"{', '.join(idle)}: not run by this computation: "
        f"{'its' if len(idle) == 1 else 'their'} results came from elsewhere "
        f"(persisted, still held from an earlier computation, or computed by another "
        f"graph that shares the keys, from another thread or client)"]
    assert f"note: {report.notes[0]}" in repr(report)
    assert not [r for r in report.rows if r["backends"] == [] and r["op"] not in idle]


@pytest.mark.parametrize("per_layer", [False, True])
def test_data_the_graph_carries_is_not_said_to_be_held_on_the_workers(mesh, per_layer):
    # from_array's blocks and a delayed constant are data in the graph, not results
    # an earlier computation left: the report must not claim a persist that never was
    # (a graph planned per layer, over mesh.router.layer-plan-threshold, did)
    x = da.from_array(np.arange(1000.0), chunks=100)
    with dask.config.set({"mesh.router.layer-plan-threshold": 5 if per_layer else 20000}):
        assert mesh.compute((x * 2).sum())[0] == pytest.approx(999_000.0)
    report = mesh.last_report
    assert [r["op"] for r in report.rows if not r["backends"]] == ["array"]
    assert report.notes == ["array: data the graph carries (values given to Dask as they "
                            "are: from_array's blocks, from_pandas's partitions, a "
                            "constant): Dask hands it to the tasks that read it; no "
                            "routed task runs"]
    assert "held from an earlier" not in repr(report)
    assert mesh.compute(dask.delayed(3))[0] == 3
    assert [n.split(":")[0] for n in mesh.last_report.notes] == ["int"]
    assert "data the graph carries" in mesh.last_report.notes[0]


def test_route_context_plans_with_chunk_sizes(mesh):
    """Plain .compute() hands Dask's scheduler a flat graph; the router still sees the
    layers' chunk shapes and dtypes, so its estimates match mesh.explain's."""
    y = pipeline()
    planned = {r["op"]: r for r in mesh.explain(y, route="cpu:jax").rows}
    with mesh.route("cpu:jax"):
        y.compute()
    ran = {r["op"]: r for r in mesh.last_report.rows}
    assert ran["matmul"]["est_seconds"] == pytest.approx(planned["matmul"]["est_seconds"],
                                                         rel=0.01)
    assert ran["matmul"]["bytes_moved"] == planned["matmul"]["bytes_moved"]


def test_explain_returns_plan(mesh):
    plan = mesh.explain(pipeline(), route="cpu:jax")
    targets = {r["op"]: r["target"] for r in plan.rows}
    assert targets["matmul"] == "cpu:jax"
    assert mesh.last_plan is plan


def test_forced_missing_kind_fails_at_once(mesh):
    with pytest.raises(MeshError, match=r"no live gpu worker.*cpu:jax"):
        mesh.compute(pipeline(), route="gpu")
    with pytest.raises(MeshError, match="no live tpu"):
        mesh.explain(pipeline(), route="tpu")


def test_bad_inputs(mesh):
    with pytest.raises(MeshError, match="unknown route"):
        mesh.compute(pipeline(), route="warp")
    with pytest.raises(MeshError, match="nothing to explain: no Dask collection"):
        mesh.explain(np.ones(3))
    with pytest.raises(MeshError, match="nothing to explain: no Dask collection"):
        mesh.explain([1, 2])
    with pytest.raises(MeshError, match="no worker at site 'moon'"):
        mesh.compute(pipeline(), site="moon")
    with pytest.raises(MeshError, match="unknown capability"):
        mesh.submit(np.sum, 1, needs="teleport")
    with pytest.raises(MeshError, match="no worker at site"):
        mesh.submit(np.sum, 1, site="moon")
    with pytest.raises(MeshError, match=r"no live gpu worker: .*use on= one of cpu:jax, "
                       r"cpu:numpy, or needs= to let the mesh pick"):
        mesh.submit(np.sum, 1, on="gpu")
    with pytest.raises(MeshError, match="convert= takes True or False"):
        mesh.submit(np.sum, 1, convert="yes")
    # dask.compute's own options: one line that says where they go
    with pytest.raises(MeshError, match=r"^mesh.compute takes route=, fallback=, site=, pin=, "
                                        r"not optimize_graph=: call dask.compute\("
                                        r"\.\.\., optimize_graph=\.\.\.\) inside `with mesh"):
        mesh.compute(pipeline(), optimize_graph=False)
    with mesh.route("auto"):  # where they work
        assert dask.compute(da.ones(4, chunks=2).sum(), optimize_graph=False)[0] == 4
    # the scheduler's options: the router places the tasks (they were dropped silently
    # inside a route block: retries=3 retried nothing, workers= placed nothing)
    with pytest.raises(MeshError, match=r"^mesh.compute takes no retries=: the router places "
                                        r"the tasks itself; for Dask's scheduler options"):
        mesh.compute(pipeline(), retries=3)
    with mesh.route("auto"), pytest.raises(MeshError, match=r"^a routed compute takes no "
                                                            r"retries=, workers=: the router"):
        dask.compute(da.ones(4, chunks=2).sum(), retries=3, workers=["x"])
    # a typo of its own keywords is said as one (it read as a scheduler option)
    with pytest.raises(MeshError, match=r"^mesh.compute takes route=, fallback=, site=, pin=, "
                                        r"not fallbak=: did you mean fallback=\?$"):
        mesh.compute(pipeline(), fallbak=False)
    # ... and one of Dask's (it said no more than what mesh.compute takes)
    with pytest.raises(MeshError, match=r"not optimise_graph=: did you mean optimize_graph=\?$"):
        mesh.compute(pipeline(), optimise_graph=False)
    # mesh.compute routes under every route: its advice for the scheduler's options
    # was "leave the block, or %mesh route off", which changes nothing for it
    with pytest.raises(MeshError, match=r"call dask.compute\(\.\.\.\) or "
                                        r"mesh.client.compute\(\.\.\.\) instead"):
        mesh.compute(pipeline(), retries=3)
    assert mesh.compute(da.ones(4, chunks=2).sum())[0] == 4  # and it goes on


def test_misspelled_keywords_of_the_api_are_one_line_that_names_the_right_one(mesh):
    # they were Python's TypeError tracebacks (mesh.compute alone said it in one line)
    import jupyter_mesh as jm

    y = da.ones(4, chunks=2).sum()
    with pytest.raises(MeshError, match=r"^Mesh.explain takes route=, site=, pin=, not rout=: "
                                        r"did you mean route=\?$"):
        mesh.explain(y, rout="gpu")
    with pytest.raises(MeshError, match=r"^Mesh.local takes cpu=, .*not threads=: did you "
                                        r"mean threads_per_worker=\?$"):
        jm.Mesh.local(threads=2)
    with pytest.raises(MeshError, match=r"^Mesh.connect takes .*not bogus=$"):
        jm.Mesh.connect(mesh.address, bogus=1)
    with pytest.raises(MeshError, match=r"^Mesh.widget takes refresh=, not refreh=: did you "
                                        r"mean refresh=\?$"):
        mesh.widget(refreh=1)
    with pytest.raises(MeshError, match=r"^Mesh.run_cell takes code=, .*not bogus=$"):
        mesh.run_cell("1", bogus=1)
    with pytest.raises(MeshError, match=r"^Inventory.select takes target=, site=, not kind=$"):
        mesh.inventory().select(kind="cpu")
    # too many by position, or none where some is needed
    with pytest.raises(MeshError, match=r"^Mesh.scale takes its arguments by name, not by "
                                        r"position$"):
        mesh.scale(1)
    with pytest.raises(MeshError, match=r"^Mesh.calibrate takes no arguments$"):
        mesh.calibrate(5)
    with pytest.raises(MeshError, match=r"^Mesh.route takes at most 1 by position \(mode\): "
                                        r"give the others by name, of mode=, fallback=$"):
        mesh.route("auto", "x")
    with pytest.raises(MeshError, match=r"^Mesh.connect: missing a required argument: "
                                        r"'address': it takes \(address, "):
        jm.Mesh.connect()
    # nothing changed: the mesh and its last plan are as they were
    assert mesh.compute(y)[0] == 4 and mesh.last_plan is not None


class _RefusesPickling:
    def __reduce__(self):
        raise RuntimeError("not for sending")


def test_a_value_that_cannot_be_pickled_is_one_line(mesh, caplog):
    # Dask logged three chained tracebacks as an ERROR, then raised "Could not
    # serialize object of type HLGExpr" with the whole graph in it
    import logging

    bad = _RefusesPickling()
    y = da.ones(4, chunks=2).map_blocks(lambda b, o=bad: b)
    said = (r"^this computation cannot be sent to the workers: a function or value in it "
            r"cannot be pickled \(RuntimeError: not for sending\); pass one that pickles")
    with caplog.at_level(logging.ERROR):
        with pytest.raises(MeshError, match=said):
            mesh.compute(y)
        with mesh.route("cpu"), pytest.raises(MeshError, match=said):
            y.compute()
        with pytest.raises(MeshError, match=r"^this call cannot be sent to the workers: .*"
                                            r"\(RuntimeError: not for sending\)"):
            mesh.submit(len, bad)
    assert not [r for r in caplog.records if r.name.startswith("distributed")], caplog.text
    # and the mesh goes on
    assert mesh.compute(da.ones(4, chunks=2).sum())[0] == 4
    assert mesh.submit(len, [1, 2]).result() == 2


def _clip_in_place(block):
    block[block > 1.0] = 1.0  # writes into its input, as NumPy code may
    return block


def test_a_function_that_writes_into_a_block_from_jax_works(mesh):
    # JAX's results came to NumPy as read-only views: "assignment destination is
    # read-only" under cpu:jax only
    from jupyter_mesh.router.backends import get_backend, to_host_any

    x = da.from_array(np.random.default_rng(0).random((8, 6)), chunks=(4, 3))
    y = (x * 2.0).map_blocks(_clip_in_place, dtype="f8")
    expected = y.compute(scheduler="sync")
    for route in ("auto", "cpu:jax"):
        np.testing.assert_allclose(mesh.compute(y, route=route)[0], expected)
    assert mesh.last_report.ran_on("mul") == ["jax"]  # the block came from JAX
    import jax.numpy as jnp

    for host in (get_backend("jax").to_host(jnp.ones(3)), to_host_any(jnp.ones(3))):
        assert isinstance(host, np.ndarray) and host.flags.writeable


def test_the_users_placing_annotations_are_said_not_to_be_followed(mesh):
    # routed, the graph's dask.annotate(workers=...) was dropped without a word
    x = da.ones((4, 4), chunks=2)
    with dask.annotate(workers=["tcp://10.9.9.9:1"], allow_other_workers=False):
        y = x.map_blocks(lambda b: b + 1)
    with pytest.warns(UserWarning, match=r"the router places the tasks: the graph's "
                      r"dask.annotate\(allow_other_workers=, workers=\) is not followed"):
        assert mesh.compute(y.sum())[0] == 32
    plain = x + 1  # nothing annotated: nothing said
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mesh.compute(plain.sum())[0] == 32


@pytest.mark.parametrize("fallback", ["no", None, 1])
def test_fallback_takes_true_or_false(mesh, fallback):
    with pytest.raises(MeshError, match=r"fallback=.*use True .* or False"):
        mesh.compute(pipeline(), fallback=fallback)
    with pytest.raises(MeshError, match=r"fallback=.*use True .* or False"):
        mesh.route("auto", fallback=fallback)
    assert mesh.route_mode == "off"


def test_route_api_bad_modes(mesh):
    with pytest.raises(MeshError, match="unknown route"):
        mesh.route("warp")
    with pytest.raises(MeshError, match=r"no live gpu worker: .*use 'auto' or one of"):
        mesh.route("gpu")
    assert mesh.route_mode == "off"


def test_site_and_pin_need_routing(mesh):
    x = da.random.random((600, 600), chunks=300)
    y = (x + 1).sum()
    for call in (mesh.compute, mesh.explain):
        with pytest.raises(MeshError, match="site= needs routing.*route='auto'"):
            call(y, route="off", site="lab")
        with pytest.raises(MeshError, match="pin= needs routing"):
            call(y, route="off", pin={"lab": x})
    with pytest.raises(MeshError, match="site must be a site name"):
        mesh.compute(y, site=3)


@pytest.mark.parametrize("route", ["auto", "off"])
def test_compute_takes_what_dask_compute_takes(mesh, route):
    # collections in lists and dicts are computed in place, plain values come back as
    # they are (e.g. the bins of da.histogram are a NumPy array)
    y = pipeline()
    d = dask.delayed(sum)([1, 2, 3])
    args = (y.sum(), 5, [y, {"total": d}], "label")
    want = dask.compute(*args, scheduler="sync")
    got = mesh.compute(*args, route=route)
    assert len(got) == 4 and got[1] == 5 and got[3] == "label"
    np.testing.assert_allclose(got[0], want[0])
    np.testing.assert_allclose(got[2][0], want[2][0])
    assert got[2][1] == {"total": 6}
    hist, bins = mesh.compute(*da.histogram(da.ones(10, chunks=5), bins=2, range=(0, 2)),
                              route=route)
    assert hist.tolist() == [0, 10] and bins.tolist() == [0.0, 1.0, 2.0]
    assert mesh.compute(5, route=route) == (5,)  # nothing for the mesh to do
    assert mesh.last_report is None and mesh.last_plan is None  # none passes for it
    mesh.compute(y.sum(), route=route)
    assert mesh.compute(route=route) == dask.compute() == ()  # nothing at all, likewise
    assert mesh.last_report is None and mesh.last_plan is None
    with pytest.raises(MeshError, match="site= needs routing"):
        mesh.compute(5, route="off", site="lab")


def test_explain_plans_the_collections_among_its_arguments(mesh):
    y = pipeline()
    assert mesh.explain([y, 3]).ntasks == mesh.explain(y).ntasks
    with pytest.raises(MeshError, match=r"^nothing to explain: no Dask collection among "
                                        r"the arguments \(int, str\)$"):
        mesh.explain(5, "x")
    with pytest.raises(MeshError, match=r"^nothing to explain: pass one or more Dask "
                                        r"collections$"):
        mesh.explain()


def test_submit_bad_inputs(mesh):
    # the targets on= takes, and not the routes it does not ("auto", "off")
    for bad in ("warp", "auto", "off", 3):
        with pytest.raises(MeshError, match=r"^on= takes a target: one of cpu, gpu, tpu, "
                                            r"cpu:numpy, cpu:jax.* \(or needs= to let the "
                                            r"mesh pick\), not ") as err:
            mesh.submit(np.sum, 1, on=bad)
        assert "auto" not in str(err.value).split(", not ")[0]
    with pytest.raises(MeshError, match="not both"):
        mesh.submit(np.sum, 1, on="cpu", needs="fft")
    with pytest.raises(MeshError, match="submit needs a function, not int"):
        mesh.submit(3, 1)
    with pytest.raises(MeshError, match="unknown capability"):
        mesh.submit(np.sum, 1, needs=["matmul"])
    with pytest.raises(MeshError, match="site must be a site name"):
        mesh.submit(np.sum, 1, site="")
    with pytest.raises(MeshError, match=r"^pure= takes True or False, not 'no'$"):
        mesh.submit(np.sum, 1, pure="no")
    assert mesh.submit(np.sum, np.ones(3), needs="reduction").result() == 3.0


def test_site_routes_within_site(mesh):
    (got,) = mesh.compute(pipeline(), site="lab")
    assert got.shape == (600,)
    # ops every pool at the site runs equally fast (NumPy on both workers): kept at the
    # site and nowhere narrower, the scheduler told so, and the same numbers
    x = da.random.random((400, 400), chunks=100)
    y = ((x + 1) * 2).sum(axis=0)
    with dask.config.set({"mesh.router.learn": 0}):
        (got,) = mesh.compute(y, site="lab")
    plan = mesh.last_plan
    assert plan.unrestricted  # small blocks: JAX's dispatch makes NumPy the faster
    assert {r["target"] for r in plan.rows} == {"any at lab (pools equivalent)"}
    np.testing.assert_allclose(got, y.compute(scheduler="sync"))
    ran = {w for r in mesh.last_report.rows for w in r["workers"]}
    assert ran and ran <= {d.name for d in mesh.inventory() if d.site == "lab"}
    # and the report says where it was kept, as the plan does (it left site= out)
    assert repr(mesh.last_report).startswith("Report (route=auto, site=lab): ")
    assert repr(plan).startswith("Plan (route=auto, site=lab): ")



def test_interrupt_drops_the_rest_of_the_computation(mesh):
    import _thread
    import threading
    import time

    def slow(block):
        time.sleep(0.3)
        return block

    y = da.ones((40, 40), chunks=5).map_blocks(slow).sum()  # 64 slow tasks
    timer = threading.Timer(0.8, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        mesh.compute(y, route="cpu:numpy")
    timer.join()

    assert tasks_of_left(mesh, y) == 0  # nothing of it left running
    (got,) = mesh.compute(da.ones(10, chunks=5).sum())
    assert got == 10

def _fails_on_odd_blocks(block, block_info=None):
    if block_info[0]["chunk-location"][0] % 2:
        raise ZeroDivisionError("an odd block")
    return block


@pytest.mark.parametrize("route", ["auto", "cpu:jax"])
def test_a_failing_task_raises_its_own_error_and_leaves_nothing_behind(mesh, route):
    # as dask.compute: the task's own exception, with the task's frame in the
    # traceback; the computation's tasks are dropped and the mesh goes on
    import traceback

    y = (da.ones((40,), chunks=5).map_blocks(_fails_on_odd_blocks, dtype=float) + 1).sum()
    mesh.compute(da.ones(10, chunks=5).sum(), route=route)  # leaves a report
    with pytest.raises(ZeroDivisionError, match="an odd block") as info:
        mesh.compute(y, route=route)
    frames = traceback.extract_tb(info.tb)
    assert frames[-1].name == "_fails_on_odd_blocks"
    # the user's call and the user's function, not the router's frames between them,
    # nor mesh.compute's own (Python 3.11 and later)
    ours = [f for f in frames if "jupyter_mesh" in f.filename]
    assert [f.name for f in ours] == ([] if sys.version_info >= (3, 11) else ["compute"]), \
        [f"{f.filename}:{f.name}" for f in ours]
    assert frames[0].name == "test_a_failing_task_raises_its_own_error_and_leaves_nothing_behind"
    with pytest.raises(ZeroDivisionError, match="an odd block") as info:  # noqa: PT012
        with mesh.route(route):
            y.compute()
    frames = traceback.extract_tb(info.tb)
    assert frames[-1].name == "_fails_on_odd_blocks"
    assert not [f for f in frames if "jupyter_mesh" in f.filename], \
        [f"{f.filename}:{f.name}" for f in frames]
    # the failed computation's plan, and no earlier report passing for its own
    assert sum(r["tasks"] for r in mesh.last_plan.rows) > 16 and mesh.last_report is None

    assert tasks_of_left(mesh, y) == 0
    assert mesh.compute(da.ones(10, chunks=5).sum(), route=route) == (10,)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("route", ["cpu:jax", "auto"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_a_p2p_rechunk_is_left_to_dask_and_finishes(mesh, route, per_layer):
    # Dask's P2P pins each output of a rechunk to a worker it picks among all: kept to
    # the NumPy pool as well, one pinned to the JAX worker waited for ever (no-worker);
    # planned per task, and per layer (as graphs of many tasks are)
    x = da.random.random((1024, 1024), chunks=(128, 1024))
    y = x.rechunk((1024, 128), method="p2p").sum(axis=0)
    want = x.compute(scheduler="sync").sum(axis=0)  # (P2P needs a cluster)
    with dask.config.set({"mesh.router.layer-plan-threshold": 10 if per_layer else 20000}):
        for _ in range(3):  # (it hung in about half the runs)
            (got,) = mesh.compute(y, route=route)
            np.testing.assert_allclose(got, want)
        assert (type(mesh.last_plan).__name__ == "LayerPlan") == per_layer
        with mesh.route(route):
            np.testing.assert_allclose(y.compute(), want)
        # kept at a site it cannot be: said in one line, before anything runs; the
        # last plan and report stay (they were the refused plan and None), and
        # mesh.explain says it too (it showed a plan "kept at 'lab'")
        before = mesh.last_plan, mesh.last_report
        p2p = (r"^this computation moves data through Dask's P2P rechunk or shuffle.*"
               r"'tasks'")
        with pytest.raises(jm.MeshError, match=p2p):
            mesh.compute(y, route=route, site="lab")
        with pytest.raises(jm.MeshError, match=p2p):
            mesh.compute(y, route=route, pin={"lab": x})
        with pytest.raises(jm.MeshError, match=p2p):
            mesh.explain(y, route=route, site="lab")
        assert (mesh.last_plan, mesh.last_report) == before
    assert tasks_of_left(mesh, y) == 0


def test_submit_on_target_and_needs(mesh):
    def backend_of_worker():
        from distributed import get_worker

        return get_worker().extensions["jupyter-mesh"].device["backend"]

    assert mesh.submit(backend_of_worker, on="cpu:jax").result() == "jax"
    assert mesh.submit(backend_of_worker, on="cpu:numpy").result() == "numpy"
    # the mesh picks the target for a capability: whichever it is, it runs
    assert mesh.submit(backend_of_worker, needs="matmul").result() in ("jax", "numpy")
    assert mesh.submit(np.add, 1, 2, needs="elementwise").result() == 3
    # pure (the default, as Dask's submit): the same call gives the held result again;
    # pure=False: a call of its own each time
    import time

    same = [mesh.submit(time.time_ns, on="cpu") for _ in range(2)]
    assert same[0].key == same[1].key and same[0].result() == same[1].result()
    new = [mesh.submit(time.time_ns, on="cpu", pure=False) for _ in range(2)]
    assert new[0].key != new[1].key and new[0].result() != new[1].result()
    # NumPy's global random functions pickle with the notebook's generator state: each
    # call started from it and gave the same numbers; they draw on the worker's own
    draws = [mesh.submit(np.random.random, 4, on="cpu", pure=False).result()
             for _ in range(2)]
    assert draws[0].shape == (4,) and not np.array_equal(draws[0], draws[1])
    draws = [mesh.submit(np.random.normal, 0, 1, size=3, pure=False, convert=False).result()
             for _ in range(2)]
    assert not np.array_equal(draws[0], draws[1])


def _divide(x):
    return 1 / x


@pytest.mark.parametrize("how", [{}, {"on": "cpu:jax"}, {"needs": "matmul"},
                                 {"convert": False}])
def test_a_failing_submit_shows_the_users_frames_not_ours(mesh, how):
    import traceback

    with pytest.raises(ZeroDivisionError) as info:
        mesh.submit(_divide, 0, **how).result()
    frames = traceback.extract_tb(info.tb)
    assert frames[-1].name == "_divide"
    assert not [f for f in frames if "jupyter_mesh" in f.filename], \
        [f"{f.filename}:{f.name}" for f in frames]
    # a user who asked for every frame (Dask's own setting) gets them
    with dask.config.set({"admin.traceback.shorten": []}), \
            pytest.raises(ZeroDivisionError) as info:
        mesh.submit(_divide, 0, pure=False, **how).result()
    assert [f for f in traceback.extract_tb(info.tb) if "jupyter_mesh" in f.filename]


def test_submit_passes_every_keyword_to_the_function(mesh):
    def keywords(**kw):
        return sorted(kw)

    # fn and self too: the names of submit's own parameters
    assert mesh.submit(keywords, fn=1, self=2, args=3).result() == ["args", "fn", "self"]
    assert mesh.submit(_divide, x=4).result() == 0.25
    assert mesh.submit(np.add, 1, 2, needs="ElementWise").result() == 3
    assert mesh.submit(np.add, 1, 2, needs=" elementwise ").result() == 3  # as on=


def test_repeated_submits_leave_nothing_waiting_on_the_scheduler(mesh):
    def waiting(dask_scheduler):
        from jupyter_mesh._scheduler_plugin import EXTENSION_NAME

        return len(dask_scheduler.extensions[EXTENSION_NAME].router.pending)

    before = mesh.client.run_on_scheduler(waiting)
    first = [mesh.submit(_divide, i + 1, on="cpu") for i in range(20)]
    again = [mesh.submit(_divide, i + 1, on="cpu") for i in range(20)]  # the same keys
    assert mesh.client.gather(again) == mesh.client.gather(first)
    del first, again
    assert mesh.client.run_on_scheduler(waiting) == before


def test_submit_moves_arrays_to_the_workers_backend(mesh):
    def kinds(a, parts, scale=None):
        # what the function got, and an array computed from it with operators
        return type(a).__module__.split(".")[0], type(parts["b"]).__module__.split(".")[0], \
            (a @ parts["b"]) * scale

    a = np.arange(6.0).reshape(2, 3)
    b = np.ones((3, 2))
    got_a, got_b, out = mesh.submit(kinds, a, {"b": b}, scale=2.0, on="cpu:jax").result()
    assert (got_a, got_b) == ("jaxlib", "jaxlib")
    assert type(out) is np.ndarray  # back on the host
    np.testing.assert_allclose(out, (a @ b) * 2.0)
    got_a, got_b, out = mesh.submit(kinds, a, {"b": b}, scale=2.0, on="cpu:numpy").result()
    assert (got_a, got_b) == ("numpy", "numpy")
    np.testing.assert_allclose(out, (a @ b) * 2.0)
    # convert=False: the function gets what was passed (here: a NumPy array on the
    # JAX worker), for functions that need host arrays, e.g. to write into them
    got_a, _, _ = mesh.submit(kinds, a, {"b": b}, scale=2.0, on="cpu:jax",
                              convert=False).result()
    assert got_a == "numpy"


def _module(a):
    return type(a).__module__.split(".")[0], a.dtype.str


def test_submit_to_jax_keeps_on_the_host_what_jax_would_not_hold_as_it_is(mesh):
    # np.matrix's * is a matrix product: as a JAX array it would be elementwise
    m = np.asmatrix([[1.0, 2.0], [3.0, 4.0]])
    expected = (m * m).tolist()
    for on in ("cpu:jax", "cpu:numpy"):
        assert mesh.submit(lambda a: a * a, m, on=on).result().tolist() == expected
    # dtypes JAX has no such thing for: the function gets the host array, no error
    extended = ([np.ones(2, dtype=np.longdouble)]  # wider than float64 here
                if np.dtype(np.longdouble).itemsize > 8 else [])
    for a in (np.array(["a", "b"]), np.array([1, None], dtype=object),
              np.array(["2026-11-29"], dtype="datetime64[D]"), *extended):
        module, dtype = mesh.submit(_module, a, on="cpu:jax").result()
        assert (module, dtype) == (type(a).__module__.split(".")[0], a.dtype.str)
    # numbers it has still go to JAX
    assert mesh.submit(_module, np.arange(3), on="cpu:jax").result()[0] == "jaxlib"


def _first_set(a):
    a = a.copy()  # in place: NumPy allows it, JAX's immutable arrays do not
    a[0] = 99.0
    return a, type(a).__module__.split(".")[0]


@pytest.mark.parametrize("on", [None, "cpu"])
def test_submit_without_a_backend_gives_numpy_on_every_worker(mesh, on):
    # no target, or a kind alone: the function's numbers must not depend on which
    # worker ran it (this mesh has NumPy and JAX-driven CPU workers)
    got = [mesh.submit(_first_set, np.zeros(4) + i, on=on) for i in range(6)]
    for i, future in enumerate(got):
        out, module = future.result()
        assert module == "numpy" and out.tolist() == [99.0] + [float(i)] * 3


def test_submit_reductions_come_back_as_numpy_gives_them(mesh):
    def total(a):
        return (a @ a).sum()

    a = np.arange(9.0).reshape(3, 3)
    expected = total(a)
    for on in ("cpu:jax", "cpu:numpy"):
        got = mesh.submit(total, a, on=on).result()
        # a NumPy scalar on every worker (JAX reduces to a 0-d array)
        assert type(got) is type(expected) and got == expected, on
    # a 0-d array a function makes on purpose stays one
    assert mesh.submit(np.asarray, 5.0, on="cpu:numpy").result().shape == ()


# ---------------------------------------------------------------- magics
@pytest.fixture(scope="module")
def ip(ip, mesh):
    """The session's shell (tests/conftest.py), with routing off again afterwards."""
    yield ip
    ip.run_line_magic("mesh", "route off")


def test_magic_route_and_explain(ip, mesh, capsys):
    ip.user_ns["y"] = pipeline()
    ip.run_line_magic("mesh", "route cpu:jax")
    assert mesh.route_mode == "cpu:jax"
    ip.run_cell("z = y.compute()")
    assert mesh.last_report.ran_on("matmul") == ["jax"]
    np.testing.assert_allclose(ip.user_ns["z"], ip.user_ns["y"].compute(scheduler="sync"))
    ip.run_line_magic("mesh", "route")
    assert "cpu:jax" in capsys.readouterr().out
    ip.run_line_magic("mesh", "route off")
    assert mesh.route_mode == "off"
    plan = ip.run_line_magic("mesh", "explain y")
    # routing is off, yet explain plans "auto": the random blocks never go to JAX
    # (both workers may run them with NumPy, equally fast: then Dask places them, or
    # the plan shares them out: "cpu:jax (numpy)x2 + cpu:numpy x2")
    assert plan.route == "auto"
    target = {r["op"]: r["target"] for r in plan.rows}["random_sample"]
    assert target == "any (pools equivalent)" or (
        "numpy" in target and "cpu:jax" not in target.replace("cpu:jax (numpy)", "")), target
    plan = ip.run_line_magic("mesh", "explain y --route cpu:jax")
    assert {r["op"]: r["target"] for r in plan.rows}["matmul"] == "cpu:jax"
    plan = ip.run_line_magic("mesh", "explain (y, y.sum())")
    assert plan.model.outputs


def test_magic_routed_cell(ip, mesh):
    ip.user_ns["y"] = pipeline()
    mesh.last_report = None
    ip.run_cell_magic("mesh", "--route cpu:jax", "w = y.compute()")
    assert mesh.last_report.ran_on("matmul") == ["jax"]
    assert mesh.route_mode == "off"
    ip.run_cell_magic("mesh", "", "w2 = y.compute()")
    assert mesh.last_report.plan.route == "auto"
    np.testing.assert_allclose(ip.user_ns["w"], ip.user_ns["w2"])


def _slow_block(block):
    import time

    time.sleep(1.0)
    return block


def test_a_cell_shows_no_report_of_a_computation_an_earlier_cell_started(ip, mesh,
                                                                          monkeypatch):
    # a thread started in one %%mesh cell whose computation ends while the next one
    # runs: its report was shown in that next cell, as if it were that cell's work
    import threading

    from jupyter_mesh.router import magic as router_magic

    shown = []
    monkeypatch.setattr(router_magic, "display", shown.append)
    slow = da.ones(4, chunks=1).map_blocks(_slow_block).sum()
    ip.user_ns.update(slow=slow, y=pipeline(), threading=threading, late={})
    ip.run_cell_magic("mesh", "--route auto", (
        "def work():\n"
        "    late['value'] = slow.compute()\n"
        "worker = threading.Thread(target=work)\n"
        "worker.start()\n"
        "import time; time.sleep(0.5)"))  # (planned and sent under this cell's route)
    assert shown == []
    ip.run_cell_magic("mesh", "--route cpu:jax", "own = (y + 1).sum().compute()\n"
                                                 "worker.join(120)")
    assert ip.user_ns["late"]["value"] == 4
    assert [r.plan.route for r in shown] == ["cpu:jax"], [r.plan.route for r in shown]


def test_magic_routed_cell_reports_every_computation(ip, mesh, monkeypatch):
    from jupyter_mesh.router import Report
    from jupyter_mesh.router import magic as router_magic

    shown = []
    monkeypatch.setattr(router_magic, "display", shown.append)
    ip.user_ns["y"] = pipeline()
    ip.run_cell_magic("mesh", "--route cpu:jax",
                      "a = y.compute()\nb = (y + 1).sum().compute()\nc = 1 + 1")
    assert len(shown) == 2 and all(isinstance(r, Report) for r in shown)
    assert shown[1] is mesh.last_report and shown[0] is not shown[1]
    assert shown[0].ran_on("matmul") == ["jax"]
    assert len(shown[1].plan.model.ops) > len(shown[0].plan.model.ops)  # the second: + 1, sum
    # the picture with the cell's last report only (a megabyte or so each: a loop of
    # ten computations put 14 MB in one cell)
    assert "jupyter-mesh-picture" not in shown[0]._repr_html_()
    assert "report.picture = True" in shown[0]._repr_html_()
    assert "jupyter-mesh-picture" in shown[1]._repr_html_()
    assert mesh.report_sinks == []
    # a cell that fails shows the reports of what finished before; a cell without Dask
    # work shows none
    shown.clear()
    with pytest.raises(ValueError, match="^x$"):  # (called from code: its own error)
        ip.run_cell_magic("mesh", "--route cpu:jax", "d = y.compute()\nraise ValueError('x')")
    assert len(shown) == 1 and shown[0] is mesh.last_report
    shown.clear()
    with pytest.raises(ValueError, match="^x$"):
        ip.run_cell_magic("mesh", "--route cpu:jax", "raise ValueError('x')")
    ip.run_cell_magic("mesh", "--route cpu:jax", "e = 2")
    assert shown == [] and mesh.report_sinks == []
    # a %%mesh cell inside another shows its report once (the inner cell shows it)
    ip.run_cell_magic("mesh", "--route cpu:jax", "%%mesh --route cpu:jax\nf = y.compute()")
    assert len(shown) == 1 and shown[0] is mesh.last_report and mesh.report_sinks == []
    # an inner cell with no report of its own leaves the outer cell's list in place
    shown.clear()
    ip.run_cell_magic("mesh", "--route cpu:jax",
                      "get_ipython().run_cell_magic('mesh', '', 'g = 1')\nh = y.compute()")
    assert len(shown) == 1 and shown[0] is mesh.last_report and mesh.report_sinks == []


def test_a_failing_routed_cell_counts_as_failed(ip, mesh, capsys):
    # so that "Run All", nbconvert and papermill stop there, as after any failing cell
    result = ip.run_cell("%%mesh --route cpu:jax\nraise ValueError('bad input')")
    assert not result.success and result.error_in_exec is not None
    err = capsys.readouterr()
    shown = err.out + err.err
    # the cell's own traceback, shown once, and nothing of the magic's
    assert shown.count("ValueError: bad input") == 1 and "CellFailed" not in shown
    assert mesh.route_mode == "off" and mesh.report_sinks == []
    assert ip.run_cell("%%mesh --route cpu:jax\nok = 1").success


def test_routed_cells_keep_the_shells_numbering_and_failures(ip, mesh, capsys):
    # as cells of a notebook: each with its number, its value in Out under it
    first = ip.run_cell("41", store_history=True)
    cell = ip.run_cell("%%mesh --route cpu:jax\n42", store_history=True)
    assert cell.success and cell.execution_count == first.execution_count + 1
    assert ip.user_ns["Out"][first.execution_count] == 41  # not overwritten
    assert ip.user_ns["Out"][cell.execution_count] == 42
    # a failing one: the traceback names its own number, and IPython counts it failed
    failed = ip.run_cell("%%mesh --route cpu:jax\n1 / 0", store_history=True)
    assert isinstance(failed.error_in_exec, ZeroDivisionError)
    assert f"In[{failed.execution_count}]" in capsys.readouterr().out
    assert ip.last_execution_succeeded is False
    # run_cell_magic called from code: the failure is the body's own exception there
    code = ("try:\n"
            "    get_ipython().run_cell_magic('mesh', '--route cpu:jax', '1 / 0')\n"
            "except ZeroDivisionError:\n    caught = True\nafter = 1")
    assert ip.run_cell(code, store_history=True).success
    assert ip.user_ns["caught"] is True and ip.user_ns["after"] == 1
    assert ip.run_cell("%%mesh --route cpu:jax\nok2 = 2", store_history=True).success
    assert ip.last_execution_succeeded is True
    # a silent run (a frontend's own request) shows nothing, keeps no value, and its
    # failure is its own: the next cell is not marked failed
    shown = ip.run_cell("77", store_history=True)
    ip.run_cell("%%mesh --route cpu:jax\n99", silent=True)
    assert ip.user_ns["Out"][shown.execution_count] == 77
    assert not ip.run_cell("%%mesh --route cpu:jax\n1 / 0", silent=True).success
    assert ip.run_cell("5", store_history=True).success and ip.last_execution_succeeded


def test_a_routed_cell_under_another_cell_magic_fails_with_its_own_error(ip, mesh, capsys):
    # %%time above %%mesh: the cell fails with the body's error, shown once, named (it
    # failed as an empty "CellFailed" that nbclient and papermill showed as nothing)
    result = ip.run_cell("%%time\n%%mesh --route cpu:jax\nv = 1\nraise ValueError('in time')")
    assert isinstance(result.error_in_exec, ValueError)
    shown = "".join(capsys.readouterr())
    assert shown.count("ValueError: in time") == 1 and "CellFailed" not in shown
    assert ip.user_ns["v"] == 1 and mesh.route_mode == "off" and mesh.report_sinks == []


def test_a_routed_cell_numbers_its_lines_as_the_notebook_does(ip, mesh, capsys):
    # a traceback's and a MeshError's line is the cell's line, the %%mesh line counted
    result = ip.run_cell("%%mesh --route cpu:jax\nv = 1\n\nraise ValueError('line 4')",
                         store_history=True)
    assert isinstance(result.error_in_exec, ValueError)
    out = capsys.readouterr().out
    assert re.search(r"line 4\b", out) and "line 3" not in out, out
    ip.user_ns["y"] = pipeline()
    ip.run_cell("%%time\n%%mesh\nv = 1\nmesh_ = __import__('jupyter_mesh').current()\n"
                "mesh_.compute(y, route='warp')", store_history=True)
    out = "".join(capsys.readouterr())
    assert re.search(r"line 5: mesh_\.compute\(y, route='warp'\)", out), out


def test_a_routed_cell_ending_in_a_semicolon_shows_no_value(ip, mesh, capsys):
    before = ip.run_cell("41", store_history=True)
    cell = ip.run_cell("%%mesh --route cpu:jax\n6 * 7;", store_history=True)
    assert cell.success and cell.execution_count not in ip.user_ns["Out"]
    assert "42" not in capsys.readouterr().out
    assert ip.user_ns["Out"][before.execution_count] == 41
    # without it, the value shows (and a ';' in a string or comment is no end)
    cell = ip.run_cell("%%mesh --route cpu:jax\n6 * 7  # done;", store_history=True)
    assert ip.user_ns["Out"][cell.execution_count] == 42


def test_top_level_await_in_a_routed_cell_is_one_line_where_a_loop_runs(ip, mesh):
    # in a Jupyter kernel an event loop runs the cell: the body, run from within it,
    # cannot await ("This event loop is already running", a traceback through asyncio)
    import asyncio

    from IPython.core.error import UsageError

    ip.user_ns.pop("before_await", None)

    async def in_a_kernel():
        ip.run_cell_magic("mesh", "--route cpu:jax",
                          "before_await = 1\nimport asyncio\nawait asyncio.sleep(0)")

    with pytest.raises(UsageError, match=r"^top-level await does not work in a %%mesh "
                                         r"cell: await in a plain cell"):
        asyncio.run(in_a_kernel())
    assert "before_await" not in ip.user_ns and mesh.route_mode == "off"
    # await inside a function the cell defines is no top-level await
    ip.run_cell_magic("mesh", "--route cpu:jax", "async def f():\n    await g()\nok_await = 1")
    assert ip.user_ns["ok_await"] == 1
    # where no loop runs (terminal IPython, a script), the body's await works
    ip.run_cell_magic("mesh", "--route cpu:jax",
                      "import asyncio\nawait asyncio.sleep(0)\nawaited = 5")
    assert ip.user_ns["awaited"] == 5


def test_a_routed_cell_over_another_cell_magic_runs_it(ip, mesh, capsys):
    # %%mesh, then %%time: IPython takes a cell magic on the body's first line only
    result = ip.run_cell("%%mesh --route cpu:jax\n%%time\ntimed = 6 * 7", store_history=True)
    assert result.success and ip.user_ns["timed"] == 42
    assert "Wall time" in capsys.readouterr().out


def test_errors_under_another_cell_magic_show_once_and_plainly(ip, mesh, capsys):
    # a MeshError (IPython shows it through the extension's one-line handler) came
    # twice; a syntax error came with IPython's frames that compiled it
    result = ip.run_cell("%%time\n%%mesh --route cpu:jax\n"
                         "raise __import__('jupyter_mesh').MeshError('boom here')",
                         store_history=True)
    assert type(result.error_in_exec).__name__ == "MeshError"
    shown = "".join(capsys.readouterr())
    assert shown.count("MeshError: boom here") == 1, shown
    result = ip.run_cell("%%time\n%%mesh --route cpu:jax\nx = (", store_history=True)
    assert isinstance(result.error_in_exec, SyntaxError)
    shown = "".join(capsys.readouterr())
    # (as IPython shows one under %%time alone: not the frames of the body's own run)
    assert shown.count("SyntaxError: incomplete input") == 1 and "x = (" in shown
    assert "run_cell_async" not in shown and "ast_parse" not in shown, shown
    # code that catches the error itself sees nothing printed
    code = ("try:\n    get_ipython().run_cell_magic('mesh', '--route cpu:jax', "
            "\"raise __import__('jupyter_mesh').MeshError('caught')\")\n"
            "except Exception as e:\n    got = type(e).__name__")
    assert ip.run_cell(code).success and ip.user_ns["got"] == "MeshError"
    assert "caught" not in "".join(capsys.readouterr())


def test_explain_refuses_a_missing_target_before_evaluating(ip, mesh):
    from IPython.core.error import UsageError

    ip.user_ns["y"] = pipeline()
    ip.user_ns["calls"] = []
    ip.user_ns["bump"] = lambda: ip.user_ns["calls"].append(1) or ip.user_ns["y"]
    with pytest.raises(UsageError, match="^no live gpu worker"):
        ip.run_line_magic("mesh", "explain bump() --route gpu")
    assert ip.user_ns["calls"] == []  # the expression (which may compute) never ran
    ip.run_line_magic("mesh", "explain bump() --route cpu:jax")
    assert ip.user_ns["calls"] == [1]


class _Holder:
    @property
    def boom(self):
        raise RuntimeError("a property failed\nsecond line")

    @property
    def inner(self):
        return self.missing_inside


#: (line, cell or None for a line magic, what the one-line error says)
MAGIC_MISUSE = [
    ("route warp", None, "unknown route"),
    ("route gpu", None, "no live gpu"),
    ("explain nothing_here", None, "not defined"),
    ("explain", None, "usage"),
    ("explain plain", None, "nothing to explain: no Dask collection"),
    ("explain y --route", None, "--route needs a value"),
    ("explain y --route=", None, "--route needs a value"),
    ("explain --route", None, "--route needs a value"),
    ("explain y --route gpu --route cpu:jax", None, "given twice"),
    ("explain y --bogus", None, r"^unknown option --bogus: %mesh explain takes EXPR "
                                r"\[--route TARGET\]; see %mesh explain --help$"),
    ("explain y --rout cpu:jax", None, "unknown option --rout"),
    ("explain y --route tpu", None, "no live tpu"),
    ("explain 1 / 0", None, "could not evaluate.*ZeroDivisionError"),
    ("explain y.nothing", None, "no attribute 'nothing'"),
    # a property that raises: its own error in one line, not a traceback; one that
    # raises AttributeError inside is not called missing
    ("explain holder.boom", None, r"^could not evaluate 'holder.boom': RuntimeError: "
                                  r"a property failed second line$"),
    ("explain holder.inner", None, r"^could not evaluate 'holder.inner': AttributeError"),
    # an error of several lines, joined: the first alone stopped mid-sentence, before
    # Dask's advice
    ("explain da.fft.fft(da.ones((6, 6), chunks=3))", None,
     r"^could not evaluate .*: ValueError: Dask array only supports taking an FFT along "
     r"an axis that has a single chunk\..*use dask.Array.rechunk\.$"),
    # --route inside a string literal is part of the expression
    ("explain plain_d['a --route x']", None, "nothing to explain: no Dask collection"),
    ("--route gpu", "1", "no live gpu"),
    ("--route warp", "1", "unknown route"),
    ("--route", "1", "--route: expected one argument; see %%mesh --help"),
    ("--rou cpu:jax", "1", r"unrecognized arguments: --rou cpu:jax; see %%mesh --help"),
    ("--route gpu --route cpu", "1", r"^--route given twice: give it once; see %%mesh --help$"),
    ("--remote -o a --output b", "1", r"^-o/--output given twice: give it once"),
    # a short option with its value attached counts too (-ob is -o b)
    ("--remote -o res -ob", "1", r"^-o/--output given twice: give it once"),
    ("--remote --output=first -osecond", "1", r"^-o/--output given twice: give it once"),
    # a name Python knows is no Dask collection, not a name the notebook lacks
    ("explain None", None, r"^nothing to explain: no Dask collection among the "
                           r"arguments \(NoneType\)"),
    ("explain len", None, r"^nothing to explain: no Dask collection"),
]


@pytest.mark.parametrize("line, cell, error", MAGIC_MISUSE)
def test_magic_misuse(ip, line, cell, error):
    from IPython.core.error import UsageError

    ip.user_ns.update(plain=[1, 2], y=pipeline(), da=da, holder=_Holder(),
                      plain_d={"a --route x": 1})
    with pytest.raises(UsageError, match=error):
        if cell is None:
            ip.run_line_magic("mesh", line)
        else:
            ip.run_cell_magic("mesh", line, cell)


def test_magic_explain_takes_the_expression_as_typed(ip, mesh):
    ip.user_ns["d"] = {"a b": pipeline()}
    ip.user_ns["d"]["x --route gpu"] = ip.user_ns["d"]["a b"]
    for line in ("explain d['a b'] --route cpu:jax", "explain d['a b'] --route=cpu:jax",
                 "explain --route cpu:jax d['a b']", "explain d['a b'] --route 'cpu:jax'",
                 "explain d['x --route gpu'] --route cpu:jax",
                 "explain d[\"x --route gpu\"] --route=\"cpu:jax\""):
        plan = ip.run_line_magic("mesh", line)
        assert {r["op"]: r["target"] for r in plan.rows}["matmul"] == "cpu:jax", line
    assert ip.run_line_magic("mesh", "explain d['a b']").route == "auto"


def test_magic_explain_evaluates_its_expression_as_typed(ip, mesh, capsys):
    # IPython expands $name and {expression} in a magic's line before the magic sees
    # it: %mesh explain evaluated the text that came out (code held in a variable ran,
    # a subscript read another key)
    from IPython.core.error import UsageError

    ip.user_ns.update(y=pipeline(), k="zz", d={"{k}": pipeline()},
                      code="__import__('builtins').print('INJECTED')")
    with pytest.raises(UsageError, match=r"^nothing to explain: .*\(set\)$"):
        ip.run_line_magic("mesh", "explain {code}")  # a set of one string, as typed
    with pytest.raises(UsageError, match=r"could not evaluate '\$code'"):
        ip.run_line_magic("mesh", "explain $code")
    assert "INJECTED" not in capsys.readouterr().out
    assert ip.run_line_magic("mesh", "explain d['{k}']").route == "auto"
    # its --route is an option, expanded as the other subcommands' options are
    ip.user_ns["where"] = "cpu:jax"
    for line in ("explain y --route $where", "explain y --route={where}"):
        assert ip.run_line_magic("mesh", line).route == "cpu:jax", line
    # a trailing ";" is no part of EXPR, and hides the plan as it hides any line's
    # value (IPython decides from the code it made of the line: the magic returns none)
    assert ip.run_line_magic("mesh", "explain y;") is None
    shown = ip.run_cell("%mesh explain y;")
    assert shown.success and shown.result is None
    assert ip.run_cell("%mesh explain y").result.route == "auto"


def test_a_bad_route_keeps_the_one_in_force(ip, mesh):
    from IPython.core.error import UsageError

    ip.run_line_magic("mesh", "route cpu:jax")
    try:
        for bad in ("gpu", "warp"):
            with pytest.raises(UsageError):
                ip.run_line_magic("mesh", f"route {bad}")
            assert mesh.route_mode == "cpu:jax"
        y = pipeline()
        np.testing.assert_allclose(y.compute(), y.compute(scheduler="sync"))
        assert mesh.last_report.ran_on("matmul") == ["jax"]
        with pytest.raises(MeshError, match="fallback="):
            api.set_route(mesh, "auto", fallback="no")
        assert mesh.route_mode == "cpu:jax"
    finally:
        ip.run_line_magic("mesh", "route off")
    assert mesh.route_mode == "off"


def test_pin_on_a_live_mesh(mesh):
    x = da.random.random((600, 600), chunks=300)
    y = ((x @ x.T) + 1).sum(axis=0)
    expected = y.compute(scheduler="sync")
    (got,) = mesh.compute(y, pin={"lab": x})
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert mesh.last_report.plan.model.pins
    with pytest.raises(MeshError, match="no worker at site 'mars'"):
        mesh.compute(y, pin={"mars": x})
    with pytest.raises(MeshError, match="needs routing"):
        mesh.compute(y, route="off", pin={"lab": x})


def test_scaling_away_the_routes_target_warns(mesh):
    # plain Dask calls would fail from then on: the user hears so when scaling
    import warnings

    api.set_route(mesh, "cpu:jax")
    try:
        with pytest.warns(UserWarning, match=r"^jupyter_mesh: the kernel's route is cpu:jax, "
                                             r"and the mesh has no cpu:jax worker now") as rec:
            mesh.scale(jax_cpu=0)
        # it points at the caller's line (from %mesh scale it pointed at magics.py)
        assert [w.filename for w in rec] == [__file__]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # back: no warning
            mesh.scale(jax_cpu=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            api.set_route(mesh, "auto")  # a route with no target strands nothing
            mesh.scale(jax_cpu=0)
    finally:
        api.set_route(mesh, "off")
        if not any(d.backend == "jax" for d in mesh.inventory()):
            mesh.scale(jax_cpu=1)
    assert [d.backend for d in mesh.inventory()].count("jax") == 1


def test_one_route_block_may_be_entered_again(mesh):
    # as a lock: one after another, or one inside another; each exit ends its own entry
    y = (da.ones((40, 40), chunks=20) + 1).sum()
    block = mesh.route("cpu:jax")
    for _ in range(2):
        with block:
            assert mesh.route_mode == "cpu:jax"
            assert y.compute() == 3200
        assert mesh.route_mode == "off"
    with block:
        with block:
            assert mesh.route_mode == "cpu:jax"
        assert mesh.route_mode == "cpu:jax"
    assert mesh.route_mode == "off" and api.ROUTES.blocks == []


def test_magic_lines_expand_variables_and_drop_a_trailing_semicolon(ip, mesh, capsys):
    # other subcommands than explain keep IPython's $name / {expression} expansion,
    # and a trailing ";" (IPython's way to hide output) is no part of the last option
    ip.user_ns["mode"] = "cpu"
    try:
        for line in ("route {mode};", "route $mode ;", "route cpu;  # a comment"):
            api.set_route(mesh, "off")
            ip.run_line_magic("mesh", line)
            assert mesh.route_mode == "cpu", line
        # the local names of the code that ran the magic too, as IPython expands them
        # (a magic line in a function)
        api.set_route(mesh, "off")
        assert ip.run_cell("def set_route(where):\n"
                           "    %mesh route $where\n"
                           "set_route('cpu')").success
        assert mesh.route_mode == "cpu"
        api.set_route(mesh, "off")

        def from_a_function():
            where = "cpu"  # noqa: F841  (the magic line reads it)
            ip.run_line_magic("mesh", "route {where}")

        from_a_function()
        assert mesh.route_mode == "cpu"
    finally:
        api.set_route(mesh, "off")
    # a ";" inside quotes is the value's own
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="unknown route 'auto;'"):
        ip.run_line_magic("mesh", "route 'auto;'")


def _slow_block(b):
    import time

    time.sleep(0.3)
    return b


@pytest.mark.parametrize("route", ["cpu", "cpu:jax"])
def test_a_routed_compute_sharing_tasks_with_plain_work_in_flight(mesh, route):
    # plain Dask's persist is still running the tasks that the routed graph shares with
    # it: their restrictions changed while they ran, the scheduler released a pool's
    # resource they had never acquired (KeyError), dropped both workers, and the
    # computation hung or failed for want of workers
    mesh.calibrate()  # (so that no probe delays the routed graph until the plain work ends)
    xn = np.random.default_rng(0).random((60, 40))
    x = da.from_array(xn, chunks=20).map_blocks(_slow_block, dtype=float)
    a = x @ x.T
    workers = {d.worker for d in mesh.inventory()}
    held = mesh.client.persist(a)
    try:
        (got,) = mesh.compute((a + 1) * 2, route=route)
        np.testing.assert_allclose(got, (xn @ xn.T + 1) * 2, rtol=1e-12)
        np.testing.assert_allclose(held.compute(), xn @ xn.T, rtol=1e-12)
        # no worker was lost on the way
        assert {d.worker for d in mesh.inventory()} == workers
    finally:
        del held


def test_layers_that_share_their_tasks_are_one_op_with_one_target(mesh):
    # Dask's lu gives its three outputs one dict of tasks; planned per layer, each was
    # an op of its own, and the shared tasks ran where the last one said: a row named
    # a target its workers were not of
    sq = da.from_array(np.random.default_rng(6).standard_normal((6, 6)) + 6 * np.eye(6),
                       chunks=3)
    p, lower, upper = da.linalg.lu(sq)
    want = dask.compute(p, lower, upper, scheduler="sync")
    with dask.config.set({"mesh.router.layer-plan-threshold": 5}):
        got = mesh.compute(p, lower, upper, route="cpu")
        assert all(np.allclose(a, b) for a, b in zip(got, want, strict=True))
        rows = [r for r in mesh.last_report.rows if r["op"].startswith("lu")]
        assert len(rows) == 1 and rows[0]["tasks"] == 24, rows
        kinds = {d.name: d.backend for d in mesh.inventory()}
        for r in rows:
            backend = "jax" if r["target"].startswith("cpu:jax") else "numpy"
            assert {kinds[w] for w in r["workers"]} == {backend}, r


def test_a_plain_graph_sharing_keys_with_a_routed_one_gets_host_arrays(mesh):
    # Dask gives every graph the task it holds for a key: a plain .compute() (another
    # thread's, another notebook's) of the same x @ x.T read the routed matmul's
    # results, kept on the JAX device for the routed sum, and failed in NumPy
    # ("Cannot cast ufunc 'add' input 0 from dtype('O')")
    import threading
    import time

    x = da.random.random((1200, 1200), chunks=300)
    a = x.compute(scheduler="sync")
    prod = a @ a.T
    for _ in range(3):
        out = {}

        def routed(out=out):
            out["routed"] = mesh.compute(((x @ x.T) + 1).sum(axis=0), route="cpu:jax")[0]

        t = threading.Thread(target=routed)
        t.start()
        time.sleep(0.3)
        plain = ((x @ x.T) + 2).sum(axis=0).compute()
        t.join(120)
        np.testing.assert_allclose(plain, (prod + 2).sum(axis=0))
        np.testing.assert_allclose(out["routed"], (prod + 1).sum(axis=0))


def test_a_graph_the_router_materializes_gets_no_large_graph_warning_of_it(mesh):
    # a plan that restricts nothing goes materialized (and fused): Dask warned "Sending
    # large graph ... embed the data" over the bytes of that, which the user's own
    # compute does not send (13 MB at 10^5 tasks); data the graph carries still warns
    import warnings

    y = (da.ones((300, 300), chunks=10) + 1).sum()
    with dask.config.set({"mesh.router.layer-plan-threshold": 100,
                          "distributed.admin.large-graph-warning-threshold": "50 kB"}):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert mesh.compute(y, route="auto")[0] == 2 * 300 * 300
        assert mesh.last_plan.unrestricted
        assert not [w for w in caught if "large graph" in str(w.message)]
        carried = da.from_array(np.ones((400, 400)), chunks=100) + 1  # 1.3 MB of data
        with pytest.warns(UserWarning, match="Sending large graph"):
            mesh.compute(carried.sum(), route="auto")


@pytest.mark.parametrize("route", ["cpu:jax", "auto", "off"])
def test_an_op_that_fails_fails_as_it_does_unrouted(mesh, route):
    # blocks whose shapes do not broadcast: NumPy says ValueError; JAX said TypeError
    # ("add got incompatible shapes for broadcasting"), which an `except ValueError`
    # in the user's code did not catch
    import operator

    f = da.from_array(np.random.default_rng(0).standard_normal((6, 8)), chunks=(3, 4))[:6, :6]
    bad = da.blockwise(operator.add, "ij", f, "ij", f, "ji", dtype="f8")
    with pytest.raises(ValueError, match="could not be broadcast together"):
        bad.compute(scheduler="sync")
    with pytest.raises(ValueError, match="could not be broadcast together") as info:
        mesh.compute(bad, route=route)
    # NumPy's own error, not chained to JAX's (13 frames of JAX above it)
    assert info.value.__context__ is None and info.value.__cause__ is None
    assert mesh.compute(f.sum(), route=route)[0] == pytest.approx(f.compute().sum())


def test_each_plan_and_report_is_announced_as_it_is_made(mesh):
    # (the sidebar's registration hears of each one: a look every second saw only the
    # last of a loop's computations)
    from jupyter_mesh import _state

    heard = []

    def listen(event, m):
        if m is mesh and event in ("plan", "report"):
            heard.append((event, getattr(m, f"last_{event}")))

    _state.listeners.append(listen)
    try:
        for i in range(3):
            mesh.compute(da.ones(10, chunks=5).sum() + i)
        mesh.explain(da.ones(10, chunks=5).sum())
    finally:
        _state.listeners.remove(listen)
    assert [e for e, _ in heard] == ["plan", "report"] * 3 + ["plan"]
    assert heard[-1][1] is mesh.last_plan and heard[-2][1] is mesh.last_report
