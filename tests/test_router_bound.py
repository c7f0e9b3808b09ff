"""The P2 benchmark's lower bound is a bound: no schedule the simulator can run beats it."""

from __future__ import annotations

import random

import pytest

from jupyter_mesh.router.cost import CostModel, build_pools

router_sim = pytest.importorskip("benchmarks.router_sim")


def _bound_and_placements(model, policies, memory=True):
    """The bound of ``model``, checked below the policies' schedules and one device's
    (not the ``dask`` policy's: it times NumPy on an accelerator worker as a host CPU
    thread, another model than the router's cost model, which the bound uses);
    returns what random placements need: (bound, devices, per-device pools, cost)."""
    devs = router_sim.modelled_mesh(memory=memory)
    bound = router_sim.lower_bound(model, devs)
    assert bound > 0
    for policy in policies:
        assert bound <= router_sim.simulate(model, devs, policy) * (1 + 1e-9)
    assert bound <= router_sim.one_device(model, devs) * (1 + 1e-9)
    solo = [build_pools([d])[0] for d in devs]
    return bound, devs, solo, CostModel(solo, router_sim.WAN, task_overhead=1e-4)


@pytest.mark.parametrize("seed", range(12))
def test_bound_below_every_simulated_schedule(seed):
    model = router_sim.random_dag(seed, n=14, width=4)
    bound, devs, solo, cost = _bound_and_placements(
        model, ("router", "router-pool", "heft"))
    # and below schedules with random placements (every task on a random worker, or
    # many joins forced onto one worker, where inputs queue behind each other)
    rng = random.Random(seed)
    for _ in range(30):
        k = rng.randrange(len(devs))
        cands = [[rng.randrange(len(devs))] if rng.random() < 0.5 else [k]
                 for _ in model.keys]
        assert bound <= router_sim._evaluate(model, solo, cost, cands) * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(10))
def test_bound_below_schedules_of_communication_heavy_dags(seed):
    # the HEFT-style DAGs where moving data costs as much as computing it or more:
    # there the bound also serializes every ancestor a task shares its worker with
    ccr = router_sim.HEFT_CCRS[seed % len(router_sim.HEFT_CCRS)]
    model = router_sim.heft_dag(seed, ccr, n=16, width=4)
    bound, devs, solo, cost = _bound_and_placements(model, ("router", "router-pool", "heft"),
                                                    memory=False)
    rng = random.Random(seed)
    for _ in range(30):
        # a few workers per schedule, neighbours often together (as good schedules do)
        ws = rng.sample(range(len(devs)), rng.randint(1, 3))
        cands = []
        for ds in model.deps:
            if ds and rng.random() < 0.7:
                cands.append(list(cands[rng.choice(ds)]))
            else:
                cands.append([rng.choice(ws)])
        assert bound <= router_sim._evaluate(model, solo, cost, cands) * (1 + 1e-9)


def test_planning_for_fusion_never_loses_to_planning_blind_to_it():
    # the planner charges a chain's next task on its input's worker no dispatch (Dask
    # fuses the two); greedy choices made that way can crowd a worker, so its variants
    # are planned blind and timed fused: on the simulator, which runs chains fused for
    # every policy, the plan is never worse than the plan made blind to fusion
    import dask
    import dask.array as da

    from jupyter_mesh.router import model_collections

    devs = router_sim.modelled_mesh()
    x = da.random.random((8000, 8000), chunks=2000).astype("float32")
    for coll in ((x @ x.T) @ x, ((x + 1) * 2 - x.T).clip(0, 1).sum(axis=0)):
        model = model_collections([coll])
        aware = router_sim.simulate(model, devs, "router")
        with dask.config.set({"optimization.fuse.active": False}):
            blind = router_sim.simulate(model, devs, "router")
        assert aware <= blind * (1 + 1e-9)


def _topological_orders(deps):
    """Every order of the tasks that puts each after its inputs."""
    n = len(deps)
    placed = [False] * n
    order: list[int] = []

    def extend():
        if len(order) == n:
            yield list(order)
            return
        for i in range(n):
            if not placed[i] and all(placed[d] for d in deps[i]):
                placed[i] = True
                order.append(i)
                yield from extend()
                order.pop()
                placed[i] = False

    yield from extend()


def _optimum(model, devs):
    """The least makespan of any schedule on ``devs``, by enumeration: every worker for
    every task and every order of starting them (each task as early as its worker and
    its inputs allow: for every schedule, its own start order run so is no later),
    with the simulator's rules (transfers between workers paid by their link, a chain's
    next task on its input's worker paying no dispatch)."""
    import itertools
    import math

    from jupyter_mesh.router.placement import allowed_pools, chain_links

    solo = [build_pools([d])[0] for d in devs]
    cost = CostModel(solo, router_sim.WAN, task_overhead=1e-4)
    allowed, _ = allowed_pools(model, solo, "auto")
    n, nw = len(model.keys), len(solo)
    ex = [[cost.exec_time(model.ops[model.layer[i]], p) for p in solo] for i in range(n)]
    out_b = [model.ops[model.layer[i]].out_bytes for i in range(n)]
    comm = [[[0.0 if q == w else cost.latency[q][w] + out_b[i] * cost.inv_bw[q][w]
              for w in range(nw)] for q in range(nw)] for i in range(n)]
    chain = chain_links(model, fusing=True)
    ov = cost.task_overhead
    orders = list(_topological_orders(model.deps))
    best = math.inf
    for where in itertools.product(*[allowed[model.layer[i]] for i in range(n)]):
        run = [ex[i][where[i]] - (min(ov, ex[i][where[i]])
                                  if chain[i] >= 0 and where[chain[i]] == where[i] else 0.0)
               for i in range(n)]
        for order in orders:
            free = [[0.0] * max(p.slots, 1) for p in solo]
            finish = [0.0] * n
            for i in order:
                w = where[i]
                ready = max((finish[d] + comm[d][where[d]][w] for d in model.deps[i]),
                            default=0.0)
                slot = min(range(len(free[w])), key=free[w].__getitem__)
                finish[i] = max(ready, free[w][slot]) + run[i]
                free[w][slot] = finish[i]
            best = min(best, max(finish))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_bound_below_the_optimum_of_tiny_dags(seed):
    # the bound against the true optimum, found by trying every schedule: two H100s and
    # a CPU node at one site and a TPU at the other, DAGs of 6 tasks at every CCR (where
    # moving data costs far more than computing it, the bound counts the tasks that must
    # share a worker, and comes close to the optimum)
    devs = [d for d in router_sim.modelled_mesh(memory=False)
            if d.name in ("cpu-a", "h100-0", "h100-1", "v5e-0")]
    ccr = router_sim.HEFT_CCRS[seed % len(router_sim.HEFT_CCRS)]
    model = router_sim.heft_dag(seed, ccr, n=6, width=3, devices=devs)
    bound = router_sim.lower_bound(model, devs)
    optimum = _optimum(model, devs)
    assert 0 < bound <= optimum * (1 + 1e-9)


def _without_late_groups(fn):
    saved = router_sim.LATE_OPS
    router_sim.LATE_OPS = 0
    try:
        return fn()
    finally:
        router_sim.LATE_OPS = saved


@pytest.mark.parametrize("seed", range(6))
def test_late_tasks_of_a_crowded_op_keep_the_bound_below_the_optimum(seed):
    # more blocks to make than the CPU has threads: the blocks of the last wave, and the
    # work after them, start late in every schedule (_late_groups); on graphs small
    # enough to try every schedule the bound stays below the optimum
    from dask.utils import format_bytes

    from jupyter_mesh.inventory import Device
    from jupyter_mesh.router.classify import synthetic_model

    rng = random.Random(seed)
    cpu = Device("sim://cpu", "cpu", "numpy", "CPU", 1 << 34, "site-a",
                 router_sim.HOST_THREAD, name="cpu", nthreads=rng.choice((1, 2)))
    devs = [cpu, next(d for d in router_sim.modelled_mesh() if d.name == "h100-0")]
    blocks = rng.choice((2, 3))
    size = rng.choice((1e6, 1e7, 4e7))
    layers = [{"name": "make", "op_class": "creation", "tasks": blocks, "flops": size / 4,
               "out_bytes": size, "native": ["numpy"]},
              {"name": "f", "op_class": "elementwise", "tasks": blocks, "flops": size / 8,
               "out_bytes": size, "deps": [(0, "map")]}]
    if blocks == 2:
        layers.append({"name": "g", "op_class": "matmul", "tasks": 2, "flops": size * 50,
                       "out_bytes": size, "deps": [(1, "map")]})
    layers.append({"name": "sum", "op_class": "reduction", "tasks": 1, "flops": size / 8,
                   "out_bytes": 8.0, "deps": [(len(layers) - 1, "all")]})
    model = synthetic_model(layers)
    bound = router_sim.lower_bound(model, devs)
    optimum = _optimum(model, devs)
    assert 0 < bound <= optimum * (1 + 1e-9), format_bytes(size)
    assert _without_late_groups(lambda: router_sim.lower_bound(model, devs)) <= bound


def test_late_tasks_of_a_crowded_op_raise_the_bound_below_every_schedule():
    # 64 blocks made on CPU threads (32 a node) before four GPUs run x + x.T on them:
    # half the blocks come a wave later, and so does the GPU work on them. The bound
    # counts that (higher than without it) and stays below every policy's schedule and
    # random placements that keep neighbours together
    import dask.array as da

    from jupyter_mesh.router import model_collections

    x = da.random.default_rng(0).random((8000, 8000), chunks=1000).astype("float32")
    model = model_collections([((x + 1) * 2 - x.T).clip(0, 1).sum(axis=0)])
    bound, devs, solo, cost = _bound_and_placements(
        model, ("router", "router-pool", "heft"))
    assert bound > 1.02 * _without_late_groups(lambda: router_sim.lower_bound(model, devs))
    rng = random.Random(0)
    gpus = [k for k, d in enumerate(devs) if d.kind == "gpu"]
    cpus = [k for k, d in enumerate(devs) if d.kind == "cpu"]
    for _ in range(20):
        cands = []
        for i, ds in enumerate(model.deps):
            if model.ops[model.layer[i]].op_class == "creation":
                cands.append([rng.choice(cpus)])
            elif ds and rng.random() < 0.7:
                src = cands[rng.choice(ds)]
                cands.append(src if src[0] in gpus else [rng.choice(gpus)])
            else:
                cands.append([rng.choice(gpus)])
        assert bound <= router_sim._evaluate(model, solo, cost, cands) * (1 + 1e-9)


@pytest.mark.parametrize("flops", [2e11, 5e11, 1e12])
def test_late_tasks_raise_the_bound_of_a_tiny_graph_toward_its_optimum(flops):
    # two blocks made one after the other on one CPU thread, each then read by two GPU
    # matmuls: the GPU runs both matmuls of the second block after it is made, which
    # neither the critical path (one matmul) nor the work per pool (all four, from the
    # first block on) sees; every schedule, tried one by one, takes at least the bound
    from jupyter_mesh.inventory import Device
    from jupyter_mesh.router.classify import synthetic_model

    cpu = Device("sim://cpu", "cpu", "numpy", "CPU", 1 << 34, "site-a",
                 router_sim.HOST_THREAD, name="cpu", nthreads=1)
    devs = [cpu, next(d for d in router_sim.modelled_mesh() if d.name == "h100-0")]
    model = synthetic_model([
        {"name": "make", "op_class": "creation", "tasks": 2, "flops": 1e9,
         "out_bytes": 1e6, "native": ["numpy"]},
        {"name": "f1", "op_class": "matmul", "tasks": 2, "flops": flops, "out_bytes": 1e6,
         "deps": [(0, "map")]},
        {"name": "f2", "op_class": "matmul", "tasks": 2, "flops": flops, "out_bytes": 1e6,
         "deps": [(0, "map")]},
        {"name": "sum", "op_class": "reduction", "tasks": 1, "flops": 1e3, "out_bytes": 8.0,
         "deps": [(1, "all"), (2, "all")]}])
    bound = router_sim.lower_bound(model, devs)
    without = _without_late_groups(lambda: router_sim.lower_bound(model, devs))
    assert without * 1.002 < bound <= _optimum(model, devs) * (1 + 1e-9)


def test_bound_below_schedules_on_a_pool_of_unlike_devices():
    # an H100 and a T4 make one CuPy pool, timed at their average: a schedule on the
    # H100 alone beats that, and the bound (device by device here) stays below it
    from jupyter_mesh.devices._profile import lookup_known
    from jupyter_mesh.inventory import Device
    from jupyter_mesh.router.classify import synthetic_model

    def gpu(name, model):
        profile = lookup_known(model)
        profile.method = "model"
        return Device(f"sim://{name}", "gpu", "cupy", model, 80 << 30, "site-a", profile,
                      name=name)

    cpu = Device("sim://cpu", "cpu", "numpy", "CPU", 1 << 34, "site-a",
                 router_sim.HOST_THREAD, name="cpu", nthreads=1)
    devs = [cpu, gpu("h100", "H100"), gpu("t4", "T4")]
    model = synthetic_model([
        {"name": "a", "op_class": "matmul", "tasks": 1, "flops": 1e12, "out_bytes": 1e6,
         "native": ["cupy"]},
        {"name": "b", "op_class": "matmul", "tasks": 1, "flops": 1e12, "out_bytes": 8.0,
         "native": ["cupy"], "deps": [(0, "map")]}])
    bound = router_sim.lower_bound(model, devs)
    assert 0 < bound <= min(router_sim.simulate(model, devs, p) for p in ("router", "heft"))


def test_late_groups_count_a_pool_that_runs_an_op_in_no_time():
    # a pool whose time for an op is 0 finishes any number of its tasks at once: none
    # is late (a cost model without dispatch and a profile without launch latency)
    from jupyter_mesh.devices._profile import Profile
    from jupyter_mesh.inventory import Device
    from jupyter_mesh.router.classify import synthetic_model

    free = Profile(flops32=7.5e10, flops64=3.75e10, mem_bandwidth=1.5e10,
                   launch_latency=0.0, method="model", source="test")
    cpu = Device("sim://cpu", "cpu", "numpy", "CPU", 1 << 34, "site-a", free, name="cpu",
                 nthreads=1)
    devs = [cpu, next(d for d in router_sim.modelled_mesh() if d.name == "h100-0")]
    model = synthetic_model([
        {"name": "g", "op_class": "elementwise", "tasks": 3, "flops": 0, "out_bytes": 8.0,
         "mem_bytes": 0.0, "native": ["numpy", "cupy"]},
        {"name": "h", "op_class": "elementwise", "tasks": 3, "flops": 0, "out_bytes": 8.0,
         "native": ["numpy"], "deps": [(0, "map")]}])
    cost = CostModel(build_pools(devs), router_sim.WAN, task_overhead=0.0)
    solo = [build_pools([d])[0] for d in devs]
    all_on_cpu = router_sim._evaluate(model, solo, CostModel(solo, router_sim.WAN,
                                                             task_overhead=0.0), [[0]] * 6)
    assert router_sim.lower_bound(model, devs, cost=cost) <= all_on_cpu * (1 + 1e-9)
