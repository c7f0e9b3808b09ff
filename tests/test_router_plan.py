"""Pure router tests: synthetic inventories, no cluster."""

from __future__ import annotations

import collections
import functools
import math
import os
import pickle
import re

import dask
import dask.array as da
import numpy as np
import pytest
from toolz import compose

from jupyter_mesh import MeshError
from jupyter_mesh.devices._profile import Profile
from jupyter_mesh.inventory import Device, format_bytes
from jupyter_mesh.router import (
    CostModel,
    Links,
    api,
    backend_names,
    build_pools,
    get_backend,
    jax_ops,
    model_collections,
    plan_collections,
    plan_model,
)
from jupyter_mesh.router.classify import classify_label, layer_label, synthetic_model
from jupyter_mesh.router.cost import core_shares
from jupyter_mesh.targets import site_resource

CPU = Profile(flops32=2e11, flops64=1e11, mem_bandwidth=2e10, launch_latency=2e-6,
              method="model", source="test")
# a modelled GPU: 10x the CPU at matmul, but a large per-launch cost, so tiny
# elementwise ops are slower there
GPU = Profile(flops32=2e12, flops64=1e12, mem_bandwidth=2e11, host_link_bandwidth=16e9,
              launch_latency=5e-3, method="model", source="test")


def dev(name, kind, backend, profile, site="local", nthreads=1):
    return Device(f"tcp://{name}:1", kind, backend, f"model {kind}", 1 << 34, site, profile,
                  name=name, nthreads=nthreads)


@pytest.fixture
def mesh_devices():
    return [dev("c0", "cpu", "numpy", CPU), dev("c1", "cpu", "numpy", CPU),
            dev("g0", "gpu", "cupy", GPU)]


def pipeline(n=4000, chunks=1000):
    x = da.random.random((n, n), chunks=chunks)
    return ((x @ x.T) + 1).sum(axis=0)


def test_classify_labels():
    assert layer_label("matmul-" + "a" * 32) == "matmul"
    assert layer_label("sum-aggregate-" + "0" * 32) == "sum-aggregate"
    # dask.delayed names an impure call with a UUID: plans and reports show the name
    assert layer_label("lambda-7d136164-1b2c-4d5e-8f90-0123456789ab") == "lambda"
    assert classify_label("matmul") == "matmul"
    assert classify_label("tensordot") == "matmul"
    assert classify_label("sum-aggregate") == "reduction"
    assert classify_label("random_sample") == "creation"
    assert classify_label("rfft") == "fft"
    assert classify_label("qr") == "linalg"
    assert classify_label("getitem") == "movement"
    assert classify_label("rechunk-merge") == "movement"
    assert classify_label("absolute", np.absolute) == "elementwise"
    assert classify_label("add", np.add) == "elementwise"
    # these were "other" (no cost, placed blind)
    assert classify_label("arg-reduce") == "reduction"  # argmax's per-chunk step
    assert classify_label("topk") == "reduction"
    assert classify_label("_sqrt") == "elementwise"  # std's, through a wrapper of Dask's
    # a user's function merely named like them stays unclassified (of unknown cost, it
    # is never batched with others)
    for label in ("reduce_rows", "run_exp", "read_log", "argtopk_preprocess"):
        assert classify_label(label) == "other", label


def test_an_elementwise_op_costs_one_operation_per_element_it_writes():
    # a comparison of float64 blocks writes bools: counted by the output's item size,
    # each input element was 8 operations
    x = da.random.random((400, 400), chunks=200)
    by = {op.label: op for op in model_collections([(x > 0.5), da.sin(x)]).ops}
    assert by["gt"].flops == by["sin"].flops == 200 * 200
    # a reduction reads its input's elements, by the input's item size
    s = {op.label: op for op in model_collections([(x > 0.5).sum()]).ops}
    assert s["sum"].flops == 200 * 200


def test_model_of_pipeline_has_costs():
    m = model_collections([pipeline()])
    by = {op.label: op for op in m.ops}
    assert by["matmul"].op_class == "matmul"
    assert by["matmul"].flops == pytest.approx(2 * 1000**3, rel=0.01)
    assert by["random_sample"].out_bytes == 1000 * 1000 * 8
    assert by["add"].op_class == "elementwise"
    assert sum(op.tasks for op in m.ops) == len(m.keys)
    # topological order
    for i, ds in enumerate(m.deps):
        assert all(d < i for d in ds)


def test_auto_puts_big_matmul_on_the_gpu(mesh_devices):
    plan = plan_collections([pipeline()], mesh_devices)
    rows = {r["op"]: r for r in plan.rows}
    gpu_share = plan.assignment()
    matmul = [p for k, p in gpu_share.items() if k[0].startswith("matmul")]
    assert matmul.count("gpu:cupy") > len(matmul) / 2
    assert rows["random_sample"]["target"] == "cpu:numpy"  # creation stays on the host
    # the keys the README documents, nothing else (users make DataFrames of them)
    for r in plan.rows:
        assert set(r) == {"op", "class", "target", "tasks", "est_seconds", "bytes_moved"}
    # a split op's target gives each pool with its share, largest first, as documented
    counts = collections.Counter(matmul)
    want = (matmul[0] if len(counts) == 1
            else " + ".join(f"{label}×{n}" for label, n in counts.most_common()))
    assert rows["matmul"]["target"] == want
    assert rows["matmul"]["class"] == "matmul" and rows["matmul"]["tasks"] == len(matmul)


def test_tiny_elementwise_stays_on_cpu(mesh_devices):
    x = da.ones((40, 40), chunks=10)
    plan = plan_collections([(x + 1) * 2], mesh_devices)
    assert set(plan.assignment().values()) == {"cpu:numpy"}
    assert plan.bytes_moved == 0


def test_forced_gpu_and_conversions_only_at_kind_boundaries(mesh_devices):
    y = pipeline(2000, 1000)
    plan = plan_collections([y], mesh_devices, route="gpu")
    m = plan.model
    labels = [plan.pools[p].label for p in plan.pool_of]
    consumers = m.consumers()
    outputs = set(m.outputs)
    for i, flag in enumerate(plan.to_host):
        other_kind = any(labels[c] != labels[i] for c in consumers[i])
        if labels[i] == "gpu:cupy":
            assert flag == (other_kind or m.keys[i] in outputs)
    # every op the GPU runs natively is on the GPU; creation on the host
    rows = {r["op"]: r["target"] for r in plan.rows}
    assert rows["matmul"] == rows["add"] == rows["sum"] == "gpu:cupy"
    assert rows["random_sample"] == "cpu:numpy"
    assert any("creation" in n for n in plan.notes)


def test_a_task_behind_an_output_alias_hands_back_a_host_array(mesh_devices):
    # plain slicing of one whole chunk makes an alias, which runs no wrapper: the task
    # it points at must return a host array, though the alias runs on the same GPU
    from dask._task_spec import Task

    x = da.random.random((40, 40), chunks=20)
    plan = plan_collections([(x + 1)[0:20, 0:20]], mesh_devices[2:], route="gpu")
    m = plan.model
    (out,) = m.outputs
    assert type(m.tasks[out]) is not Task
    (producer,) = m.deps[m.keys.index(out)]
    assert plan.pools[plan.pool_of[producer]].backend == "cupy"
    assert plan.to_host[producer]
    # its other tasks keep their results on the device for the next GPU op
    assert not all(plan.to_host[i] for i, p in enumerate(plan.pool_of)
                   if plan.pools[p].backend == "cupy")


def _sum_of_squares_scipy(block):
    # a user's own chunk function: it may call anything (SciPy, np.asarray), which would
    # fail on CuPy arrays
    return np.asarray(block) ** 2


def test_a_users_own_chunk_function_never_gets_device_arrays(mesh_devices):
    x = da.random.random((2000, 2000), chunks=1000)
    y = (x @ x.T).map_blocks(_sum_of_squares_scipy, name="sum-of-squares")
    plan = plan_collections([y], mesh_devices, route="gpu")
    rows = {r["op"]: r["target"] for r in plan.rows}
    assert rows["matmul"] == "gpu:cupy"
    # classed a reduction by its name, but it is not NumPy's or Dask's code
    assert rows["sum-of-squares"] == "cpu:numpy"
    op = next(o for o in plan.model.ops if o.label == "sum-of-squares")
    assert op.native == {"numpy"}
    # NumPy's and Dask's own functions still run natively on CuPy
    assert all("cupy" in o.native for o in plan.model.ops if o.label == "matmul")


def test_forced_missing_kind_names_what_the_mesh_has(mesh_devices):
    with pytest.raises(MeshError, match=r"no live tpu worker.*cpu:numpy"):
        plan_collections([pipeline()], mesh_devices, route="tpu")


@pytest.mark.parametrize("route", ["quantum", "gpu:numpy", 3, ""])
def test_unknown_route(mesh_devices, route):
    with pytest.raises(MeshError, match="unknown"):
        plan_collections([pipeline()], mesh_devices, route=route)


def test_non_dask_input(mesh_devices):
    with pytest.raises(MeshError, match="Dask collections"):
        plan_collections([np.ones(3)], mesh_devices)


def test_unknown_site(mesh_devices):
    with pytest.raises(MeshError, match="no worker at site 'mars'"):
        plan_collections([pipeline()], mesh_devices, site="mars")
    # the inventory's site of plain Dask workers: said as what it is (it listed the
    # mesh's sites as if 'unknown', which the inventory had just shown, were none)
    with pytest.raises(MeshError, match=r"^no worker at site 'unknown': the mesh has sites "
                       r".*\('unknown' is where the inventory shows plain Dask workers, "
                       r"which have no site: start them with --preload "
                       r"jupyter_mesh.worker --site NAME\)$"):
        plan_collections([pipeline()], mesh_devices, site="unknown")


def test_jax_never_gets_ops_outside_its_table():
    devs = [dev("c0", "cpu", "numpy", CPU), dev("j0", "cpu", "jax", CPU)]
    x = da.random.random((400, 100), chunks=(100, 100))
    u, s, v = da.linalg.svd(x)
    plan = plan_collections([s, x.var()], devs, route="cpu:jax")
    m = plan.model
    for i, p in enumerate(plan.pool_of):
        op = m.ops[m.layer[i]]
        if plan.pools[p].backend == "jax":
            assert jax_ops.supported(op.func), op.label
    targets = {r["op"]: r["target"] for r in plan.rows}
    assert any(t == "cpu:numpy" for op, t in targets.items() if op.startswith("qr"))
    assert targets["var"] == "cpu:numpy"  # (moment_chunk)
    # an elementwise op with a 0-d array operand, which Dask wraps to enforce its
    # dtype (_enforce_dtype), is planned by the op it wraps: it went to NumPy, with a
    # note that cpu:jax "does not run other ops natively"
    plan = plan_collections([x - x.mean()], devs, route="cpu:jax")
    targets = {r["op"]: r["target"] for r in plan.rows}
    assert targets["sub"] == "cpu:jax", (targets, plan.notes)


def test_second_site_far_away():
    # a fast GPU at a second site 60 ms away does not get small work
    devs = [dev("c0", "cpu", "numpy", CPU), dev("g0", "gpu", "cupy", GPU, site="cloud")]
    links = Links(wan_latency=0.06, wan_bandwidth=5e9 / 8)
    x = da.random.random((400, 400), chunks=100)
    plan = plan_collections([(x @ x.T).sum()], devs, links=links)
    assert set(plan.assignment().values()) == {"cpu:numpy@local"}
    assert plan.bytes_between_sites == 0
    # said on a mesh of several sites, nothing included (it was left out)
    assert repr(plan).splitlines()[0].endswith(", nothing between sites")
    one_site = plan_collections([(x @ x.T).sum()], devs[:1], links=links)
    assert "between sites" not in repr(one_site)
    # big matmul blocks are worth the trip
    x = da.random.random((16000, 16000), chunks=4000)
    plan = plan_collections([(x @ x.T).sum()], devs, links=links)
    assert "gpu:cupy@cloud" in set(plan.assignment().values())
    # and the plan says how much goes over the link (its rows count kinds only, and
    # a plan that sent 130 MiB over the WAN said "nothing moved")
    m = plan.model
    site = [plan.pools[p].site for p in plan.pool_of]
    crossing = sum(m.ops[m.layer[d]].out_bytes for i in range(len(m.keys))
                   for d in m.deps[i] if site[d] != site[i])
    assert crossing > 0 and plan.bytes_between_sites == crossing
    assert f"{format_bytes(crossing)} between sites" in repr(plan).splitlines()[0]


def test_residency_pins_follow_the_data():
    devs = [dev("c0", "cpu", "numpy", CPU, site="edge"), dev("c1", "cpu", "numpy", CPU),
            dev("g0", "gpu", "cupy", GPU)]
    x = da.random.random((8000, 8000), chunks=2000)
    model = model_collections([(x @ x.T).sum()])
    roots = [i for i, ds in enumerate(model.deps) if not ds]
    model.pins = {i: "edge" for i in roots}
    pools = build_pools(devs)
    plan = plan_model(model, pools, "auto", cost=CostModel(pools))
    assert {plan.pools[p].site for p in plan.pool_of} == {"edge"}


def test_site_keeps_everything_there():
    devs = [dev("c0", "cpu", "numpy", CPU, site="edge"), dev("g0", "gpu", "cupy", GPU)]
    plan = plan_collections([pipeline()], devs, site="edge")
    assert set(plan.assignment().values()) == {"cpu:numpy@edge"}
    # and the header names only the pools at that site (it listed the GPU elsewhere)
    header = repr(plan).splitlines()[0]
    assert "site=edge" in header and "over cpu:numpy@edge×1;" in header
    assert "gpu" not in header


def test_plan_reprs(mesh_devices):
    plan = plan_collections([pipeline()], mesh_devices)
    text = repr(plan)
    assert "matmul" in text and "est_seconds" in text and "route=auto" in text
    html = plan._repr_html_()
    assert html.startswith("<div") and "<table>" in html and "matmul" in html


def test_placement_places_every_task_of_a_synthetic_model():
    # (how planning time grows with tasks and targets: P3 and P6 in benchmarks/, timed)
    layers = [
        {"name": "load", "op_class": "creation", "tasks": 500, "flops": 1e6, "out_bytes": 1e6},
        {"name": "mm", "op_class": "matmul", "tasks": 500, "flops": 1e9, "out_bytes": 1e6,
         "deps": [(0, "map")]},
        {"name": "ew", "op_class": "elementwise", "tasks": 500, "flops": 1e5,
         "out_bytes": 1e6, "deps": [(1, "map")]},
        {"name": "agg", "op_class": "reduction", "tasks": 50, "flops": 1e6,
         "out_bytes": 8, "deps": [(2, 10)]},
    ]
    model = synthetic_model(layers)
    devs = [dev(f"c{i}", "cpu", "numpy", CPU) for i in range(4)] + [dev("g0", "gpu", "cupy", GPU)]
    pools = build_pools(devs)
    plan = plan_model(model, pools, "auto", cost=CostModel(pools))
    assert len(plan.pool_of) == 1550 and min(plan.pool_of) >= 0
    assert plan.makespan > 0


def test_backend_registry():
    assert {"numpy", "cupy", "jax"} <= set(backend_names())
    assert get_backend("numpy").available()
    with pytest.raises(MeshError, match="unknown backend 'opencl'"):
        get_backend("opencl")
    a = np.arange(4.0)
    assert get_backend("numpy").to_host(a) is a


def test_jax_op_table_on_host():
    pytest.importorskip("jax")
    a = np.arange(12.0).reshape(3, 4)
    assert jax_ops.supported(np.add) and jax_ops.supported(np.fft.fft)
    assert not jax_ops.supported(np.linalg.svd)
    f = jax_ops.translate(functools.partial(np.sum, axis=0))
    np.testing.assert_allclose(np.asarray(f(a)), a.sum(axis=0))
    from dask.array.core import _concatenate2

    g = jax_ops.translate(compose(functools.partial(np.sum, axis=(0,)),
                                  functools.partial(_concatenate2, axes=[0])))
    np.testing.assert_allclose(np.asarray(g([a, a])), np.concatenate([a, a]).sum(axis=0))
    from dask.array.routines import _matmul

    mm = jax_ops.translate(_matmul)
    np.testing.assert_allclose(np.asarray(mm(a, a.T))[:, 0, :], a @ a.T)


def test_transfers_between_workers_of_one_pool_are_charged():
    # two identical GPUs form one pool; moving a block between them costs more than
    # computing on it, so each chain stays on one worker
    devs = [dev("c0", "cpu", "numpy", CPU), dev("g0", "gpu", "cupy", GPU),
            dev("g1", "gpu", "cupy", GPU)]
    pools = build_pools(devs)
    cost = CostModel(pools)
    gp = next(i for i, p in enumerate(pools) if p.kind == "gpu")
    assert cost.transfer(1e8, gp, gp) == 0.0
    assert cost.transfer(1e8, gp, gp, same_worker=False) > 1e8 / 16e9
    layers = [{"name": f"mm{j}", "op_class": "matmul", "tasks": 2, "flops": 2e10,
               "out_bytes": 4e8, **({"deps": [(j - 1, "map")]} if j else {})}
              for j in range(6)]
    model = synthetic_model(layers)
    plan = plan_model(model, pools, "auto", cost=cost)
    assert {plan.pools[p].kind for p in plan.pool_of} == {"gpu"}
    for i, ds in enumerate(model.deps):
        for d in ds:
            assert plan.worker_of[i] == plan.worker_of[d]
    # and the two chains run side by side on the two GPUs
    assert len({plan.worker_of[i] for i in range(len(model.keys))}) == 2


def test_cpu_workers_sharing_a_hosts_cores_are_planned_at_their_share():
    # a local mesh on a 2-core machine: two single-thread NumPy workers and a JAX one
    # (XLA computes on a pool of its own as wide as the cores: it counts two) run side
    # by side on two cores, each at about 2/4 of the speed it measured alone; a GPU
    # worker's tasks run on the GPU, and another host's workers are apart
    def on(name, kind, backend, profile, host, cores, nthreads=1):
        d = dev(name, kind, backend, profile, nthreads=nthreads)
        d.host, d.extra = host, {"cores": cores}
        return d

    devs = [on("c0", "cpu", "numpy", CPU, "10.0.0.1", 2),
            on("c1", "cpu", "numpy", CPU, "10.0.0.1", 2),
            on("j0", "cpu", "jax", CPU, "10.0.0.1", 2),
            on("g0", "gpu", "cupy", GPU, "10.0.0.1", 2, nthreads=4),
            on("c2", "cpu", "numpy", CPU, "10.0.0.2", 2, nthreads=2)]
    shares = core_shares(devs)
    assert shares == {d.worker: ("10.0.0.1", 2, 4) for d in devs[:3]}
    pools = build_pools(devs)
    by = {(p.backend, p.workers[0]): p for p in pools}
    jax_pool = by[("jax", "tcp://j0:1")]
    assert jax_pool.profile.flops64 == pytest.approx(CPU.flops64 * 2 / 4)
    assert jax_pool.profile.mem_bandwidth == pytest.approx(CPU.mem_bandwidth * 2 / 4)
    assert jax_pool.shared == [("10.0.0.1", 2, 4)]
    numpy_pool = next(p for p in pools if p.backend == "numpy")
    # the pool's profile is the mean of its workers': two at 2/4, one on its own host
    assert numpy_pool.profile.flops64 == pytest.approx(CPU.flops64 * (2 / 4 + 2 / 4 + 1) / 3)
    gpu_pool = next(p for p in pools if p.kind == "gpu")
    assert gpu_pool.profile == GPU and gpu_pool.shared == []
    # the estimate of CPU work grows by threads / cores, and the plan says why
    cost = CostModel(pools)
    op = synthetic_model([{"name": "mm", "op_class": "matmul", "tasks": 1,
                           "flops": 1e10, "out_bytes": 8.0}]).ops[0]
    alone = CostModel(build_pools([dev("j0", "cpu", "jax", CPU)]))
    assert cost.exec_time(op, jax_pool) > 1.4 * alone.exec_time(op, alone.pools[0])
    # (a plan that uses them all: an op only NumPy runs, feeding one only JAX runs)
    both = synthetic_model([
        {"name": "load", "op_class": "elementwise", "tasks": 4, "flops": 1e6,
         "out_bytes": 8e3, "native": ["numpy"]},
        {"name": "mm", "op_class": "matmul", "tasks": 4, "flops": 1e10, "out_bytes": 8.0,
         "deps": [(0, "map")], "native": ["jax"]}])
    plan = plan_model(both, pools, "cpu", cost=cost)
    api._noted(plan, cost)
    assert {plan.pools[p].backend for p in plan.pool_of} == {"numpy", "jax"}
    assert any("10.0.0.1 run 4 threads on 2 cores (a JAX worker counts one per core"
               in n for n in plan.notes)
    # one that leaves the JAX worker idle runs the NumPy ones at full speed, and says
    # nothing of sharing
    plan = plan_model(both, pools, "cpu:numpy", cost=cost)
    api._noted(plan, cost)
    assert not any("threads on" in n for n in plan.notes)
    # a JAX worker alone on its host already measured its speed on all its cores
    assert core_shares([on("j1", "cpu", "jax", CPU, "10.0.0.3", 2)]) == {}
    # and with one NumPy worker beside it, both are at 2/3
    assert set(core_shares([on("j1", "cpu", "jax", CPU, "10.0.0.3", 2),
                            on("c3", "cpu", "numpy", CPU, "10.0.0.3", 2)]).values()) == {
        ("10.0.0.3", 2, 3)}
    # a local mesh pins its JAX worker to the core the NumPy workers leave: it says one
    # core, counts one thread, and the host's cores are the most any worker may use
    assert set(core_shares([on("j2", "cpu", "jax", CPU, "10.0.0.4", 1),
                            on("c4", "cpu", "numpy", CPU, "10.0.0.4", 2),
                            on("c5", "cpu", "numpy", CPU, "10.0.0.4", 2)]).values()) == {
        ("10.0.0.4", 2, 3)}
    # workers that do not say how many cores they may use (older workers, modelled
    # meshes) are planned at their profile's speed
    plain = [dev("c0", "cpu", "numpy", CPU), dev("c1", "cpu", "numpy", CPU)]
    assert core_shares(plain) == {} and build_pools(plain)[0].profile == CPU


def test_cpu_workers_pinned_to_cores_of_their_own_share_nothing():
    # workers that say which cores they may use (Linux affinity) compute on all of them
    # together: two JAX workers pinned to a core each on 2 cores use two, not one
    from jupyter_mesh.router.cost import host_cores, reshared

    def on(name, backend, cores, cpus):
        d = dev(name, "cpu", backend, CPU)
        d.host, d.extra = "10.0.0.1", {"cores": cores, "cpus": cpus}
        return d

    pinned = [on("j0", "jax", 1, [0]), on("j1", "jax", 1, (1,))]  # (as Dask's comm hands it)
    assert core_shares(pinned) == {}
    assert build_pools(pinned)[0].profile == CPU
    # both pinned to the same core: two threads on one
    assert set(core_shares([on("j0", "jax", 1, [0]), on("j1", "jax", 1, [0])]).values()) \
        == {("10.0.0.1", 1, 2)}
    # a NumPy worker on both cores beside a JAX worker pinned to one: 2 threads, 2 cores
    assert core_shares([on("c0", "numpy", 2, [0, 1]), on("j0", "jax", 1, [1])]) == {}
    # a quota (fewer cores than CPUs) caps the host: 16 CPUs, 4 cores' worth of time
    assert host_cores([(4, frozenset(range(16))), (4, frozenset(range(16)))]) == 4
    # a worker that does not say which: the most any worker may use, as before
    assert host_cores([(1, frozenset({0})), (1, None)]) == 1
    assert set(core_shares([on("j0", "jax", 1, [0]), on("j1", "jax", 1, None)]).values()) \
        == {("10.0.0.1", 1, 2)}
    bad = on("j1", "jax", 1, ["zero"])
    assert set(core_shares([on("j0", "jax", 1, [0]), bad]).values()) == {("10.0.0.1", 1, 2)}
    # a plan that leaves one idle: the other alone, at full speed
    mesh = [on("c0", "numpy", 2, [0, 1]), on("c1", "numpy", 2, [0, 1]), on("j0", "jax", 2, [0, 1])]
    pools = build_pools(mesh)
    j = next(i for i, p in enumerate(pools) if p.backend == "jax")
    assert pools[j].profile.flops64 == pytest.approx(CPU.flops64 / 2)
    alone = reshared(pools, {j})
    assert alone is not None and alone[j].profile == CPU


def test_a_plan_that_leaves_cpu_workers_idle_runs_the_others_at_full_speed():
    # a local mesh on 2 cores: two NumPy workers and a JAX one pinned to one core, at
    # half NumPy's speed. Beside the JAX worker the NumPy ones get 2/3 of a core each;
    # a schedule that leaves it idle has them at full speed, which beats using all
    # three, so "auto" leaves JAX out and plans as the two NumPy workers alone would
    def on(name, backend, profile, cores):
        d = dev(name, "cpu", backend, profile)
        d.host, d.extra = "10.0.0.1", {"cores": cores}
        return d

    half = Profile(flops32=1e11, flops64=5e10, mem_bandwidth=1e10, launch_latency=2e-6,
                   method="model", source="test")
    numpy_only = [on("c0", "numpy", CPU, 2), on("c1", "numpy", CPU, 2)]
    devs = numpy_only + [on("j0", "jax", half, 1)]
    assert set(core_shares(devs).values()) == {("10.0.0.1", 2, 3)}
    graph = synthetic_model([{"name": "mm", "op_class": "matmul", "tasks": 12,
                              "flops": 1e10, "out_bytes": 8.0}])
    alone = plan_model(graph, build_pools(numpy_only), "auto")
    auto = plan_model(graph, build_pools(devs), "auto")
    assert {auto.pools[p].backend for p in auto.pool_of} == {"numpy"}
    assert auto.makespan == pytest.approx(alone.makespan)
    # a forced route leaves the JAX worker idle too: estimated at full speed
    forced = plan_model(graph, build_pools(devs), "cpu:numpy")
    assert forced.makespan == pytest.approx(alone.makespan)
    # and where the JAX worker is as fast as NumPy, three at 2/3 are no faster than two
    # at full speed: the plan is no slower than the NumPy workers alone
    even = plan_model(graph, build_pools(numpy_only + [on("j0", "jax", CPU, 1)]), "auto")
    assert even.makespan <= alone.makespan * (1 + 1e-9)


def test_a_jax_cpu_worker_runs_numpy_where_numpy_is_faster_for_the_op():
    # a JAX CPU worker is a CPU: it runs NumPy too. Here JAX's matmul runs at half
    # NumPy's speed on it and its elementwise ops at twice (a made-up profile, so that
    # the two pools differ): "auto" runs the matmuls on both workers, with NumPy on the
    # JAX one, and the elementwise ops with JAX. A forced "cpu:jax" runs JAX, and a
    # worker that measured no NumPy (an older one) runs only what JAX runs, as before
    from jupyter_mesh.router.rewrite import rewrite

    jax_prof = Profile(flops32=1e11, flops64=5e10, mem_bandwidth=4e10, launch_latency=2e-6,
                       method="model", source="test")

    def on(name, backend, profile, cores, numpy=None):
        d = dev(name, "cpu", backend, profile)
        d.host, d.extra = "10.0.0.1", {"cores": cores}
        if numpy is not None:
            d.extra["numpy_profile"] = numpy.to_dict()
        return d

    x = da.random.random((4000, 4000), chunks=1000)
    y = ((x @ x.T) * 2 + 1).sum(axis=0)
    numpy_only = [on("c0", "numpy", CPU, 2)]
    both = numpy_only + [on("j0", "jax", jax_prof, 1, numpy=CPU)]
    pools = build_pools(both)
    jax_pool = next(p for p in pools if p.backend == "jax")
    assert jax_pool.numpy_profile == CPU  # 2 threads on 2 cores: nothing shared
    cost = CostModel(pools)
    ops = {op.label: op for op in model_collections([y]).ops}
    assert cost.runs_numpy(ops["matmul"], jax_pool)
    assert not cost.runs_numpy(ops["mul"], jax_pool)
    assert cost.runs_numpy(ops["random_sample"], jax_pool)  # JAX does not run it

    plan = plan_collections([y], both)
    targets = {r["op"]: r["target"] for r in plan.rows}
    assert "cpu:jax (numpy)" in targets["matmul"] and "cpu:numpy" in targets["matmul"]
    # the plan says why, with both times
    (note,) = [n for n in plan.notes if "with NumPy" in n]
    assert note.startswith("the cpu:jax workers run matmul (") and "faster there than jax" in note
    assert "mul" not in note.split("with NumPy")[0].replace("matmul", "")
    routed = rewrite(plan, fuse=False)
    m = plan.model
    for i, key in enumerate(m.keys):
        call = routed.graph[key].func
        if plan.pools[plan.pool_of[i]].backend != "jax" or not hasattr(call, "native"):
            continue
        label = m.ops[m.layer[i]].label
        if label == "matmul":
            assert "jax" not in call.native, "the JAX worker runs its matmuls with NumPy"
        elif label == "mul":
            assert "jax" in call.native
    # a NumPy worker's tasks keep the op's backends: a fallback to another kind of
    # worker still runs them on its device
    numpy_matmuls = [routed.graph[k].func for i, k in enumerate(m.keys)
                     if m.ops[m.layer[i]].label == "matmul"
                     and plan.pools[plan.pool_of[i]].backend == "numpy"]
    assert numpy_matmuls and all(c.native == ops["matmul"].native for c in numpy_matmuls)
    # under "auto" the JAX worker may take what only NumPy runs too (the random blocks)
    from jupyter_mesh.router.placement import allowed_pools

    allowed, _ = allowed_pools(plan.model, pools, "auto")
    creation = next(li for li, op in enumerate(plan.model.ops) if op.op_class == "creation")
    assert {pools[p].backend for p in allowed[creation]} == {"numpy", "jax"}
    # the same JAX worker without a NumPy profile: only JAX's ops go there, slower
    old = numpy_only + [on("j0", "jax", jax_prof, 1)]
    before = plan_collections([y], old)
    assert plan.makespan < before.makespan
    assert not any("(numpy)" in t for r in before.rows for t in [r["target"]]
                   if r["class"] != "creation")
    # forced: JAX runs what it can, NumPy profile or not
    forced = plan_collections([y], both, route="cpu:jax")
    assert {r["op"]: r["target"] for r in forced.rows}["matmul"] == "cpu:jax"
    assert not any("with NumPy" in n for n in forced.notes)
    # what a forced target does not run goes to the NumPy workers, as the note says
    gpu = both + [dev("g0", "gpu", "cupy", GPU)]
    on_gpu = plan_collections([y], gpu, route="gpu")
    assert {r["op"]: r["target"] for r in on_gpu.rows}["random_sample"] == "cpu:numpy"
    assert any("random_sample" in n and "host NumPy" in n for n in on_gpu.notes)
    routed = rewrite(forced, fuse=False)
    calls = [routed.graph[k].func for i, k in enumerate(forced.model.keys)
             if forced.model.ops[forced.model.layer[i]].label == "matmul"]
    assert calls and all("jax" in c.native for c in calls)


def test_needs_picks_numpy_on_a_jax_cpu_worker_where_numpy_is_faster():
    # mesh.submit(f, needs=...) moves the arguments to the backend the mesh picks: on a
    # JAX CPU worker whose NumPy is faster for the capability, NumPy arrays
    class Mesh:
        def __init__(self, devices):
            self.devices = devices

        def inventory(self):
            return self.devices

    slow = Profile(flops32=1e11, flops64=5e10, mem_bandwidth=1e10, launch_latency=2e-6,
                   method="model", source="test")
    j = dev("j0", "cpu", "jax", slow)
    j.extra = {"numpy_profile": CPU.to_dict()}
    _, label, backend = api.choose_for_needs(Mesh([j]), "matmul")
    assert (label, backend) == ("cpu:jax (numpy)", "numpy")
    # a NumPy worker as fast: it gets the task, not the JAX worker running NumPy
    _, label, backend = api.choose_for_needs(Mesh([j, dev("c0", "cpu", "numpy", CPU)]),
                                             "matmul")
    assert (label, backend) == ("cpu:numpy", "numpy")
    # a JAX worker that measured no NumPy: JAX, as before
    _, label, backend = api.choose_for_needs(Mesh([dev("j1", "cpu", "jax", slow)]), "matmul")
    assert (label, backend) == ("cpu:jax", "jax")


def test_a_jax_cpu_workers_numpy_speed_is_its_share_of_the_cores():
    # beside two NumPy workers on 2 cores, an unpinned JAX worker counts both cores:
    # 4 threads on 2 cores, each at half speed, its NumPy too; a plan that leaves the
    # NumPy workers idle has it at full speed
    from jupyter_mesh.router.cost import reshared

    def on(name, backend, cores, numpy=None):
        d = dev(name, "cpu", backend, CPU)
        d.host, d.extra = "10.0.0.1", {"cores": cores}
        if numpy is not None:
            d.extra["numpy_profile"] = numpy.to_dict()
        return d

    pools = build_pools([on("c0", "numpy", 2), on("c1", "numpy", 2),
                         on("j0", "jax", 2, numpy=CPU)])
    j = next(i for i, p in enumerate(pools) if p.backend == "jax")
    assert pools[j].numpy_profile.flops64 == pytest.approx(CPU.flops64 / 2)
    alone = reshared(pools, {j})
    assert alone is not None and alone[j].numpy_profile.flops64 == pytest.approx(CPU.flops64)
    # a NumPy profile that is not a profile is ignored: the worker runs JAX only
    bad = on("j1", "jax", 2)
    bad.extra["numpy_profile"] = {"flops32": "fast"}
    assert build_pools([bad])[0].numpy_profile is None


def device_calls(graph):
    """The device calls of a routed graph, those inside fused tasks too."""
    from dask._task_spec import Task

    from jupyter_mesh.router._device import DeviceCall

    out = []
    for node in graph.values():
        if isinstance(node.func, DeviceCall):
            out.append(node.func)
        elif isinstance(node, Task) and node.args and isinstance(node.args[0], dict):
            out += device_calls(node.args[0])  # Task.fuse: (subgraph, outkey, deps, ...)
    return out


def test_rewrite_fuses_chains_that_one_worker_runs(mesh_devices):
    # Dask fuses linear chains of array tasks; a routed graph does too, but only where
    # the plan runs the whole chain on one worker, never across targets
    from jupyter_mesh.router.rewrite import linear_chains, rewrite

    x = da.random.random((2000, 2000), chunks=500)
    y = (((x @ x.T) / 2000 + 1) * 2 - x).sum(axis=0)
    plan = plan_collections([y], mesh_devices)
    m = plan.model
    chains = linear_chains(plan)
    assert chains, "the elementwise tail of each block is a chain"
    routed = rewrite(plan, batch=False)  # (batches: test_router_batch.py)
    fused_away = {m.keys[i] for c in chains for i in c[:-1]}
    assert len(routed.graph) == len(m.keys) - len(fused_away)
    for c in chains:
        assert len({plan.worker_of[i] for i in c}) == 1
        for a, b in zip(c, c[1:], strict=False):
            assert m.deps[b] == [a] and m.keys[a] not in m.outputs
    # restrictions and priorities name only the submitted keys; a fused task starts
    # when its first member was planned to
    assert set(routed.restrictions) <= set(routed.graph)
    assert set(routed.priorities) <= set(routed.graph)
    for c in chains:
        assert routed.priorities[m.keys[c[-1]]] == plan.start[c[0]]
    # every member keeps its own device call, recording under its own key
    keys = {c.key for c in device_calls(routed.graph) if c.key is not None}
    assert fused_away <= keys
    # the same numbers as Dask's
    got = dask.get(routed.graph, routed.keys)
    np.testing.assert_allclose(np.concatenate(got), y.compute(scheduler="sync"))
    # Dask's switch turns it off, as for Dask's own fusion
    with dask.config.set({"optimization.fuse.active": False}):
        assert len(rewrite(plan).graph) == len(m.keys)
    assert len(rewrite(plan, fuse=False).graph) == len(m.keys)


def test_a_routed_graph_is_named_without_pickling_its_tasks(mesh_devices, monkeypatch):
    # client.get names the graph it receives by tokenizing every task, which pickles
    # each function and argument (1.7 s for a 10,000-task graph on a small machine):
    # the routed tasks carry a name of their own, unique to the task and the plan
    from dask._expr import LLGExpr
    from dask.tokenize import tokenize

    from jupyter_mesh.router import _device
    from jupyter_mesh.router.rewrite import rewrite, submission

    x = da.random.random((2000, 2000), chunks=500)
    y = (((x @ x.T) / 2000 + 1) * 2 - x).sum(axis=0)
    plan = plan_collections([y], mesh_devices)
    first, second = rewrite(plan), rewrite(plan, fuse=False)
    assert first.fused, "some chains are fused: their tasks are named too"
    pickled = []
    real = dask.tokenize._normalize_pickle
    monkeypatch.setattr(dask.tokenize, "_normalize_pickle",
                        lambda o: pickled.append(o) or real(o))
    # what the router hands client.get: Dask names it without looking into it
    names = [submission(r)._name for r in (first, second)]
    assert pickled == []
    assert names[0] != names[1]  # each submission is its own graph
    assert dict(submission(first).__dask_graph__()) == first.graph
    # named as a plain dict, each task is named by its own token, none pickled
    assert LLGExpr(first.graph)._name
    pickled = [o for o in pickled if not isinstance(o, type)]  # LLGExpr itself, once
    assert pickled == []
    tokens = [tokenize(t) for r in (first, second) for t in r.graph.values()]
    assert len(set(tokens)) == len(tokens)
    # a device call is named by what it is (its function as Dask names functions),
    # without pickling the wrapper
    call = next(iter(device_calls(first.graph)))
    same = _device.DeviceCall(call.func, call.key, call.plan_id, call.to_host, call.native)
    other = _device.DeviceCall(call.func, call.key, "another-plan", call.to_host,
                               call.native)
    assert tokenize(call) == tokenize(same) != tokenize(other)
    assert not any(isinstance(o, _device.DeviceCall) for o in pickled)
    # and the graph still computes Dask's numbers
    got = dask.get(first.graph, first.keys)
    np.testing.assert_allclose(np.concatenate(got), y.compute(scheduler="sync"))


def test_chain_links_are_only_input_and_only_consumer():
    from jupyter_mesh.router.placement import chain_links

    m = synthetic_model([
        {"name": "a", "op_class": "creation", "tasks": 2},
        {"name": "b", "op_class": "elementwise", "tasks": 2, "deps": [(0, "map")]},
        {"name": "c", "op_class": "reduction", "tasks": 1, "deps": [(1, "all")]},
    ])
    # b continues a (its only input, whose only consumer it is); c has two inputs
    assert chain_links(m) == [-1, -1, 0, 1, -1]
    m.outputs = [m.keys[0], m.keys[4]]  # an output is never fused into its consumer
    assert chain_links(m) == [-1, -1, -1, 1, -1]
    assert chain_links(m, fusing=False) == [-1] * 5
    with dask.config.set({"optimization.fuse.active": False}):
        assert chain_links(m) == [-1] * 5


def test_planner_counts_the_dispatch_that_fusing_a_chain_saves(mesh_devices):
    # the rewrite fuses a chain the plan runs on one worker into one task, which Dask
    # dispatches once: the planner charges a continuation there no dispatch of its own,
    # so it keeps chains together where splitting them gains less
    from jupyter_mesh.router import placement as P
    from jupyter_mesh.router.rewrite import linear_chains, rewrite

    pools = build_pools(mesh_devices)
    x = da.random.random((2000, 2000), chunks=250)
    m = model_collections([(((x @ x.T) / 2000 + 1) * 2 - x).sum(axis=0)])
    cost = CostModel(pools, task_overhead=1e-3)
    chain = P.chain_links(m)
    plan = plan_model(m, pools, "auto", cost=cost)
    kept = {(d, i) for i, d in enumerate(chain)
            if d >= 0 and plan.worker_of[i] == plan.worker_of[d]}
    fused = {(c[k], c[k + 1]) for c in linear_chains(plan) for k in range(len(c) - 1)}
    assert kept and kept == fused  # what the plan counts on is what the rewrite does
    # planning blind to fusion (as with Dask's switch off), then running fused
    with dask.config.set({"optimization.fuse.active": False}):
        blind = plan_model(m, pools, "auto", cost=cost)
    # (chains alone: batching a worker's runs of tasks, see test_router_batch.py, cuts
    # the dispatch of either plan further)
    assert (len(rewrite(plan, batch=False).graph)
            < 0.9 * len(rewrite(blind, fuse=True, batch=False).graph))
    ex = [[cost.exec_time(op, p) for p in pools] for op in m.ops]

    def fused_makespan(p):
        order = sorted(range(len(m.keys)), key=lambda i: (p.start[i], i))
        return max(P._replay(m, pools, cost, ex, order, p.worker_of, chain)[2])

    assert fused_makespan(plan) < 0.9 * fused_makespan(blind)
    assert plan.makespan == pytest.approx(fused_makespan(plan), rel=0.02)


def test_a_task_waits_the_dependency_latency_after_its_inputs_unless_fused():
    # Dask starts a task only after the scheduler heard that its inputs are done: a
    # round trip, also on the same worker; a chain's next task fused into one task
    # with its input waits none
    from jupyter_mesh.router import placement as P

    m = synthetic_model([
        {"name": "a", "op_class": "creation", "tasks": 2},
        {"name": "b", "op_class": "elementwise", "tasks": 2, "deps": [(0, "map")]},
        {"name": "c", "op_class": "reduction", "tasks": 1, "deps": [(1, "all")]},
    ])
    pools = build_pools([dev("c0", "cpu", "numpy", CPU)])
    chain = P.chain_links(m)
    assert chain[2] == 0 and chain[3] == 1 and chain[4] == -1
    plans = {rt: plan_model(m, pools, "cpu", cost=CostModel(pools, task_overhead=0.0,
                                                          dependency_latency=rt))
             for rt in (0.0, 0.01)}
    # one worker: b continues a (fused, no wait); c waits once after the last b
    assert plans[0.01].makespan == pytest.approx(plans[0.0].makespan + 0.01)
    # between two workers, the transfer comes on top of the round trip
    two = build_pools([dev("c0", "cpu", "numpy", CPU), dev("c1", "cpu", "numpy", CPU)])
    base = CostModel(two, task_overhead=0.0)
    cost = CostModel(two, task_overhead=0.0, dependency_latency=0.01)
    assert cost.transfer(1e6, 0, 0) == 0.01
    assert cost.transfer(1e6, 0, 0, same_worker=False) == pytest.approx(
        base.transfer(1e6, 0, 0, same_worker=False) + 0.01)
    assert base.transfer(1e6, 0, 0) == 0.0


def test_an_estimate_is_never_below_the_meshs_pace_of_dispatch():
    # tiny tasks: Dask's scheduler sees to one task at a time, so the plan's estimate
    # is at least its dispatched tasks (a fused chain is one) at the measured pace
    from jupyter_mesh.router import placement as P

    m = synthetic_model([
        {"name": "a", "op_class": "creation", "tasks": 4},
        {"name": "b", "op_class": "elementwise", "tasks": 4, "deps": [(0, "map")]},
        {"name": "c", "op_class": "reduction", "tasks": 1, "deps": [(1, "all")]},
    ])
    pools = build_pools([dev("c0", "cpu", "numpy", CPU), dev("c1", "cpu", "numpy", CPU)])
    cost = CostModel(pools, task_overhead=0.0)
    free = plan_model(m, pools, "cpu", cost=cost)
    assert free.floor == 0.0
    cost.task_interval = 1.0  # far above every task's modelled time
    paced = plan_model(m, pools, "cpu", cost=cost)
    chain = P.chain_links(m)
    fused = sum(1 for i, d in enumerate(chain)
                if d >= 0 and paced.worker_of[i] == paced.worker_of[d])
    assert fused > 0
    assert paced.makespan == pytest.approx(len(m.keys) - fused)
    assert any("at this mesh's measured pace" in n for n in paced.notes)
    assert not any("measured pace" in n for n in free.notes)


def test_an_estimate_counts_dasks_cpu_beside_the_tasks_on_a_shared_host():
    # a local mesh on 2 cores: two NumPy workers keep both busy, and the scheduler's and
    # workers' own work for each task needs those cores too: what the schedule leaves
    # idle takes it, the rest comes on top
    from jupyter_mesh.router import placement as P

    def on(name, backend, cores=2, nthreads=1):
        d = dev(name, "cpu", backend, CPU, nthreads=nthreads)
        d.host, d.extra = "10.0.0.1", {"cores": cores}
        return d

    m = synthetic_model([
        {"name": "mm", "op_class": "matmul", "tasks": 8, "flops": 2e10, "out_bytes": 8.0}])
    pools = build_pools([on("c0", "numpy"), on("c1", "numpy")])
    cost = CostModel(pools, task_overhead=0.0)
    plain = plan_model(m, pools, "cpu", cost=cost)
    span = max(plain.finish)
    assert plain.makespan == pytest.approx(span) and plain.floor == 0.0
    cost.cpu_per_task, cost.host_cores = 0.05, 2
    busy = plan_model(m, pools, "cpu", cost=cost)
    # both workers busy throughout: nothing idle, so 8 tasks x 50 ms over 2 cores on top
    assert busy.makespan == pytest.approx(span + 8 * 0.05 / 2)
    assert any("ms of CPU per task, 8 tasks) share this host's 2 cores" in n
               for n in busy.notes)
    # on 8 cores the idle ones take Dask's work: the estimate stands
    cost.host_cores = 8
    roomy = plan_model(m, pools, "cpu", cost=cost)
    assert roomy.makespan == pytest.approx(span)
    assert not any("CPU per task" in n for n in roomy.notes)
    # no host shared by all (a mesh over several hosts): no such floor
    cost.host_cores = None
    assert plan_model(m, pools, "cpu", cost=cost).makespan == pytest.approx(span)
    # a JAX worker keeps a core per thread it counts (XLA computes on all it may use);
    # an accelerator's task keeps none
    jax = build_pools([on("j0", "jax", cores=2)])
    assert jax[0].members[0][2] == 2
    assert P.cpu_floor(jax, [0], [0.0], [1.0], 4, 0.1, 2) == pytest.approx(1.2)
    gpu = build_pools([dev("g0", "gpu", "cupy", GPU)])
    assert P.cpu_floor(gpu, [0], [0.0], [1.0], 4, 0.1, 2) == pytest.approx(1.0)
    assert P.cpu_floor(gpu, [0], [0.0], [1.0], 0, 0.1, 2) == 0.0


def test_equivalent_pools_are_not_restricted():
    # a NumPy pool and a JAX-on-CPU pool with the same profile: routing could only get
    # in the way, so the plan restricts nothing and runs every task on host NumPy
    from jupyter_mesh.router.rewrite import rewrite

    devs = [dev("c0", "cpu", "numpy", CPU), dev("j0", "cpu", "jax", CPU)]
    x = da.random.random((400, 400), chunks=100)
    plan = plan_collections([(x + 1).sum()], devs)
    assert plan.unrestricted
    assert {r["target"] for r in plan.rows} == {"any (pools equivalent)"}
    routed = rewrite(plan)
    assert routed.restrictions == {}
    calls = device_calls(routed.graph)
    assert calls and all(c.native == frozenset({"numpy"}) for c in calls)
    # a forced target, or pools that differ, are restricted as planned
    assert not plan_collections([(x + 1).sum()], devs, route="cpu:jax").unrestricted
    devs.append(dev("g0", "gpu", "cupy", GPU))
    assert not plan_collections([(x + 1).sum()], devs).unrestricted


@pytest.mark.parametrize("per_layer", [False, True])
def test_site_keeps_equivalent_pools_unrestricted_inside_the_site(per_layer):
    # site= keeps the tasks at the site; where every pool there runs every op equally
    # fast, nothing else is restricted: Dask places and fuses them among its workers
    from jupyter_mesh.router.layers import rewrite_layers
    from jupyter_mesh.router.rewrite import rewrite

    devs = [dev("c0", "cpu", "numpy", CPU, site="lab"), dev("j0", "cpu", "jax", CPU, site="lab"),
            dev("e0", "cpu", "numpy", CPU, site="edge")]
    x = da.random.random((400, 400), chunks=100)
    y = ((x + 1) * 2).sum()
    with dask.config.set({"mesh.router.layer-plan-threshold": 1 if per_layer else 10**9}):
        plan = plan_collections([y], devs, site="lab")
    assert plan.unrestricted and plan.site == "lab"
    assert {r["target"] for r in plan.rows} == {"any at lab (pools equivalent)"}
    if not per_layer:  # (a plan per layer has no per-task assignment)
        assert set(plan.assignment().values()) == {"any at lab (pools equivalent)"}
    assert any("every pool at site 'lab' runs every op" in n for n in plan.notes)
    routed = rewrite_layers(plan) if per_layer else rewrite(plan)
    # one pool entry that names the site and no kind, and every task restricted to it
    anywhere = len(routed.pools) - 1
    assert routed.pools[anywhere][:2] == (None, "lab")
    # (a plan per layer that restricts nothing goes materialized and fused too)
    assert routed.layers == {} and set(routed.restrictions) == set(routed.graph)
    assert set(routed.restrictions.values()) == {anywhere}
    # chains fused where Dask would fuse them: fewer tasks than the plan's
    assert routed.fused and len(routed.graph) < plan.ntasks
    # pools at the site that differ: planned and restricted per pool, as before
    devs.append(dev("g0", "gpu", "cupy", GPU, site="lab"))
    assert not plan_collections([(x @ x.T).sum()], devs, site="lab").unrestricted


@pytest.mark.parametrize("kind, backend, profile", [("gpu", "cupy", GPU), ("cpu", "jax", CPU)])
def test_a_mesh_of_one_accelerator_kind_runs_its_ops_natively(kind, backend, profile):
    # nothing to choose between, but routing "auto" must still use the device's backend
    from jupyter_mesh.router.rewrite import rewrite

    devs = [dev("a0", kind, backend, profile), dev("a1", kind, backend, profile)]
    x = da.random.random((2000, 2000), chunks=1000)
    plan = plan_collections([((x @ x.T) + 1).sum()], devs)
    assert not plan.unrestricted
    rows = {r["op"]: r["target"] for r in plan.rows}
    assert rows["matmul"] == rows["add"] == f"{kind}:{backend}"
    calls = device_calls(rewrite(plan).graph)
    assert any(backend in c.native for c in calls)
    # a mesh of NumPy workers alone is left to Dask
    cpus = [dev("c0", "cpu", "numpy", CPU), dev("c1", "cpu", "numpy", CPU)]
    assert plan_collections([((x @ x.T) + 1).sum()], cpus).unrestricted


def test_pin_keeps_data_at_its_site():
    devs = [dev("e0", "cpu", "numpy", CPU, site="edge"), dev("c1", "cpu", "numpy", CPU),
            dev("g0", "gpu", "cupy", GPU)]
    x = da.random.random((8000, 8000), chunks=2000)
    z = da.random.random((8000, 8000), chunks=2000)
    y = (x @ x.T).sum() + (z @ z.T).sum()
    plan = plan_collections([y], devs, pin={"edge": x})
    m = plan.model
    xkeys = set(dask.core.flatten(x.__dask_keys__()))
    # every task that produces x or reads it (directly or not) stays at the edge
    reads_x = [m.keys[i] in xkeys for i in range(len(m.keys))]
    for i, ds in enumerate(m.deps):
        if any(reads_x[d] for d in ds):
            reads_x[i] = True
    assert any(reads_x)
    for i, flag in enumerate(reads_x):
        if flag:
            assert plan.pools[plan.pool_of[i]].site == "edge", m.keys[i]
    # z is not pinned: its big matmul goes to the GPU
    zmm = [i for i, k in enumerate(m.keys) if k[0].startswith("matmul") and not reads_x[i]]
    assert any(plan.pools[plan.pool_of[i]].kind == "gpu" for i in zmm)
    # the scheduler learns the pins, so a fallback never relaxes them elsewhere
    from jupyter_mesh.router.rewrite import rewrite

    routed = rewrite(plan, fuse=False)  # every key's pin (fused chains: the last key's)
    assert routed.pins and set(routed.pins.values()) == {"edge"}
    assert all(routed.pins.get(m.keys[i]) == "edge" for i, f in enumerate(reads_x) if f)
    assert all(workers for _, workers, _ in routed.pools)


def test_fallback_relaxes_pinned_tasks_only_within_their_site():
    from types import SimpleNamespace

    from jupyter_mesh.router._scheduler import PlanState, RouterState

    def ws(site):
        return SimpleNamespace(extra={"jupyter-mesh": {"site": site, "kind": "cpu",
                                                       "backend": "numpy"}},
                               resources={site_resource(site): 1}, address=site, name=site,
                               nthreads=1, processing=(), memory=None, metrics={},
                               status="running")

    st = RouterState()
    st.scheduler = SimpleNamespace(workers={"tcp://e:1": ws("edge"), "tcp://c:1": ws("local")},
                                   tasks={})
    ps = PlanState("p", [("gpu-cupy", None, "gpu:cupy")], True, 1.0, None, {"k1": "edge"})
    pinned, free = SimpleNamespace(key="k1"), SimpleNamespace(key="k2")
    st._relax_one(pinned, ps)
    st._relax_one(free, ps)
    # kept to the site by its resource (not by address: a restarted worker counts)
    assert pinned.resource_restrictions == {"mesh-site:edge": 1}
    assert pinned.worker_restrictions is None
    assert free.worker_restrictions is None and free.resource_restrictions is None


def _stub_scheduler(workers, states):
    """A scheduler's state as the router's plugin reads it: workers by address (each
    with its site), tasks by key, and the transitions asked for."""
    from types import SimpleNamespace

    def ws(site):
        return SimpleNamespace(extra={"jupyter-mesh": {"site": site, "kind": "cpu",
                                                       "backend": "numpy"}},
                               resources={"mesh-cpu-numpy": 1, site_resource(site): 1},
                               address=site, name=site, nthreads=1, processing=(),
                               memory=None, metrics={}, status="running")

    asked: list = []
    tasks = {k: SimpleNamespace(key=k, state=st, resource_restrictions={"mesh-gpu-cupy": 1},
                                worker_restrictions=None, host_restrictions=None,
                                loose_restrictions=False) for k, st in states.items()}

    def transition(key, finish, stimulus_id, **kwargs):
        # what Dask does for a task failed while it waits: erred, with the exception
        tasks[key].state = finish
        tasks[key].exception = pickle.loads(kwargs["exception"])
        return {}

    sched = SimpleNamespace(workers={a: ws(site) for a, site in workers.items()},
                            tasks=tasks, transitions=lambda recs, stimulus_id: asked.append(recs),
                            transition=transition)
    return sched, asked


@pytest.mark.parametrize("left, site, failed", [
    ({"tcp://c:1": "cloud"}, "lab",
     r"^no live worker at site 'lab', where the computation was kept \(site=\): the "
     r"computation cannot finish there; start a worker at 'lab' \(jupyter-mesh worker "
     r"ADDRESS --site lab\) and run it again, or run it without site=$"),
    ({}, "lab", "no live worker at site 'lab'"),
    ({}, None, "no live worker left for 1 s: .* add workers"),
])
def test_fallback_never_moves_a_site_computation_out_nor_waits_for_nothing(left, site, failed):
    # the GPU pool of a plan kept at site "lab" (site=) is lost: its tasks may move to
    # another kind at lab, never to another site; with no worker at lab (or none at
    # all) the computation fails at once instead of waiting for ever in no-worker
    from jupyter_mesh.router._scheduler import PlanState, RouterState

    st = RouterState()
    st.scheduler, asked = _stub_scheduler(left, {"k1": "no-worker"})
    ps = PlanState("p", [("mesh-gpu-cupy", None, "gpu:cupy")], True, 1.0, site)
    ps.keys, ps.used = {"k1": 0}, {0}
    st.plans["p"] = ps
    st._expire("p", 0)
    assert re.search(failed, ps.failed)
    assert asked == [] and st.status(plan_id="p")["failed"] == ps.failed
    # the task waiting for a worker fails with that error, so that nothing waiting on
    # it (a mesh.submit future, persisted data computed again) waits for ever
    k1 = st.scheduler.tasks["k1"]
    assert k1.state == "erred" and isinstance(k1.exception, MeshError)
    assert str(k1.exception) == ps.failed
    # with a worker left at lab, the task goes there, and only there
    st.scheduler, asked = _stub_scheduler({**left, "tcp://l:1": "lab"}, {"k1": "no-worker"})
    ps = PlanState("q", [("mesh-gpu-cupy", None, "gpu:cupy")], True, 1.0, "lab")
    ps.keys, ps.used = {"k1": 0}, {0}
    st.plans["q"] = ps
    st._expire("q", 0)
    assert ps.failed is None and asked == [{"k1": "processing"}]
    k1 = st.scheduler.tasks["k1"]
    assert k1.resource_restrictions == {"mesh-site:lab": 1} and not k1.worker_restrictions
    assert "re-routed" in ps.events[0]


def test_a_failed_plan_never_fails_what_another_client_needs_too():
    # two notebooks computing the same graph share its keys: one's fallback=False
    # failure erred every waiting task of its plan, and the other's computation (plain,
    # or routed with fallback) failed with the first one's error
    from types import SimpleNamespace

    from jupyter_mesh.router._scheduler import PlanState, RouterState

    st = RouterState()
    st.scheduler, asked = _stub_scheduler({"tcp://c:1": "lab"},
                                          {"mine": "no-worker", "shared": "no-worker"})
    tasks = st.scheduler.tasks
    # "shared" is read by a task another client wants; "mine" by one only this one does
    reader = SimpleNamespace(key="reader", dependencies=[tasks["shared"]])
    tasks["shared"].dependencies = tasks["mine"].dependencies = []
    st.scheduler.clients = {
        "Client-a": SimpleNamespace(client_key="Client-a", wants_what=[tasks["mine"]]),
        "Client-b": SimpleNamespace(client_key="Client-b", wants_what=[reader])}
    ps = PlanState("p", [("mesh-gpu-cupy", None, "gpu:cupy")], False, 1.0, None)
    ps.keys, ps.used, ps.client = {"mine": 0, "shared": 0}, {0}, "Client-a"
    st.plans["p"] = ps
    st._expire("p", 0)
    assert ps.failed.startswith("no live gpu:cupy worker for 1 s and fallback=False")
    assert tasks["mine"].state == "erred"
    shared = tasks["shared"]
    assert shared.state == "no-worker" and shared.resource_restrictions is None
    assert asked == [{"shared": "processing"}]
    # another routed computation kept to a site (site=, pin=) keeps its tasks there
    st.scheduler, asked = _stub_scheduler({"tcp://c:1": "lab"}, {"shared": "no-worker"})
    shared = st.scheduler.tasks["shared"]
    shared.dependencies = []
    st.scheduler.clients = {"Client-b": SimpleNamespace(client_key="Client-b",
                                                        wants_what=[shared])}
    ps = PlanState("q", [("mesh-gpu-cupy", None, "gpu:cupy")], False, 1.0, None)
    ps.keys, ps.used, ps.client = {"shared": 0}, {0}, "Client-a"
    theirs = PlanState("r", [("mesh-gpu-cupy", "lab", "gpu:cupy at lab")], True, 5.0, "lab")
    theirs.keys, theirs.used, theirs.client = {"shared": 0}, {0}, "Client-b"
    st.plans.update(q=ps, r=theirs)
    st._expire("q", 0)
    assert shared.resource_restrictions == {site_resource("lab"): 1}
    assert asked == [{"shared": "processing"}]


def test_a_kernel_holding_the_scheduler_logs_only_its_own_plans_fallbacks(caplog,
                                                                          monkeypatch):
    # a local mesh's scheduler runs in its owner's kernel: other notebooks' fallbacks
    # were logged into the owner's cell (theirs get their own warning)
    import logging
    from types import SimpleNamespace

    from distributed import Client

    owner = SimpleNamespace(id="Client-owner")
    monkeypatch.setattr(Client, "_instances", [owner])
    gpu = ("mesh-gpu-cupy", None, "gpu:cupy")
    for client, logged in (("Client-other", False), ("Client-owner", True), (None, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="jupyter_mesh"):
            ps, asked = _expired({"tcp://l:1": "lab"}, gpu, True, None, client)
        assert asked == [{"k1": "processing"}] and "re-routed" in ps.events[0]
        assert ("re-routed" in caplog.text) is logged, (client, caplog.text)
    # a scheduler in a process of its own (no client there) logs every plan's
    monkeypatch.setattr(Client, "_instances", [])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jupyter_mesh"):
        _expired({"tcp://l:1": "lab"}, gpu, True, None, "Client-other")
    assert "re-routed" in caplog.text


def _expired(workers, pool, fallback, site, client=None):
    """A plan of one task on ``pool`` whose fallback timer ran out, on a scheduler with
    ``workers`` (address -> site): the plan's state and the transitions asked for."""
    from jupyter_mesh.router._scheduler import PlanState, RouterState

    st = RouterState()
    st.scheduler, asked = _stub_scheduler(workers, {"k1": "no-worker"})
    ps = PlanState("p", [pool], fallback, 1.0, site)
    ps.keys, ps.used, ps.client = {"k1": 0}, {0}, client
    st.plans["p"] = ps
    st._expire("p", 0)
    return ps, asked


@pytest.mark.parametrize("fallback", [True, False])
def test_a_site_left_without_workers_is_said_as_such_with_fallback_on_or_off(fallback):
    # with fallback=False, losing the only workers of a site= computation said "compute
    # with fallback=True or another route", which fails the same way: nothing may leave
    # the site; both say what helps
    ps, asked = _expired({"tcp://c:1": "cloud"}, ("mesh-cpu-numpy", "edge", "cpu:numpy at edge"),
                         fallback, "edge")
    assert ps.failed == (
        "no live worker at site 'edge', where the computation was kept (site=): the "
        "computation cannot finish there; start a worker at 'edge' (jupyter-mesh worker "
        "ADDRESS --site edge) and run it again, or run it without site=")
    assert asked == []
    # with workers left at the site, fallback=False says its own
    ps, asked = _expired({"tcp://e:1": "edge"}, ("mesh-gpu-cupy", "edge", "gpu:cupy at edge"),
                         fallback, "edge")
    if fallback:
        assert ps.failed is None and asked == [{"k1": "processing"}]
    else:
        assert ps.failed.startswith("no live gpu:cupy worker at edge for 1 s and "
                                    "fallback=False: ")


def test_a_fallback_timer_says_nothing_once_its_computation_is_over(caplog):
    # a computation that failed (or finished) before its lost pool's timer ran out:
    # the scheduler logged "lost every ...: 0 routed tasks re-routed" after it
    import logging

    from jupyter_mesh.router._scheduler import PlanState, RouterState

    class Timer:
        cancelled = False

        def cancel(self):
            self.cancelled = True

    st = RouterState()
    st.scheduler, asked = _stub_scheduler({"tcp://c:1": "lab"}, {"k1": "memory"})
    ps = PlanState("p", [("mesh-gpu-cupy", None, "gpu:cupy")], True, 1.0, None)
    ps.keys, ps.used = {"k1": 0}, {0}
    st.plans["p"] = ps
    st.owner["k1"] = "p"
    timer = ps.timers[0] = Timer()
    st.transition("k1", "forgotten")  # the last of its keys goes
    assert timer.cancelled and not ps.timers
    # and a timer that fires with nothing of the plan waiting says nothing
    ps.keys = {"k1": 0}
    with caplog.at_level(logging.WARNING, logger="jupyter_mesh"):
        st._expire("p", 0)
    assert "re-routed" not in caplog.text and not ps.events and asked == []


def test_bad_pins(mesh_devices):
    x = da.random.random((400, 400), chunks=100)
    y = (x + 1).sum()
    with pytest.raises(MeshError, match="no worker at site 'mars'"):
        plan_collections([y], mesh_devices, pin={"mars": x})
    with pytest.raises(MeshError, match="Dask collections"):
        plan_collections([y], mesh_devices, pin={"local": "x"})
    with pytest.raises(MeshError, match=r"not an input of this computation: pin the "
                                         r"collections it is computed from"):
        plan_collections([y], mesh_devices, pin=[(da.ones(3), "local")])
    with pytest.raises(MeshError, match="pin takes"):
        plan_collections([y], mesh_devices, pin=["local"])


@pytest.mark.parametrize("pin", [
    lambda x: [(x, "local"), (x, "edge")],
    lambda x: {"local": x, "edge": [x]},
])
def test_the_same_data_pinned_to_two_sites_is_one_line(pin):
    devs = [dev("c0", "cpu", "numpy", CPU), dev("e0", "cpu", "numpy", CPU, site="edge")]
    x = da.random.random((400, 400), chunks=100)
    y = (x + 1).sum()
    with pytest.raises(MeshError, match=r"^data pinned to two sites: 'local' and 'edge': pin each collection to one site"):
        plan_collections([y], devs, pin=pin(x))
    # pinned to one site once is fine, and twice to the same site too
    plan = plan_collections([y], devs, pin=[(x, "edge"), (x, "edge")])
    assert set(plan.model.pins.values()) == {"edge"}


def test_scheduler_runs_ready_tasks_in_plan_order(mesh_devices):
    import pickle
    from types import SimpleNamespace

    from jupyter_mesh.router._scheduler import RouterState
    from jupyter_mesh.router.rewrite import rewrite

    plan = plan_collections([pipeline(2000, 1000)], mesh_devices)
    routed = rewrite(plan, fuse=False)
    assert routed.priorities == dict(zip(plan.model.keys, plan.start, strict=True))
    st = RouterState()
    # (each read by something: the plugin forgets routed tasks that nothing reads)
    tasks = {k: SimpleNamespace(key=k, state="released", priority=(0, 3, 17),
                                dependents={"reader"}, who_wants=None)
             for k in plan.model.keys}
    st.scheduler = SimpleNamespace(workers={}, tasks=tasks)
    st.register(payload=pickle.dumps(pickle.loads(routed.payload())))
    st.update_graph(st.scheduler, list(tasks))
    k = plan.model.keys[-1]
    assert tasks[k].priority == (0, 3, routed.priorities[k])
    assert tasks[k].resource_restrictions == {plan.pools[plan.pool_of[-1]].resource: 1}


def test_replay_of_a_list_schedule_gives_its_times(mesh_devices):
    # the planner compares variants by replaying fixed assignments: a replay of the
    # plain schedule's own assignment must reproduce its start and finish times
    from jupyter_mesh.router.placement import _list_schedule, _pins, _rank_order, _replay

    pools = build_pools(mesh_devices)
    model = model_collections([pipeline()])
    cost = CostModel(pools)
    allowed = [list(range(len(pools)))] * len(model.ops)
    ex = [[cost.exec_time(op, p) for p in pools] for op in model.ops]
    order = _rank_order(model, ex, allowed, [1] * len(pools))
    pool_of, start, finish, worker_of = _list_schedule(model, pools, cost, allowed, ex,
                                                       order, _pins(model))
    r_pool, r_start, r_finish, r_worker = _replay(model, pools, cost, ex, order, worker_of)
    assert r_pool == pool_of and r_worker == worker_of
    assert r_start == pytest.approx(start) and r_finish == pytest.approx(finish)


def test_plan_never_worse_than_one_worker_when_moving_data_dominates():
    # a wide DAG whose blocks take far longer to move between the two GPUs than to
    # compute: greedy earliest finish spreads it and pays for every hand-over; the
    # planner keeps the schedule that finishes first, here all on one GPU
    devs = [dev("g0", "gpu", "cupy", GPU), dev("g1", "gpu", "cupy", GPU)]
    pools = build_pools(devs)
    cost = CostModel(pools, Links(network_bandwidth=1e8, network_latency=1e-3))
    layers = [{"name": "a", "op_class": "matmul", "tasks": 4, "flops": 2e9,
               "out_bytes": 4e8}]
    for j in range(1, 6):
        layers.append({"name": f"l{j}", "op_class": "matmul", "tasks": 4, "flops": 2e9,
                       "out_bytes": 4e8, "deps": [(j - 1, "map"), (j - 1, "all")]})
    model = synthetic_model(layers)
    plan = plan_model(model, pools, "auto", cost=cost)
    serial = sum(cost.exec_time(model.ops[li], pools[0]) for li in model.layer)
    assert plan.makespan <= serial * (1 + 1e-9)
    assert len(set(plan.worker_of)) == 1


def _gpu_router_state(addresses, keys, **payload):
    """A scheduler plugin's state with one GPU pool of ``addresses`` and waiting tasks
    ``keys``, all routed to that pool, registered with ``payload`` and submitted:
    (state, tasks by key, the transitions it asked for)."""
    import pickle
    from types import SimpleNamespace

    from jupyter_mesh.router._scheduler import RouterState

    st = RouterState()
    done: list = []
    tasks = {k: SimpleNamespace(key=k, state="waiting", priority=None) for k in keys}
    gpu = SimpleNamespace(resources={"mesh-gpu-cupy": 1})
    st.scheduler = SimpleNamespace(workers=dict.fromkeys(addresses, gpu), tasks=tasks,
                                   transitions=lambda recs, stimulus_id: done.append(recs))
    st.register(payload=pickle.dumps({
        "plan_id": "p", "restrictions": dict.fromkeys(keys, 0),
        "pools": [("mesh-gpu-cupy", None, "gpu:cupy")], "fallback": True, "timeout": 5.0,
        **payload}))
    st.update_graph(st.scheduler, list(tasks))
    return st, tasks, done


def test_plan_on_one_worker_of_a_pool_narrows_live_restrictions():
    # the plan keeps a communication-bound DAG on one of two GPUs; live, the scheduler
    # restricts its tasks to that GPU (not the whole pool, where Dask would spread
    # them) and widens to the pool at once when that GPU is gone

    from jupyter_mesh.router.plan import Plan
    from jupyter_mesh.router.rewrite import narrowed

    devs = [dev("g0", "gpu", "cupy", GPU), dev("g1", "gpu", "cupy", GPU)]
    pools = build_pools(devs)
    model = synthetic_model([{"name": "a", "op_class": "matmul", "tasks": 2,
                              "flops": 2e9, "out_bytes": 4e8}])
    cost = CostModel(pools)
    plan = Plan(model, pools, "auto", [0, 0], [0.0, 0.1], [0.1, 0.2], cost)
    plan.worker_of = [1, 1]
    assert narrowed(plan) == {0: [pools[0].workers[1]]}
    plan.worker_of = [0, 1]
    assert narrowed(plan) == {}  # the plan uses the whole pool: nothing to narrow

    one, other = pools[0].workers[1], pools[0].workers[0]
    st, tasks, done = _gpu_router_state([one, other], "ab", narrow={0: [one]})
    assert tasks["a"].worker_restrictions == {one}
    assert tasks["a"].resource_restrictions == {"mesh-gpu-cupy": 1}
    tasks["b"].state = "no-worker"
    del st.scheduler.workers[one]
    st.workers_changed()
    assert tasks["a"].worker_restrictions is None  # the whole pool again
    assert tasks["b"].worker_restrictions is None
    assert done == [{"b": "processing"}]


def test_tasks_kept_together_are_kept_on_their_worker_live():
    # plan.kept: the scheduler restricts those tasks to their planned worker (their
    # pool's other workers would have to move the data they share), the rest to the
    # pool; when that worker leaves, its kept tasks may use their pool again at once

    from jupyter_mesh.router.plan import Plan
    from jupyter_mesh.router.rewrite import kept_workers

    devs = [dev("g0", "gpu", "cupy", GPU), dev("g1", "gpu", "cupy", GPU)]
    pools = build_pools(devs)
    model = synthetic_model([
        {"name": "a", "op_class": "matmul", "tasks": 3, "flops": 2e9, "out_bytes": 4e8},
        {"name": "b", "op_class": "matmul", "tasks": 3, "flops": 2e9, "out_bytes": 4e8,
         "deps": [(0, "map")]}])
    cost = CostModel(pools)
    plan = Plan(model, pools, "auto", [0] * 6, [0.0] * 6, [0.1] * 6, cost)
    plan.worker_of = [0, 1, 0, 0, 1, 0]
    plan.kept = [1, 4]
    w0, w1 = pools[0].workers
    assert kept_workers(plan, {}) == {("a", 1): w1, ("b", 1): w1}
    # a fused chain is one task under its last key, on its members' worker
    assert kept_workers(plan, {("b", 1): [("a", 1), ("b", 1)]}) == {("b", 1): w1}
    plan.kept = [1]
    assert kept_workers(plan, {("b", 1): [("a", 1), ("b", 1)]}) == {("b", 1): w1}

    st, tasks, done = _gpu_router_state([w0, w1], "abc", workers={"a": w1, "b": w1})
    assert tasks["a"].worker_restrictions == {w1}
    assert tasks["a"].resource_restrictions == {"mesh-gpu-cupy": 1}
    assert tasks["c"].worker_restrictions is None  # the pool: Dask picks the worker
    tasks["b"].state = "no-worker"
    st.workers_changed()  # both workers still there: nothing changes
    assert tasks["a"].worker_restrictions == {w1} and done == []
    del st.scheduler.workers[w1]
    st.workers_changed()
    assert tasks["a"].worker_restrictions is None  # the whole pool again
    assert tasks["b"].worker_restrictions is None
    assert done == [{"b": "processing"}]


def test_the_same_graph_gets_the_same_plan():
    # the planner's search is seeded: mesh.explain(y) shows the plan mesh.compute(y)
    # will run, not one of many
    devs = [dev("c0", "cpu", "numpy", CPU, nthreads=4), dev("g0", "gpu", "cupy", GPU),
            dev("g1", "gpu", "cupy", GPU), dev("f0", "gpu", "cupy", GPU, site="far")]
    pools = build_pools(devs)
    cost = CostModel(pools)
    layers = [{"name": "a", "op_class": "matmul", "tasks": 6, "flops": 2e10,
               "out_bytes": 4e7}]
    for j in range(1, 5):
        layers.append({"name": f"l{j}", "op_class": "elementwise" if j % 2 else "matmul",
                       "tasks": 6, "flops": 2e9 * j, "out_bytes": 4e7,
                       "deps": [(j - 1, "map"), (j - 1, 2)]})
    first = plan_model(synthetic_model(layers), pools, "auto", cost=cost)
    again = plan_model(synthetic_model(layers), pools, "auto", cost=cost)
    assert first.worker_of == again.worker_of and first.start == again.start


def test_planner_stops_looking_once_a_plan_is_provably_near_best(mesh_devices, monkeypatch):
    # the quick bound is below every schedule the planner can make; when the plain
    # schedule is within GOOD_ENOUGH of it, no other schedule is built (planning time)
    from jupyter_mesh.router import placement as P
    from jupyter_mesh.router.cost import CostModel

    pools = build_pools(mesh_devices)
    cost = CostModel(pools)

    def schedules(coll):
        model = model_collections([coll])
        allowed, _ = P.allowed_pools(model, pools, "auto")
        exec_t = [[cost.exec_time(op, p) for p in pools] for op in model.ops]
        order = P._rank_order(model, exec_t, allowed, [1] * len(pools))
        pin = P._pins(model)
        plain = P._list_schedule(model, pools, cost, allowed, exec_t, order, pin)
        others = list(P._variants(model, pools, cost, allowed, exec_t, order, pin))
        return model, P._quick_bound(model, pools, exec_t, allowed), [plain, *others]

    x = da.random.random((4000, 4000), chunks=500)
    for coll in (pipeline(), (x + 1).sum(axis=0), (x @ x.T).T.sum()):
        model, bound, scheds = schedules(coll)
        assert len(scheds) > 5
        assert all(max(s[2]) >= bound * (1 - 1e-9) for s in scheds)
    # a wide elementwise graph on two equal CPUs: the plain schedule is at the bound,
    # so no other schedule is made
    pools = build_pools(mesh_devices[:2])
    cost = CostModel(pools)
    model, bound, _ = schedules(x * 2)
    made = []
    real = P._variants

    def counting(*args):
        for cand in real(*args):
            made.append(cand)
            yield cand

    monkeypatch.setattr(P, "_variants", counting)
    plan = plan_model(model, pools, "auto", cost=cost)
    assert plan.makespan <= bound * (1 + P.GOOD_ENOUGH)
    assert made == []
    # the pipeline on CPUs and a GPU is not: the planner goes on comparing
    pools = build_pools(mesh_devices)
    plan_model(model_collections([pipeline()]), pools, "auto", cost=CostModel(pools))
    assert made


def count_searched(monkeypatch):
    """The makespans of the seeded search's schedules, as the planner makes them (the
    planner never stops early for being near its bound)."""
    from jupyter_mesh.router import placement as P

    searched = []
    real = P._searched

    def counting(*args, **kw):
        for cand in real(*args, **kw):
            searched.append(max(cand[2]))
            yield cand

    monkeypatch.setattr(P, "_searched", counting)
    monkeypatch.setattr(P, "GOOD_ENOUGH", -1.0)  # never good enough: the search may run
    return searched


def test_the_search_stops_once_it_keeps_finding_nothing_better(mesh_devices, monkeypatch):
    # the seeded search costs a full schedule per trial: where trial after trial finds
    # nothing better, it stops after SEARCH_STALL of them rather than spend its budget
    from jupyter_mesh.router import placement as P

    pools = build_pools(mesh_devices)
    x = da.random.random((2000, 2000), chunks=250)
    m = model_collections([(((x @ x.T) / 2000 + 1) * 2 - x).sum(axis=0)])
    cost = CostModel(pools, task_overhead=1e-3)
    searched = count_searched(monkeypatch)
    monkeypatch.setattr(P, "SEARCH_BUDGET", 10**9)  # every trial affordable
    monkeypatch.setattr(P, "SEARCH_SHARE", math.inf)
    monkeypatch.setattr(P, "SEARCH_STALL", 6)
    plan = plan_model(m, pools, "auto", cost=cost)
    stopped = len(searched)
    searched.clear()
    monkeypatch.setattr(P, "SEARCH_STALL", 10**9)
    full = plan_model(m, pools, "auto", cost=cost)
    assert len(searched) == P.SEARCH_TRIALS > stopped >= 6
    assert 0 < full.makespan <= plan.makespan * (1 + 1e-9)  # the longer search never loses


def test_the_search_costs_no_more_than_a_share_of_what_it_improves(mesh_devices, monkeypatch):
    # planning is time the user waits too: a computation of a few milliseconds gets no
    # seeded search (it would cost more than it could save); one of seconds does, and
    # the search never spends more than SEARCH_SHARE of the makespan on its schedules
    from jupyter_mesh.router import placement as P

    pools = build_pools(mesh_devices)
    searched = count_searched(monkeypatch)
    small = da.random.random((400, 400), chunks=100)
    m = model_collections([((small @ small.T) + 1).sum(axis=0)])
    plan = plan_model(m, pools, "auto", cost=CostModel(pools, task_overhead=1e-4))
    assert plan.makespan < 0.05 and searched == []
    x = da.random.random((8000, 8000), chunks=1000)
    m = model_collections([((x @ x.T) + 1).sum(axis=0)])
    cost = CostModel(pools, task_overhead=1e-3)
    with monkeypatch.context() as mp:
        mp.setattr(P, "VARIANT_BUDGET", 0)  # the plain schedule only: no best is worse
        plain = plan_model(m, pools, "auto", cost=cost)
    plan = plan_model(m, pools, "auto", cost=cost)
    each = P.SCHEDULE_SECONDS * len(m.keys) * len(pools)
    assert searched and len(searched) * each <= P.SEARCH_SHARE * plain.makespan
    # a larger share lets it search further (up to its other limits)
    searched.clear()
    monkeypatch.setattr(P, "SEARCH_SHARE", math.inf)
    monkeypatch.setattr(P, "SEARCH_STALL", 10**9)
    again = plan_model(m, pools, "auto", cost=CostModel(pools, task_overhead=1e-3))
    assert len(searched) > 0 and again.makespan <= plan.makespan * (1 + 1e-9)


def test_a_site_pool_survives_its_worker_rejoining_under_a_new_address():
    # multi-site and site= plans keep a pool to its site; a worker restarted by its
    # nanny rejoins under a new address and must still count (by its resources)
    from jupyter_mesh.router._scheduler import PlanState, RouterState

    st = RouterState()
    st.scheduler, asked = _stub_scheduler({"tcp://l:2": "lab"}, {"k1": "no-worker"})
    ps = PlanState("p", [("mesh-cpu-numpy", "lab", "cpu:numpy")], False, 1.0, "lab")
    ps.keys, ps.used = {"k1": 0}, {0}
    st.plans["p"] = ps
    assert st._alive(ps, 0)
    st._restrict(st.scheduler.tasks["k1"], ps, 0)
    k1 = st.scheduler.tasks["k1"]
    assert k1.resource_restrictions == {"mesh-cpu-numpy": 1, "mesh-site:lab": 1}
    assert k1.worker_restrictions is None
    # with fallback=False it is not failed: the pool is alive
    st._expire("p", 0)
    assert ps.failed is None and k1.state == "no-worker"
    # a worker of the same kind at another site does not keep the pool alive
    st.scheduler, _ = _stub_scheduler({"tcp://c:1": "cloud"}, {"k1": "no-worker"})
    assert not st._alive(ps, 0)


def test_records_come_with_the_tasks_metadata_and_are_handed_over_once():
    # a finished task's metadata carries its device calls' records (a fused task: one
    # per member); the scheduler files them under their plans, and the client gets
    # them once, with the plan's status
    from jupyter_mesh.router._device import METADATA_KEY
    from jupyter_mesh.router._scheduler import PlanState, RouterState

    st = RouterState()
    st.plans["p"] = PlanState("p", [("mesh-cpu-numpy", None, "cpu:numpy")], True, 1.0, None)
    meta = {METADATA_KEY: [("p", ["x", 0, 1], "jax", 0.5), ("p", "y", "numpy", 0.25),
                           ("gone", "z", "numpy", 1.0), "not a record"]}
    st.transition(("x", 0, 1), "memory", {"worker": "tcp://w:1", "metadata": meta})
    st.transition("w", "memory", {"worker": "tcp://w:1", "metadata": {"other": 1}})
    st.transition("v", "memory", None)
    assert st.status(plan_id="p") == {"known": True, "events": [], "failed": None}
    got = st.status(plan_id="p", records=True)["records"]
    assert len(got) == 2 and set(got) == {(("x", 0, 1), "tcp://w:1", "jax", 0.5),
                                          ("y", "tcp://w:1", "numpy", 0.25)}
    assert st.status(plan_id="p", records=True)["records"] == []
    assert st.status(plan_id="gone", records=True) == {
        "known": False, "events": [], "failed": None, "records": []}
    # a computation that failed or was interrupted never asks: its records go with
    # the last of its keys
    ps = st.plans["p"]
    ps.keys = {"a": 0, "b": 0}
    st.owner.update(a="p", b="p")
    st.transition("a", "memory", {"worker": "tcp://w:1", "metadata": {
        METADATA_KEY: [("p", "a", "numpy", 0.1)]}})
    st.transition("a", "forgotten")
    assert set(ps.records) == {"a"}  # "b" is still there
    st.transition("b", "forgotten")
    assert ps.records == {}


def test_a_task_computed_again_after_its_pool_was_rerouted_is_not_left_waiting():
    # data of a re-routed pool lost later: its task waits in no-worker with the gone
    # pool's restrictions; the plugin relaxes it as it did the others
    from jupyter_mesh.router._scheduler import PlanState, RouterState

    st = RouterState()
    st.scheduler, asked = _stub_scheduler({"tcp://c:1": "local"}, {"k1": "no-worker"})
    ps = PlanState("p", [("mesh-gpu-cupy", None, "gpu:cupy")], True, 1.0, None)
    ps.keys, ps.used, ps.relaxed = {"k1": 0}, {0}, {0}
    st.plans["p"] = ps
    st._revisit("p", "k1")
    assert st.scheduler.tasks["k1"].resource_restrictions is None
    assert asked == [{"k1": "processing"}]
    # and in a computation that failed, it fails too rather than wait
    ps.failed = "no live gpu:cupy worker for 1 s and fallback=False: ..."
    st.scheduler.tasks["k1"].state = "no-worker"
    st._revisit("p", "k1")
    assert st.scheduler.tasks["k1"].state == "erred"


def test_a_device_result_moved_to_another_worker_arrives_as_an_exact_host_array(tmp_path):
    # a routed task's result kept on its JAX worker for the next JAX op there; when a
    # fallback runs that op elsewhere (a NumPy worker, whose process has JAX's 64-bit
    # mode off) the result is pickled to it: it must arrive as float64 NumPy, exactly
    # (it arrived as float32 JAX, off by about 1e-8, before)
    import subprocess
    import sys

    a = np.random.default_rng(0).random((64, 64))
    np.save(tmp_path / "a.npy", a)
    on_jax_worker = f"""
import operator, pickle, numpy as np
from jupyter_mesh.router import _device
_device._local.device = ("cpu", "jax")  # as on a JAX worker
a = np.load({str(tmp_path / "a.npy")!r})
kept = _device.DeviceCall(operator.matmul, "k", "p", False, frozenset({{"jax"}}))(a, a)
assert type(kept) is _device.OnDevice and kept.backend == "jax", kept
# the next op of the same device gets the array itself
nxt = _device.DeviceCall(operator.add, "k2", "p", True, frozenset({{"jax"}}))(kept, 1.0)
assert type(nxt) is np.ndarray and nxt.dtype == np.float64
pickle.dump(kept, open({str(tmp_path / "kept.pkl")!r}, "wb"), protocol=5)
"""
    on_numpy_worker = f"""
import pickle, sys, numpy as np
x = pickle.load(open({str(tmp_path / "kept.pkl")!r}, "rb"))
print(type(x).__module__, type(x).__name__, x.dtype, "jax" in sys.modules)
np.save({str(tmp_path / "got.npy")!r}, x)
"""
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    subprocess.run([sys.executable, "-c", on_jax_worker], check=True, timeout=120,
                   env={**env, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"})
    out = subprocess.run([sys.executable, "-c", on_numpy_worker], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.stdout.split() == ["numpy", "ndarray", "float64", "False"], out.stderr
    np.testing.assert_allclose(np.load(tmp_path / "got.npy"), a @ a, rtol=1e-13)


@pytest.mark.parametrize("how", ["per task", "per layer"])
def test_a_reductions_per_chunk_step_is_sized_by_what_it_returns(how):
    # Dask builds a reduction's per-chunk layer with its input's chunks and shrinks the
    # reduced axes afterwards, so its annotations say 1000 x 1000 where each task returns
    # 1 x 1000: moving partial sums is cheap, and the random blocks before them are not
    from jupyter_mesh.router.layers import model_layers

    x = da.random.random((4000, 4000), chunks=1000)
    for y, step, block in ((x.sum(axis=0), "sum", (1, 1000)),
                           (x.max(axis=1), "chunk_max", (1000, 1)),
                           (x.sum(), "sum", (1, 1)), ((x + 1).mean(axis=0), "mean_chunk", None)):
        keys = list(dask.core.flatten(y.__dask_keys__()))
        m = (model_collections([y]) if how == "per task"
             else model_layers(y.__dask_graph__(), keys))
        by = {op.label: op for op in m.ops}
        assert by["random_sample"].out_bytes == 1000 * 1000 * 8
        if block is not None:
            assert by[step].out_bytes == math.prod(block) * 8
        else:  # mean's step returns a dict of two 1 x 1000 arrays: still no block
            assert by[step].out_bytes <= 2 * 1000 * 8
        assert by[step].in_bytes >= 1000 * 1000 * 8
    # a Generator's float64 blocks, cast to float32: culling renames their layer, and
    # under its new name it still has its own size, not that of its consumers
    g = da.random.default_rng(0).random((4000, 4000), chunks=1000).astype("float32")
    y = (g @ g.T).sum()
    keys = list(dask.core.flatten(y.__dask_keys__()))
    m = (model_collections([y]) if how == "per task"
         else model_layers(y.__dask_graph__(), keys))
    by = {op.label: op for op in m.ops}
    assert by["random"].out_bytes == 1000 * 1000 * 8
    assert by["astype"].out_bytes == 1000 * 1000 * 4


def test_a_ready_task_goes_into_an_idle_gap_of_its_worker():
    # eight blocks made on a 4-thread CPU (two rounds), each then through two GPU ops:
    # ranked op by op, the second op of the first round's blocks would wait behind the
    # first op of the second round's; a worker runs what is ready while it waits, and
    # the plan says so (HEFT's insertion policy)
    from jupyter_mesh.router import placement as P

    pools = build_pools([dev("c0", "cpu", "numpy", CPU, nthreads=4),
                         dev("g0", "gpu", "cupy", GPU)])
    cost = CostModel(pools)
    model = synthetic_model([
        {"name": "create", "op_class": "creation", "tasks": 8, "flops": 2e9,
         "out_bytes": 1e6, "native": ["numpy"]},
        {"name": "a", "op_class": "matmul", "tasks": 8, "flops": 4e10, "out_bytes": 1e6,
         "deps": [(0, "map")]},
        {"name": "b", "op_class": "matmul", "tasks": 8, "flops": 4e10, "out_bytes": 1e6,
         "deps": [(1, "map")]}])
    allowed, _ = P.allowed_pools(model, pools, "auto")
    exec_t = [[cost.exec_time(op, p) for p in pools] for op in model.ops]
    order = P._rank_order(model, exec_t, allowed, [1] * len(pools))
    args = (model, pools, cost, allowed, exec_t, order, P._pins(model))
    pool_of, start, finish, _ = P._list_schedule(*args)
    _, _, finish_plain, _ = P._list_schedule(*args, gaps_kept=0)
    second_round = min(start[i] for i in range(4, 8))  # the creates that wait
    a_late = min(start[8 + j] for j in range(4, 8))  # the GPU's first op on them
    # some of the first round's second ops run before the second round's first ops
    assert any(start[16 + j] < a_late for j in range(4)), start[16:]
    assert second_round > 0 and all(pool_of[i] == 1 for i in range(8, 24))
    # no two tasks on the GPU overlap
    spans = sorted((start[i], finish[i]) for i in range(8, 24))
    assert all(a[1] <= b[0] + 1e-12 for a, b in zip(spans, spans[1:], strict=False))
    assert max(finish) < max(finish_plain)
    # the planner keeps whichever schedule finishes first
    assert plan_model(model, pools, "auto", cost=cost).makespan <= max(finish) + 1e-12


def test_blocks_read_together_later_stay_on_one_worker():
    # ``x + x.T`` reads block (i, j) together with block (j, i). Earliest finish places
    # each block on its own, and one of them then moves between GPUs (64 MB here, 5 ms,
    # where each op takes a fraction of a millisecond); the plan keeps each pair on one
    # GPU, and the rewrite keeps them there (plan.kept), not on any GPU of the pool
    router_sim = pytest.importorskip("benchmarks.router_sim")
    devs = router_sim.modelled_mesh()
    pools = build_pools(devs)
    cost = CostModel(pools, router_sim.WAN, task_overhead=1e-4)
    x = da.random.default_rng(0).random((16000, 16000), chunks=4000).astype("float32")
    m = model_collections([((x + 1) * 2 - x.T).clip(0, 1).sum(axis=0)])
    plan = plan_model(m, pools, "auto", cost=cost)
    where = {k[1:]: plan.worker_of[i] for i, k in enumerate(m.keys)
             if m.ops[m.layer[i]].label == "astype"}
    assert len(where) == 16
    assert all(where[i, j] == where[j, i] for i, j in where)
    assert len(set(where.values())) == 4  # and the four GPUs share the work
    assert plan.makespan <= 1.05 * router_sim.lower_bound(m, devs)
    kept = set(plan.kept)
    assert {i for i, k in enumerate(m.keys) if m.ops[m.layer[i]].label == "astype"} <= kept
    assert all(len({plan.worker_of[i] for i in kept if m.keys[i][1:] in ((a, b), (b, a))}) == 1
               for a, b in where)


def test_a_plan_does_not_depend_on_the_hash_seed():
    # two kernels planning the same computation get the same plan: a layer's tasks and a
    # task's inputs come in an order that does not change with Python's hash seed (Dask
    # keeps both in sets); ties between equal workers are broken the same way
    import subprocess
    import sys

    script = (
        "import dask.array as da\n"
        "from jupyter_mesh.router import model_collections, plan_model, CostModel, "
        "build_pools\n"
        "from benchmarks.router_sim import modelled_mesh, WAN\n"
        "x = da.random.default_rng(0).random((8000, 8000), chunks=1000)\n"
        "y = da.linalg.svd(x.rechunk((1000, 2000))[:, :2000])[1]\n"
        "m = model_collections([y])\n"
        "pools = build_pools(modelled_mesh())\n"
        "cost = CostModel(pools, WAN, task_overhead=1e-4)\n"
        "print([str(k) for k in m.keys], m.deps, plan_model(m, pools, cost=cost).worker_of)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = {subprocess.run([sys.executable, "-c", script], cwd=root, check=True,
                           capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2", "3", "4")}
    assert len(outs) == 1 and "qr" in outs.pop()


@pytest.mark.parametrize("int_first", [True, False])
def test_an_ops_dtype_is_kept_when_collections_are_planned_together(int_first):
    # culling rebuilt the integer sum's aggregate without its dtype: JAX was planned
    # for it (the worker ran NumPy after all, and the row said cpu:jax)
    devs = [dev("c0", "cpu", "numpy", CPU), dev("j0", "cpu", "jax", CPU)]
    xi = da.arange(40, chunks=10, dtype="int32").sum()
    xf = da.arange(40, chunks=10, dtype="float64").sum()
    plan = plan_collections([xi, xf] if int_first else [xf, xi], devs, route="cpu:jax")
    m = plan.model
    for i, k in enumerate(m.keys):
        op = m.ops[m.layer[i]]
        if op.label == "sum-aggregate":
            want = "cpu:numpy" if op.dtype_kind == "i" else "cpu:jax"
            assert op.dtype_kind in ("i", "f")
            assert plan.pools[plan.pool_of[i]].target == want, (k, op.dtype_kind)
    assert sorted(m.ops[li].dtype_kind for li in range(len(m.ops))
                  if m.ops[li].label == "sum-aggregate") == ["f", "i"]


def test_a_forced_jax_route_names_a_function_it_has_no_translation_of():
    # a delayed call of Python's sum is a "reduction": the note said JAX does not run
    # reductions natively, which it does (np.sum)
    devs = [dev("c0", "cpu", "numpy", CPU), dev("j0", "cpu", "jax", CPU)]
    plan = plan_collections([dask.delayed(sum)([1.0, 2.0])], devs, route="cpu:jax")
    notes = " | ".join(plan.notes)
    assert "sum: cpu:jax does not run sum (no translation of it for its backend)" in notes
    assert "reduction ops natively" not in notes


def test_a_forced_jax_route_says_integer_data_is_why_an_op_went_to_numpy():
    devs = [dev("c0", "cpu", "numpy", CPU), dev("j0", "cpu", "jax", CPU)]
    x = da.arange(400, chunks=100)
    plan = plan_collections([(x + 1) * 2, da.ones(400, chunks=100) + 1], devs,
                            route="cpu:jax")
    notes = " | ".join(plan.notes)
    # (one note for the ops placed elsewhere for one reason)
    assert "add, mul: cpu:jax does not run elementwise ops on integer data natively" in notes
    # the float add runs on JAX: one note, for the integer one alone
    assert sum("add" in n.split(":")[0].split(", ") for n in plan.notes) == 1
    float_add = [k for k in plan.model.keys if k[0].startswith("add")
                 and plan.model.ops[plan.model.layer[plan.model.keys.index(k)]].dtype_kind
                 == "f"]
    assert float_add and {plan.assignment()[k] for k in float_add} == {"cpu:jax"}


def test_a_forced_route_on_a_mesh_without_workers_says_to_scale():
    # (a scheduler whose workers are all gone): no empty list of targets to use
    from types import SimpleNamespace

    from jupyter_mesh.inventory import Inventory
    from jupyter_mesh.router.api import _checked_route

    empty = SimpleNamespace(inventory=lambda: Inventory.from_records([], "tcp://x:1", None),
                            owns_cluster=True, address="tcp://x:1")
    with pytest.raises(MeshError, match=r"^no live cpu worker: the mesh has no workers now; "
                                        r"scale it up \(%mesh scale\) or use 'auto'"):
        _checked_route(empty, "cpu", True)
    # a mesh connected to cannot be scaled from here (mesh.scale refuses): a worker joins
    empty.owns_cluster = False
    with pytest.raises(MeshError, match=r"^no live cpu worker: the mesh has no workers now; "
                                        r"add one \(jupyter-mesh worker tcp://x:1 on a "
                                        r"machine of the mesh\) or use 'auto'"):
        _checked_route(empty, "cpu", True)


def test_headers_count_in_the_singular_for_one(mesh_devices):
    from jupyter_mesh.router.plan import Report

    one = plan_collections([da.ones(5, chunks=5)], mesh_devices)
    assert one.ntasks == 1 and "1 task in 1 op over" in repr(one)
    assert repr(Report(one, {}, 0.0)).startswith("Report (route=auto): 1 task, ")
    many = plan_collections([pipeline()], mesh_devices)
    assert f"{many.ntasks} tasks in {len(many.rows)} ops over" in repr(many)


def test_the_scheduler_names_a_pools_workers_in_words():
    # its log said "no live any worker at site other worker"
    from jupyter_mesh.router._scheduler import _workers_of

    assert _workers_of("cpu:jax") == "cpu:jax worker"
    assert _workers_of("cpu:jax@cloud") == "cpu:jax@cloud worker"
    assert _workers_of("any at lab") == "worker at site lab"
    assert _workers_of("any worker") == "worker"
    assert _workers_of("any worker at site lab") == "worker at site lab"
    assert _workers_of("gpu at site lab") == "gpu worker at site lab"


@pytest.mark.parametrize("per_layer", [False, True])
def test_unrestricted_ops_of_one_block_that_fan_out_and_meet_go_as_one_task(per_layer):
    # sin(x)**2 + cos(x)**2: Dask's Blockwise fusion runs each block's ops as one task;
    # a linear chain cannot hold them, and unfused each op went as a task of its own
    # (and the block of x often to a second worker, for the cosine)
    from jupyter_mesh.router.layers import rewrite_layers
    from jupyter_mesh.router.rewrite import rewrite

    devs = [dev("c0", "cpu", "numpy", CPU), dev("c1", "cpu", "numpy", CPU)]
    x = da.random.random((400, 400), chunks=100)
    y = (da.sin(x) ** 2 + da.cos(x) ** 2).sum(axis=0)
    with dask.config.set({"mesh.router.layer-plan-threshold": 1 if per_layer else 10**9}):
        plan = plan_collections([y], devs)
    assert plan.unrestricted
    routed = rewrite_layers(plan) if per_layer else rewrite(plan)
    groups = [g for g in routed.fused.values() if len(g) > 2]
    assert len(groups) == 16  # one per block
    for members in groups:
        assert sorted(k[0].rsplit("-", 1)[0] for k in members) == [
            "add", "cos", "pow", "pow", "random_sample", "sin", "sum"]
        assert {k[1:] for k in members} == {members[-1][1:]}  # one block's
        assert not any(k in routed.graph for k in members[:-1])
    # the 16 blocks' tasks and the reduction's aggregation (4 columns' sums)
    assert len(routed.graph) == 16 + 4
    values = dict(zip(routed.keys, dask.get(routed.graph, routed.keys), strict=True))
    finalize, extra = y.__dask_postcompute__()
    got = finalize([values[k] for k in dask.core.flatten(y.__dask_keys__())], *extra)
    np.testing.assert_allclose(got, y.compute(scheduler="sync"), rtol=1e-12)
    # with no linear chain in the graph at all (the sine and cosine of each block, then
    # their sum: every op is read twice or reads two), one task per block too; and where
    # the blocks are data the graph holds (from_array's), the ops on each block
    for z, data in ((da.sin(x) + da.cos(x), 0),
                    (da.sin(d := da.from_array(np.ones((400, 400)), chunks=100)) ** 2
                     + da.cos(d) ** 2, 16)):
        with dask.config.set({"mesh.router.layer-plan-threshold":
                              1 if per_layer else 10**9}):
            plan = plan_collections([z], devs)
        routed = rewrite_layers(plan) if per_layer else rewrite(plan)
        assert len(routed.graph) == 16 + data


def test_block_groups_leave_alone_what_others_read_or_blocks_that_differ():
    from jupyter_mesh.router.rewrite import block_groups

    def groups(keys, deps, outputs, fusable=None):
        return [[keys[i] for i in g] for g in block_groups(
            keys, deps, set(outputs), fusable or [True] * len(keys))]

    x, s, c, a = ("x", 0), ("s", 0), ("c", 0), ("a", 0)
    # the diamond: one group, its last the sum
    assert groups([x, s, c, a], [[], [0], [0], [1, 2]], [a]) == [[x, s, c, a]]
    # the sine is an output too: a group would hide it
    assert groups([x, s, c, a], [[], [0], [0], [1, 2]], [a, s]) == []
    # the block of x read by a task of another block (x + x.T): x stays its own
    t = ("t", 1)
    assert groups([x, s, c, a, t], [[], [0], [0], [1, 2], [0]], [a, t]) == []
    # ops of different blocks are never one group; nor are tasks Dask must not fuse
    y = ("y", 1)
    assert groups([x, y], [[], [0]], [y]) == []
    assert groups([x, s, c, a], [[], [0], [0], [1, 2]], [a], [True, True, False, True]
                  ) == []
    # two sources meeting (x + z of one block): the sum starts a group of its own
    z, m, q = ("z", 0), ("m", 0), ("q", 0)
    assert groups([x, z, m, q], [[], [], [0, 1], [2]], [q]) == [[m, q]]
    # keys that are not blocks (a delayed's) are left to the linear chains
    assert groups(["f", "g"], [[], [0]], ["g"]) == []
    # a 1-d sum's partial step reads blocks 0-3 and has block 0's index: it joins no
    # group (in block 0's, block 0's ops would wait for blocks 1-3)
    xs = [("x", i) for i in range(4)]
    ss = [("s", i) for i in range(4)]
    part = ("p", 0)
    assert groups(xs + ss + [part], [[], [], [], [], [0], [1], [2], [3], [4, 5, 6, 7]],
                  [part]) == [[("x", i), ("s", i)] for i in range(4)]
    # nor does a task that reads a block of another op made elsewhere (x(i) + y(i) of
    # two sources), or a block of another index (x(0, 1) + y(1), broadcast)
    b = ("b", 0, 1)
    assert groups([("x", 0, 1), ("y", 1), b], [[], [], [0, 1]], [b]) == []
    # a block the graph holds as data (not a task Dask fuses), or reads from outside
    # it (persisted): the ops that read nothing else group around it
    assert groups([x, s, c, a], [[], [0], [0], [1, 2]], [a], [False, True, True, True]
                  ) == [[s, c, a]]
    assert [[keys[i] for i in g] for g, keys in [(g, [s, c, a]) for g in block_groups(
        [s, c, a], [[], [], [0, 1]], {a}, [True] * 3, [[x], [x], []])]] == [[s, c, a]]
    # (one of another block's outside is no source of theirs)
    assert block_groups([s, c, a], [[], [], [0, 1]], {a}, [True] * 3,
                        [[("x", 1)], [("x", 1)], []]) == []


def test_a_forced_jax_route_names_dasks_own_functions_and_the_data_jax_is_off_for():
    # Dask's reductions call partials (mean_chunk) and Compose (topk's aggregate): the
    # notes said "reduction ops", and "Compose"; float16 data, integer input to a float
    # result and ordering complex numbers ran NumPy on the JAX worker, planned and
    # labelled cpu:jax with no note; from_array's blocks, which no task runs, had a
    # note of "movement ops"
    devs = [dev("c0", "cpu", "numpy", CPU), dev("j0", "cpu", "jax", CPU)]
    x = da.from_array(np.arange(36.0).reshape(6, 6), chunks=3)

    def planned(y):
        plan = plan_collections([y], devs, route="cpu:jax")
        where = {}
        for k, target in plan.assignment().items():
            label = plan.model.ops[plan.model.layer[plan.model.keys.index(k)]].label
            where.setdefault(label, set()).add(target)
        return " | ".join(plan.notes), where

    notes, where = planned(x.var())
    assert "var: cpu:jax does not run moment_chunk (no translation" in notes
    assert "reduction ops natively" not in notes and "movement ops" not in notes
    notes, _ = planned(da.topk(x.ravel(), 2))
    assert "does not run topk_aggregate (no translation" in notes
    assert "Compose" not in notes
    for y, data in [(x.astype("f2").sum(), "float16 data"),
                    (x.astype("i4") * 1.5, "integer data"),
                    ((x + 1j).max(), "complex data"),
                    # JAX takes the other side of a branch cut, or computes these less
                    # exactly: they ran NumPy on the JAX worker, planned cpu:jax
                    (da.sqrt(x + 1j), "complex data"), (da.expm1(x + 1j), "complex data"),
                    ((x + 1j) ** 1.5, "complex data")]:
        notes, where = planned(y)
        assert f"ops on {data} natively; placed on host NumPy" in notes, notes
        ops = [label for label in where if label not in ("array", "astype")]
        assert ops and all(where[label] == {"cpu:numpy"} for label in ops
                           if label not in ("add",)), where
    # what JAX computes as NumPy does stays on it
    _, where = planned((x * 1.5).sum())
    assert where["mul"] == {"cpu:jax"} and where["sum"] == {"cpu:jax"}


def test_a_layer_is_sampled_by_a_task_that_calls_something():
    # a cumulative sum's merge layer has aliases among its tasks; one sampled (which one,
    # the hash seed decided) made the layer seem to call nothing, JAX was planned for
    # its _cumsum_merge tasks, and they ran NumPy
    from dask._task_spec import Alias, Task, TaskRef

    from jupyter_mesh.router.classify import sample_node

    task = Task("b", np.cumsum, TaskRef("x"))
    assert sample_node([Alias("a", "x"), task]) is task
    assert isinstance(sample_node([Alias("a", "x")]), Alias)
    assert sample_node([]) is None
    devs = [dev("c0", "cpu", "numpy", CPU), dev("j0", "cpu", "jax", CPU)]
    y = da.from_array(np.arange(48.0).reshape(6, 8), chunks=(3, 4)).cumsum(axis=0)
    plan = plan_collections([y], devs, route="cpu:jax")
    assert {r["op"]: r["target"] for r in plan.rows}["cumsum"] == "cpu:numpy"


@pytest.mark.parametrize("value, said", [
    (5, "5 B"), (1023, "1023 B"), (1023.6, "1.0 KiB"), (1024, "1.0 KiB"),
    (1024 * 1024 - 1, "1.0 MiB"), (1.5 * 1024 ** 3, "1.5 GiB"),
])
def test_sizes_take_the_unit_of_the_number_as_written(value, said):
    # the unit was chosen before rounding: 1048575 B was "1024.0 KiB"
    assert format_bytes(value) == said


@pytest.mark.parametrize("value, said", [
    (2.0, "2.00 s"), (0.99996, "1.00 s"), (0.5, "500.0 ms"), (0.00099996, "1.0 ms"),
    (0.0009994, "999 µs"), (1e-7, "0 µs"), (float("nan"), "nan s"), (float("inf"), "inf s"),
])
def test_times_take_the_unit_of_the_number_as_written(value, said):
    from jupyter_mesh.router.plan import _secs

    assert _secs(value) == said


def test_the_equal_speeds_note_names_a_forced_route_only_where_it_runs_something():
    # a DataFrame's plan on a mesh with a JAX CPU worker said 'route="cpu:jax" runs
    # jax', where that route runs every op of it on NumPy
    import dask.dataframe as dd
    import pandas as pd

    j = dev("j0", "cpu", "jax", CPU, nthreads=2)
    j.extra = {"numpy_profile": CPU.to_dict()}
    devs = [dev("c0", "cpu", "numpy", CPU, nthreads=2), j]
    df = dd.from_pandas(pd.DataFrame({"k": np.arange(40) % 3, "x": np.arange(40.0)}),
                        npartitions=2)
    plan = plan_collections([df.groupby("k").x.sum()], devs)
    (note,) = [n for n in plan.notes if "equally fast" in n]
    assert "NumPy, which is no slower there)" in note and "route=" not in note
    # an array's, which JAX runs, names it
    x = da.ones((400, 400), chunks=200)
    plan = plan_collections([(x + 1).sum()], devs)
    (note,) = [n for n in plan.notes if "equally fast" in n]
    assert 'no slower there; route="cpu:jax" runs jax)' in note


def test_a_dtype_a_partial_asks_for_is_one_jax_must_compute_as_numpy(monkeypatch):
    # Dask's reductions put dtype= in a partial: with JAX's 64-bit mode off, a float32
    # block's sum(dtype=float64) and mean(dtype=float64) ran JAX, in float32
    from dask.array.reductions import mean_chunk

    block = np.array([1e8, 1.0, -1e8], dtype=np.float32)
    kw = {"axis": (0,), "keepdims": True}
    for func in (functools.partial(np.sum, dtype="float64"),
                 functools.partial(functools.partial(mean_chunk, dtype=np.float64))):
        monkeypatch.setattr(jax_ops, "_same_dtypes", lambda: jax_ops._SAME_DTYPES)
        assert jax_ops.same_numbers(func, (block,), kw)  # 64-bit mode on: JAX's
        monkeypatch.setattr(jax_ops, "_same_dtypes", lambda: jax_ops._SAME_DTYPES_32)
        assert not jax_ops.same_numbers(func, (block,), kw)
        assert jax_ops.same_numbers(functools.partial(np.sum, dtype="float32"), (block,), kw)


def test_a_delayed_calls_numpy_work_is_planned_where_it_runs():
    # delayed(np.sum)([1.0, 2.0]) was planned (and labelled) cpu:jax, and ran NumPy
    devs = [dev("c0", "cpu", "numpy", CPU), dev("j0", "cpu", "jax", CPU)]
    for value in (dask.delayed(np.sum)([1.0, 2.0]), dask.delayed(np.dot)([1., 2.], [3., 4.])):
        plan = plan_collections([value], devs, route="cpu:jax")
        assert {r["target"] for r in plan.rows} == {"cpu:numpy"}, plan
        assert any("data of no known array type" in n for n in plan.notes), plan.notes


def test_pins_that_cannot_be_kept_say_what_conflicts_and_what_to_do():
    # they said "array: no allowed worker at site 'edge', where its data is pinned"
    # (Dask's data node, and no word of the route that excluded the site), and named a
    # task by its key
    devs = [dev("c0", "cpu", "numpy", CPU, site="edge"), dev("j0", "cpu", "jax", CPU,
                                                            site="cloud")]
    a = da.from_array(np.arange(16.0).reshape(4, 4), chunks=2)
    b = da.from_array(np.ones((4, 4)), chunks=2)
    y = (a + b).sum()
    with pytest.raises(MeshError) as info:
        plan_collections([y], devs, pin={"cloud": a}, route="cpu:numpy")
    assert str(info.value) == (
        "the pinned data: the route (or site=) allows no worker at site 'cloud', where its "
        "data is pinned (pin=), and pinned data never leaves its site: compute with "
        "route='auto' or a target that site has, and no site= of another site")
    with pytest.raises(MeshError) as info:
        plan_collections([y], devs, pin={"edge": a, "cloud": b})
    assert str(info.value) == (
        "add reads data pinned to sites 'cloud' and 'edge', and pinned data never leaves "
        "its site, so no worker may read both: pin what it reads to one site, or leave "
        "one of them unpinned")


def test_array_work_in_layers_of_no_dtype_of_their_own_stays_on_jax():
    # Dask's tsqr builds layers with no dtype (dot-q3, r-inner): they were planned off
    # JAX as "data of no known array type (a DataFrame's, a delayed value's)"
    devs = [dev("c0", "cpu", "numpy", CPU), dev("j0", "cpu", "jax", CPU)]
    t = da.from_array(np.random.RandomState(0).random_sample((80, 10)), chunks=(20, 10))
    plan = plan_collections([da.linalg.svd(t)[0]], devs, route="cpu:jax")
    targets = {r["op"]: r["target"] for r in plan.rows}
    assert targets["dot-q3"] == "cpu:jax", targets
    assert not any("no known array type" in n for n in plan.notes), plan.notes


def test_an_item_of_a_linalg_result_is_planned_on_numpy_and_unneeded_layers_are_not():
    # getitem(qr_result, 0) takes Q of NumPy's (Q, R): it was planned and labelled
    # cpu:jax, and ran NumPy on the JAX worker; and an svd's singular values alone
    # counted the layer of Q (Dask's culling keeps a whole layer when it is asked for
    # as many keys as the layer has tasks), which the scheduler never ran
    devs = [dev("c0", "cpu", "numpy", CPU), dev("j0", "cpu", "jax", CPU)]
    t = da.from_array(np.random.RandomState(0).random_sample((40, 10)), chunks=(10, 10))
    q, r = da.linalg.qr(t)
    plan = plan_collections([q], devs, route="cpu:jax")
    targets = {row["op"]: row["target"] for row in plan.rows}
    for label in ("getitem-r1", "getitem-q1", "getitem-q2-aux"):
        assert targets[label] == "cpu:numpy", targets
    # (Q's blocks, sliced out of one array, stay on JAX)
    assert targets["getitem-q2"] == "cpu:jax" and targets["dot-q3"] == "cpu:jax"
    assert any("an item of a linalg op's results" in n and "getitem-q1" in n
               for n in plan.notes), plan.notes
    u, s, v = da.linalg.svd(t)
    plan = plan_collections([s], devs, route="cpu:jax")
    ops = [row["op"] for row in plan.rows]
    assert "getitem-q2-aux" not in ops and ops[-1] == "getitem-s2", ops
    assert sum(row["tasks"] for row in plan.rows) == len(plan.model.keys) == 17
    # asked for Q too, its layers are back
    plan = plan_collections([s, u], devs, route="cpu:jax")
    assert "getitem-q2-aux" in [row["op"] for row in plan.rows]


def test_a_long_op_name_is_cut_in_the_html_table_and_whole_on_hover(mesh_devices):
    # a layer named at length (name=) made the tables 2,000 px wide, the times off-screen
    from jupyter_mesh.router.plan import HTML_OP_MOST

    long = "stage_" + "x" * 200 + "<b>"
    y = da.ones((4, 4), chunks=2).map_blocks(lambda b: b + 1, name=long, dtype=float)
    plan = plan_collections([y], mesh_devices)
    shown = plan._repr_html_()
    label = next(r["op"] for r in plan.rows if r["op"].startswith("stage_"))
    assert len(label) > HTML_OP_MOST
    assert f">{label[:HTML_OP_MOST - 1]}…</td>" in shown.replace("&lt;", "<")
    assert "title='stage_" + "x" * 200 + "&lt;b&gt;" in shown
    assert "<b>" + "x" not in shown and label in repr(plan)  # the text repr keeps it whole


def test_jax_is_left_calls_it_would_answer_otherwise(monkeypatch):
    # found by a sweep of the op table against NumPy (64-bit mode on, as on a mesh's
    # JAX workers): each of these ran JAX and gave other numbers, types or no error
    import operator

    monkeypatch.setattr(jax_ops, "_same_dtypes", lambda: jax_ops._SAME_DTYPES)
    a = np.arange(12.0).reshape(3, 4)
    # JAX clamps an index out of bounds (x[10] gave the last row; NumPy raises)
    assert not jax_ops.same_numbers(operator.getitem, (a, 10), {})
    assert not jax_ops.same_numbers(operator.getitem, (a, (0, 7)), {})
    assert not jax_ops.same_numbers(operator.getitem, (a, (np.array([0, 5]), slice(None))), {})
    assert jax_ops.same_numbers(operator.getitem, (a, (slice(0, 2), Ellipsis, None)), {})
    # a NaN in a huge broadcast divisor hid it (x / [huge, nan] gave 0 for x / huge)
    big = np.finfo(np.float64).max
    assert not jax_ops.same_numbers(operator.truediv,
                                    (np.array([[big, 1.0], [3.0, 4.0]]), np.array([big, np.nan])),
                                    {})
    # a Python number made an array by NumPy's function beside a 32-bit array: float64
    # in NumPy, float32 on JAX
    x32 = np.ones((2, 2), np.float32)
    assert not jax_ops.same_numbers(np.dot, (x32, 2.0), {})
    assert jax_ops.same_numbers(np.dot, (np.ones((2, 2)), 2.0), {})  # (float64 either way)
    assert jax_ops.same_numbers(operator.mul, (x32, 2.0), {})  # (weak in both)
    # ulps off on ordinary numbers (log1p near -0.4, arctanh, sinh and cosh of large
    # arguments) and complex logarithms: NumPy's
    for f in (np.log1p, np.arctanh, np.sinh, np.cosh):
        assert not jax_ops.supported(f), f
    c = np.array([0.7554440855024736 + 0.16207847202493772j])
    for f in (np.log, np.log2, np.log10):
        assert not jax_ops.same_numbers(f, (c,), {}), f
        assert jax_ops.same_numbers(f, (c.real,), {}), f
