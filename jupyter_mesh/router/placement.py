"""Placement: earliest-finish-time list scheduling (HEFT-like) of tasks over device pools.

Tasks are taken in decreasing upward rank (the classic HEFT priority); each goes to the
allowed pool where it would finish first, counting the time its inputs need to arrive
from the pools that produce them. Work is linear in tasks × pools (× inputs per task).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Any, cast

from ..errors import MeshError
from ..inventory import format_ms, plural
from ..targets import Target, parse_route
from .classify import GraphModel, native_backends
from .cost import CostModel, Pool, reshared
from .plan import Plan


def parse_route_or_error(route: Any) -> str | Target:
    if isinstance(route, Target):
        return route
    try:
        return parse_route(route)
    except ValueError as exc:
        raise MeshError(str(exc)) from None


def _have(pools: list[Pool]) -> str:
    if not pools:
        return "no devices"
    counts: dict[str, int] = {}
    for p in pools:
        counts[p.label] = counts.get(p.label, 0) + len(p.workers)
    return ", ".join(f"{n} {label}" for label, n in sorted(counts.items()))


def allowed_pools(model: GraphModel, pools: list[Pool], route: str | Target,
                  site: str | None = None) -> tuple[list[list[int]], list[str]]:
    """Per layer, the pool indices it may use; plus notes for the plan."""
    from .rewrite import is_p2p

    notes: list[str] = []
    idx = list(range(len(pools)))
    if site is not None:
        idx = [i for i in idx if pools[i].site == site]
        if not idx:
            raise no_site(site, {p.site for p in pools})
    if not idx:
        raise MeshError("the mesh has no live workers to route to")
    matching = idx
    if isinstance(route, Target):
        matching = [i for i in idx if route.matches(pools[i].kind, pools[i].backend)]
        if not matching:
            where = f" at site {site!r}" if site else ""
            have = sorted({pools[i].target for i in idx})
            raise MeshError(
                f"no live {route} worker{where}: the mesh has {_have([pools[i] for i in idx])}; "
                f"use 'auto' or one of {', '.join(have)}"
            )
    forced = isinstance(route, Target)
    # where an op no target of a forced route runs goes: the NumPy workers
    host = [i for i in idx if pools[i].backend == "numpy"]
    # under a route that names no backend ("auto", "cpu"), CPU workers of another
    # backend that measured NumPy (a JAX CPU worker) run what NumPy runs too, at
    # NumPy's speed there
    named = forced and cast(Target, route).backend is not None
    also = [] if named else [i for i in idx if pools[i].runs_host_numpy]
    allowed: list[list[int]] = []
    fraction = device_memory_fraction() if any(p.device_memory for p in pools) else 1.0
    # what a forced route places elsewhere, and why: {why: the ops' labels}
    off_route: dict[str, list[str]] = {}
    for op in model.ops:
        native = [i for i in matching if pools[i].backend in op.native
                  or (i in also and "numpy" in op.native)]
        short = [i for i in native if not fits(op, pools[i], fraction)]
        if short:
            native = [i for i in native if i not in short]
            if not native and (forced or not host):
                raise MeshError(_too_big(op, [pools[i] for i in short], fraction) + (
                    ": use smaller chunks (rechunk) or route='auto'" if forced else
                    ", and the mesh has no CPU workers to run it: use smaller chunks "
                    "(rechunk)"))
            notes.append(_too_big(op, [pools[i] for i in short], fraction)
                         + ": kept off them (smaller chunks would fit)")
        if native:
            allowed.append(native)
            continue
        if forced:
            fallback = [i for i in host if op.op_class in ("creation", "other")] or host
            # JAX runs the op class, but not on this dtype (see classify.op_native)
            dtype = getattr(op, "jax_off", None)
            what = (f"{op.op_class} ops on {dtype}" if dtype and any(
                pools[i].backend == "jax" for i in matching)
                else f"{op.op_class} ops")
            fname = _func_name(op.func)
            if (not dtype and fname and op.func is not None
                    and any(pools[i].backend in native_backends(op.op_class)
                            for i in matching)):
                # the class is one the target runs; this function is not in its table
                # (a delayed call of Python's own sum is a "reduction" too)
                what = f"{fname} (no translation of it for its backend)"
            # (Dask places its P2P steps, whatever the route; data the graph carries,
            # from_array's blocks, is run by no task)
            if not is_p2p(op.name) and not getattr(op, "data", False):
                off_route.setdefault(
                    f"{route} does not run {what} natively; "
                    f"placed on {'host NumPy' if fallback else route}", []).append(op.label)
            allowed.append(fallback or matching)
        else:
            # no pool runs it on its device: it runs NumPy, in host memory, wherever
            allowed.append(host or idx)
    notes.extend(f"{', '.join(dict.fromkeys(labels))}: {why}"
                 for why, labels in off_route.items())
    return allowed, notes


def _func_name(func: Any) -> str | None:
    """The name of the function a task calls, inside Dask's partials and Compose
    (``mean_chunk``, not the generic "reduction ops"; ``topk_aggregate``, not Compose)."""
    from .jax_ops import _one_supported, _parts

    parts = (_parts(func) if func is not None else None) or []
    # those JAX's table lacks, where it has some of them
    parts = [f for f in parts if not _one_supported(f)] or parts
    names = [n for f in parts if (n := str(getattr(f, "__name__", "")))]
    if not names:
        return None
    return ", ".join(dict.fromkeys(names))


#: the site the inventory shows for a plain Dask worker (no jupyter_mesh on it)
PLAIN_SITE = "unknown"


def no_site(site: str, sites: Any) -> MeshError:
    """No routed worker at ``site``: the sites the mesh has (its plain Dask workers,
    shown at site 'unknown', have none a computation may be kept to)."""
    said = ", ".join(sorted(set(sites) - {PLAIN_SITE})) or "none"
    plain = (f" ('{PLAIN_SITE}' is where the inventory shows plain Dask workers, which "
             f"have no site: start them with --preload jupyter_mesh.worker --site NAME)"
             if site == PLAIN_SITE else "")
    return MeshError(f"no worker at site {site!r}: the mesh has sites {said}{plain}")


def task_memory(op: Any) -> float:
    """Bytes the largest task of ``op`` holds at once on its device: its inputs and its
    output (a floor: a library may need room of its own besides), each input at its
    layer's largest block where chunks differ in size."""
    return (max(float(op.in_bytes), float(getattr(op, "peak_in_bytes", 0.0)))
            + max(float(op.out_bytes), float(getattr(op, "peak_out_bytes", 0.0))))


def _at_once(pool: Pool) -> int:
    """Tasks one worker of ``pool`` may run at once (its threads), which share its
    device's memory."""
    return max(pool.worker_threads(), default=1)


def fits(op: Any, pool: Pool, fraction: float) -> bool:
    """Whether one task of ``op`` fits in its share of ``fraction`` of a worker's device
    memory, shared by the tasks the worker runs at once (always, where the pool's
    memory is not known or it is a CPU pool: Dask manages host memory itself)."""
    return (not pool.device_memory
            or task_memory(op) * _at_once(pool) <= fraction * pool.device_memory)


def all_fit(model: Any, pools: list[Pool]) -> bool:
    """Whether every op's tasks fit on every pool (see :func:`fits`)."""
    if not any(p.device_memory for p in pools):
        return True
    fraction = device_memory_fraction()
    # an op a pool does not run natively runs NumPy there, in host memory
    return all(fits(op, p, fraction) for op in model.ops for p in pools
               if p.backend in op.native)


def _too_big(op: Any, pools: list[Pool], fraction: float) -> str:
    from ..inventory import format_bytes

    sized = [p for p in pools if p.device_memory]
    least = min(sized, key=lambda p: p.device_memory / _at_once(p))
    labels = ", ".join(sorted({p.label for p in sized}))
    threads = _at_once(least)
    shared = f", shared by the {threads} tasks a worker runs at once" if threads > 1 else ""
    return (f"{op.label}: each task needs {format_bytes(int(task_memory(op)))} of device "
            f"memory, more than the {labels} workers hold ({fraction:.0%} of "
            f"{format_bytes(least.device_memory)} each{shared}, "
            f"mesh.router.device-memory-fraction)")


def device_memory_fraction() -> float:
    """``mesh.router.device-memory-fraction``: the share of an accelerator's memory one
    task may take (the rest is the library's and its runtime's), above 0, at most 1."""
    from .. import _config
    from ..errors import MeshConfigError

    f = _config.get_number("router.device-memory-fraction")
    if not 0.0 < f <= 1.0:  # NaN too
        raise MeshConfigError(
            f"config mesh.router.device-memory-fraction must be a number above 0 and at "
            f"most 1 (the share of a GPU's or TPU's memory one task may use), not "
            f"{_config.get('router.device-memory-fraction')!r}")
    return f


#: try the alternative schedules (each pool or site on its own) while
#: tasks × pools stays under this, so planning stays linear in tasks
VARIANT_BUDGET = 200_000


def _pins(model: GraphModel) -> list[str | None]:
    """Per task, the site its data is pinned to (pins propagate to consumers)."""
    n = len(model.keys)
    pin: list[str | None] = [None] * n
    if not model.pins:
        return pin
    deps = model.deps
    for i in range(n):
        s = model.pins.get(i)
        for d in deps[i]:
            ds = pin[d]
            if ds is not None:
                if s is not None and s != ds:
                    a, b = sorted((s, ds))
                    raise MeshError(
                        f"{model.ops[model.layer[i]].label} reads data pinned to sites "
                        f"{a!r} and {b!r}, and pinned data never leaves its site, so no "
                        f"worker may read both: pin what it reads to one site, or leave "
                        f"one of them unpinned"
                    )
                s = ds
        pin[i] = s
    return pin


def place(model: GraphModel, pools: list[Pool], cost: CostModel,
          allowed: list[list[int]], *, variants: bool = True
          ) -> tuple[list[int], list[float], list[float], list[int]]:
    """Assign every task a pool and a worker of it.

    Returns (pool per task, start, finish, worker per task); workers are numbered
    across pools in pool order (``pools[0].workers`` first). Transfers are charged
    between distinct workers, inside a pool too; only data on the same worker is free.
    Besides the plain earliest-finish schedule, graphs of up to ``VARIANT_BUDGET``
    tasks × pools also try: planning as if links were slower (consumers stay with
    their inputs), everything on one worker, HEFT's own priority, each op kept off
    pools far slower for it, and each pool (or site) on its own; the schedule that
    finishes first wins. When moving data costs more than computing it, spreading the
    work greedily loses, so the plan is never worse than one worker running it all.
    """
    n = len(model.keys)
    ops = model.ops
    exec_t = [[cost.exec_time(op, p) for p in pools] for op in ops]
    pin = _pins(model)
    chain = chain_links(model)
    order = _rank_order(model, exec_t, allowed, [1] * len(pools))
    best = _list_schedule(model, pools, cost, allowed, exec_t, order, pin, chain=chain)
    fusing = any(d >= 0 for d in chain)
    resharing = any(p.shared for p in pools)
    if resharing:
        best = _retimed(model, pools, cost, best, chain if fusing else None, exec_t)
    if not variants or n * len(pools) > VARIANT_BUDGET:
        return best
    finish_best = max(best[2], default=0.0)
    # no schedule beats this: once one is within GOOD_ENOUGH of it, stop looking
    enough = (1 + GOOD_ENOUGH) * _quick_bound(model, pools, exec_t, allowed,
                                              cost.task_overhead, chain)
    if finish_best <= enough:
        return best
    # candidates since the last better one, and the best makespan so far (the search
    # reads both)
    progress: dict[str, float] = {"stale": 0, "best": finish_best}
    for cand in _variants(model, pools, cost, allowed, exec_t, order, pin, progress):
        if fusing:
            # the variants are planned blind to fusion (charging a chain's next task
            # less keeps chains together greedily, which can crowd a worker); each is
            # timed as it runs, its chains fused, in its own order
            starts = cand[1]
            own = sorted(range(n), key=lambda i: (starts[i], i))
            cand = _replay(model, pools, cost, exec_t, own, cand[3], chain)
        if resharing:
            cand = _retimed(model, pools, cost, cand, chain if fusing else None, exec_t)
        f = max(cand[2], default=0.0)
        progress["stale"] += 1
        if f < finish_best * (1 - 1e-9):
            best, finish_best = cand, f
            progress["stale"] = 0
            progress["best"] = f
            if f <= enough:
                break
    return best


def _retimed(model: GraphModel, pools: list[Pool], cost: CostModel,
             cand: tuple[list[int], list[float], list[float], list[int]],
             chain: list[int] | None, planned: list[list[float]]
             ) -> tuple[list[int], list[float], list[float], list[int]]:
    """``cand`` timed as it runs when it leaves some pools idle whose CPU workers share a
    host's cores with those it uses: the idle ones take no share (:func:`reshared`), so
    a forced route or a schedule on NumPy workers alone is not planned at the speed they
    have beside a busy JAX worker. Unchanged where that changes no speed."""
    alone = reshared(pools, set(cand[0]))
    if alone is None:
        return cand
    exec_t = [[cost.exec_time(op, p) for p in alone] for op in model.ops]
    if exec_t == planned:  # a cost model that does not read the pools' speeds
        return cand
    starts = cand[1]
    own = sorted(range(len(starts)), key=lambda i: (starts[i], i))
    return _replay(model, pools, cost, exec_t, own, cand[3], chain)


#: a plan within this fraction of :func:`_quick_bound` is kept without trying others
GOOD_ENOUGH = 0.02


def dask_fuses() -> bool:
    """Whether Dask's ``optimization.fuse.active`` leaves linear fusion on (unless it
    is False), as the router's rewrite then fuses chains too."""
    import dask

    return dask.config.get("optimization.fuse.active", None) is not False


def chain_links(model: GraphModel, fusing: bool | None = None) -> list[int]:
    """For each task, the input it continues a linear chain of (its only input, of
    which it is the only consumer, not an output), or -1.

    When the plan runs both on one worker the rewrite fuses them into one task (as Dask
    fuses linear chains), so the second pays no dispatch of its own: the schedules
    below charge it its time less the cost model's ``task_overhead`` there. ``fusing``
    None follows Dask's ``optimization.fuse.active``: when it is False nothing is fused,
    so no task continues a chain."""
    from dask._task_spec import Task

    n = len(model.keys)
    links = [-1] * n
    if fusing is None:
        fusing = dask_fuses()
    if not fusing:
        return links
    deps = model.deps
    consumers = [0] * n
    for ds in deps:
        for d in set(ds):
            consumers[d] += 1
    outputs = set(model.outputs)
    keys = model.keys
    tasks = model.tasks
    for i, ds in enumerate(deps):
        if len(set(ds)) != 1:
            continue
        d = ds[0]
        if consumers[d] != 1 or keys[d] in outputs:
            continue
        if tasks is not None and not (type(tasks.get(keys[d])) is Task
                                      and type(tasks.get(keys[i])) is Task):
            continue
        links[i] = d
    return links


def _quick_bound(model: GraphModel, pools: list[Pool], exec_t: list[list[float]],
                 allowed: list[list[int]], overhead: float = 0.0,
                 chain: list[int] | None = None) -> float:
    """A lower bound on any schedule, linear in tasks × pools: the longest chain of
    tasks each at its fastest allowed pool (no transfers, no waiting; a chain's
    continuation without its dispatch), and the least total work spread over every
    thread of the mesh."""
    layer = model.layer
    fastest = [min(exec_t[li][p] for p in a) for li, a in enumerate(allowed)]
    done = [0.0] * len(model.keys)
    work = 0.0
    for i, ds in enumerate(model.deps):
        t = fastest[layer[i]]
        if chain is not None and chain[i] >= 0:
            t = max(t - overhead, 0.0)
        work += t
        done[i] = t + max((done[d] for d in ds), default=0.0)
    threads = sum(sum(p.worker_threads()) for p in pools) or 1
    return max(max(done, default=0.0), work / threads)


def _variants(model: GraphModel, pools: list[Pool], cost: CostModel,
              allowed: list[list[int]], exec_t: list[list[float]], order: list[int],
              pin: list[str | None], progress: dict[str, float] | None = None) -> Any:
    """The other schedules :func:`place` compares with plain earliest finish, cheapest
    first (each a full schedule, made when asked for)."""
    n = len(model.keys)
    # without going into idle gaps: filling them with the next op's ready tasks can
    # take a thread that a more urgent task (by rank) would have had right after
    yield _list_schedule(model, pools, cost, allowed, exec_t, order, pin, gaps_kept=0)
    # work that meets again later kept on one worker
    together = _clusters(model, pools, cost, allowed, exec_t)
    if together is not None:
        yield _list_schedule(model, pools, cost, allowed, exec_t, order, pin,
                             together=together)
    # when moving data costs more than computing it, greedy earliest finish spreads
    # work and then pays for every hand-over: plan again as if links were slower
    # (keeping consumers with their inputs), and everything on one worker; each such
    # assignment is replayed with the true link costs before it is compared
    for k in LINK_PENALTIES:
        slow = _scaled_links(cost, k)
        try:
            cand = _list_schedule(model, pools, slow, allowed, exec_t, order, pin)
        except MeshError:
            continue
        yield _replay(model, pools, cost, exec_t, order, cand[3])
    if not model.pins:
        first = 0
        for p, pool in enumerate(pools):
            threads = pool.worker_threads()
            w = first + max(range(len(threads)), key=threads.__getitem__)
            first += len(threads)
            if not all(p in a for a in allowed):
                continue
            yield _replay(model, pools, cost, exec_t, order, [w] * n)
    if len(pools) < 2:
        return
    # HEFT's own priority: the mean over workers (a pool of four counts four times)
    order_w = _rank_order(model, exec_t, allowed, [len(p.workers) or 1 for p in pools])
    if order_w != order:
        yield _list_schedule(model, pools, cost, allowed, exec_t, order_w, pin)
    # leave each op off the pools where it runs far slower than on its best one:
    # greedy earliest-finish puts work there whenever the fast pool is busy
    for factor in (1.5, 2.0, 4.0):
        alt = []
        for li, a in enumerate(allowed):
            fast = min(exec_t[li][p] for p in a)
            alt.append([p for p in a if exec_t[li][p] <= fast * factor])
        if alt == allowed:
            continue
        for o in (order, order_w):
            try:
                yield _list_schedule(model, pools, cost, alt, exec_t, o, pin, allowed)
            except MeshError:
                continue
    alternatives: list[set[int]] = [{p} for p in range(len(pools))]
    sites = sorted({p.site for p in pools})
    if len(sites) > 1:
        alternatives += [{i for i, p in enumerate(pools) if p.site == s} for s in sites]
    seen = {tuple(map(tuple, allowed))}
    for keep in alternatives:
        alt = [[p for p in a if p in keep] or a for a in allowed]
        sig = tuple(map(tuple, alt))
        if sig in seen:
            continue
        seen.add(sig)
        try:
            yield _list_schedule(model, pools, cost, alt, exec_t, order, pin, allowed)
        except MeshError:
            continue
    # a short seeded search: priorities jittered, slow pools left out by a random
    # factor, sometimes one site only; each schedule is real, so the best one stands.
    # Seeded by the graph's size: the same graph gets the same plan
    trials = min(SEARCH_TRIALS, SEARCH_BUDGET // max(n * len(pools), 1))
    if trials:
        yield from _searched(model, pools, cost, allowed, exec_t, pin, sites, trials,
                             progress if progress is not None else {"stale": 0})


#: most schedules the seeded search tries, and the tasks × pools it may spend on them
SEARCH_TRIALS = 48
SEARCH_BUDGET = 30_000
#: the search stops after this many schedules in a row found nothing better
SEARCH_STALL = 24
#: ... and once its schedules would have taken more than this share of the best
#: makespan found so far to make: a search that costs a user more time than it can save
#: is not worth it (a 50 ms computation gets no search; one of seconds gets it all)
SEARCH_SHARE = 0.02
#: what a schedule costs to make, per task × pool (seconds; measured on a small
#: machine, a constant so that the same graph gets the same plan whatever the load)
SCHEDULE_SECONDS = 6e-6


def _searched(model: GraphModel, pools: list[Pool], cost: CostModel,
              allowed: list[list[int]], exec_t: list[list[float]],
              pin: list[str | None], sites: list[str], trials: int,
              progress: dict[str, float]) -> Any:
    """Schedules from jittered HEFT priorities and random pool filters; it stops after
    ``SEARCH_STALL`` of them in a row found nothing better (``progress["stale"]``, kept
    by the caller), or once making them would have cost more than ``SEARCH_SHARE`` of
    the best makespan so far (``progress["best"]``)."""
    import random

    n = len(model.keys)
    layer, deps = model.layer, model.deps
    mean = [sum(exec_t[li][p] for p in a) / len(a) for li, a in enumerate(allowed)]
    rng = random.Random(n * 7919 + len(pools))
    progress["stale"] = 0
    each = SCHEDULE_SECONDS * n * len(pools)
    for t in range(trials):
        if progress["stale"] >= SEARCH_STALL:
            return
        if (t + 1) * each > SEARCH_SHARE * progress.get("best", math.inf):
            return
        rank = [0.0] * n
        for i in range(n - 1, -1, -1):
            rank[i] += mean[layer[i]] * rng.uniform(0.5, 1.5) + 1e-12
            r = rank[i]
            for d in deps[i]:
                if rank[d] < r:
                    rank[d] = r
        order = sorted(range(n), key=rank.__getitem__, reverse=True)
        factor = rng.choice((1.2, 1.5, 2.0, 3.0, 5.0, math.inf))
        alt = []
        for li, a in enumerate(allowed):
            fast = min(exec_t[li][p] for p in a)
            alt.append([p for p in a if exec_t[li][p] <= fast * factor])
        if len(sites) > 1 and rng.random() < 0.5:
            site = rng.choice(sites)
            alt = [[p for p in a if pools[p].site == site] or a for a in alt]
        try:
            yield _list_schedule(model, pools, cost, alt, exec_t, order, pin, allowed)
        except MeshError:
            continue


#: link-cost factors of the locality-seeking variants
LINK_PENALTIES = (3.0, 10.0, 30.0)


def _scaled_links(cost: CostModel, k: float) -> CostModel:
    """A copy of ``cost`` whose transfers take ``k`` times as long."""
    import copy

    slow = copy.copy(cost)
    slow.latency = [[x * k for x in row] for row in cost.latency]
    slow.inv_bw = [[x * k for x in row] for row in cost.inv_bw]
    slow.intra_latency = [x * k for x in cost.intra_latency]
    slow.intra_inv_bw = [x * k for x in cost.intra_inv_bw]
    return slow


def _replay(model: GraphModel, pools: list[Pool], cost: CostModel,
            exec_t: list[list[float]], order: list[int], worker_of: list[int],
            chain: list[int] | None = None
            ) -> tuple[list[int], list[float], list[float], list[int]]:
    """The schedule of a fixed worker per task, with ``cost``'s link times: tasks in
    ``order`` (inputs first), each on the first free thread of its worker (a chain's
    continuation on its input's worker without its dispatch, see :func:`chain_links`)."""
    wpool: list[int] = []
    slots: list[list[float]] = []
    for p, pool in enumerate(pools):
        for t in pool.worker_threads():
            wpool.append(p)
            slots.append([0.0] * t)
    lat, inv = cost.latency, cost.inv_bw
    ilat, iinv = cost.intra_latency, cost.intra_inv_bw
    ov = cost.task_overhead
    rt = cost.dependency_latency
    layer, deps = model.layer, model.deps
    out_b = [op.out_bytes for op in model.ops]
    n = len(layer)
    start = [0.0] * n
    finish = [0.0] * n
    for i in order:
        w = worker_of[i]
        p = wpool[w]
        ready = 0.0
        fused = chain is not None and chain[i] >= 0 and worker_of[chain[i]] == w
        for d in deps[i]:
            wd = worker_of[d]
            if wd == w:
                # the scheduler's round trip, unless fused into the chain it continues
                a = finish[d] if fused else finish[d] + rt
            else:
                q = wpool[wd]
                nb = out_b[layer[d]]
                a = finish[d] + (ilat[p] + nb * iinv[p] if q == p
                                 else lat[q][p] + nb * inv[q][p])
            if a > ready:
                ready = a
        heap = slots[w]
        s0 = heap[0] if heap[0] > ready else ready
        e = exec_t[layer[i]][p]
        if fused:
            e = e - ov if e > ov else 0.0
        f = s0 + e
        heapq.heapreplace(heap, f)
        start[i], finish[i] = s0, f
    return [wpool[w] for w in worker_of], start, finish, list(worker_of)


#: idle gaps each worker keeps for later tasks to go into (see :func:`_list_schedule`)
GAPS = 8


def _rank_order(model: GraphModel, exec_t: list[list[float]], allowed: list[list[int]],
                weight: list[int]) -> list[int]:
    """Tasks in decreasing upward rank, with each op's mean cost over its allowed pools
    (each pool weighted by ``weight``): HEFT's priority."""
    layer, deps = model.layer, model.deps
    n = len(layer)
    w = []
    for li, a in enumerate(allowed):
        tot = sum(weight[p] for p in a)
        w.append(max(sum(exec_t[li][p] * weight[p] for p in a) / tot, 1e-12))
    rank = [0.0] * n
    for i in range(n - 1, -1, -1):
        rank[i] += w[layer[i]]
        r = rank[i]
        for d in deps[i]:
            if rank[d] < r:
                rank[d] = r
    return sorted(range(n), key=rank.__getitem__, reverse=True)


def _list_schedule(model: GraphModel, pools: list[Pool], cost: CostModel,
                   allowed: list[list[int]], exec_t: list[list[float]], order: list[int],
                   pin: list[str | None], wider: list[list[int]] | None = None,
                   *, chain: list[int] | None = None, gaps_kept: int | None = None,
                   together: tuple[list[int], dict[int, list[int]]] | None = None,
                   ) -> tuple[list[int], list[float], list[float], list[int]]:
    """Earliest-finish-time list scheduling at worker granularity.

    For each allowed pool only a few workers are candidates: the one free first and
    those already holding an input of the task, so the work is linear in tasks × pools
    (× inputs). A chain's continuation (``chain``, see :func:`chain_links`) placed on
    the worker of the input it continues is charged its time less the dispatch that
    fusing it saves.

    A task may also go into an idle gap that an earlier placement left on a thread of a
    candidate worker (it waited for its inputs there), when it fits before the task
    placed after the gap: a worker runs whatever is ready while it waits, so ranking
    every task of one op before the next op's does not keep the next op's ready tasks
    from running meanwhile (HEFT's insertion policy). Each worker keeps its
    ``GAPS`` (or ``gaps_kept``) latest gaps, so the work stays linear.

    ``together`` (see :func:`_clusters`): a group per task (-1: none) and the pools each
    group may use; the first task of a group placed picks a worker among those pools,
    and the group's later tasks go to that worker."""
    keep = GAPS if gaps_kept is None else gaps_kept
    group, group_pools = together if together is not None else (None, {})
    home: dict[int, int] = {}
    n = len(model.keys)
    layer = model.layer
    deps = model.deps
    out_b = [op.out_bytes for op in model.ops]
    wpool: list[int] = []
    slots: list[list[float]] = []
    pheap: list[list[tuple[float, int]]] = []
    for p, pool in enumerate(pools):
        ids = []
        for nthreads in pool.worker_threads():
            ids.append(len(wpool))
            wpool.append(p)
            slots.append([0.0] * nthreads)
        pheap.append([(0.0, wid) for wid in ids])
    # idle gaps (from, to) on each worker's threads, the latest GAPS of them
    gaps: list[list[tuple[float, float]]] = [[] for _ in wpool]
    lat, inv = cost.latency, cost.inv_bw
    ilat, iinv = cost.intra_latency, cost.intra_inv_bw
    site_of = [p.site for p in pools]
    ov = cost.task_overhead
    rt = cost.dependency_latency
    worker_of = [-1] * n
    start = [0.0] * n
    finish = [0.0] * n
    pinned_cache: dict[tuple[int, str], list[int]] = {}
    heappop, heappush, heapreplace = heapq.heappop, heapq.heappush, heapq.heapreplace
    inf = float("inf")
    for i in order:
        li = layer[i]
        cand = allowed[li]
        ps = pin[i]
        if ps is not None:
            ck = (li, ps)
            c = pinned_cache.get(ck)
            if c is None:
                c = [p for p in cand if site_of[p] == ps]
                if not c and wider is not None:
                    c = [p for p in wider[li] if site_of[p] == ps]
                if not c:
                    op = model.ops[li]
                    what = "the pinned data" if getattr(op, "data", False) else op.label
                    raise MeshError(
                        f"{what}: the route (or site=) allows no worker at site {ps!r}, "
                        f"where its data is pinned (pin=), and pinned data never leaves "
                        f"its site: compute with route='auto' or a target that site has, "
                        f"and no site= of another site"
                    )
                pinned_cache[ck] = c
            cand = c
        only = -1  # the worker this task's group went to
        gi = group[i] if group is not None else -1
        if gi >= 0:
            only = home.get(gi, -1)
            if only >= 0 and wpool[only] not in cand:
                only = -1
            elif only < 0:
                cand = [p for p in cand if p in group_pools[gi]] or cand
        ex = exec_t[li]
        ds = deps[i]
        # the worker where this task would be fused into the chain it continues
        fw = worker_of[chain[i]] if chain is not None and chain[i] >= 0 else -1
        if ds:
            # (finish, worker, pool, bytes) of each input, once for all pools
            dinf = [(finish[d], worker_of[d], wpool[worker_of[d]], out_b[layer[d]])
                    for d in ds]
        best = inf
        bw = -1
        bs = 0.0
        bg = -1  # the gap of bw the task goes into, or -1: after its last task
        for p in cand:
            if only >= 0:
                if p != wpool[only]:
                    continue
                top = only
                t = slots[only][0]
            else:
                ph = pheap[p]
                while True:
                    t, top = ph[0]
                    if t == slots[top][0]:
                        break
                    heappop(ph)
            e = ex[p]
            if not ds:
                f = t + e
                if f < best:
                    best, bw, bs, bg = f, top, t, -1
                for k, (g0, g1) in enumerate(gaps[top]):
                    if g0 + e <= g1 and g0 + e < best:
                        best, bw, bs, bg = g0 + e, top, g0, k
                continue
            # arrival of each input at a worker of p that does not hold it
            generic = 0.0
            local: list[int] = []
            il, ii = ilat[p], iinv[p]
            for fd, wd, q, nb in dinf:
                if q == p:
                    a = fd + il + nb * ii
                    if wd not in local and len(local) < 4:
                        local.append(wd)
                else:
                    a = fd + lat[q][p] + nb * inv[q][p]
                if a > generic:
                    generic = a
            if only >= 0:
                local = [only]
            s = slots[top][0]
            if top not in local:
                s0 = generic if generic > s else s
                f = s0 + e
                if f < best:
                    best, bw, bs, bg = f, top, s0, -1
                for k, (g0, g1) in enumerate(gaps[top]):
                    g = generic if generic > g0 else g0
                    if g + e <= g1 and g + e < best:
                        best, bw, bs, bg = g + e, top, g, k
            for wl in local:
                ready = 0.0
                for fd, wd, q, nb in dinf:
                    if wd == wl:
                        # the scheduler's round trip, unless fused into its chain
                        a = fd if wl == fw else fd + rt
                    elif q == p:
                        a = fd + il + nb * ii
                    else:
                        a = fd + lat[q][p] + nb * inv[q][p]
                    if a > ready:
                        ready = a
                s0 = slots[wl][0]
                if ready > s0:
                    s0 = ready
                el = e if wl != fw else e - ov if e > ov else 0.0
                f = s0 + el
                if f < best:
                    best, bw, bs, bg = f, wl, s0, -1
                for k, (g0, g1) in enumerate(gaps[wl]):
                    g = ready if ready > g0 else g0
                    if g + el <= g1 and g + el < best:
                        best, bw, bs, bg = g + el, wl, g, k
        wg = gaps[bw]
        if bg >= 0:
            # into a gap: what is left of it on either side stays a gap
            g0, g1 = wg.pop(bg)
            if bs > g0:
                wg.append((g0, bs))
            if g1 > best:
                wg.append((best, g1))
        else:
            free = slots[bw][0]
            heapreplace(slots[bw], best)
            heappush(pheap[wpool[bw]], (slots[bw][0], bw))
            if bs > free and keep:
                wg.append((free, bs))
        if len(wg) > keep:
            # the gap that ends first is the least likely to be filled
            wg.remove(min(wg, key=lambda g: g[1]))
        worker_of[i] = bw
        start[i] = bs
        finish[i] = best
        if gi >= 0 and gi not in home:
            home[gi] = bw
    pool_of = [wpool[x] for x in worker_of]
    return pool_of, start, finish, worker_of


def _clusters(model: GraphModel, pools: list[Pool], cost: CostModel,
              allowed: list[list[int]], exec_t: list[list[float]]
              ) -> tuple[list[int], dict[int, list[int]]] | None:
    """Groups of tasks to keep on one worker: those joined by an edge whose data takes
    longer to move between two workers of a pool that runs both ends well (within
    twice their fastest) than the consumer takes to run there, heaviest edges first,
    as long as a group's work stays within its pool's share per worker of the work
    that pool is fastest for. Greedy earliest finish decides each task alone, so it
    splits work that meets again later: ``x + x.T`` reads block (i, j) and block
    (j, i) together, and whichever of them is placed second does not know it.
    Returns (group per task, -1 for none; the pools each group may use), or None when
    no two tasks are joined."""
    n = len(model.keys)
    layer, deps = model.layer, model.deps
    best = [min(exec_t[li][p] for p in a) for li, a in enumerate(allowed)]
    good = [frozenset(p for p in a if exec_t[li][p] <= 2 * best[li])
            for li, a in enumerate(allowed)]
    fastest = [min(a, key=exec_t[li].__getitem__) for li, a in enumerate(allowed)]
    share = [0.0] * len(pools)
    for li in layer:
        share[fastest[li]] += best[li]
    for p, pool in enumerate(pools):
        share[p] /= max(len(pool.worker_threads()), 1)
    ilat, iinv = cost.intra_latency, cost.intra_inv_bw
    out_b = [op.out_bytes for op in model.ops]
    edges: list[tuple[float, int, int, int]] = []
    pair_pool: dict[tuple[int, int], tuple[int, float] | None] = {}
    for i, ds in enumerate(deps):
        li = layer[i]
        for d in ds:
            ld = layer[d]
            key = (ld, li)
            if key not in pair_pool:
                both = good[ld] & good[li]
                if not both:
                    pair_pool[key] = None
                else:
                    p = min(both, key=lambda q: exec_t[li][q] + exec_t[ld][q])
                    move = ilat[p] + out_b[ld] * iinv[p]
                    pair_pool[key] = (p, move) if move > exec_t[li][p] else None
            hit = pair_pool[key]
            if hit is not None:
                edges.append((hit[1], d, i, hit[0]))
    if not edges:
        return None
    edges.sort(reverse=True)
    parent = list(range(n))
    work = [best[layer[i]] for i in range(n)]
    can: list[frozenset[int]] = [good[layer[i]] for i in range(n)]

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    joined = False
    for _, d, i, p in edges:
        a, b = root(d), root(i)
        if a == b:
            continue
        both = can[a] & can[b]
        if p not in both or work[a] + work[b] > share[p]:
            continue
        parent[a] = b
        work[b] += work[a]
        can[b] = both
        joined = True
    if not joined:
        return None
    roots = [root(x) for x in range(n)]
    size: dict[int, int] = {}
    for r in roots:
        size[r] = size.get(r, 0) + 1
    group = [r if size[r] > 1 else -1 for r in roots]
    return group, {r: sorted(can[r]) for r in size if size[r] > 1}


def kept_together(model: GraphModel, pools: list[Pool], cost: CostModel,
                  allowed: list[list[int]], worker_of: list[int]) -> list[int]:
    """The tasks of each :func:`_clusters` group that the plan runs on one worker (in
    task order): run elsewhere than their group, they would move data that takes
    longer to move than to compute, so the rewrite keeps them on that worker rather
    than on any worker of its pool (empty for graphs too large for the variants)."""
    if len(model.keys) * len(pools) > VARIANT_BUDGET or len(worker_of) != len(model.keys):
        return []
    exec_t = [[cost.exec_time(op, p) for p in pools] for op in model.ops]
    together = _clusters(model, pools, cost, allowed, exec_t)
    if together is None:
        return []
    group = together[0]
    where: dict[int, int] = {}
    split: set[int] = set()
    for i, g in enumerate(group):
        if g >= 0 and where.setdefault(g, worker_of[i]) != worker_of[i]:
            split.add(g)
    return [i for i, g in enumerate(group) if g >= 0 and g not in split]


def forced_backend(pools: list[Pool], route: str | Target) -> list[Pool]:
    """``pools`` for a route: one that names a backend other than NumPy
    (``"cpu:jax"``) gets that backend for every op it runs natively, so its pools
    do not run NumPy instead where NumPy is faster (see ``CostModel.runs_numpy``)."""
    if not isinstance(route, Target) or route.backend in (None, "numpy"):
        return pools
    return [dataclasses.replace(p, numpy_profile=None, numpy_members=[])
            if p.numpy_profile is not None and route.matches(p.kind, p.backend) else p
            for p in pools]


def route_constraints(model: Any, pools: list[Pool], route: Any, site: str | None,
                      cost: CostModel | None
                      ) -> tuple[str | Target, CostModel, list[list[int]], list[str]]:
    """The parsed route, the cost model, each op's allowed pools and the plan's notes
    (for plans made per task and per layer alike)."""
    route = parse_route_or_error(route)
    # a bad setting is said on every mesh, not only where a device's memory is read
    device_memory_fraction()
    cost = cost or CostModel(pools)
    if route == "off":
        allowed = [list(range(len(pools)))] * len(model.ops)
        notes = ["route is off: Dask places every task itself (estimates assume any worker)"]
    else:
        allowed, notes = allowed_pools(model, pools, route, site)
    return route, cost, allowed, notes


def relax_if_equivalent(model: Any, pools: list[Pool], route: str | Target,
                        site: str | None, cost: CostModel, allowed: list[list[int]],
                        notes: list[str]) -> tuple[bool, list[list[int]]]:
    """Whether routing would only get in the way (see :func:`equivalent_pools`); then
    every op may use every pool (with ``site=``, every pool at that site: the tasks are
    kept there and nothing else), and the notes say so."""
    here = [i for i, p in enumerate(pools) if site is None or p.site == site]
    mine = [pools[i] for i in here]
    unrestricted = route == "auto" and (site is None or bool(mine)) and not model.pins and all_fit(
        model, mine) and equivalent_pools(model, mine, cost)
    if unrestricted:
        allowed = [here] * len(model.ops)
        # JAX CPU workers among them run the ops with NumPy: say so, and how to force
        both = sorted({(p.label, p.target, p.backend) for p in mine
                       if p.numpy_profile is not None})
        # (the forced route runs that backend only where it runs some op: a DataFrame's
        # or a bag's run NumPy under any route)
        runs = [b for b in both if any(b[2] in op.native for op in model.ops)]
        why = (f" (the {', '.join(label for label, _, _ in both)} workers run them with "
               f"NumPy, which is no slower there"
               + (f"; route=\"{runs[0][1]}\" runs {runs[0][1].split(':')[1]}" if runs
                  else "") + ")" if both else "")
        if site is None:
            notes.append("every pool runs every op of this computation equally fast"
                         f"{why}: no restrictions, Dask places each task itself")
        else:
            notes.append(f"every pool at site {site!r} runs every op of this computation "
                         f"equally fast{why}: the tasks are kept at {site!r} and Dask "
                         f"places each among its workers")
    return unrestricted, allowed


def plan_model(model: GraphModel, pools: list[Pool], route: Any = "auto", *,
               site: str | None = None, cost: CostModel | None = None) -> Plan[GraphModel]:
    """Plan a computation: the pool of every task and the per-op summary."""
    pools = forced_backend(pools, parse_route_or_error(route))
    route, cost, allowed, notes = route_constraints(model, pools, route, site, cost)
    if not model.keys:
        return Plan(model, pools, str(route), [], [], [], cost, notes=notes)
    unrestricted, allowed = relax_if_equivalent(model, pools, route, site, cost, allowed,
                                                notes)
    pool_of, start, finish, worker_of = place(model, pools, cost, allowed)
    plan = Plan(model, pools, str(route), pool_of, start, finish, cost, notes=notes,
                site=site)
    plan.worker_of = worker_of
    plan.unrestricted = unrestricted
    if not unrestricted:
        plan.kept = kept_together(model, pools, cost, allowed, worker_of)
    plan.note_numpy_runs()
    cpu_cores = cost.host_cores if cost.cpu_per_task > 0 else None
    if cost.task_interval > 0 or cpu_cores:
        # the mesh dispatches one task at a time: a chain fused into one task is one
        chain = chain_links(model)
        # restricting nothing, the rewrite fuses every chain (Dask places them whole)
        fused = sum(1 for i, d in enumerate(chain)
                    if d >= 0 and (unrestricted or worker_of[i] == worker_of[d]))
        dispatched = len(model.keys) - fused
        plan.floor = dispatched * cost.task_interval
        if plan.floor > max(finish):
            plan.notes.append(
                f"estimate: at least {plan.floor:.2g} s, the "
                f"{plural(dispatched, 'task')} it dispatches at this mesh's measured "
                f"pace (one every "
                f"{format_ms(cost.task_interval)})")
        if cpu_cores:
            cpu = cpu_floor(pools, worker_of, start, finish, dispatched,
                            cost.cpu_per_task, cpu_cores)
            if cpu > max(plan.floor, max(finish)) * (1 + 1e-9):
                plan.floor = cpu
                plan.notes.append(
                    f"estimate: at least {cpu:.2g} s with Dask's own work: the workers' "
                    f"tasks and Dask ({format_ms(cost.cpu_per_task)} of CPU per task, "
                    f"{plural(dispatched, 'task')}) share this host's {cpu_cores} "
                    f"core{'s' * (cpu_cores != 1)}")
    return plan


def cpu_floor(pools: list[Pool], worker_of: list[int], start: list[float],
              finish: list[float], dispatched: int, cpu_per_task: float, cores: int
              ) -> float:
    """The least a schedule can take on a mesh whose scheduler and workers share one
    host of ``cores`` cores, with Dask's own CPU work (``cpu_per_task`` for each of the
    ``dispatched`` tasks) beside its tasks' own: that work takes the cores the schedule
    leaves idle, and what does not fit there comes on top. A task on a CPU worker keeps
    busy as many cores as its worker counts threads on them (a JAX worker one per core
    it may use, as XLA computes on all of them), at the host's share where those
    threads outnumber the cores (see ``cost.core_shares``); an accelerator's task keeps
    none. 0 where nothing is dispatched."""
    if dispatched <= 0 or cores <= 0 or not finish:
        return 0.0
    makespan = max(finish)
    # cores each thread of each worker keeps busy (workers numbered across the pools)
    per_thread: list[float] = []
    used = set(worker_of)
    counted: list[int] = []
    for pool in pools:
        threads = pool.worker_threads()
        members = pool.members if len(pool.members) == len(threads) else []
        for j, t in enumerate(threads):
            if pool.kind != "cpu":
                counted.append(0)
            else:
                counted.append(members[j][2] if members else t)
            per_thread.append(counted[-1] / t)
    demand = sum(c for w, c in enumerate(counted) if w in used)
    share = min(1.0, cores / demand) if demand else 1.0
    busy = sum((finish[i] - start[i]) * per_thread[w] * share
               for i, w in enumerate(worker_of))
    idle = max(cores * makespan - busy, 0.0)
    extra = dispatched * cpu_per_task - idle
    return makespan + extra / cores if extra > 0 else makespan


#: pools whose task times differ by less than this are interchangeable
EQUIVALENT_WITHIN = 0.02


def equivalent_pools(model: GraphModel, pools: list[Pool], cost: CostModel) -> bool:
    """Whether routing can only get in the way: one site, and every op takes the same
    time on every pool (an op a pool's backend does not run natively runs there on
    host NumPy, at that cost; an accelerator pays its host copies, so it differs)."""
    if len(pools) < 2:
        # one pool: nothing to choose, but a pool of accelerators (a GPU-only or
        # TPU-only mesh) must still run each op natively where its backend can
        return not pools or pools[0].backend == "numpy"
    if len({p.site for p in pools}) > 1:
        return False
    for op in model.ops:
        if not op.tasks:
            continue
        times = [cost.exec_time(op, p) for p in pools]
        lo, hi = min(times), max(times)
        if hi > lo * (1 + EQUIVALENT_WITHIN):
            return False
    return True
