"""Router benchmarks, one command::

    .venv/bin/python -m benchmarks.router            # prints the tables
    .venv/bin/python -m benchmarks.router --update   # and rewrites its section of
                                                     # benchmarks/RESULTS.md

* P1 placement, live EMULATION: a real mesh (2 NumPy workers, 1 JAX-on-CPU worker, one
  thread each); every task sleeps the modelled time of its (op, worker) pair: the JAX
  worker emulates an accelerator-like speed table (10x on matmul, 0.5x on small
  elementwise ops). It is a CPU and is labelled one. Router vs Dask default vs
  everything on the fastest worker vs a lower bound, measured side by side, at two task
  lengths (8-60 ms and 4x that: Dask's own per-task dispatch weighs less in the second).
* P2 placement, SIMULATED (benchmarks/router_sim.py): modelled 4xH100 + 1 CPU node at
  one site, 2xTPU v5e + 1 CPU node at another, 60 ms / 5 Gbps apart.
* P3 overhead: plan + rewrite vs Dask's own graph construction + optimization.
* P6 scale: planning 1e5 tasks over 1,000 modelled workers.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import itertools
import os
import platform
import statistics
import sys
import time
from typing import Any
from unittest import mock

from .emulation import emulate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

RESULTS = os.path.join(REPO, "benchmarks", "RESULTS.md")
BEGIN = "<!-- router:begin (written by benchmarks/router.py) -->"
END = "<!-- router:end -->"

# ---------------------------------------------------------------- P1: live emulation
#: seconds per task on a NumPy worker, and the factor on the accelerator-like worker
BASE = {"creation": 0.010, "matmul": 0.060, "elementwise": 0.008, "reduction": 0.010}
ACCEL = {"creation": None, "matmul": 0.1, "elementwise": 2.0, "reduction": 1.0}


def p1_workload():
    import uuid

    from jupyter_mesh.router.classify import synthetic_model

    n = 36
    L = [
        {"name": "create", "op_class": "creation", "tasks": n, "native": ["numpy"]},
        {"name": "matmul-a", "op_class": "matmul", "tasks": n, "deps": [(0, "map")]},
        {"name": "scale-a", "op_class": "elementwise", "tasks": n, "deps": [(1, "map")]},
        {"name": "matmul-b", "op_class": "matmul", "tasks": n, "deps": [(2, "map")]},
        {"name": "shift-b", "op_class": "elementwise", "tasks": n, "deps": [(3, "map")]},
        {"name": "clip-b", "op_class": "elementwise", "tasks": n, "deps": [(4, "map")]},
        {"name": "sum-chunk", "op_class": "reduction", "tasks": n, "deps": [(5, "map")]},
        {"name": "abs-c", "op_class": "elementwise", "tasks": n, "deps": [(6, "map")]},
        {"name": "sum-aggregate", "op_class": "reduction", "tasks": n // 4, "deps": [(7, 4)]},
    ]
    token = uuid.uuid4().hex
    for spec in L:
        spec.update(flops=1.0, out_bytes=32.0, name=f"{spec['name']}-{token}")
    return synthetic_model(L)


def _emulated_cost(pools, homogeneous: bool, overhead: float = 1e-3, scale: float = 1.0,
                   latency: float | None = None, dependency: float = 0.0,
                   interval: float = 0.0):

    from jupyter_mesh.router.cost import CostModel, Links

    class EmulatedCost(CostModel):
        def exec_time(self, op, pool):
            base = BASE[op.op_class] * scale
            if pool.backend == "jax" and not homogeneous and ACCEL[op.op_class]:
                return base * ACCEL[op.op_class] + overhead
            return base + overhead

    links = Links.from_config()
    if latency is not None:
        links = dataclasses.replace(links, network_latency=latency)
    cost = EmulatedCost(pools, links, task_overhead=overhead, dependency_latency=dependency)
    cost.task_interval = interval
    return cost


def _graph(model, homogeneous: bool, scale: float = 1.0):
    from dask._task_spec import Task, TaskRef

    tasks = {}
    for i, key in enumerate(model.keys):
        op = model.ops[model.layer[i]]
        accel = 1.0 if homogeneous or ACCEL[op.op_class] is None else ACCEL[op.op_class]
        tasks[key] = Task(key, emulate, BASE[op.op_class] * scale, accel,
                          *[TaskRef(model.keys[d]) for d in model.deps[i]])
    return tasks


def _dask_overhead(mesh, workers: int = 3, repeats: int = 3) -> float:
    """Seconds per task that Dask itself costs on this mesh, measured now: the same
    graph with every sleep at zero, run by Dask default (wall × workers / tasks)."""
    walls = []
    for _ in range(repeats):
        model = p1_workload()
        model.outputs = [model.keys[-k] for k in range(1, model.ops[-1].tasks + 1)]
        model.tasks = _graph(model, True, scale=0.0)
        t0 = time.perf_counter()
        mesh.client.get(model.tasks, model.outputs, sync=True)
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls) * workers / len(model.keys)


#: emulated task lengths: BASE as it is (8-60 ms tasks), and 4x as long (32-240 ms),
#: where Dask's own dispatch per task (1-3 ms on this machine) weighs less
P1_SCALES = ((1.0, 5), (4.0, 5))  # (scale, repeats)


def p1(scales=P1_SCALES) -> dict[str, Any]:
    import dask
    from dask._task_spec import fuse_linear_task_spec

    import jupyter_mesh as jm
    from jupyter_mesh.router import api
    from jupyter_mesh.router import rewrite as rewrite_mod
    from jupyter_mesh.router.cost import build_pools
    from jupyter_mesh.router.placement import plan_model
    from jupyter_mesh.router.rewrite import rewrite

    from .router_sim import lower_bound

    mesh = jm.Mesh.local(cpu=2, jax_cpu=1, gpu=0, tpu=0, threads_per_worker=1,
                         set_current=False)
    out: dict[str, Any] = {}
    when = _when()
    # no progress bars: Dask default shows none, and a bar (past mesh.progress-after)
    # costs scheduler work and waits for its last update at the end
    progress_off = dask.config.set({"mesh.progress-after": 3600})
    progress_off.__enter__()
    try:
        # the JAX worker emulates an accelerator: it runs its own backend's ops only
        # (a JAX CPU worker otherwise runs NumPy too where NumPy is faster)
        pools = [dataclasses.replace(p, numpy_profile=None, numpy_members=[])
                 for p in build_pools(mesh.inventory())]
        for (scale, repeats), homogeneous in [(sr, h) for sr in scales for h in (False, True)]:
            cost = _emulated_cost(pools, homogeneous, scale=scale)
            times: dict[str, list[float]] = {"router": [], "unbatched": [], "dask": [],
                                             "fastest": []}
            orders = list(itertools.permutations(times))

            def run(policy: str, homogeneous=homogeneous, scale=scale, cost=cost) -> float:
                # fresh keys every run: nothing may be reused from an earlier run
                model = p1_workload()
                model.outputs = [model.keys[-k] for k in range(1, model.ops[-1].tasks + 1)]
                model.tasks = _graph(model, homogeneous, scale)
                if policy == "dask":
                    # Dask's own linear fusion, as dask.array's optimization applies it
                    # (the router fuses the chains it runs on one worker too)
                    graph = fuse_linear_task_spec(model.tasks, model.outputs)
                    t0 = time.perf_counter()
                    mesh.client.get(graph, model.outputs, sync=True)
                    return time.perf_counter() - t0
                route = "cpu:jax" if policy == "fastest" else "auto"
                # "unbatched": the router as it was before it batched a worker's runs of
                # tasks (a batch needs two tasks at least)
                units = 1 if policy == "unbatched" else rewrite_mod.BATCH_UNITS
                with mock.patch.object(rewrite_mod, "BATCH_UNITS", units):
                    t0 = time.perf_counter()  # planning counts: a user waits for it too
                    plan = plan_model(model, pools, route, cost=cost)
                    api.run_plan(mesh, plan)
                    return time.perf_counter() - t0

            # one untimed round first: the first runs in a fresh mesh pay for imports
            # and first connections, and Dask has learned no task durations yet
            for policy in times:
                run(policy)
            # the router plans with Dask's costs as it measures them on the mesh (what
            # mesh.compute does with mesh.task-overhead and the link latency at auto)
            cal = mesh.calibrate()
            cost = _emulated_cost(pools, homogeneous, overhead=cal.task_overhead,
                                  scale=scale, latency=cal.network_latency,
                                  dependency=cal.dependency_latency,
                                  interval=cal.task_interval)
            for rep in range(repeats):
                # the order changes from run to run, so no policy always follows the
                # same other one (a run leaves Dask's learned task durations behind)
                for policy in orders[(rep * 7) % len(orders)]:
                    times[policy].append(run(policy, cost=cost))
            model = p1_workload()
            model.outputs = [model.keys[-k] for k in range(1, model.ops[-1].tasks + 1)]
            model.tasks = _graph(model, homogeneous, scale)
            med = {k: statistics.median(v) for k, v in times.items()}
            # the emulated sleeps alone: no execution, fused or not, takes less; every op
            # allowed on every worker (the router keeps NumPy's creation off the JAX
            # worker, but Dask default runs it there too; until 2026-11-30 the bound
            # kept it off as well, 0.4% higher)
            anywhere = copy.deepcopy(model)
            for op in anywhere.ops:
                op.native = frozenset({"numpy", "jax"})
            med["bound"] = lower_bound(anywhere, [], cost=_emulated_cost(
                pools, homogeneous, overhead=0.0, scale=scale))
            # the same bound with the per-task cost Dask itself has on this machine now
            # (measured in this run), in place of the 1 ms the emulation models
            h = _dask_overhead(mesh)
            med["overhead"] = h
            med["bound_measured"] = lower_bound(
                anywhere, [], cost=_emulated_cost(pools, homogeneous, overhead=max(h, 1e-3),
                                                  scale=scale), fused=False)
            plan = plan_model(model, pools, "auto", cost=cost)
            med["est"] = plan.makespan
            med["cal"] = cal
            med["when"] = when
            routed = rewrite(plan)
            med["submitted"] = len(routed.graph)
            med["submitted_unbatched"] = len(rewrite(plan, batch=False).graph)
            per_pool = collections.Counter(routed.restrictions.values())
            med["per_numpy_worker"] = max(
                (c / len(pools[p].workers) for p, c in per_pool.items()
                 if pools[p].backend == "numpy"), default=len(routed.graph) / 3)
            med["tasks"] = len(model.keys)
            med["scale"], med["repeats"] = scale, repeats
            out[("homogeneous" if homogeneous else "heterogeneous", scale)] = med
    finally:
        progress_off.__exit__(None, None, None)
        mesh.close()
    return out


# ---------------------------------------------------------------- estimates, live
#: fixed figures: what the cost model used before it measured Dask's costs
FIXED_COSTS = {"mesh.task-overhead": 1e-3, "mesh.links.network-latency": 2e-4,
               "mesh.dependency-latency": 0.0, "mesh.links.network-bandwidth": 1.25e9}


#: the meshes the live estimates run on: (NumPy workers, JAX CPU workers, sizes)
EST_MESHES = ((2, 1, (400, 2000, 4000)), (1, 1, (4000,)))


def estimates(meshes=EST_MESHES, repeats=3) -> list[dict[str, Any]]:
    """How close the router's estimate (``mesh.explain``'s makespan) comes to the wall
    time of the same routed computation, with Dask's costs measured on the mesh (the
    default) and with the fixed figures, side by side on one mesh; and plain Dask's
    wall time for the same collection beside them."""
    import dask
    import dask.array as da

    import jupyter_mesh as jm

    when = _when()
    out = []
    for cpu, jax_cpu, sizes in meshes:
        mesh = jm.Mesh.local(cpu=cpu, jax_cpu=jax_cpu, gpu=0, tpu=0, threads_per_worker=1,
                             set_current=False)
        rows = []
        speeds: list[tuple[float, float]] = []
        try:
            with dask.config.set({"mesh.progress-after": 3600}):
                cal = mesh.calibrate()
                for n in sizes:
                    x = da.random.random((n, n), chunks=n // 4)
                    y = ((x @ x.T) + 1).sum(axis=0)
                    mesh.compute(y)  # untimed: JAX compiles each op once per shape
                    mesh.client.compute(y, sync=True)
                    runs: dict[str, list[tuple[float, float]]] = {
                        "measured": [], "fixed": [], "plain": []}
                    #: the whole mesh.compute call, planning and the report included
                    calls: list[float] = []
                    orders = list(itertools.permutations(runs))
                    for rep in range(repeats):
                        for label in orders[(rep * 5) % len(orders)]:
                            if label == "plain":
                                t0 = time.perf_counter()
                                mesh.client.compute(y, sync=True)
                                runs[label].append((0.0, time.perf_counter() - t0))
                                continue
                            with dask.config.set(FIXED_COSTS if label == "fixed" else {}):
                                t0 = time.perf_counter()
                                mesh.compute(y)
                                if label == "measured":
                                    calls.append(time.perf_counter() - t0)
                            r = mesh.last_report
                            runs[label].append((r.plan.makespan, r.wall_seconds))
                    row: dict[str, Any] = {"n": n, "tasks": mesh.last_plan.ntasks,
                                           "targets": sorted({r["target"]
                                                              for r in mesh.last_plan.rows})}
                    for label, v in runs.items():
                        row[label] = (statistics.median(e for e, _ in v),
                                      statistics.median(w for _, w in v))
                    row["call"] = statistics.median(calls)
                    rows.append(row)
                # float64 matmul speed of the JAX worker with JAX and with NumPy, as the
                # router measured them (the profiles a plan's pools carry)
                speeds = [(p.profile.flops64, p.numpy_profile.flops64)
                          for p in mesh.last_plan.pools
                          if p.backend == "jax" and p.numpy_profile is not None]
        finally:
            mesh.close()
        out.append({"cal": cal, "rows": rows, "repeats": repeats, "when": when,
                    "cpu": cpu, "jax_cpu": jax_cpu, "speeds": speeds})
    return out


#: the large graph's side and block: ((x + 1) * 2).sum(axis=0) has 21,420 tasks, above
#: the default mesh.router.layer-plan-threshold (20,000)
LARGE = (700, 10)


def large(repeats: int = 3) -> dict[str, Any]:
    """A graph above the layer-plan threshold on a mesh of 2 NumPy workers, where the
    plan restricts nothing: routed (`auto`, planned per layer, its chains fused as Dask
    fuses them), routed with fusion off (as it ran before 2026-11-29: unfused) and plain
    Dask, taking turns, medians of ``repeats``."""
    import dask
    import dask.array as da

    import jupyter_mesh as jm

    when = _when()
    n, chunk = LARGE
    x = da.random.random((n, n), chunks=chunk)
    y = ((x + 1) * 2).sum(axis=0)
    runs: dict[str, list[float]] = {"routed": [], "routed, unfused": [], "plain": []}
    mesh = jm.Mesh.local(cpu=2, jax_cpu=0, gpu=0, tpu=0, threads_per_worker=1,
                         set_current=False)
    try:
        with dask.config.set({"mesh.progress-after": 3600}):
            mesh.calibrate()
            mesh.compute(y)  # untimed: first connections, the workers' imports
            orders = list(itertools.permutations(runs))
            for rep in range(repeats):
                for label in orders[(rep * 5) % len(orders)]:
                    t0 = time.perf_counter()
                    if label == "plain":
                        mesh.client.compute(y, sync=True)
                    else:
                        with dask.config.set({"optimization.fuse.active": label == "routed"}):
                            mesh.compute(y)
                        assert mesh.last_plan.unrestricted
                    runs[label].append(time.perf_counter() - t0)
            plan = mesh.last_plan
            tasks = plan.ntasks
            kind = type(plan).__name__
            mesh.compute(y)  # the fused one: how many tasks it submits
            submitted = tasks - sum(len(c) - 1 for c in mesh.last_report.fused.values())
            (optimized,) = dask.optimize(y)
            dask_tasks = len(dict(optimized.__dask_graph__()))
    finally:
        mesh.close()
    return {"when": when, "tasks": tasks, "plan": kind, "repeats": repeats,
            "submitted": submitted, "dask_tasks": dask_tasks,
            "median": {k: statistics.median(v) for k, v in runs.items()}, "runs": runs}


#: the fan-out workload's sizes (n, chunk): blocks of 2 MB (the ops' own work weighs
#: most) and of 80 kB (Dask's dispatch weighs most)
FANOUT = ((4000, 500), (1500, 100))


def fanout(repeats: int = 5) -> dict[str, Any]:
    """``(sin(x)**2 + cos(x)**2).sum(axis=0)`` on a mesh of 2 NumPy workers, where the
    plan restricts nothing: routed (one task per block for the ops that fan out and
    meet, as Dask's Blockwise fusion runs them), routed without those groups (as before
    2026-11-30: linear chains only) and plain Dask, taking turns, medians."""
    import dask
    import dask.array as da

    import jupyter_mesh as jm
    from jupyter_mesh.router import rewrite as rewrite_mod

    when = _when()
    out: dict[str, Any] = {"when": when, "repeats": repeats, "sizes": []}
    mesh = jm.Mesh.local(cpu=2, jax_cpu=0, gpu=0, tpu=0, threads_per_worker=1,
                         set_current=False)
    try:
        with dask.config.set({"mesh.progress-after": 3600}):
            mesh.calibrate()
            for n, chunk in FANOUT:
                x = da.random.random((n, n), chunks=chunk)
                y = (da.sin(x) ** 2 + da.cos(x) ** 2).sum(axis=0)
                runs: dict[str, list[float]] = {"routed": [], "routed, chains only": [],
                                                "plain": []}

                def run(label: str, y: Any = y) -> float:
                    t0 = time.perf_counter()
                    if label == "plain":
                        mesh.client.compute(y, sync=True)
                    elif label == "routed":
                        mesh.compute(y)
                    else:
                        with mock.patch.object(rewrite_mod, "block_groups",
                                               lambda *a, **k: []):
                            mesh.compute(y)
                    return time.perf_counter() - t0

                for label in runs:  # untimed: first runs of each
                    run(label)
                orders = list(itertools.permutations(runs))
                for rep in range(repeats):
                    for label in orders[(rep * 5) % len(orders)]:
                        runs[label].append(run(label))
                mesh.compute(y)
                assert mesh.last_plan.unrestricted
                fused = mesh.last_report.fused
                tasks = mesh.last_plan.ntasks
                (optimized,) = dask.optimize(y)
                out["sizes"].append({
                    "n": n, "chunk": chunk, "tasks": tasks,
                    "submitted": tasks - sum(len(c) - 1 for c in fused.values()),
                    "dask_tasks": len(dict(optimized.__dask_graph__())),
                    "median": {k: statistics.median(v) for k, v in runs.items()}})
    finally:
        mesh.close()
    return out


# ---------------------------------------------------------------- P2: simulation
#: the array graphs' sizes (n, chunk): those the planner was developed on, and sizes
#: added on 2026-11-30 that no change to the planner was ever tried on (a review found
#: the planner's ratios partly fitted to the first ones)
P2_SIZES = ((8000, 2000), (16000, 4000), (20000, 2500))
P2_HELD_OUT = ((12000, 3000), (8000, 1000))


def p2() -> dict[str, Any]:
    import dask.array as da

    from jupyter_mesh.router import model_collections

    from .router_sim import HEFT_CCRS, heft_dag, lower_bound, modelled_mesh, one_device, simulate

    devs = modelled_mesh()
    when = _when()
    instances = []
    for n, c in P2_SIZES + P2_HELD_OUT:
        # a seeded generator: the same names, so the same graph order, run after run
        x = da.random.default_rng(0).random((n, n), chunks=c).astype("float32")
        tag = " (held out)" if (n, c) in P2_HELD_OUT else ""
        instances += [
            (f"matmul chain {n}/{c}{tag}", (x @ x.T) @ x),
            (f"ETL {n}/{c}{tag}", ((x + 1) * 2 - x.T).clip(0, 1).sum(axis=0)),
            (f"fft pipeline {n}/{c}{tag}",
             abs(da.fft.fft(x.rechunk((c // 4, n)), axis=1)).sum(axis=1)),
            (f"svd {n}/{c}{tag}", da.linalg.svd(x.rechunk((c, n // 4))[:, : n // 4])[1]),
        ]
    rows = []
    for name, coll in instances:
        rows.append((name, model_collections([coll])))
    for seed in range(20):
        ccr = HEFT_CCRS[seed % len(HEFT_CCRS)]
        rows.append((f"random DAG #{seed}, CCR {ccr:g}", heft_dag(seed, ccr)))
    # the random DAGs' data volumes set their CCR; they are not what a task holds, so
    # no device's memory keeps a task off it there (the array graphs' blocks all fit)
    abstract = modelled_mesh(memory=False)
    results = []
    for name, model in rows:
        on = devs if model.tasks is not None else abstract
        r = {p: simulate(model, on, p) for p in ("router", "router-pool", "heft", "dask")}
        r["bound"] = lower_bound(model, on)
        r["one"] = one_device(model, on)
        r["name"], r["tasks"] = name, len(model.keys)
        results.append(r)
    return {"instances": results, "when": when}


# ---------------------------------------------------------------- P3 and P6
def p3(repeats: int = 3) -> list[dict[str, Any]]:
    """Each size: Dask's own figure, the per-task path and the per-layer path (the
    router takes the per-layer one above mesh.router.layer-plan-threshold); medians."""
    import dask.array as da
    from dask._task_spec import convert_legacy_graph
    from dask.base import collections_to_expr
    from dask.core import flatten

    from jupyter_mesh.inventory import Device
    from jupyter_mesh.router.classify import _collection_graph, model_graph, no_gc
    from jupyter_mesh.router.cost import CostModel, build_pools
    from jupyter_mesh.router.layers import (
        layer_plan_threshold,
        model_layers,
        plan_layers,
        rewrite_layers,
        submission,
    )
    from jupyter_mesh.router.placement import plan_model
    from jupyter_mesh.router.rewrite import rewrite
    from jupyter_mesh.router.rewrite import submission as task_submission

    from .router_sim import modelled_mesh

    devs: list[Device] = modelled_mesh(sites=1)
    pools = build_pools(devs)
    threshold = layer_plan_threshold()

    def build(blocks):
        x = da.random.random((blocks * 10, blocks * 10), chunks=10)
        return ((x + 1) * 2 - x.T).sum(axis=0)

    out = []
    for blocks in (12, 40, 126):  # about 1e3, 1e4, 1e5 tasks
        runs: list[dict[str, float]] = []
        for _ in range(repeats):
            r: dict[str, float] = {}
            t0 = time.perf_counter()
            y = build(blocks)
            tb = time.perf_counter()
            expr = collections_to_expr([y], True).optimize()
            dict(expr.__dask_graph__())
            r["dask"] = time.perf_counter() - t0
            r["build"] = tb - t0
            # (materialized on the client here; live, the scheduler materializes it)
            r["dask_tasks"] = len(expr.__dask_graph__())
            # what part of per-task modelling is Dask materializing the unfused graph
            # (the same expression built again: fresh layers, nothing cached)
            y2 = build(blocks)
            with no_gc():  # as the router's modelling runs it
                tm = time.perf_counter()
                g2 = y2.__dask_graph__().cull(set(flatten(y2.__dask_keys__())))
                for layer in g2.layers.values():
                    dict(layer)
                r["materialize"] = time.perf_counter() - tm
            # the per-task path, on its own fresh collection
            y3 = build(blocks)
            t2 = time.perf_counter()
            model = model_graph(*_collection_graph([y3]))
            t3 = time.perf_counter()
            plan = plan_model(model, pools, "auto", cost=CostModel(pools))
            t4 = time.perf_counter()
            routed_tasks = rewrite(plan)
            t5 = time.perf_counter()
            # what client.get receives, named (Dask names a plain dict by tokenizing
            # every task): the router's cost too, paid before anything is submitted
            _ = task_submission(routed_tasks)._name
            t5n = time.perf_counter()
            r.update(model=t3 - t2, plan=t4 - t3, rewrite=t5 - t4, name=t5n - t5,
                     tasks=len(model.keys))
            # the per-layer path, on its own fresh collection
            y4 = build(blocks)
            t6 = time.perf_counter()
            lmodel = model_layers(*_collection_graph([y4]))
            t7 = time.perf_counter()
            lplan = plan_layers(lmodel, pools, "auto", cost=CostModel(pools))
            t8 = time.perf_counter()
            routed = rewrite_layers(lplan)
            _ = submission(routed)._name
            t9 = time.perf_counter()
            # what the scheduler then does with it at submission (Dask's own code:
            # distributed's _materialize_graph on the culled expression), here in-process
            with no_gc():
                ts = time.perf_counter()
                sent = convert_legacy_graph(dict(submission(routed).__dask_graph__()))
                tsub = time.perf_counter() - ts
            r.update(lmodel=t7 - t6, lplan=t8 - t7, lrewrite=t9 - t8, submit=tsub,
                     layers=len(lmodel.ops), ltasks=lmodel.ntasks, sent=len(sent))
            runs.append(r)
        med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        med["tasks"] = int(runs[0]["tasks"])
        med["layers"] = int(runs[0]["layers"])
        med["per_layer"] = med["tasks"] > threshold
        med["threshold"] = threshold
        out.append(med)
    return out


def p6() -> dict[str, Any]:
    from jupyter_mesh.inventory import Device
    from jupyter_mesh.router.classify import synthetic_model
    from jupyter_mesh.router.cost import CostModel, build_pools
    from jupyter_mesh.router.placement import plan_model

    from .router_sim import CPU_NODE, _model

    devs = []
    for i in range(1000):
        site = "site-a" if i % 2 else "site-b"
        if i < 700:
            devs.append(Device(f"sim://c{i}", "cpu", "numpy", "cpu", 1 << 36, site, CPU_NODE,
                               nthreads=8))
        elif i < 950:
            devs.append(Device(f"sim://g{i}", "gpu", "cupy", "H100", 80 << 30, site,
                               _model("H100")))
        else:
            devs.append(Device(f"sim://t{i}", "tpu", "jax", "TPU v5e", 16 << 30, site,
                               _model("TPU v5e")))
    n = 20000
    layers = [
        {"name": "load", "op_class": "creation", "tasks": n, "flops": 1e7, "out_bytes": 4e6},
        {"name": "matmul", "op_class": "matmul", "tasks": n, "flops": 2e10, "out_bytes": 4e6,
         "deps": [(0, "map")]},
        {"name": "add", "op_class": "elementwise", "tasks": n, "flops": 1e6, "out_bytes": 4e6,
         "deps": [(1, "map")]},
        {"name": "fft", "op_class": "fft", "tasks": n, "flops": 1e8, "out_bytes": 8e6,
         "deps": [(2, "map")]},
        {"name": "sum", "op_class": "reduction", "tasks": n, "flops": 1e6, "out_bytes": 8,
         "deps": [(3, "map")]},
    ]
    model = synthetic_model(layers)
    pools = build_pools(devs)
    cost = CostModel(pools)
    when = _when()
    t0 = time.perf_counter()
    plan = plan_model(model, pools, "auto", cost=cost)
    took = time.perf_counter() - t0
    return {"tasks": len(model.keys), "workers": len(devs), "pools": len(pools),
            "seconds": took, "makespan": plan.makespan, "when": when}


# ---------------------------------------------------------------- report
def _cores() -> int:
    from dask.system import CPU_COUNT

    return CPU_COUNT


def _when() -> str:
    """When a part starts, and the machine's load then (it is shared)."""
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
            f"{os.getloadavg()[0]:.1f}")


def _yes(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def report(r1, r2, r3, r6, r7=None, r8=None, r9=None) -> str:
    lines = ["## Router (issue 3)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other "
             f"engineers' work, Python {platform.python_version()}. Each part says when it "
             f"ran and the machine's load then (`--only` runs some parts again and keeps "
             f"the others as they were); this section last written "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             ""]
    if r1:
        scales = sorted({k[1] for k in r1})
        het1 = r1[("heterogeneous", scales[0])]
        lines += ["### P1 placement, live EMULATION", "",
                  "A real mesh of 2 NumPy workers and 1 JAX (CPU backend) worker, one thread "
                  "each; each task sleeps its modelled time for its (op, worker) pair. The JAX "
                  "worker *emulates* an accelerator-like speed table (10x on matmul, 0.5x on "
                  "small elementwise ops); it is a CPU and is labelled one. The same 297-task "
                  "workload at two task lengths: *scale 1* = NumPy-worker tasks of 8-60 ms "
                  "(creation 10, matmul 60, elementwise 8, reduction 10 ms), *scale 4* = the "
                  "same four times as long (32-240 ms). Median of the runs shown, after one "
                  "untimed round of each policy (the first runs in a fresh mesh pay for "
                  "imports and first connections, up to 1.5x as long), wall "
                  "seconds (the router's and all-on-fastest's include planning and the report), "
                  "the policies taking turns in an order that changes from run to run "
                  "(Dask learns task durations per key prefix, so a run leaves estimates "
                  "behind for the next), so load from elsewhere and what a run leaves behind "
                  "hit them alike; progress bars off for every policy "
                  "(Dask default shows none). *Dask default* = Dask's own scheduling of the "
                  "graph after Dask's own linear fusion (`fuse_linear_task_spec`, which "
                  "dask.array's optimization applies; here it makes each 8-task chain one "
                  "task). The emulated task is a function of its own module "
                  "(benchmarks/emulation.py), so tasks refer to it by name, as they do to "
                  "dask.array's functions; until 2026-11-28 it was defined in the script "
                  "run as `__main__`, so every task carried its code pickled by value and "
                  "each worker unpickled it again for each task, which slowed every policy "
                  "(the router, which dispatches the most tasks, most) and put Dask's "
                  "measured per-task cost at 15-19 ms. The router, likewise, submits each linear chain that its plan runs "
                  "on one worker as one task (never a chain across two targets), and its "
                  "planner charges a chain's next task on the same worker no dispatch of "
                  "its own; since 2026-11-30 it also submits a run of tasks that its plan "
                  "puts one after another on one worker as one *batch* task, where that "
                  "delays nothing the plan counts on with a few of Dask's round trips to "
                  f"spare (`rewrite.worker_batches`): at scale 1 it dispatches "
                  f"{het1['submitted']} of the {het1['tasks']} tasks "
                  f"({het1['submitted_unbatched']} without batches). *Router, unbatched* = "
                  "the same plans submitted without batches, as before, side by side. A first "
                  "version batched tasks of any length, and at scale 4 (32-240 ms tasks) "
                  "took 3.95 s against 3.48 s unbatched (medians of 5, taking turns): a "
                  "batch waits for all its inputs and hands its results over at its end, "
                  "and live runs drift from their plans; so only tasks of at most a few of "
                  "Dask's round trips are batched (`rewrite.BATCH_SHORT`), where the "
                  "dispatch saved is worth it. "
                  "*Lower bound* = max(critical path, LP "
                  "relaxation of the work per pool; P2's bound below, whose other parts add "
                  "nothing here) with the emulated sleeps alone, every op allowed on every "
                  "worker (Dask default runs NumPy's creation on the JAX worker too, which "
                  "the router does not; until 2026-11-30 the bound kept it off there as "
                  "well, 0.4% higher, as a review found): no "
                  "execution, fused or not, takes less (earlier versions of this table added "
                  "the 1 ms per task the planner models, a bound only while every task is "
                  "dispatched on its own). *With Dask's cost* = the same figure with the "
                  "per-task cost Dask itself has on this machine added to every task, measured "
                  "in this run (the same unfused graph with zero sleeps under Dask default, "
                  "wall x workers / tasks); a throughput, not a floor, so an estimate of what "
                  "this machine allows when no task is fused. *Plan est.* = the router's own "
                  "estimate of its makespan: the emulated times plus Dask's own costs as "
                  "the router measured them on this mesh after the untimed round "
                  "(`mesh.calibrate()`, as `mesh.compute` does with `mesh.task-overhead`, "
                  "`mesh.dependency-latency` and `mesh.links.network-latency` at `auto`; "
                  f"at scale 1: {het1['cal'].task_overhead * 1e3:.1f} ms of a worker's time "
                  f"per task, {het1['cal'].dependency_latency * 1e3:.1f} ms from a task's "
                  "end to the start of one waiting for it, "
                  + (f"{het1['cal'].network_latency * 1e3:.1f} ms"
                     if het1['cal'].network_latency is not None else "no figure")
                  + " more per transfer between workers); the planner trades splitting a "
                  "chain across workers against these. Until 2026-11-29 the cost model charged "
                  "Dask's dispatch, measured with chains of no-op tasks on every worker at once "
                  "(5-10 ms here), as time each task took from its worker, and had no wait for a "
                  "dependency: it kept chains on slow devices to save dispatch the workers do not "
                  "in fact spend while their tasks leave the CPU free (scale 1 then: 2.08x the "
                  "bound, 1.21x faster than Dask; scale 4: 1.22x, 1.87x). What is left "
                  "above the bound at scale 1 is mostly Dask's own cost per dispatched task "
                  f"(with {het1['per_numpy_worker']:.0f} tasks per "
                  "NumPy worker after fusion) and "
                  "the submission before the first task; it does not grow with task length, "
                  "so at scale 4 it weighs a quarter as much: the targets are "
                  "judged at both scales below. That cost grows with load from elsewhere "
                  "on these 2 shared cores and varies from run to run: the run of "
                  "2026-11-29 12:04 UTC (load average 0.4 at its start, other sessions' "
                  "work starting during it) measured Dask's per-task cost at 8.5 ms and "
                  "gave 1.64 s at scale 1 (2.04x the bound, 1.23x faster than Dask default) "
                  "and 3.74 s at scale 4 (1.17x, 1.94x); that of 15:24 (load average 0.2, "
                  "4.1 ms) 1.05 s (1.31x, 1.79x) and 3.46 s (1.08x, 2.07x). Since that run "
                  "the planner fills a worker's idle gaps and keeps blocks that meet again "
                  "on one worker (P2 below); side by side on one mesh (scale 1, medians of "
                  "6 runs each, taking turns), plans with and without those took 1.05-1.08 s "
                  "alike. This part run "
                  f"{het1['when']}.", "",
                  "| workers | scale | runs | tasks (router submits) | router | router, unbatched "
                  "| Dask default | all on fastest | "
                  "plan est. | lower bound | with Dask's cost (estimate) | router / bound | "
                  "Dask / router |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for (k, scale), m in r1.items():
            lines.append(
                f"| {k} | {scale:g} | {m['repeats']} | {m['tasks']} ({m['submitted']}) | "
                f"{m['router']:.2f} s | {m['unbatched']:.2f} s | "
                f"{m['dask']:.2f} s | {m['fastest']:.2f} s | {m['est']:.2f} s | "
                f"{m['bound']:.2f} s | {m['bound_measured']:.2f} s | "
                f"{m['router'] / m['bound']:.2f}x | {m['dask'] / m['router']:.2f}x |")
        lines.append("")
        for scale in scales:
            het, hom = r1[("heterogeneous", scale)], r1[("homogeneous", scale)]
            lines += [
                f"- Scale {scale:g}, target router <= 1.15x the lower bound: "
                f"{het['router'] / het['bound']:.2f}x {_yes(het['router'] / het['bound'] <= 1.15)} "
                f"(the plan's own estimate is {het['est'] / het['bound']:.2f}x the bound; the "
                f"router takes {het['router'] / het['bound_measured']:.2f}x the estimate with "
                f"Dask's measured per-task cost, {het['overhead'] * 1e3:.1f} ms, on every "
                "task).",
                f"- Scale {scale:g}, target >= 1.6x faster than Dask default: "
                f"{het['dask'] / het['router']:.2f}x {_yes(het['dask'] / het['router'] >= 1.6)} "
                f"(the emulated speeds allow {het['dask'] / het['bound']:.2f}x at most: Dask "
                "default / lower bound).",
                f"- Scale {scale:g}, target homogeneous no worse than 1.05x Dask default: "
                f"{hom['router'] / hom['dask']:.2f}x {_yes(hom['router'] / hom['dask'] <= 1.05)} "
                "(every pool runs every op equally fast there, so the router restricts "
                "nothing and Dask places the tasks)."]
        lines.append("")
    if r2:
        inst = r2["instances"]
        lines += ["### P2 placement, SIMULATED", "",
                  "**This is a simulation** (benchmarks/router_sim.py): modelled 4xH100 and a "
                  "32-core CPU node at site A, 2xTPU v5e and a CPU node at site B (each CPU "
                  "node one Dask worker of 32 threads, each thread a core with a 32nd of the "
                  "node's memory bandwidth, as Dask's nanny runs BLAS on one thread per "
                  "worker thread; an earlier version of this table gave every thread the "
                  "whole node's speed, 32 times too much), 60 ms and "
                  "5 Gbps apart; durations and transfers from the router's cost model; every "
                  "transfer between two distinct workers is paid (inside a pool too); as "
                  "Dask fuses a linear chain that one worker runs into one task, a chain's "
                  "next task on its input's worker pays no dispatch of its own (0.1 ms here), "
                  "under every policy, and the bound allows for it. "
                  "`router` = the router's worker-level plan; `router (pools)` = what runs live: "
                  "each task restricted to the planned pool (narrowed to the workers of it the "
                  "plan uses, where it leaves some idle on purpose), the worker inside it chosen "
                  "at run time (earliest finish, as Dask balances restricted tasks), except "
                  "the tasks the plan keeps together (below), which stay on their planned "
                  "worker, as live (`plan.kept`, since 2026-11-29); both take "
                  "ready tasks in the plan's start order, the priorities the scheduler plugin "
                  "gives them live; `HEFT` = "
                  "classic HEFT over the individual workers (with its insertion policy: a "
                  "task may go into an idle gap a worker left earlier; until 2026-11-29 "
                  "without it), its upward rank the paper's: a task's mean time over its "
                  "allowed workers plus the largest of its consumers' ranks with the mean "
                  "cost of sending its output (until 2026-11-30 the rank left out that "
                  "communication, as a review found; the array graphs' makespans did not "
                  "change with it, and on the random DAGs HEFT got faster on some and "
                  "slower on others); `dask` = no routing (NumPy "
                  "everywhere, earliest start); `1 device` = everything on the single best "
                  "device, serially (no transfers), an achievable reference. The planner's "
                  "earliest finish lets a task go into an idle gap that a worker's thread "
                  "has while it waits for an earlier task's inputs (HEFT's insertion policy, "
                  "since 2026-11-29: ranked op by op, the next op's ready tasks otherwise "
                  "waited behind the last of the previous op's; the fft pipeline 20000/2500 "
                  "went from 1.36x to 1.21x the bound of then). It "
                  "compares several schedules of its own (plain earliest finish, counting the "
                  "dispatch a fused chain saves; the others planned blind to fusion and "
                  "timed as they run, fused: the same without going into gaps; the tasks "
                  "joined by edges whose data takes longer to move between two workers than "
                  "its consumer takes to run kept on one worker, each group at most its "
                  "pool's share per worker of the work (since 2026-11-29: `x + x.T` reads "
                  "block (i, j) with block (j, i), and placing each block alone moved one "
                  "of them between GPUs later; ETL 16000/4000 went from 1.14x to 1.01x); "
                  "planning as if "
                  "links were 3, 10 or 30 times slower, replayed with the true links; "
                  "everything on one worker; each op kept off pools far slower for it; each "
                  "pool or site alone; a short seeded search over jittered priorities and "
                  "pool filters, bounded by tasks x pools, that stops after 24 schedules "
                  "in a row found nothing better, or once its schedules would have taken "
                  "more than 2% of the best makespan found to make (planning is time a "
                  "user waits too; since 2026-11-29: a computation of a few tens of "
                  "milliseconds, like the random DAGs here, gets no search)) and keeps the "
                  "one that finishes first, so it is never worse than one worker running "
                  "it all. The sizes marked *held out* (12000/3000 and 8000/1000) were "
                  "added on 2026-11-30, after a review found the planner's ratios partly "
                  "fitted to the first three sizes, on which its changes had been tried; "
                  "no change to the planner was tried on them. "
                  "The array graphs come from a seeded generator, and the model puts "
                  "a layer's tasks in key order and a task's inputs in index order (Dask "
                  "holds both in sets, whose order changes with the hash seed): the same "
                  "plan in every run and every process (before 2026-11-29 these ratios moved "
                  "by up to 10% from run to run). Since 2026-11-29 the model also sizes a "
                  "reduction's per-chunk step by what it returns (Dask annotates it with "
                  "its input's chunks: partial sums counted 25 MB each here instead of "
                  "10 kB) and a Generator's float64 blocks by their own size (culling "
                  "renamed their layer, and they took their consumer's float32 size; the "
                  "svd graphs' QR layers, renamed the same way, took 8 bytes, so every "
                  "policy ran svd in almost no time and all showed 1.00x). "
                  "Before that evening's changes (insertion, the kept groups, these sizes, "
                  "the bound's part (E) below) the median was 1.27x the bound (router) and "
                  "1.28x (pools).", "",
                  "*Random DAGs* are the HEFT paper's (Topcuoglu et al. 2002): random layered "
                  "graphs of 200 tasks (array ops of random sizes) with a set "
                  "communication-to-computation ratio (CCR 0.1, 0.5, 1, 5, 10, four graphs "
                  "each): a task's output takes CCR times its mean computation time over the "
                  "eight devices to cross the same-site network, the WAN's 60 ms on top. (An "
                  "earlier version of this table used random DAGs whose block sizes alone set "
                  "the data volume, a CCR far above 10; the HEFT set replaces them and covers "
                  "that end with CCR 5 and 10.) Their data volumes set the CCR and are not what "
                  "a task holds (up to 220 GiB at CCR 10), so these graphs are planned with no "
                  "device memory modelled; the array graphs are planned with it (80 GiB per "
                  "H100, 16 GiB per TPU v5e, since 2026-11-29 the router keeps a task off a "
                  "device its inputs and output do not fit in), and all their blocks fit. "
                  "The paper's mean over devices is over a mesh "
                  "far more uneven than the paper's: a CPU thread runs these ops 30-100 times "
                  "slower than an accelerator, so the mean is mostly the CPUs' time and even "
                  "at CCR 0.1 a transfer takes several times an accelerator's task: on this "
                  "mesh the random DAGs are communication-bound, and the router's best "
                  "schedule for most of them is one device running it all. Its planner builds "
                  "greedy list schedules and does not search far: a local search over each "
                  "task's worker, run once by hand for 20 s on each of DAGs #0-4 (about "
                  "100,000 schedules each), found schedules 2-30% shorter than the router's "
                  "(16, 30, 11, 2, 2%); one guided by the critical path, 400 schedules "
                  "(about 0.06 s), gained a median 2% on DAGs #0-9. These DAGs' makespans "
                  "are 30-60 ms and planning one already takes 50-90 ms: searching longer "
                  "would cost a user more than it saves here, so the planner does not.", "",
                  "**The bound** is valid for any schedule that times each task by the "
                  "router's cost model on a pool that may run its op (tests/test_router_bound.py "
                  "checks it stays below the router's, HEFT's and random placements on small "
                  "random DAGs, and below the optimum of tiny ones; the `dask` policy times "
                  "NumPy on an accelerator worker as a host CPU thread, another model, which "
                  "it does not cover): "
                  "the largest of (A) the critical path with each task at its fastest allowed "
                  "device and no contention, where an input either ran on the same worker as "
                  "its consumer (no transfer, but it used that worker) or crossed a link, plus "
                  "the least time from each task to the end (its consumers, and theirs); (B) "
                  "an LP relaxation with release and delivery times: per pool, the work of the "
                  "ops that cannot start before a and leave at least b after them fits in the "
                  "pool's slots within [a, T - b] (a = b = 0: total work over capacity), the "
                  "least feasible T found by bisection; and, on connected graphs over two "
                  "sites, (C) the least of: the shortest path that sends an input across sites, "
                  "and (A, B) over one site's pools alone, since any schedule either crosses "
                  "or stays at one site; and (D) the tasks that must share a worker: if an "
                  "ancestor a of task i ran on another worker than i, i starts no earlier than "
                  "a's output (or that of a task after it) crossing a link and passing the "
                  "tasks after it, so where that start plus i's own time and least tail "
                  "exceeds T, a ran on i's worker in every schedule of makespan T; the tasks "
                  "so linked ran on one worker, which must fit their work and their paths "
                  "within T; the least T at which every such group fits, found by bisection "
                  "(`_together_bound`, since 2026-11-29: before it the router was 1.9-2.8x "
                  "the bound on the random DAGs at CCR 5 and 10; the search for such a T "
                  "starts from the LP's bound and from the critical path's); and, inside "
                  "(B), (E) the tasks an op with more tasks than slots holds back: fewer "
                  "than N(c) of its tasks finish before c (each pool's slots, from the "
                  "least release of its tasks there, one task after another), so at least "
                  "m - N(c) of them finish at c or later, and so do the tasks after them; "
                  "a later task is early only if all its ancestors in that op are, so at "
                  "least (its op's tasks after the crowded op) less the N(c) largest shares "
                  "of them per ancestor start at c or later (plus the least chain between), "
                  "and the LP fits their work in [c, T - b] (`_late_groups`, since "
                  "2026-11-29: the 64 random blocks of the 20000/2500 graphs take two waves "
                  "of the 32 CPU threads at site A, and the GPU work on the second wave's "
                  "blocks comes after it; ETL went from 1.17x to 1.09x the bound, fft from "
                  "1.21x to 1.14x). In (A) a task's start also "
                  "looks at all its ancestors (the latest 400), not only its inputs: those "
                  "that ran on its worker ran there one after another, and from any other one "
                  "the data crossed a link and then passed the chain of tasks after it (the "
                  "argument is in `_deep_heads`). It charges no contention on links, so it is "
                  "tight where compute dominates (ETL, svd) and close where moving data costs far "
                  "more than computing it (the random DAGs at CCR 5 and 10, where nearly "
                  "every task must share one worker); in between (the random DAGs at CCR "
                  "0.1-1, the largest matmul chains) any schedule either pays transfers or "
                  "runs serially, which the bound sees only in part (compare the router with "
                  "`1 device` there). On 6-task versions of the random DAGs over two H100s "
                  "and a CPU node at one site and a TPU at the other, where trying every "
                  "schedule finds the true optimum (tests/test_router_bound.py checks the "
                  "bound below it), the optimum was at most 0.1% above the bound on 8 of 10 "
                  "and 9% and 18% above it on the other two (without (D): 9-57% above it on "
                  f"6 of 10). This part run {r2.get('when') or _when()}.", "",
                  "| instance | tasks | router/bound | router (pools)/bound | HEFT/bound | "
                  "Dask/bound | 1 device/bound | router/HEFT | router (pools)/HEFT |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for i in inst:
            lines.append(f"| {i['name']} | {i['tasks']} | {i['router'] / i['bound']:.2f} | "
                         f"{i['router-pool'] / i['bound']:.2f} | "
                         f"{i['heft'] / i['bound']:.2f} | {i['dask'] / i['bound']:.2f} | "
                         f"{i['one'] / i['bound']:.2f} | "
                         f"{i['router'] / i['heft']:.3f} | {i['router-pool'] / i['heft']:.3f} |")
        lines.append("")

        def rand_by_ccr(key: str) -> str:
            groups: dict[str, list[float]] = {}
            for i in inst:
                if i["name"].startswith("random"):
                    groups.setdefault(i["name"].rsplit("CCR ", 1)[1], []).append(
                        i[key] / i["bound"])
            return ", ".join(f"{c}: {statistics.median(v):.2f}x" for c, v in groups.items())

        def no_worse(key: str, some: list[dict[str, Any]], by: float = 1 + 1e-9) -> float:
            return sum(i[key] <= i["heft"] * by for i in some) / len(some)

        arrays = [i for i in inst if not i["name"].startswith("random")]
        held = [i for i in arrays if i["name"].endswith("(held out)")]
        for key, name in (("router", "router"), ("router-pool", "router (pools, as live)")):
            ratio = [i[key] / i["bound"] for i in inst]
            med = statistics.median(ratio)
            share = no_worse(key, inst)
            real = statistics.median(i[key] / i["bound"] for i in arrays)
            lines += [
                f"- {name}: target median <= 1.2x the bound: median {med:.2f}x "
                f"{_yes(med <= 1.2)} (array graphs only: median {real:.2f}x "
                f"{_yes(real <= 1.2)}"
                + (f"; the held-out sizes alone: median "
                   f"{statistics.median(i[key] / i['bound'] for i in held):.2f}x"
                   if held else "")
                + f"; random DAGs by CCR: {rand_by_ccr(key)}).",
                f"- {name}: target no worse than HEFT on >= 90% of instances: {share:.0%} "
                f"{_yes(share >= 0.9)} (array graphs only: {no_worse(key, arrays):.0%} "
                f"{_yes(no_worse(key, arrays) >= 0.9)}; within 5% of HEFT on "
                f"{no_worse(key, inst, 1.05):.0%}, array graphs only "
                f"{no_worse(key, arrays, 1.05):.0%}; median router/HEFT "
                f"{statistics.median(i[key] / i['heft'] for i in inst):.2f}).",
            ]
        beats = sum(i["one"] < i["heft"] for i in inst if i["name"].startswith("random"))
        rand_n = sum(i["name"].startswith("random") for i in inst)
        lines.append(f"- HEFT is a weak baseline on the random DAGs: the `1 device` schedule "
                     f"beats it on {beats} of {rand_n} (HEFT spreads their tasks over the "
                     f"mesh, and on this mesh moving their data costs more than computing "
                     f"it), so the share of instances no worse than HEFT says most on the "
                     f"array graphs.")
        worst = max(i["router"] / i["one"] for i in inst)
        worst_p = max(i["router-pool"] / i["one"] for i in inst)
        lines += [f"- Router / 1 device: at most {worst:.2f}x (router (pools): "
                  f"{worst_p:.2f}x).",
                  f"- Router vs Dask default (median speed-up): "
                  f"{statistics.median(i['dask'] / i['router-pool'] for i in inst):.1f}x.", ""]
    if r3:
        thr = r3[0]["threshold"]
        lines += ["### P3 overhead", "",
                  "Dask = building the collection + Dask's optimization + materializing the "
                  "optimized (fused) graph. The router has two paths and takes the per-layer "
                  f"one above `mesh.router.layer-plan-threshold` ({thr:,} tasks). *Per task* "
                  "= modelling the unfused graph task by task (culled) + placement per task + "
                  "rewrite per task + building the expression that `client.get` receives, "
                  "named (until 2026-11-28 the router handed `client.get` a plain dict, which "
                  "Dask names by tokenizing every task, pickling each: 1.7 s at 10^4 tasks, "
                  "then not counted here; now one materialized layer of an expression that "
                  "Dask names without looking into it); "
                  "*of which Dask materializing* = Dask's own code building "
                  "the unfused graph's tasks, measured on its own. *Per layer* = classifying "
                  "each HighLevelGraph layer from its metadata (Blockwise layers are never "
                  "materialized) + placement per layer + rewrite per layer (a Blockwise "
                  "layer's one task template wrapped once; the tasks that materialized layers "
                  "already hold, here the random blocks and the reduction tree, wrapped one by "
                  "one; restrictions travel by layer name to the scheduler plugin; naming the "
                  "submitted expression included; since 2026-11-30 Dask's own Blockwise "
                  "fusion of the layers that the plan puts on one pool, never across two "
                  "pools). *Scheduler "
                  "at submission* is not part of the router's figure: it is Dask's own code "
                  "that runs on the scheduler when the routed graph arrives: culling "
                  "it and materializing its tasks (measured here in-process). Dask pays the "
                  "same kind of work for its own (fused) graph, inside its figure here; the "
                  "per-task path pays it on "
                  "the client while modelling and then the scheduler handles the submitted "
                  "dict again. *End to end, per layer* compares what happens before the first "
                  "task can run on each path, the collection's building included: (building "
                  "+ per layer + scheduler at submission) / Dask; above 100% the routed path "
                  "costs that much more than Dask's own. A review on 2026-11-30 found that "
                  "the per-layer path, in a plan that restricts its layers, sent every layer's "
                  "tasks unfused (100,674 tasks where Dask's graph has 37,170 at 10^5), and "
                  "end to end took 1.6-1.9 times Dask's time, the target's figure leaving "
                  "that out; the Blockwise fusion per pool came from it. *Tasks sent* = the "
                  "routed graph's tasks at submission / Dask's optimized graph's. "
                  "The per-layer plan is coarser: each layer goes to one target "
                  "(a layer's tasks are never split between kinds); P1 and P2 run graphs "
                  "below the threshold, so they measure the per-task planner. "
                  "Median of 3 runs, each path on a freshly built collection. "
                  f"This part run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
                  f"load average {os.getloadavg()[0]:.1f}.", "",
                  "| tasks | layers | Dask | per task: model (of which Dask materializing) "
                  "+ plan + rewrite + naming | per task / Dask | per layer: model + plan + rewrite | "
                  "per layer / Dask | scheduler at submission (per layer) | end to end, per "
                  "layer / Dask | tasks sent, per layer / Dask | router takes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in r3:
            ours = r["model"] + r["plan"] + r["rewrite"] + r["name"]
            lay = r["lmodel"] + r["lplan"] + r["lrewrite"]
            lines.append(
                f"| {r['tasks']} | {r['layers']} | {r['dask']:.3f} s | {r['model']:.3f} "
                f"({r['materialize']:.3f}) + {r['plan']:.3f} + {r['rewrite']:.3f} + "
                f"{r['name']:.3f} s | "
                f"{ours / r['dask']:.0%} | {r['lmodel'] * 1e3:.1f} + {r['lplan'] * 1e3:.1f} + "
                f"{r['lrewrite'] * 1e3:.1f} ms | {lay / r['dask']:.1%} | "
                f"{r['submit']:.3f} s | {(r['build'] + lay + r['submit']) / r['dask']:.0%} | "
                f"{r['sent']:,.0f} / {r['dask_tasks']:,.0f} | "
                f"{'per layer' if r['per_layer'] else 'per task'} |")

        def used(r):
            if r["per_layer"]:
                return r["lmodel"] + r["lplan"] + r["lrewrite"]
            return r["model"] + r["plan"] + r["rewrite"] + r["name"]

        last = r3[-1]
        frac = used(last) / last["dask"]
        per = [used(r) / r["tasks"] * 1e6 for r in r3]
        lper = [(r["lmodel"] + r["lplan"] + r["lrewrite"]) / r["tasks"] * 1e6 for r in r3]
        dper = [r["dask"] / r["tasks"] * 1e6 for r in r3]
        e2e = (last["build"] + last["lmodel"] + last["lplan"] + last["lrewrite"]
               + last["submit"]) / last["dask"]
        lines += ["",
                  f"- Target <= 10% at 1e5 tasks: {frac:.1%} {_yes(frac <= 0.10)} (the "
                  f"{'per-layer' if last['per_layer'] else 'per-task'} path, as the target "
                  f"counts it: planning and rewriting against Dask's building and "
                  f"optimization). End to end, with the scheduler's work at submission, "
                  f"the routed path takes {e2e:.0%} of Dask's time"
                  + (" (less than Dask's own path)." if e2e <= 1 else
                     f" ({'within' if e2e <= 1.1 else 'more than'} 10% over Dask's own "
                     f"path)."),
                  f"- Growth, what the router takes: {', '.join(f'{p:.2f}' for p in per)} µs "
                  f"per task; per-layer path alone: {', '.join(f'{p:.2f}' for p in lper)} µs "
                  f"per task (Dask: {', '.join(f'{p:.1f}' for p in dper)}). Per layer, the cost "
                  "is per layer plus per task of the already materialized layers only, so it "
                  "grows at most linearly with tasks "
                  f"{_yes(all(b <= a * 1.25 for a, b in zip(lper, lper[1:], strict=False)))}.",
                  ""]
    if r6:
        lines += ["### P6 scale", "",
                  f"Planning {r6['tasks']:,} tasks over {r6['workers']:,} modelled workers "
                  f"({r6['pools']} pools, worker-level placement): {r6['seconds']:.2f} s. "
                  f"Target < 1 s {_yes(r6['seconds'] < 1.0)}. This is placement alone "
                  "(`plan_model` on the per-task path, given a synthetic model of five "
                  "layers, each task of one layer feeding one of the next): building the "
                  "model from a Dask graph is not in it, and at this many tasks times pools "
                  "(over `placement.VARIANT_BUDGET`) the planner makes its base list "
                  "schedule only, with none of the variants it compares on smaller graphs. "
                  "A live computation of this size takes the per-layer path instead (above "
                  "`mesh.router.layer-plan-threshold`; P3 times that one end to end). "
                  f"This part run {r6.get('when') or _when()}.", ""]
    if r7:
        first = r7[0]
        meshes = " and ".join(f"{m['cpu']} NumPy worker{'s' * (m['cpu'] != 1)} and "
                              f"{m['jax_cpu']} JAX (CPU backend) worker" for m in r7)
        cals = "; ".join(f"{m['cpu']}+{m['jax_cpu']}: {m['cal']!r}" for m in r7)
        speeds = "; ".join(f"{m['cpu']} + {m['jax_cpu']}: {j / 1e9:.0f} GFLOP/s with JAX, "
                           f"{n / 1e9:.0f} with NumPy" for m in r7 for j, n in m["speeds"][:1])
        lines += ["### Estimates, live", "",
                  "How close the router's estimate of a computation (the makespan "
                  "`mesh.explain` shows) comes to its wall time, and how the routed "
                  f"computation compares with plain Dask, on real meshes of {meshes}, "
                  "one thread each: "
                  "`((x @ x.T) + 1).sum(axis=0)` on an n x n random array in 4 x 4 chunks, "
                  "routed `auto`; medians of "
                  f"{first['repeats']} runs each, after one untimed run of each (JAX compiles "
                  "each op once per shape), the three taking turns in an order that changes "
                  "from run to run. *Measured* = the "
                  "default: Dask's dispatch per task, the wait for a dependency, the "
                  "transfer latency and bandwidth, and the CPU the scheduler and the "
                  "workers spend per task, measured on the "
                  f"mesh (`mesh.calibrate()`, {cals}); since 2026-11-29 an estimate on a "
                  "mesh whose scheduler and workers share one host is never below what its "
                  "tasks' own work and Dask's CPU need of that host's cores together "
                  "(`placement.cpu_floor`): on these 2 cores every computation here is "
                  "CPU-bound with Dask's part in it (at n = 400 the processes spent 0.7 "
                  "CPU seconds, 0.03 of them in the tasks, in 0.34 s of wall), and before "
                  "it est./wall was 0.76 / 0.60 / 0.80 on the 2 + 1 mesh and 0.86 on the "
                  "1 + 1 (the run of 15:42); *fixed* = 1 ms per task, no wait, "
                  "0.2 ms per transfer and 1.25 GB/s, the figures the cost model used "
                  "before it measured them; *plain Dask* = `client.compute` of the same "
                  "collection, unrouted (Dask's own optimization and placement). Both "
                  "settings also plan with the task times the mesh's earlier routed "
                  "computations measured (`mesh.router.learn`, on by default since "
                  "2026-11-29: per op class and backend, the median ratio of a task's "
                  "measured seconds to its profile's, the untimed run teaching the first "
                  "timed one). Before both (the run of 2026-11-29 11:24), est./wall was "
                  "0.46 / 0.34 / 0.95 on the 2 + 1 mesh and 0.90 on the 1 + 1: at n = 4000 "
                  "the profiles' matmul time, too long on this machine (the mesh learns "
                  "about 0.8x), made up for Dask's own costs, which run longer under a "
                  "full CPU than the probe measures on idle workers; learning corrects the "
                  "first, not the second. "
                  "Both settings plan the worker threads, on this machine's "
                  f"{_cores()} cores, at their share of those cores "
                  "(`jupyter_mesh.router.cost.core_shares`: a JAX worker counts one "
                  "thread per core it may use, as XLA computes on all of them; "
                  "`Mesh.local` pins a JAX worker only where "
                  "the other workers leave it a core of its own, `mesh.local.pin-jax`, "
                  "as on the 1 + 1 mesh here). Since the afternoon of 2026-11-29 a JAX CPU "
                  "worker runs each op it is given with whichever of JAX and NumPy is the "
                  "faster there (it measures NumPy too; float64 matmuls on the JAX worker "
                  f"in this run: {speeds}; on the machine of the earlier runs JAX ran them "
                  "at about half NumPy's speed). Where every pool runs every op equally "
                  "fast, the plan restricts nothing (`any (pools equivalent)` in the "
                  "targets column); otherwise that column lists the pools the plan uses: "
                  "where it names only `cpu:numpy`, the plan leaves the JAX worker idle, "
                  "as an unpinned JAX worker computes on every core (the cost model counts "
                  "it one thread per core) and the NumPy workers already use them all. "
                  "Before, the JAX worker ran "
                  "only JAX's ops: on the 1 + 1 mesh, routed n = 4000 took 5.0-5.3 s "
                  "where plain Dask took 3.1 s (routed/plain 1.6-1.7); on the 2 + 1 mesh the "
                  "plan left the JAX worker idle (est./wall 0.44 / 0.51 / 0.94 for the "
                  "three sizes). Earlier still, with the profiles timing matmuls of 384 and "
                  "JAX as one compiled call, and every worker sharing the cores whether "
                  "used or not, est./wall was 0.33 / 0.44 / 0.95; until 2026-11-28 the "
                  "probe timed independent no-op tasks, which Dask dispatches two to three "
                  "times as fast as tasks with inputs (0.23 / 0.31 / 0.52). "
                  "*Wall* = from submission to the values (`Report.wall_seconds`), the "
                  "span the estimate models; an estimate below 1 says the computation took "
                  "longer than planned. *Routed / plain* compares the whole `mesh.compute` "
                  "call (planning, submission and the report: what a user waits for; "
                  "*routed call*) with plain Dask's `client.compute` (its optimization and "
                  "submission included; until 2026-11-29 this column compared the routed "
                  f"wall alone). This part run {first['when']}.", "",
                  "| mesh (NumPy + JAX workers) | n | tasks | targets | measured: est. / wall "
                  "| fixed: est. / wall | routed call | plain Dask | routed / plain |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m in r7:
            for r in m["rows"]:
                (me, mw), (fe, fw), (_, pw) = r["measured"], r["fixed"], r["plain"]
                lines.append(
                    f"| {m['cpu']} + {m['jax_cpu']} | {r['n']} | {r['tasks']} | "
                    f"{', '.join(r['targets'])} | {me:.2f} / {mw:.2f} s = {me / mw:.2f} | "
                    f"{fe:.2f} / {fw:.2f} s = {fe / fw:.2f} | {r['call']:.2f} s | "
                    f"{pw:.2f} s | {r['call'] / pw:.2f} |")
        lines.append("")
    if r8:
        med = r8["median"]
        n, chunk = LARGE
        lines += ["### Large graphs, live (the per-layer path)", "",
                  f"`((x + 1) * 2).sum(axis=0)` on a {n} x {n} random array in {chunk} x "
                  f"{chunk} blocks: {r8['tasks']} tasks, above `mesh.router.layer-plan-"
                  "threshold` (20,000), so the router plans it per layer "
                  f"(`{r8['plan']}`), on a real mesh of 2 NumPy workers, one thread each. "
                  "Every worker runs every op equally fast there, so the plan restricts "
                  "nothing. *Routed* = `mesh.compute(y)` (planning, submission and the "
                  "report included): since 2026-11-29 such a plan's linear chains are fused "
                  "as Dask's optimization fuses them; *routed, unfused* = the same with "
                  "Dask's `optimization.fuse.active` off, as every per-layer plan ran "
                  "before (the graph went layer by layer, unfused: a helper's QA run "
                  "found it 1.4-1.8x as long as plain Dask); *plain* = "
                  "`client.compute(y)` of the same collection (Dask's own optimization "
                  f"and placement). The routed graph goes as {r8['submitted']} tasks, "
                  f"Dask's optimized one as {r8['dask_tasks']}: both fuse each block's "
                  "chain (random block, `add`, `mul`, `sum`) into one task, but Dask "
                  "renames it and adds an alias under the chain's last key, a task of "
                  "its own that the scheduler dispatches too; the router's fusion (as on "
                  "its per-task path) keeps the last key. Medians of "
                  f"{r8['repeats']} runs each "
                  "after one untimed "
                  "routed run, taking turns in an order that changes from run to run. This "
                  f"part run {r8['when']}.", "",
                  "| routed | routed, unfused | plain Dask | routed / plain | unfused / plain |",
                  "|---|---|---|---|---|",
                  f"| {med['routed']:.1f} s | {med['routed, unfused']:.1f} s | "
                  f"{med['plain']:.1f} s | {med['routed'] / med['plain']:.2f} | "
                  f"{med['routed, unfused'] / med['plain']:.2f} |", ""]
    if r9:
        lines += ["### Ops of one block that fan out and meet, live (plans that restrict "
                  "nothing)", "",
                  "`(sin(x)**2 + cos(x)**2).sum(axis=0)` on a real mesh of 2 NumPy "
                  "workers, one thread each, where every worker runs every op equally "
                  "fast, so the plan restricts nothing. *Routed* = `mesh.compute(y)` "
                  "(planning, submission and the report included): since 2026-11-30 the "
                  "ops of one block that fan out and meet (the block, its sine and "
                  "cosine, their squares, their sum, its partial sum) go as one task, as "
                  "Dask's Blockwise fusion sends them; *routed, chains only* = the same "
                  "without those groups, as before (each op a task of its own, and a "
                  "block often sent to the other worker for its cosine); *plain* = "
                  "`client.compute(y)` (Dask's own optimization and placement). Medians "
                  f"of {r9['repeats']} runs each after one untimed run of each, taking "
                  f"turns in an order that changes from run to run. This part run "
                  f"{r9['when']}.", "",
                  "| array / blocks | tasks (routed submits; Dask's optimized graph) | "
                  "routed | routed, chains only | plain Dask | routed / plain | "
                  "chains only / plain |",
                  "|---|---|---|---|---|---|---|"]
        for size in r9["sizes"]:
            med = size["median"]
            lines.append(
                f"| {size['n']} / {size['chunk']} | {size['tasks']} ({size['submitted']}; "
                f"{size['dask_tasks']}) | {med['routed']:.2f} s | "
                f"{med['routed, chains only']:.2f} s | {med['plain']:.2f} s | "
                f"{med['routed'] / med['plain']:.2f} | "
                f"{med['routed, chains only'] / med['plain']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _subsections(section: str) -> tuple[str, dict[str, str]]:
    """(text before the first '### ', {'### title': its text}) of a Router section."""
    head, *parts = section.split("\n### ")
    out = {}
    for part in parts:
        title = "### " + part.split("\n", 1)[0]
        out[title] = "### " + part.rstrip("\n") + "\n"
    return head.rstrip("\n") + "\n", out


def _update(section: str, partial: bool = False) -> None:
    """Write the Router section; ``partial``: only some parts ran, so replace just
    their subsections (and the header, which dates no part) and keep the others."""
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        old, tail = rest.split(END, 1)
        if partial:
            _, old_parts = _subsections(old.strip("\n"))
            new_head, new_parts = _subsections(section)
            old_parts.update(new_parts)
            section = "\n".join([new_head] + list(old_parts.values()))
        block = f"{BEGIN}\n{section.rstrip(chr(10))}\n\n{END}"
        text = head + block + tail
    else:
        block = f"{BEGIN}\n{section}\n{END}"
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(RESULTS, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", action="store_true",
                    help="write the 'Router' section of benchmarks/RESULTS.md")
    every = {"p1", "p2", "p3", "p6", "est", "large", "fanout"}
    ap.add_argument("--only", default=",".join(sorted(every)), help="comma-separated subset")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    unknown = only - every
    if unknown:
        ap.error(f"--only takes p1, p2, p3, p6, est, large and fanout, not "
                 f"{', '.join(sorted(unknown))}")
    import warnings

    warnings.filterwarnings("ignore", category=Warning, module="dask")
    # the live part first, in a fresh process: the others build graphs of up to 1e5
    # tasks, and the heap they leave makes the client's own work slower afterwards
    # (each part says when it starts: the whole run takes minutes, P1 and P2 several)
    parts: list[tuple[str, str, Any]] = [("p1", "P1 placement, live", p1), ("p2", "P2 placement, simulated", p2),
             ("p3", "P3 overhead", p3), ("p6", "P6 scale", p6),
             ("est", "estimates, live", estimates), ("large", "large graphs, live", large),
             ("fanout", "fan-out, live", fanout)]
    got: dict[str, Any] = {}
    for name, title, run in parts:
        if name in only:
            print(f"benchmarks.router: {title}...", file=sys.stderr, flush=True)
            got[name] = run()
    r1, r2, r3, r6, r7, r8, r9 = (got.get(n) for n, _, _ in parts)
    text = report(r1, r2, r3, r6, r7, r8, r9)
    print(text)
    if args.update:
        _update(text, partial=only != every)
        print(f"wrote the 'Router' section of {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
