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
