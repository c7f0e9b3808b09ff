"""The P2 benchmark's lower bound is a bound: no schedule the simulator can run beats it."""

from __future__ import annotations

import random

import pytest

from jupyter_mesh.router.cost import CostModel, build_pools

router_sim = pytest.importorskip("benchmarks.router_sim")


def _bound_and_placements(model, policies):
    """The bound of ``model``, checked below the policies' schedules and one device's;
    returns what random placements need: (bound, devices, per-device pools, cost)."""
    devs = router_sim.modelled_mesh()
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
        model, ("router", "router-pool", "heft", "dask"))
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
    bound, devs, solo, cost = _bound_and_placements(model, ("router", "router-pool", "heft"))
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
    devs = [d for d in router_sim.modelled_mesh()
            if d.name in ("cpu-a", "h100-0", "h100-1", "v5e-0")]
    ccr = router_sim.HEFT_CCRS[seed % len(router_sim.HEFT_CCRS)]
    model = router_sim.heft_dag(seed, ccr, n=6, width=3, devices=devs)
    bound = router_sim.lower_bound(model, devs)
    optimum = _optimum(model, devs)
    assert 0 < bound <= optimum * (1 + 1e-9)
