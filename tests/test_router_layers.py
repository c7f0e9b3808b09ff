"""The router's per-layer fast path for large graphs (mesh.router.layer-plan-threshold)."""

from __future__ import annotations

from collections import Counter

import dask
import dask.array as da
import numpy as np
import pytest
from dask.blockwise import Blockwise

from jupyter_mesh.devices._profile import Profile
from jupyter_mesh.inventory import Device
from jupyter_mesh.router._device import DeviceCall
from jupyter_mesh.router.classify import _collection_graph, model_graph
from jupyter_mesh.router.cost import build_pools
from jupyter_mesh.router.layers import (
    LayerPlan,
    layer_plan_threshold,
    model_layers,
    plan_layers,
    rewrite_layers,
    use_layer_plan,
)
from jupyter_mesh.router.placement import plan_model

from .meshes import fresh_local_mesh
from .test_router_live import assert_all_close, other_ops


def pipeline(n: int = 600, chunks: int = 300):
    x = da.random.random((n, n), chunks=chunks)
    return ((x @ x.T) + 1).sum(axis=0)


def synthetic_pools():
    # a modelled JAX device 10x the CPU at compute, same memory bandwidth
    cpu = Profile(flops32=2e11, flops64=1e11, mem_bandwidth=2e10, launch_latency=2e-6,
                  method="model", source="test")
    fast = Profile(flops32=2e12, flops64=1e12, mem_bandwidth=2e10, launch_latency=2e-6,
                   method="model", source="test")
    return build_pools([
        Device("tcp://a:1", "cpu", "numpy", "model cpu", 1 << 34, "lab", cpu, name="a"),
        Device("tcp://b:1", "cpu", "jax", "model cpu", 1 << 34, "lab", fast, name="b"),
    ])


def test_threshold_from_config():
    assert layer_plan_threshold() == 20_000
    g, _ = _collection_graph([pipeline()])
    assert not use_layer_plan(g)
    with dask.config.set({"mesh.router.layer-plan-threshold": 5}):
        assert layer_plan_threshold() == 5
        assert use_layer_plan(g)


def test_layers_classified_like_the_per_task_model_without_materializing():
    y = ((da.random.random((400, 400), chunks=100) + 1) * 2).sum(axis=0)
    g, keys = _collection_graph([y])
    lm = model_layers(g, keys)
    blockwise = [layer for layer in g.layers.values() if isinstance(layer, Blockwise)]
    assert blockwise and not any(hasattr(b, "_cached_dict") for b in blockwise)
    y2 = ((da.random.random((400, 400), chunks=100) + 1) * 2).sum(axis=0)
    tm = model_graph(*_collection_graph([y2]))
    per_layer = {(op.label, op.op_class, op.tasks, op.out_bytes) for op in lm.ops}
    per_task = {(op.label, op.op_class, op.tasks, op.out_bytes) for op in tm.ops if op.tasks}
    assert per_layer == per_task
    assert lm.ntasks == len(tm.keys)


def test_integer_and_boolean_ops_are_never_planned_on_jax():
    # JAX's integer arithmetic is not NumPy's (the worker would run NumPy instead):
    # both planners keep such ops off JAX, float ops stay eligible
    def graph():
        x = da.random.random((200, 200), chunks=100)
        return ((x * 10).astype(np.int32) // 3).sum() + (x @ x.T).sum() + (x > 0.5).sum()

    for model in (model_layers(*_collection_graph([graph()])),
                  model_graph(*_collection_graph([graph()]))):
        kinds = {op.label: op.dtype_kind for op in model.ops}
        assert kinds["astype"] == "i" and kinds["floordiv"] == "i" and kinds["gt"] == "b"
        for op in model.ops:
            if op.dtype_kind in ("i", "b"):
                assert "jax" not in op.native, op.label
        assert "jax" in next(op.native for op in model.ops if op.label == "matmul")


def test_a_layer_plan_has_no_pace_floor():
    # its layers count tasks before Dask culls them: a floor from them could be far
    # above what runs (a few chunks sliced from a large array)
    from jupyter_mesh.router.cost import CostModel

    pools = synthetic_pools()
    g, keys = _collection_graph([pipeline()])
    model = model_layers(g, keys)
    cost = CostModel(pools)
    cost.task_interval = 1.0
    plan = plan_layers(model, pools, "cpu:jax", cost=cost)
    assert plan.floor == 0.0 and plan.makespan < model.ntasks


def test_a_layer_plan_says_how_much_goes_between_sites():
    from jupyter_mesh.inventory import format_bytes
    from jupyter_mesh.router.cost import CostModel

    cpu = Profile(flops32=2e11, flops64=1e11, mem_bandwidth=2e10, launch_latency=2e-6,
                  method="model", source="test")
    pools = build_pools([
        Device("tcp://a:1", "cpu", "numpy", "model cpu", 1 << 34, "lab", cpu, name="a"),
        Device("tcp://b:1", "cpu", "jax", "model cpu", 1 << 34, "edge", cpu, name="b"),
    ])
    g, keys = _collection_graph([pipeline()])
    model = model_layers(g, keys)
    # forced to JAX (at edge): the random blocks, which JAX does not make, at lab
    plan = plan_layers(model, pools, "cpu:jax", cost=CostModel(pools))
    site = [plan.pools[p].site for p in plan.layer_pool]
    crossing = sum(nb * model.ops[li].tasks for li, row in enumerate(model.deps)
                   for d, nb in row if site[d] != site[li])
    assert len(set(site)) == 2 and crossing > 0
    assert plan.bytes_between_sites == crossing
    assert f"{format_bytes(crossing)} between sites" in repr(plan).splitlines()[0]


def test_a_forced_layer_plan_times_the_cpu_workers_it_uses_at_their_own_share():
    # two NumPy workers and a JAX one on a 2-core host: beside the JAX worker each NumPy
    # one gets 2/3 of a core; "cpu:numpy" leaves the JAX worker idle, so they run (and
    # are planned) at full speed, as on a mesh without the JAX worker
    cpu = Profile(flops32=2e11, flops64=1e11, mem_bandwidth=2e10, launch_latency=2e-6,
                  method="model", source="test")

    def on(name, backend, cores):
        d = Device(f"tcp://{name}:1", "cpu", backend, "model cpu", 1 << 34, "lab", cpu,
                   name=name)
        d.host, d.extra = "10.0.0.1", {"cores": cores}
        return d

    numpy_only = [on("a", "numpy", 2), on("b", "numpy", 2)]
    g, keys = _collection_graph([pipeline()])
    alone = plan_layers(model_layers(g, keys), build_pools(numpy_only), "cpu:numpy")
    forced = plan_layers(model_layers(g, keys), build_pools(numpy_only + [on("j", "jax", 1)]),
                         "cpu:numpy")
    assert forced.makespan == pytest.approx(alone.makespan)
    assert [r["est_seconds"] for r in forced.rows] == pytest.approx(
        [r["est_seconds"] for r in alone.rows])


def test_plan_rows_and_rewrite_wrap_each_layer_once():
    pools = synthetic_pools()
    y = pipeline()
    g, keys = _collection_graph([y])
    plan = plan_layers(model_layers(g, keys), pools, "cpu:jax")
    assert isinstance(plan, LayerPlan)
    rows = {r["op"]: r for r in plan.rows}
    assert rows["matmul"]["target"] == "cpu:jax"
    assert rows["random_sample"]["target"] == "cpu:numpy"  # creation is not in JAX's table
    for r in plan.rows:
        assert set(r) >= {"op", "target", "tasks", "est_seconds", "bytes_moved"}
    assert "planned per layer" in repr(plan) and "<table>" in plan._repr_html_()
    unfused = rewrite_layers(plan, fuse=False)
    assert set(unfused.layers) == set(plan.model.names)
    for name, layer in unfused.graph.layers.items():
        if isinstance(layer, Blockwise):
            assert isinstance(layer.task.func, DeviceCall)
            assert not isinstance(g.layers[name].task.func, DeviceCall)  # input untouched
    # by default the Blockwise layers of one pool are fused as Dask fuses them: fewer
    # layers, each still restricted by its (last layer's) name, every member wrapped
    routed = rewrite_layers(plan)
    assert set(routed.graph.layers) < set(unfused.graph.layers)
    assert set(routed.graph.layers) <= set(routed.layers)
    for layer in routed.graph.layers.values():
        assert not getattr(layer, "annotations", None)  # the pool's mark is taken off
        if isinstance(layer, Blockwise):
            inner = [layer.task] if isinstance(layer.task.func, DeviceCall) else \
                list(layer.task.args[0].values())
            assert inner and all(isinstance(t.func, DeviceCall) for t in inner)
    # the rewritten graphs give the unrouted numbers (the wrapper runs on host NumPy here)
    finalize, extra = y.__dask_postcompute__()
    for r in (unfused, routed):
        got = dask.get(r.graph, r.keys)
        values = dict(zip(r.keys, got, strict=True))
        result = finalize([values[k] for k in dask.core.flatten(y.__dask_keys__())], *extra)
        np.testing.assert_allclose(result, y.compute(scheduler="sync"), rtol=1e-12)


def equivalent_pools(site_b: str = "lab"):
    cpu = Profile(flops32=2e11, flops64=1e11, mem_bandwidth=2e10, launch_latency=2e-6,
                  method="model", source="test")
    return build_pools([
        Device("tcp://a:1", "cpu", "numpy", "model cpu", 1 << 34, "lab", cpu, name="a"),
        Device("tcp://b:1", "cpu", "numpy", "model cpu", 1 << 34, site_b, cpu, name="b"),
    ])


@pytest.mark.parametrize("site", [None, "lab"])
def test_a_layer_plan_that_restricts_nothing_is_fused_as_dask_fuses(site):
    # Dask places every task: its linear chains go as one task each, as Dask's own
    # optimization sends them (unfused, graphs of small blocks ran twice as long)
    pools = equivalent_pools("lab" if site is None else "edge")
    x = da.random.random((400, 400), chunks=100)
    y = ((x + 1) * 2).sum(axis=0)
    g, keys = _collection_graph([y])
    model = model_layers(g, keys)
    plan = plan_layers(model, pools, "auto", site=site)
    assert plan.unrestricted
    routed = rewrite_layers(plan)
    assert isinstance(routed.graph, dict) and routed.layers == {}
    # each 16-block chain random -> add -> mul -> sum fused into its last task, which
    # keeps its key; every member records under its own key
    assert len(routed.fused) == 16
    for last, chain in routed.fused.items():
        assert chain[-1] == last and [k[0].split("-")[0] for k in chain] == [
            "random_sample", "add", "mul", "sum"]
        assert last in routed.graph and not any(k in routed.graph for k in chain[:-1])
    assert len(routed.graph) == model.ntasks - 3 * 16
    if site is None:
        assert routed.restrictions == {}
    else:  # kept at the site, and nothing narrower
        anywhere = set(routed.restrictions.values())
        assert len(anywhere) == 1 and routed.pools[anywhere.pop()][:2] == (None, "lab")
        assert set(routed.restrictions) == set(routed.graph)
    got = dict(zip(routed.keys, dask.get(routed.graph, routed.keys), strict=True))
    finalize, extra = y.__dask_postcompute__()
    result = finalize([got[k] for k in dask.core.flatten(y.__dask_keys__())], *extra)
    np.testing.assert_allclose(result, y.compute(scheduler="sync"), rtol=1e-12)
    # with Dask's fusion off, nothing is fused either
    assert not isinstance(rewrite_layers(plan, fuse=False).graph, dict)
    # the plan's estimate knows: the chains' first three layers dispatch nothing of
    # their own (their tasks run inside the sum's)
    from jupyter_mesh.router.layers import fused_layers

    assert sorted(model.names[i].split("-")[0] for i in fused_layers(model)) == [
        "add", "mul", "random_sample"]
    with dask.config.set({"optimization.fuse.active": False}):
        unfused = plan_layers(model, pools, "auto", site=site)
    workers = 2 if site is None else 1  # (the other one is at the edge)
    saved = 3 * 16 * plan.cost.task_overhead / workers  # 48 dispatches fewer
    assert plan.makespan == pytest.approx(unfused.makespan - saved, rel=0.05)


def test_a_layer_behind_an_output_alias_layer_hands_back_host_arrays():
    # plain slicing of whole chunks makes a layer of aliases, which runs no wrapper:
    # the layer they point at must return host arrays, though both run on JAX
    pools = [p for p in synthetic_pools() if p.backend == "jax"]
    x = da.random.random((40, 40), chunks=20)
    g, keys = _collection_graph([(x + 1)[0:20, 0:20]])
    plan = plan_layers(model_layers(g, keys), pools, "cpu:jax")
    m = plan.model
    add, out = m.names.index(next(n for n in m.names if n.startswith("add"))), len(m.names) - 1
    assert m.names[out].startswith("getitem") and [d for d, _ in m.deps[out]] == [add]
    assert plan.pools[plan.layer_pool[add]].backend == "jax"
    assert plan.pools[plan.layer_pool[out]].backend == "jax"
    assert plan.layer_to_host[add]
    # a layer whose consumers run on the same kind keeps its results there
    y = x + 1
    g, keys = _collection_graph([(y * 2).sum()])
    plan = plan_layers(model_layers(g, keys), pools, "cpu:jax")
    m = plan.model
    assert not plan.layer_to_host[m.names.index(next(n for n in m.names
                                                     if n.startswith("add")))]


def test_auto_plan_matches_per_task_plan_targets_on_clear_cases():
    pools = synthetic_pools()
    y = pipeline(2000, 500)
    g, keys = _collection_graph([y])
    layered = plan_layers(model_layers(g, keys), pools, "auto")
    per_task = plan_model(model_graph(*_collection_graph([pipeline(2000, 500)])), pools, "auto")
    lt = {r["op"]: r["target"] for r in layered.rows}
    # the per-task plan may also give a few matmul blocks to the idle NumPy pool; the
    # layer goes where most of its blocks go
    m = per_task.model
    matmul_on = Counter(per_task.pools[per_task.pool_of[i]].label
                        for i in range(len(m.keys)) if m.ops[m.layer[i]].label == "matmul")
    assert matmul_on.most_common(1)[0][0] == lt["matmul"] == "cpu:jax"


# ---------------------------------------------------------------- live
@pytest.fixture(scope="module")
def mesh():
    with fresh_local_mesh(cpu=1, jax_cpu=1, site="lab") as m, \
            dask.config.set({"mesh.router.layer-plan-threshold": 10}):
        yield m


def test_live_forced_jax_same_numbers_and_report(mesh):
    y = pipeline()
    expected = y.compute(scheduler="sync")
    (got,) = mesh.compute(y, route="cpu:jax")
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    report = mesh.last_report
    assert isinstance(report.plan, LayerPlan)
    assert report.ran_on("matmul") == ["jax"]  # the layer restriction reached the scheduler
    assert report.ran_on("random_sample") == ["numpy"]
    rows = {r["op"]: r for r in report.rows}
    assert rows["matmul"]["target"] == "cpu:jax"
    assert rows["matmul"]["tasks"] == 8 and rows["matmul"]["workers"] == ["jax-cpu-0"]
    # Blockwise layers fused into one another's tasks (one pool) each report their own
    # tasks, where they ran and their seconds
    planned = {r["op"]: r for r in report.plan.rows}
    for op in ("transpose", "matmul", "add"):
        assert rows[op]["tasks"] == planned[op]["tasks"], op
        assert rows[op]["backends"] == ["jax"] and rows[op]["seconds"] > 0, op
    # ... and their own bars in the report's picture, a bar per block at least (a
    # member that a fused task reads twice, as the transpose inside the matmul's sum
    # over blocks, runs in each such task: Dask's fusion computes it again)
    from jupyter_mesh import viz

    bars, real = viz.measured_bars(report)
    assert real
    for op in ("transpose", "matmul", "add"):
        mine = [b for b in bars if b["op"] == op]
        assert len({b["key"] for b in mine}) == planned[op]["tasks"], (op, len(mine))
        assert {b["target"] for b in mine} == {"cpu:jax"}, op
    assert "matmul" in repr(report) and "<table>" in report._repr_html_()
    (b,) = mesh.compute(y, route="cpu:numpy")
    assert mesh.last_report.ran_on("matmul") == ["numpy"]
    np.testing.assert_allclose(b, expected, rtol=1e-10)


@pytest.mark.parametrize("route", ["auto", "cpu:jax"])
def test_live_other_ops_same_numbers(mesh, route):
    colls, expected = other_ops()
    got = mesh.compute(*colls, route=route)
    assert isinstance(mesh.last_report.plan, LayerPlan)
    assert_all_close(got, expected)


@pytest.mark.parametrize("route", ["auto", "cpu:jax", "cpu"])
def test_live_a_to_delayed_block_computes_planned_per_layer(mesh, route):
    # to_delayed() puts an array's (or a bag's) keys in a layer named delayed-<name>:
    # "MeshError: the graph has no layer for output 'add-...'"
    import dask.bag as db

    x = (da.arange(40, chunks=2) + 1).sum(keepdims=True)  # a block of 30-odd tasks
    b = db.from_sequence(range(24), npartitions=12).map(lambda v: v * 2).repartition(1)
    block, part = x.to_delayed()[0], b.to_delayed()[0]
    assert isinstance(mesh.explain(block, route=route), LayerPlan)
    got = mesh.compute(block, part, route=route)
    assert isinstance(mesh.last_report.plan, LayerPlan)
    np.testing.assert_array_equal(got[0], [820])
    assert got[1] == list(range(0, 48, 2))
    with mesh.route(route):
        np.testing.assert_array_equal(block.compute(), [820])


def test_live_an_op_with_a_0d_operand_runs_jax_planned_per_layer_too(mesh):
    # Dask wraps x - x.mean() in _enforce_dtype: the per-layer model took the wrapper
    # for the op, an "other" op that cpu:jax does not run, placed on NumPy
    x = da.from_array(np.random.default_rng(0).random((6, 5)), chunks=3)
    e = x - x.mean()
    plan = mesh.explain(e, route="cpu:jax")
    assert isinstance(plan, LayerPlan)
    row = next(r for r in plan.rows if r["op"] == "sub")
    assert (row["class"], row["target"]) == ("elementwise", "cpu:jax"), plan
    (got,) = mesh.compute(e, route="cpu:jax")
    np.testing.assert_allclose(got, e.compute(scheduler="sync"), rtol=1e-12)
    assert mesh.last_report.ran_on("sub") == ["jax"]


def test_live_route_context_and_explain(mesh):
    y = pipeline()
    expected = y.compute(scheduler="sync")
    plan = mesh.explain(y, route="cpu:jax")
    assert isinstance(plan, LayerPlan)
    assert {r["op"]: r["target"] for r in plan.rows}["matmul"] == "cpu:jax"
    with mesh.route("cpu:jax"):
        got = y.compute()
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert isinstance(mesh.last_report.plan, LayerPlan)
    assert mesh.last_report.ran_on("matmul") == ["jax"]


def test_live_a_layer_plan_that_restricts_nothing_runs_fused(mesh):
    # NumPy on both workers (small blocks: JAX's dispatch makes it the slower): Dask
    # places every task, and each linear chain runs as one task
    x = da.random.random((400, 400), chunks=50)
    y = ((x + 1) * 2).sum(axis=0)
    expected = y.compute(scheduler="sync")
    (got,) = mesh.compute(y)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    report = mesh.last_report
    assert isinstance(report.plan, LayerPlan) and report.plan.unrestricted
    assert len(report.fused) == 64
    # the report still sees each op of a fused chain, under its own keys
    ran = {r["op"]: r for r in report.rows}
    for op in ("random_sample", "add", "mul", "sum"):
        assert ran[op]["backends"] == ["numpy"] and ran[op]["workers"], op
        assert len([k for k in report.records if k[0].rsplit("-", 1)[0] == op]) == 64, op


def test_live_layer_entries_do_not_outlive_their_submission(mesh):
    y = pipeline()
    mesh.compute(y, route="cpu:jax")

    def pending(dask_scheduler=None):
        return len(dask_scheduler.extensions["jupyter-mesh"].router.pending_layers)

    assert mesh.client.run_on_scheduler(pending) == 0
    # the same collection computed unrouted afterwards is not held to the old plan
    np.testing.assert_allclose(mesh.compute(y, route="off")[0],
                               y.compute(scheduler="sync"), rtol=1e-10)


def test_live_unneeded_blocks_are_culled_at_submission(mesh):
    x = da.random.random((400, 400), chunks=100)
    y = x[:100, :100] + 1
    expected = y.compute(scheduler="sync")
    (got,) = mesh.compute(y, route="cpu:numpy")
    np.testing.assert_allclose(got, expected)
    report = mesh.last_report
    ran = {r["op"]: r for r in report.rows}
    assert ran["random_sample"]["tasks"] == 16  # planned on the layers as built
    ran_keys = [k for k in report.records if k[0].startswith("random_sample")]
    assert len(ran_keys) == 1  # the scheduler culled the other 15 blocks
    # and the plan says it counts the graph as built (it said 16 tasks, with no word)
    assert any("counting every task of the graph as built; Dask's scheduler runs those "
               "the results need" in n for n in report.plan.notes), report.plan.notes


def test_live_a_layer_plan_says_what_no_task_ran_truly(mesh):
    # persisted results were "data the graph carries (from_array's blocks...)", ops the
    # results did not need "came from elsewhere", and an alias of whole blocks too
    import numpy as np

    A = np.random.default_rng(0).random((40, 40))
    with mesh.route("auto"):
        xp = (da.from_array(A, chunks=10) + 1).persist()
    mesh.compute((xp * 2).sum(axis=0), route="cpu")
    assert any(n.startswith("add: results persisted earlier, held on the workers")
               for n in mesh.last_report.notes), mesh.last_report.notes
    Q = np.random.default_rng(1).standard_normal((200, 8))
    mesh.compute(da.linalg.qr(da.from_array(Q, chunks=(10, 8)))[1], route="cpu")
    held = [n for n in mesh.last_report.notes if "not run by this computation" in n]
    assert held and "the results did not need them (a plan made per layer" in held[0]
    x = da.random.RandomState(2).random_sample((40, 40), chunks=10)
    (got,) = mesh.compute(x[:10, :10] + 1, route="cpu")
    np.testing.assert_allclose(got, (x[:10, :10] + 1).compute(scheduler="sync"))
    assert ("getitem: a slice that is whole blocks of what it reads: Dask hands the "
            "blocks on, and no function runs") in mesh.last_report.notes


def test_a_layer_plan_counts_no_bytes_between_workers_that_both_run_numpy():
    # a JAX CPU worker running every layer it gets with NumPy hands over NumPy arrays:
    # nothing crosses between kinds, and its layers' wrappers leave JAX out
    from jupyter_mesh.devices._profile import Profile
    from jupyter_mesh.router import plan_collections
    from jupyter_mesh.router.layers import rewrite_layers

    fast = Profile(flops32=2e11, flops64=1e11, mem_bandwidth=2e10, launch_latency=2e-6,
                   method="model", source="test")
    slow = Profile(flops32=1e11, flops64=5e10, mem_bandwidth=1e10, launch_latency=2e-6,
                   method="model", source="test")
    # the JAX worker's host is the faster one, its JAX the slower
    numpy = Device("tcp://a:1", "cpu", "numpy", "model cpu", 1 << 34, "lab", slow, name="a")
    jax = Device("tcp://b:1", "cpu", "jax", "model cpu", 1 << 34, "lab", slow, name="b")
    jax.extra = {"numpy_profile": fast.to_dict()}
    with dask.config.set({"mesh.router.layer-plan-threshold": 10}):
        plan = plan_collections([pipeline()], [numpy, jax], route="cpu")
    assert isinstance(plan, LayerPlan)
    assert plan.bytes_moved == 0
    on_jax = [li for li, p in enumerate(plan.layer_pool) if plan.pools[p].backend == "jax"]
    assert on_jax, "the JAX worker got layers"
    routed = rewrite_layers(plan)
    assert routed is not None
    for li in on_jax:
        assert "jax" not in plan.native_for(li, plan.layer_pool[li])


def test_plan_collections_takes_the_layer_path_above_the_threshold():
    from jupyter_mesh import MeshError
    from jupyter_mesh.router import plan_collections

    devices = [
        Device("tcp://a:1", "cpu", "numpy", "model cpu", 1 << 34, "lab", None, name="a"),
        Device("tcp://b:1", "cpu", "jax", "model cpu", 1 << 34, "edge", None, name="b"),
    ]
    with dask.config.set({"mesh.router.layer-plan-threshold": 10}):
        plan = plan_collections([pipeline()], devices, site="edge")
        assert isinstance(plan, LayerPlan)
        # the ops JAX does not run (the random blocks) run with NumPy on that worker
        assert {r["target"] for r in plan.rows} == {"cpu:jax@edge", "cpu:jax@edge (numpy)"}
        assert {r["target"] for r in plan.rows if r["class"] == "creation"} == {
            "cpu:jax@edge (numpy)"}
        with pytest.raises(MeshError, match="no live tpu worker"):
            plan_collections([pipeline()], devices, route="tpu")


def test_blockwise_layers_of_different_pools_are_never_fused_together():
    pools = synthetic_pools()
    y = pipeline()
    g, keys = _collection_graph([y])
    plan = plan_layers(model_layers(g, keys), pools, "cpu:jax")
    names = plan.model.names
    add = next(i for i, n in enumerate(names) if n.startswith("add-"))
    other = next(p for p in range(len(plan.pools)) if p != plan.layer_pool[add])
    plan.layer_pool[add] = other  # `add` alone on another pool than its neighbours
    routed = rewrite_layers(plan)
    layers = routed.graph.layers
    assert names[add] in layers and routed.layers[names[add]] == other
    # no fused layer holds `add`: its inner tasks are named after their layers
    fused_inner = [k for layer in layers.values() if isinstance(layer, Blockwise)
                   and not isinstance(layer.task.func, DeviceCall)
                   for k in layer.task.args[0]]
    assert fused_inner, "nothing was fused: the test needs layers fused on one pool"
    assert not [k for k in fused_inner if str(k).startswith(names[add])]
    assert all(names[add] not in [m.name for m in ms] for ms in routed.fused_layers.values())
    got = dask.get(routed.graph, routed.keys)
    values = dict(zip(routed.keys, got, strict=True))
    finalize, extra = y.__dask_postcompute__()
    result = finalize([values[k] for k in dask.core.flatten(y.__dask_keys__())], *extra)
    np.testing.assert_allclose(result, y.compute(scheduler="sync"), rtol=1e-12)


def _x2():
    return da.from_array(np.arange(36.0).reshape(6, 6), chunks=3) + 1


@pytest.mark.parametrize("build", [
    lambda x, v: ((x + 1).T * 2) + 0,  # a member read transposed
    lambda x, v: x + v * 3,  # a broadcast member
    lambda x, v: ((x @ x.T) + 1).sum(axis=0),  # a member inside a contraction
    # one member read twice, as it is and transposed
    lambda x, v: da.blockwise(np.add, "ij", _x2(), "ij", _x2(), "ji", dtype=float) * 2,
    # a layer name with "_." in it
    lambda x, v: x.map_blocks(np.negative, name="neg_.x").T + 0,
    # a 0-d member
    lambda x, v: x + v.sum() * 2,
])
def test_a_fused_member_records_under_a_key_of_its_own_layer(build):
    # each member's device call (in the fused tasks themselves) records under the key
    # its task had unfused, read from the fused task's index (the report and its
    # picture go by these keys)
    x = da.random.random((600, 400), chunks=200)
    v = da.random.random(400, chunks=200)
    y = build(x, v)
    g, keys = _collection_graph([y])
    plan = plan_layers(model_layers(g, keys), synthetic_pools(), "cpu:jax")
    routed = rewrite_layers(plan)
    assert routed.fused_layers, "nothing was fused"
    checked = 0
    for root in routed.fused_layers:
        task = routed.graph.layers[root].task
        assert task.func.__name__ == "routed_chain"  # (its name says it is routed)
        roots = list(g.layers[root].keys())
        # a layer read two ways in one task records under each reading's own key
        readings = {}
        for inner_key, node in task.args[0].items():
            readings.setdefault(node.func.key.name, set()).add((inner_key, node.func.key))
        for name, pairs in readings.items():
            assert len({k for _, k in pairs}) == len({ik for ik, _ in pairs}), name
        for node in task.args[0].values():
            lk = node.func.key
            if lk.name == root:
                continue
            own = set(g.layers[lk.name].keys())
            got = {lk.key_of(k) for k in roots}
            assert got <= own, (lk.name, sorted(got - own)[:3])
            checked += 1
    assert checked
    # and the same numbers (the wrapper runs on host NumPy here)
    values = dict(zip(routed.keys, dask.get(routed.graph, routed.keys), strict=True))

    def nest(ks):
        return [nest(k) for k in ks] if isinstance(ks, list) else values[ks]

    finalize, extra = y.__dask_postcompute__()
    result = finalize(nest(y.__dask_keys__()), *extra)
    np.testing.assert_allclose(result, y.compute(scheduler="sync"), rtol=1e-12)



def test_live_a_fused_routed_persist_and_plain_dask_sharing_keys_warn_nothing(mesh, caplog):
    # Dask warns that the two graphs' tasks differ for the same key (its run_spec
    # warning): a routed graph's fused Blockwise tasks are known by their layer names
    x = da.from_array(np.random.RandomState(0).rand(40, 40), chunks=10)
    y = np.cos(x * 3) + 1
    with caplog.at_level("WARNING", logger="distributed.scheduler"):
        with mesh.route("cpu:jax"):
            kept = y.persist()
        assert isinstance(mesh.last_plan, LayerPlan) and mesh.last_report.fused_layers
        np.testing.assert_allclose(y.compute(), np.cos(x.compute() * 3) + 1)
        np.testing.assert_allclose(kept.compute(), np.cos(x.compute() * 3) + 1)
        del kept
    assert "run_spec" not in caplog.text


@pytest.mark.parametrize("build", [
    # Dask joins the blocks of the dropped axis (concatenate=True) outside the wrapper
    lambda x: (x * 2).map_blocks(np.sum, axis=1, drop_axis=1, dtype=float) + 1,
    lambda x: da.blockwise(np.dot, "ik", x * 2, "ij", x + 1, "jk", concatenate=True,
                           dtype=float),
])
def test_live_a_blockwise_that_concatenates_its_inputs_gets_host_arrays(mesh, build):
    x = da.from_array(np.random.RandomState(0).rand(40, 40), chunks=10)
    y = build(x)
    (got,) = mesh.compute(y, route="cpu:jax")
    assert isinstance(mesh.last_plan, LayerPlan)
    np.testing.assert_allclose(got, y.compute(scheduler="sync"), rtol=1e-10)
