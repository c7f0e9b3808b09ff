"""Batches: runs of tasks that a plan puts one after another on one worker, submitted
as one task each (``rewrite.worker_batches``), so Dask's cost per dispatched task is
paid once per run. They must give Dask's numbers, keep every op in the report, and
never hold back a result that the plan has a task on another worker waiting for."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

from jupyter_mesh.router import CostModel, build_pools, plan_collections
from jupyter_mesh.router.classify import synthetic_model
from jupyter_mesh.router.plan import Plan
from jupyter_mesh.router.rewrite import (
    BATCH_BYTES,
    BATCH_SHORT,
    linear_chains,
    rewrite,
    worker_batches,
)

from .meshes import fresh_local_mesh, tasks_left
from .test_router_plan import CPU, GPU, dev


def devices():
    return [dev("c0", "cpu", "numpy", CPU), dev("c1", "cpu", "numpy", CPU),
            dev("g0", "gpu", "cupy", GPU)]


def small_tasks():
    # many small blocks: Dask's dispatch outweighs the work of each task
    x = da.random.random((4000,), chunks=50)
    return (da.sin(x) * 2 + da.cos(x)).sum()


def batch_keys(routed):
    return [k for k in routed.graph if str(k).startswith("jupyter-mesh-batch-")]


def test_a_batched_graph_gives_daskss_numbers_and_keeps_every_task_accounted_for():
    y = small_tasks()
    plan = plan_collections([y], devices())
    m = plan.model
    routed = rewrite(plan)
    unbatched = rewrite(plan, batch=False)
    assert batch_keys(routed), "runs of small tasks on one worker are batched"
    assert batch_keys(unbatched) == []
    assert len(routed.graph) < 0.7 * len(unbatched.graph)
    # the outputs are tasks of their own, under their own keys
    assert set(routed.keys) <= set(routed.graph)
    head = {c[-1]: c[0] for c in linear_chains(plan)}
    for bkey in batch_keys(routed):
        members = routed.fused[bkey]
        idx = [m.keys.index(k) for k in members]
        # one worker's tasks, in the order the plan starts them there (a fused chain
        # by its first task)
        assert len({plan.worker_of[i] for i in idx}) == 1
        units = [m.keys.index(node.key) for node in routed.graph[bkey].args[0]]
        starts = [plan.start[head.get(i, i)] for i in units]
        assert starts == sorted(starts)
        assert not set(members) & set(m.outputs)
        assert not set(members) & set(routed.graph)  # none is submitted on its own
        # restricted to the members' pool, started when its first member was planned to
        assert routed.restrictions[bkey] == plan.pool_of[idx[0]]
        assert routed.priorities[bkey] == min(plan.start[i] for i in idx)
    # every task is submitted once: on its own, in a fused chain, or in a batch
    covered = [k for sk in routed.graph for k in routed.fused.get(sk, [sk])]
    assert sorted(map(str, covered)) == sorted(map(str, m.keys))
    assert set(routed.restrictions) <= set(routed.graph)
    assert set(routed.priorities) <= set(routed.graph)
    # the same numbers as Dask's, with and without batches
    expected = y.compute(scheduler="sync")
    for r in (routed, unbatched):
        (got,) = dask.get(r.graph, r.keys)
        np.testing.assert_allclose(got, expected)


def test_data_pinned_to_a_site_is_never_batched():
    # a consumer at another site of one member of a batch receives the whole batch's
    # results: pinned data (x's, and what is computed from it) went with them
    devs = [dev("a0", "cpu", "numpy", CPU, site="lab"), dev("a1", "cpu", "numpy", CPU,
                                                           site="lab"),
            dev("b0", "cpu", "numpy", CPU, site="cloud")]
    x = da.random.random((4000,), chunks=50)
    z = da.random.random((4000,), chunks=50)
    y = (da.sin(x) * 2).sum() + (da.cos(z) * 2).sum()
    plan = plan_collections([y], devs, pin={"lab": x})
    routed = rewrite(plan)
    unbatched = rewrite(plan, batch=False)
    pinned = set(unbatched.pins)  # every task computed from x (pins propagate)
    assert pinned and len(pinned) < len(plan.model.keys)
    for bkey in batch_keys(routed):
        assert not pinned & set(routed.fused[bkey]), bkey
    # unpinned runs are still batched, and the pinned tasks keep their site
    assert batch_keys(routed)
    assert {routed.pins.get(k) for k in pinned if k in routed.pins} == {"lab"}


@pytest.mark.parametrize("build", [
    lambda x: (da.sin(x) * 2)[10:].sum(),  # slices: aliases of whole blocks
    lambda x: da.concatenate([da.sin(x), da.cos(x)]).sum(),
])
def test_an_alias_of_a_batched_task_keeps_its_key(build):
    # an alias of a member whose result leaves its batch became the task that takes
    # it out of the batch, under the key None
    y = build(da.random.random((4000,), chunks=50))
    routed = rewrite(plan_collections([y], devices()))
    assert batch_keys(routed)
    assert [k for k, node in routed.graph.items() if node.key != k] == []
    (got,) = dask.get(routed.graph, routed.keys)
    np.testing.assert_allclose(got, y.compute(scheduler="sync"))


@pytest.mark.parametrize("chunks", [(300, 3000), ((100,) * 60 + (2000,) * 2 + (80,) * 12,
                                                   3000)])
def test_results_handed_out_of_a_batch_stay_under_the_byte_limit(chunks):
    # 7.2 MB blocks, or many small blocks and two of 48 MB (a limit on the op's mean
    # block would let one of those through)
    x = da.random.random((sum(chunks[0]) if isinstance(chunks[0], tuple) else 3000,
                          3000), chunks=chunks)
    y = (da.sin(x) * 2 + da.cos(x)).sum(axis=1)
    plan = plan_collections([y], devices())
    routed = rewrite(plan)
    outputs = {}
    for bkey in batch_keys(routed):
        _, handed, *_ = routed.graph[bkey].args
        outputs[bkey] = handed
    # what each batch hands out, in the numbers its tasks really give
    values = dask.get(routed.graph, list(outputs))
    for bkey, value in zip(outputs, values, strict=True):
        assert len(value) == len(outputs[bkey])
        assert sum(v.nbytes for v in value) <= BATCH_BYTES
    got = dask.get(routed.graph, routed.keys)
    np.testing.assert_allclose(np.concatenate(got), y.compute(scheduler="sync"))


def two_by_two(start, finish, outputs=None, out_bytes=8.0):
    """a0, a1 on worker 0, each read by b0, b1 on worker 1, at the times given."""
    pools = build_pools([dev("c0", "cpu", "numpy", CPU), dev("c1", "cpu", "numpy", CPU)])
    m = synthetic_model([
        {"name": "a", "op_class": "creation", "tasks": 2, "out_bytes": out_bytes},
        {"name": "b", "op_class": "elementwise", "tasks": 2, "deps": [(0, "map")]},
    ])
    m.outputs = outputs or [m.keys[2], m.keys[3]]
    cost = CostModel(pools, task_overhead=1e-3, dependency_latency=2e-3)
    plan = Plan(m, pools, "auto", [0] * 4, start, finish, cost)
    plan.worker_of = [0, 0, 1, 1]
    return plan


def test_a_result_is_never_held_back_past_when_its_consumer_was_planned_to_start():
    # a0 is read on the other worker as soon as it has crossed: waiting for a1 with
    # it would delay b0, and everything after it, by a1's 10 ms
    tight = two_by_two([0.0, 0.010, 0.013, 0.023], [0.010, 0.020, 0.015, 0.025])
    assert worker_batches(tight, [], lambda u: True) == []
    # b0 was planned well after both a's: a0 and a1 go as one task
    slack = two_by_two([0.0, 0.010, 0.060, 0.070], [0.010, 0.020, 0.062, 0.072])
    assert worker_batches(slack, [], lambda u: True) == [[[0], [1]]]
    # ... but not an output of the computation (it is fetched by its own key), nor a
    # task the rewrite cannot batch, nor results over the byte limit
    out = two_by_two([0.0, 0.010, 0.060, 0.070], [0.010, 0.020, 0.062, 0.072],
                     outputs=None)
    out.model.outputs = [out.model.keys[1], out.model.keys[2], out.model.keys[3]]
    assert worker_batches(out, [], lambda u: True) == []
    assert worker_batches(slack, [], lambda u: u != 1) == []
    big = two_by_two([0.0, 0.010, 0.060, 0.070], [0.010, 0.020, 0.062, 0.072],
                     out_bytes=BATCH_BYTES * 0.6)
    assert worker_batches(big, [], lambda u: True) == []
    # nor tasks that take longer than BATCH_SHORT of Dask's round trips (here 3 ms):
    # the dispatch saved is a small part of them, and their results would wait longer
    assert BATCH_SHORT * 3e-3 < 0.020
    long = two_by_two([0.0, 0.020, 0.100, 0.110], [0.020, 0.040, 0.102, 0.112])
    assert worker_batches(long, [], lambda u: True) == []


def test_a_task_whose_input_arrives_after_the_batch_would_start_is_not_batched():
    # worker 1 runs b0 and then b1; b1 reads a1, which comes from worker 0 just in
    # time for b1: batching b1 with b0 would hold b0 back until a1 is there
    pools = build_pools([dev("c0", "cpu", "numpy", CPU), dev("c1", "cpu", "numpy", CPU)])
    m = synthetic_model([
        {"name": "a", "op_class": "creation", "tasks": 2},
        {"name": "b", "op_class": "elementwise", "tasks": 2, "deps": [(0, "map")]},
        {"name": "c", "op_class": "reduction", "tasks": 1, "deps": [(1, "all")]},
    ])
    m.outputs = [m.keys[4]]
    cost = CostModel(pools, task_overhead=1e-3, dependency_latency=2e-3)
    start = [0.0, 0.040, 0.050, 0.055, 0.100]
    finish = [0.001, 0.045, 0.055, 0.060, 0.101]
    plan = Plan(m, pools, "auto", [0] * 5, start, finish, cost)
    plan.worker_of = [0, 0, 1, 1, 1]
    only_b = lambda u: u in (2, 3)  # noqa: E731
    assert worker_batches(plan, [], only_b) == []
    # with a1 there long before b0 starts, b0 and b1 go as one task
    start[1], finish[1] = 0.001, 0.020
    assert worker_batches(plan, [], only_b) == [[[2], [3]]]


@pytest.fixture(scope="module")
def mesh():
    with fresh_local_mesh(cpu=1, jax_cpu=1) as m:
        yield m


def test_a_routed_compute_runs_batches_and_reports_every_op(mesh):
    from distributed import get_task_stream

    x = da.random.random((20000,), chunks=100)
    y = (da.sin(x) @ da.cos(x)) + (x * 2).sum()
    expected = y.compute(scheduler="sync")
    # (with "auto" the pools of this mesh are equivalent and Dask places every task:
    # a forced kind restricts them, to one pool of two workers)
    # (Dask's costs fixed, not measured: the plan does not depend on the load)
    with get_task_stream(mesh.client) as ts, dask.config.set(
            {"mesh.task-overhead": 1e-3, "mesh.dependency-latency": 1e-3}):
        (got,) = mesh.compute(y, route="cpu")
    np.testing.assert_allclose(got, expected)
    plan, report = mesh.last_plan, mesh.last_report
    batches = [r["key"] for r in ts.data if str(r["key"]).startswith("jupyter-mesh-batch-")]
    # (the stream has the calibration's probes too, run before the computation)
    ran = [r["key"] for r in ts.data if r["key"] in set(plan.model.keys)] + batches
    assert batches, "the plan's runs of small tasks on one worker ran as batches"
    assert len(ran) < 0.8 * len(rewrite(plan, batch=False).graph)
    # the report still has every task of every op, each on the worker that ran it
    assert set(report.records) == set(plan.model.keys)
    for row in report.rows:
        assert row["workers"] and row["backends"]
    # and its picture has a bar per task, each where it ran
    from jupyter_mesh.viz import measured_bars

    bars, timed = measured_bars(report)
    assert timed and len(bars) == plan.ntasks
    assert {b["worker"] for b in bars} <= {w for r in report.rows for w in r["workers"]}


def test_batches_that_nothing_reads_are_forgotten(mesh):
    # a routed graph may bring tasks whose keys the scheduler holds already (a
    # persisted collection's, dask/dask#9888): the scheduler keeps its own tasks for
    # them, so a new batch that only they would have read is read by nothing; it must
    # not keep the tasks it reads (and theirs) on the scheduler once all is released

    x = da.random.random((600, 600), chunks=100)
    y = ((x @ x.T) + 1).sum(axis=0)
    expected = y.compute(scheduler="sync")
    # (Dask's costs fixed, not measured: the plans, and their batches, do not depend on
    # the load of the moment)
    with mesh.route("cpu"), dask.config.set({"mesh.task-overhead": 1e-3,
                                             "mesh.dependency-latency": 1e-3}):
        p = y.persist()
        p2, total = dask.persist(y + 1, y.sum())
    assert any(str(k).startswith("jupyter-mesh-batch-") for k in mesh.last_report.fused)
    np.testing.assert_allclose(mesh.compute(p2, route="off")[0], expected + 1)
    assert mesh.compute(total, route="off")[0] == pytest.approx(expected.sum())
    np.testing.assert_allclose(mesh.compute(p, route="off")[0], expected)
    del p, p2, total
    assert tasks_left(mesh, timeout=10) == 0
