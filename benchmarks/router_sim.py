"""A discrete-event SIMULATOR of modelled meshes, for router benchmarks (P2, P6).

Everything here is a simulation: devices, links and durations come from the router's
cost model applied to modelled profiles; nothing runs on real accelerators.

Policies compared on the same simulated mesh and the same evaluator:

* ``router``: the router's plan (a pool per task); inside a pool the task goes to the
  worker where it finishes first, as Dask would balance a resource-restricted task;
* ``heft``: classic HEFT (upward rank, earliest finish time) over individual workers;
* ``dask``: Dask without routing: no op runs on a device backend (NumPy everywhere, an
  accelerator worker is one host CPU thread), each ready task goes to the worker where
  it can start first, counting data transfer;
* ``bound``: a lower bound on any schedule: max(critical path at the fastest device,
  LP relaxation of the work per pool).
"""

from __future__ import annotations

import copy
import heapq
import itertools
import math
import random
from typing import Any

from jupyter_mesh.devices._profile import Profile, lookup_known
from jupyter_mesh.inventory import Device
from jupyter_mesh.router.classify import GraphModel, OpInfo
from jupyter_mesh.router.cost import CostModel, Links, build_pools
from jupyter_mesh.router.placement import allowed_pools, chain_links, kept_together, place

SIMULATED = "SIMULATION (modelled devices and links; nothing ran on accelerators)"

#: a 32-core server CPU (AVX-512, 8-channel DDR5: 2.4 TFLOP/s float32 and 200 GB/s for the
#: whole node) as one Dask worker with 32 threads. A profile is per thread: Dask's nanny
#: starts workers with one BLAS thread per worker thread (OMP/MKL/OPENBLAS_NUM_THREADS=1),
#: so each of the 32 tasks running at once gets a core and its share of the bandwidth
CPU_NODE_THREADS = 32
CPU_NODE = Profile(flops32=2.4e12 / CPU_NODE_THREADS, flops64=1.2e12 / CPU_NODE_THREADS,
                   mem_bandwidth=2.0e11 / CPU_NODE_THREADS, launch_latency=2e-6,
                   method="model",
                   source="modelled 32-core server CPU (AVX-512, 8-ch DDR5), per thread")
HOST_THREAD = Profile(flops32=7.5e10, flops64=3.75e10, mem_bandwidth=1.5e10,
                      launch_latency=2e-6, method="model", source="one host CPU core")


def _model(name: str) -> Profile:
    p = lookup_known(name)
    assert p is not None
    p.method = "model"
    return p


def modelled_mesh(sites: int = 2, memory: bool = True) -> list[Device]:
    """4×H100 and one 32-core CPU node at site A; 2×TPU v5e (and a CPU node) at site B.

    ``memory=False``: the accelerators report no memory, so the planner does not keep
    tasks off them for their size (the random DAGs' data volumes set their
    communication-to-computation ratio; they are not what a task holds)."""
    gpu_mem, tpu_mem = (80 << 30, 16 << 30) if memory else (0, 0)
    devs = [Device("sim://cpu-a", "cpu", "numpy", "32-core CPU", 1 << 38, "site-a", CPU_NODE,
                   name="cpu-a", nthreads=CPU_NODE_THREADS)]
    devs += [Device(f"sim://h100-{i}", "gpu", "cupy", "H100", gpu_mem, "site-a",
                    _model("H100"), name=f"h100-{i}") for i in range(4)]
    site_b = "site-b" if sites > 1 else "site-a"
    devs += [Device(f"sim://v5e-{i}", "tpu", "jax", "TPU v5e", tpu_mem, site_b,
                    _model("TPU v5e"), name=f"v5e-{i}") for i in range(2)]
    if sites > 1:
        devs.append(Device("sim://cpu-b", "cpu", "numpy", "32-core CPU", 1 << 38, site_b,
                           CPU_NODE, name="cpu-b", nthreads=CPU_NODE_THREADS))
    return devs


WAN = Links(wan_latency=0.06, wan_bandwidth=5e9 / 8, network_bandwidth=12.5e9,
            network_latency=5e-5, pcie_bandwidth=25e9)


def simulate(model: GraphModel, devices: list[Device], policy: str,
             links: Links = WAN) -> float:
    """Makespan of ``policy`` on the simulated mesh."""
    pools = build_pools(devices)
    cost = CostModel(pools, links, task_overhead=1e-4)
    # one pool per worker: HEFT's processors, and the evaluator's bookkeeping
    solo = [build_pools([d])[0] for d in devices]
    solo_cost = CostModel(solo, links, task_overhead=1e-4)
    n = len(model.keys)
    if policy in ("router", "router-pool"):
        # the router plans at worker granularity; live, the scheduler restricts each task
        # to its pool (narrowed to the workers of it the plan uses) and picks the worker
        # (router-pool evaluates that: inside those workers each task goes where it
        # finishes first, as Dask balances restricted tasks)
        allowed, _ = allowed_pools(model, pools, "auto")
        pool_of, start, _, worker_of = place(model, pools, cost, allowed)
        # live, the scheduler plugin gives ready tasks the plan's start times as their
        # priorities: the evaluator takes them in that order too
        by_start = sorted(range(n), key=lambda i: (start[i], i))
        if policy == "router":
            order = [w for p in pools for w in p.workers]
            index = {d.worker: j for j, d in enumerate(devices)}
            return _evaluate(model, solo, solo_cost, [[index[order[w]]] for w in worker_of],
                             order=by_start)
        # restricted to the workers of the pool the plan uses (all of them, unless
        # it leaves some idle on purpose: then live restrictions narrow to those too)
        order = [w for p in pools for w in p.workers]
        index = {d.worker: j for j, d in enumerate(devices)}
        members: list[set[int]] = [set() for _ in pools]
        for i in range(n):
            members[pool_of[i]].add(index[order[worker_of[i]]])
        cands = [sorted(members[p]) for p in range(len(pools))]
        per_task = [cands[pool_of[i]] for i in range(n)]
        # the tasks the plan keeps together stay on their planned worker (see
        # placement.kept_together), as live
        for i in kept_together(model, pools, cost, allowed, worker_of):
            per_task[i] = [index[order[worker_of[i]]]]
        return _evaluate(model, solo, solo_cost, per_task, order=by_start)
    if policy == "heft":
        allowed, _ = allowed_pools(model, solo, "auto")
        return heft(model, solo, solo_cost, allowed)
    if policy == "dask":
        # no routing: every task runs with NumPy; an accelerator worker is one host thread
        host = [Device(d.worker, "cpu", "numpy", d.model, d.memory, d.site,
                       d.profile if d.kind == "cpu" else HOST_THREAD, name=d.name,
                       nthreads=d.nthreads) for d in devices]
        hsolo = [build_pools([d])[0] for d in host]
        hcost = CostModel(hsolo, links, task_overhead=1e-4)
        return _evaluate(model, hsolo, hcost, [list(range(len(devices)))] * n,
                         earliest_start=True)
    raise ValueError(policy)



def _upward_rank_order(n: int, layer: list[int], deps: list[list[int]],
                       weight: list[float]) -> list[int]:
    """Task indices by decreasing upward rank (a task's weight plus its longest tail);
    tasks are in topological order, so one backward pass computes it."""
    rank = [0.0] * n
    for i in range(n - 1, -1, -1):
        rank[i] += weight[layer[i]]
        for d in deps[i]:
            if rank[d] < rank[i]:
                rank[d] = rank[i]
    return sorted(range(n), key=rank.__getitem__, reverse=True)


def heft(model: GraphModel, solo, cost: CostModel, allowed: list[list[int]]) -> float:
    """Classic HEFT (Topcuoglu et al. 2002): tasks in decreasing upward rank, each to
    the allowed worker where it finishes first (with its insertion policy), transfers
    between workers paid by their link. The rank is the paper's: a task's mean time over
    its allowed workers, plus the largest of its consumers' rank with the mean cost of
    sending its output to them (the mean latency and the mean inverse bandwidth over
    every ordered pair of distinct workers). The baseline the router is compared with.
    (Until 2026-11-30 its rank left out the communication; with it no array graph's
    makespan changed, and on the random DAGs HEFT got faster on some and slower on
    others.)"""
    ex = [[cost.exec_time(op, p) for p in solo] for op in model.ops]
    w = [max(sum(ex[li][p] for p in allowed[li]) / len(allowed[li]), 1e-12)
         for li in range(len(model.ops))]
    nw = len(solo)
    pairs = [(a, b) for a in range(nw) for b in range(nw) if a != b]
    mean_lat = sum(cost.latency[a][b] for a, b in pairs) / len(pairs) if pairs else 0.0
    mean_inv = sum(cost.inv_bw[a][b] for a, b in pairs) / len(pairs) if pairs else 0.0
    n = len(model.keys)
    send = [mean_lat + op.out_bytes * mean_inv for op in model.ops]
    rank = [0.0] * n
    # tasks are in topological order: one backward pass, each task's rank complete
    # before its inputs take theirs
    for i in range(n - 1, -1, -1):
        rank[i] += w[model.layer[i]]
        for d in model.deps[i]:
            via = send[model.layer[d]] + rank[i]
            if rank[d] < via:
                rank[d] = via
    order = sorted(range(n), key=lambda i: (-rank[i], i))
    return _evaluate(model, solo, cost, [allowed[li] for li in model.layer], order=order,
                     insertion=True)


def _evaluate(model: GraphModel, solo, cost: CostModel, cands: list[list[int]],
              earliest_start: bool = False, order: list[int] | None = None,
              insertion: bool = False) -> float:
    """List-schedule tasks in ``order`` (inputs first; default: upward rank); each goes
    to the candidate worker where it finishes first (or, like Dask, which knows no
    device speeds, starts first); transfers between workers are paid by their link.
    As Dask fuses a linear chain that runs on one worker into one task, a chain's next
    task on its input's worker pays no dispatch (``task_overhead``) of its own, under
    every policy. With ``insertion`` (HEFT's own policy), a task may also go into an
    idle gap an earlier task left on a thread of the worker, where it fits."""
    n = len(model.keys)
    ex = [[cost.exec_time(op, p) for p in solo] for op in model.ops]
    gaps: list[list[tuple[float, float]]] = [[] for _ in solo]
    chain = chain_links(model, fusing=True)
    ov = cost.task_overhead
    layer, deps = model.layer, model.deps
    out_b = [op.out_bytes for op in model.ops]
    if order is None:
        order = _upward_rank_order(n, layer, deps, [sum(r) / len(r) for r in ex])
    free = [[0.0] * max(p.slots, 1) for p in solo]
    where = [-1] * n
    finish = [0.0] * n
    lat, inv = cost.latency, cost.inv_bw
    for i in order:
        li = layer[i]
        best, bw, bs, be, bg = math.inf, -1, 0.0, 0.0, -1
        for w in cands[i]:
            ready = 0.0
            for d in deps[i]:
                q = where[d]
                f = finish[d] + (0.0 if q == w else lat[q][w] + out_b[layer[d]] * inv[q][w])
                if f > ready:
                    ready = f
            s = max(ready, free[w][0])
            e = ex[li][w]
            if chain[i] >= 0 and where[chain[i]] == w:
                e = e - ov if e > ov else 0.0
            key = s if earliest_start else s + e
            if key < best:
                best, bw, bs, be, bg = key, w, s, e, -1
            for k, (g0, g1) in enumerate(gaps[w]):
                g = max(g0, ready)
                if g + e <= g1 and (g if earliest_start else g + e) < best:
                    best, bw, bs, be, bg = (g if earliest_start else g + e), w, g, e, k
        f = bs + be
        if bg >= 0:
            g0, g1 = gaps[bw].pop(bg)
            gaps[bw] += [gap for gap in ((g0, bs), (f, g1)) if gap[1] > gap[0]]
        else:
            if insertion and bs > free[bw][0]:
                gaps[bw].append((free[bw][0], bs))
            heapq.heapreplace(free[bw], f)
        where[i] = bw
        finish[i] = f
    return max(finish) if finish else 0.0


def lower_bound(model: GraphModel, devices: list[Device], links: Links = WAN, *,
                cost: CostModel | None = None, tolerance: float = 2e-3,
                fused: bool = True) -> float:
    """A lower bound on the makespan of any schedule of ``model`` on the mesh (with
    ``fused``, also of schedules whose linear chains run fused; without, of schedules
    that dispatch every task on its own), each task timed by the router's cost model on
    a pool that may run its op (the ``dask`` policy times NumPy on an accelerator worker
    as a host CPU thread instead: it is not covered). Pools whose devices differ are
    bounded device by device (a pool is timed at its members' average).

    The general bound (:func:`_bound_over`) holds for every schedule. With several
    sites and a connected graph, every schedule either sends some task's input across
    sites (then it takes at least the shortest such path: ``crossing``) or runs the
    whole graph at one site (then it takes at least the general bound over that site's
    pools alone); the least of those, if larger, is a bound too."""
    if cost is not None:
        pools = cost.pools
    else:
        pools = build_pools(devices)
        if any(len({(repr(d.profile), d.nthreads) for d in devices if d.worker in p.workers}) > 1
               for p in pools):
            # a pool is timed at its members' average, which a schedule on its faster
            # members beats: bound over each device as a pool of its own
            pools = [build_pools([d])[0] for d in devices]
    cost = cost or CostModel(pools, links, task_overhead=1e-4)
    if fused:
        cost = _fused(model, cost)
    allowed, _ = allowed_pools(model, pools, "auto")
    parts: dict[str, Any] = {}
    general = _bound_over(model, pools, cost, allowed, tolerance, parts)
    sites = sorted({p.site for p in pools})
    if len(sites) < 2 or not _connected(model):
        return general
    ef, tail, ex = parts["ef"], parts["tail"], parts["ex"]
    inf = math.inf
    crossing = inf
    out_b = [op.out_bytes for op in model.ops]
    for i, ds in enumerate(model.deps):
        li = model.layer[i]
        for d in ds:
            ld = model.layer[d]
            for p in allowed[ld]:
                for q in allowed[li]:
                    if pools[p].site != pools[q].site:
                        t = (ef[d][p] + cost.transfer(out_b[ld], p, q, same_worker=False)
                             + ex[li][q] + tail[i][q])
                        if t < crossing:
                            crossing = t
    one_site = inf
    for s in sites:
        here = [[p for p in a if pools[p].site == s] for a in allowed]
        if all(here):
            one_site = min(one_site, _bound_over(model, pools, cost, here, tolerance))
    return max(general, min(crossing, one_site))


def _fused(model: GraphModel, cost: CostModel) -> CostModel:
    """``cost`` with every op of which some task continues a linear chain charged its
    time less the dispatch (fused into its input's task, it pays none), so a bound
    made with it stays below schedules that Dask's fusion shortens."""
    chain = chain_links(model, fusing=True)
    ops = {id(model.ops[model.layer[i]]) for i, d in enumerate(chain) if d >= 0}
    ov = cost.task_overhead
    if not ops or ov <= 0:
        return cost
    fused = copy.copy(cost)
    base = cost.exec_time

    def exec_time(op: Any, pool: Any) -> float:
        t = base(op, pool)
        return max(t - ov, 0.0) if id(op) in ops else t

    fused.exec_time = exec_time  # type: ignore[method-assign]
    return fused


def _connected(model: GraphModel) -> bool:
    """Whether the tasks form one weakly connected graph."""
    edges = ((i, d) for i, ds in enumerate(model.deps) for d in ds)
    return len(set(_joined(len(model.deps), edges))) <= 1


def _joined(n: int, pairs: Any) -> list[int]:
    """For each of ``n`` items, a representative of the group ``pairs`` join it to
    (union-find)."""
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[ra] = rb
    return [root(x) for x in range(n)]


#: ancestors (the latest in topological order) each task's deeper start bound looks at
DEEP_ANCESTORS = 400


def _towards(i: int, model: GraphModel, best: list[float], anc: list[int],
             consumers: list[list[int]], most: int) -> tuple[list[int], dict[int, float]]:
    """The ``most`` latest ancestors of task i in topological order (largest index first)
    and, for each, ``via``: the least, over its consumers c that lie on a path to i, of
    the longest chain of least task times from c up to i (i excluded). Restricting the
    ancestors to those with an index of at least some cut keeps the set closed under
    "lies between a and i" (tasks are in topological order), so every path from a member
    to i stays among the members."""
    layer = model.layer
    members = []
    x = anc[i]
    while x and len(members) < most:
        top = x.bit_length() - 1
        members.append(top)
        x ^= 1 << top
    chain: dict[int, float] = {i: 0.0}
    via: dict[int, float] = {}
    for c in members:
        longest = 0.0
        least = math.inf
        for j in consumers[c]:
            cj = chain.get(j)
            if cj is None:
                continue
            if cj > longest:
                longest = cj
            if cj < least:
                least = cj
        chain[c] = best[layer[c]] + longest
        via[c] = least
    return members, via


def _away_keys(p: int, members: list[int], via: dict[int, float], model: GraphModel,
               cost: CostModel, ef: list[list[float]], consumers: list[list[int]],
               npools: int) -> dict[int, float]:
    """key(a) for each ancestor a of a task i run on a worker w of pool p: the earliest
    i can start if a did not run on w. Take any path from a to i; its last task b not on
    w (a itself, or a later one) hands its output across a link to its successor c on
    the path, which ran on w, and every task from c to i ran after it. So i starts no
    earlier than the earliest b finishes anywhere plus the least transfer from there to
    another worker of p, plus ``via`` (b); key(a) is the least of that over every b
    between a and i."""
    layer = model.layer
    key: dict[int, float] = {}
    for b in members:
        nb = model.ops[layer[b]].out_bytes
        efb = ef[b]
        away = min(efb[q] + cost.transfer(nb, q, p, same_worker=False)
                   for q in range(npools))
        k = away + via[b]
        for j in consumers[b]:
            kj = key.get(j)
            if kj is not None and kj < k:
                k = kj
        key[b] = k
    return key


def _deep_heads(i: int, model: GraphModel, cost: CostModel, pools: list,
                allowed: list[list[int]], ex: list[list[float]], best: list[float],
                threads: list[int], ef: list[list[float]], row: list[float],
                anc: list[int], consumers: list[list[int]], most: int) -> None:
    """Raise ``row`` (the earliest finish of task i on each pool) by looking at all of
    i's ancestors A (the ``most`` latest in topological order, :func:`_towards`), not
    only its inputs.

    Say i runs on worker w of pool p, and X is the set of its ancestors that also ran
    on w. Then i starts no earlier than
      (1) the finish on p of any member of X, and the work of X on w: they all ran on
          w before i, so their times on p over w's threads;
      (2) for each ancestor a not in X, key(a) (:func:`_away_keys`).
    For every X, the bound is the larger of those terms; the least over every X is a
    bound. As for the inputs above, the sets X made of the ancestors with the
    largest keys (a prefix of A sorted by key, largest first) are enough: the terms
    in (1) only grow with X, and for any X the prefix of the ancestors with keys above
    the largest key outside X is a subset of X. Dropping ancestors (the cut) only
    drops terms: still a bound."""
    layer = model.layer
    members, via = _towards(i, model, best, anc, consumers, most)
    npools = len(pools)
    li = layer[i]
    for p in allowed[li]:
        key = _away_keys(p, members, via, model, cost, ef, consumers, npools)
        order = sorted(members, key=key.__getitem__, reverse=True)
        forced = 0.0  # ancestors that may not run on p are never in X
        ok = []
        for a in order:
            if p in allowed[layer[a]]:
                ok.append(a)
            elif key[a] > forced:
                forced = key[a]
        t = threads[p]
        ready = max(forced, key[ok[0]]) if ok else forced
        here = busy = 0.0
        for j, a in enumerate(ok):
            if ready <= forced:
                break
            here = max(here, ef[a][p])
            busy += ex[layer[a]][p]
            rest = key[ok[j + 1]] if j + 1 < len(ok) else 0.0
            r = max(here, busy / t, rest, forced)
            if r < ready:
                ready = r
        f = ready + ex[li][p]
        if f > row[p]:
            row[p] = f


def _bound_over(model: GraphModel, pools: list, cost: CostModel,
                allowed: list[list[int]], tolerance: float,
                parts: dict[str, Any] | None = None) -> float:
    """max(critical path with communication and without contention, the LP relaxation
    of spreading each op's tasks over the pools with release and delivery times, the
    work of the tasks that must share a worker), for schedules that run each op only on
    its ``allowed`` pools."""
    parts = {} if parts is None else parts
    lo = _cp_lp_bound(model, pools, cost, allowed, tolerance, parts)
    # the search for a T that (D) shows infeasible is not monotone (see
    # _together_bound): it starts from the LP's bound and from the critical path's
    together = _together_bound(model, pools, cost, allowed, tolerance, parts, lo)
    if parts["cp"] < lo:
        together = max(together, _together_bound(model, pools, cost, allowed, tolerance,
                                                 parts, parts["cp"]))
    return max(lo, together)


def _cp_lp_bound(model: GraphModel, pools: list, cost: CostModel,
                 allowed: list[list[int]], tolerance: float, parts: dict[str, Any]
                 ) -> float:
    """max(critical path with communication and without contention, the LP relaxation
    of spreading each op's tasks over the pools with release and delivery times, where
    the tasks that an op with more tasks than slots before them holds back
    (:func:`_late_groups`) also start no earlier than their wave); what it computes on
    the way goes into ``parts``."""
    ex = [[cost.exec_time(op, p) for p in pools] for op in model.ops]
    best = [min(ex[li][p] for p in allowed[li]) for li in range(len(model.ops))]
    # critical path with communication but no contention: the earliest each task could
    # finish on each pool. Task i runs on one worker w of some pool p; each input either
    # ran on w itself (no transfer, but then it occupied one of w's threads) or elsewhere
    # (its bytes cross a link: from another pool, or from another worker of p). So for
    # the set S of inputs that ran on w, i starts no earlier than
    #   max(latest finish on p of an input in S, latest arrival of an input not in S,
    #       total time of the inputs in S / threads of the largest worker of p)
    # and the bound takes the least of that over every S. Sorting the inputs by their
    # arrival from elsewhere (largest first), the sets S made of a prefix of that order
    # are enough: for any S, the prefix of inputs arriving strictly later than the
    # latest arrival outside S is a subset of S, so no term grows.
    inf = math.inf
    npools = len(pools)
    threads = [max(p.worker_threads()) for p in pools]
    ef: list[list[float]] = []
    out_b = [op.out_bytes for op in model.ops]
    consumers_all: list[list[int]] = [[] for _ in model.deps]
    for i, ds in enumerate(model.deps):
        for d in set(ds):
            consumers_all[d].append(i)
    anc: list[int] = []  # ancestors of each task, as a bit set
    for ds in model.deps:
        a = 0
        for d in ds:
            a |= anc[d] | (1 << d)
        anc.append(a)
    for i, ds in enumerate(model.deps):
        li = model.layer[i]
        row = [inf] * npools
        for p in allowed[li]:
            opts = []
            for d in set(ds):
                efd = ef[d]
                ld = model.layer[d]
                nb = out_b[ld]
                away = min(efd[q] + cost.transfer(nb, q, p, same_worker=False)
                           for q in range(npools))
                opts.append((away, efd[p], ex[ld][p]))
            opts.sort(reverse=True)
            k = len(opts)
            ready = opts[0][0] if opts else 0.0
            here = 0.0
            busy = 0.0
            for j in range(k):
                # inputs 0..j on the same worker as i, the rest from elsewhere
                here = max(here, opts[j][1])
                busy += opts[j][2]
                rest = opts[j + 1][0] if j + 1 < k else 0.0
                r = max(here, rest, busy / threads[p])
                if r < ready:
                    ready = r
            row[p] = ready + ex[li][p]
        if DEEP_ANCESTORS and ds:
            _deep_heads(i, model, cost, pools, allowed, ex, best, threads, ef, row,
                        anc, consumers_all, DEEP_ANCESTORS)
        ef.append(row)
    # the least time from a task's finish (on each pool) to the end of any schedule:
    # each consumer runs after it, on the same worker (no transfer) or anywhere else
    # (its input crosses a link), and then its own tail follows
    n = len(model.deps)
    consumers: list[set[int]] = [set() for _ in range(n)]
    for i, ds in enumerate(model.deps):
        for d in ds:
            consumers[d].add(i)
    tail = [[0.0] * npools for _ in range(n)]
    for i in range(n - 1, -1, -1):
        li = model.layer[i]
        row = tail[i]
        for p in allowed[li]:
            worst = 0.0
            for j in consumers[i]:
                lj = model.layer[j]
                via = [ex[lj][p] + tail[j][p]] if p in allowed[lj] else []
                via += [cost.transfer(out_b[li], p, q, same_worker=False) + ex[lj][q]
                        + tail[j][q] for q in allowed[lj]]
                worst = max(worst, min(via))
            row[p] = worst
    # a task on pool p starts no earlier than ef - ex and leaves at least its tail
    bound_cp = max((min(ef[i][p] + tail[i][p] for p in allowed[model.layer[i]])
                    for i in range(n)), default=0.0)
    parts.update(ef=ef, tail=tail, ex=ex, best=best, threads=threads, anc=anc,
                 consumers=consumers_all, cp=bound_cp)
    try:
        from scipy.optimize import linprog
        from scipy.sparse import coo_matrix
    except ImportError:  # pragma: no cover
        total = sum(best[li] for li in model.layer)
        return max(bound_cp, total / sum(p.slots for p in pools))
    # LP relaxation with release and delivery times: x[g, p] tasks of group g (an op's
    # tasks) on pool p. Every task of g on p starts no earlier than r[g][p] (the least
    # start of its tasks there) and leaves at least q[g][p] after it (the least tail).
    # A schedule of makespan T therefore puts, for any thresholds a and b, the work of
    # the groups with r >= a and q >= b on p inside [a, T - b] when it puts any there:
    #   sum x[g, p] * ex[g][p] <= slots[p] * max(0, T - a - b)
    # (a = b = 0: the plain LP, the work per pool fits in its slots over T), and no task
    # of g on p when r + ex + q > T. For a fixed T these are linear, and feasibility only
    # grows with T, so the bound is the least T found feasible by bisection.
    nl = len(model.ops)
    r = [[inf] * npools for _ in range(nl)]
    q = [[inf] * npools for _ in range(nl)]
    for i in range(n):
        li = model.layer[i]
        for p in allowed[li]:
            r[li][p] = min(r[li][p], ef[i][p] - ex[li][p])
            q[li][p] = min(q[li][p], tail[i][p])

    def levels(values: list[float], most: int = 16) -> list[float]:
        v = sorted(set(values))
        if len(v) > most:  # any subset of valid constraints is valid: keep quantiles
            v = sorted({v[round(t * (len(v) - 1) / (most - 1))] for t in range(most)})
        return v

    # late groups (see _late_groups): z[k, p] of group k's tasks (of op h) on pool p start
    # no earlier than c; at least `count` of them in all, each also counted in x[h, p]
    late = _late_groups(model, pools, allowed, ex, best, parts["anc"], r)
    nx = nl * npools
    nvar = nx + len(late) * npools
    rows, cols, vals, windows = [], [], [], []  # windows: (slots, a + b) per row
    for p in range(npools):
        members = [li for li in range(nl) if p in allowed[li]]
        if not members:
            continue
        mine = [k for k, (h, _, _) in enumerate(late) if p in allowed[h]]
        # the late groups' starts come on top of the ops' own (not among their quantiles)
        starts = levels([r[li][p] for li in members])
        starts = sorted(set(starts) | set(levels([late[k][1] for k in mine])))
        for a in starts:
            # per op whose tasks may start before a: the late group that starts at a or
            # later with the most tasks (groups of one op overlap: one at a time)
            pick: dict[int, int] = {}
            for k in mine:
                h, c, cnt = late[k]
                if r[h][p] < a <= c and (h not in pick or cnt > late[pick[h]][2]):
                    pick[h] = k
            for b in levels([q[li][p] for li in members if r[li][p] >= a or li in pick]):
                row = len(windows)
                for li in members:
                    if q[li][p] < b:
                        continue
                    if r[li][p] >= a:
                        rows.append(row)
                        cols.append(li * npools + p)
                        vals.append(ex[li][p])
                    elif li in pick:
                        rows.append(row)
                        cols.append(nx + pick[li] * npools + p)
                        vals.append(ex[li][p])
                windows.append((float(pools[p].slots), a + b))
    # z[k, p] <= x[h, p], and -sum_p z[k, p] <= -count
    extra_b: list[float] = []
    for k, (h, _, cnt) in enumerate(late):
        for p in range(npools):
            row = len(windows) + len(extra_b)
            rows += [row, row]
            cols += [nx + k * npools + p, h * npools + p]
            vals += [1.0, -1.0]
            extra_b.append(0.0)
        row = len(windows) + len(extra_b)
        for p in range(npools):
            rows.append(row)
            cols.append(nx + k * npools + p)
            vals.append(-1.0)
        extra_b.append(-cnt)
    a_ub = coo_matrix((vals, (rows, cols)),
                      shape=(len(windows) + len(extra_b), nvar)).tocsr()
    erows = [li for li in range(nl) for _ in range(npools)]
    a_eq = coo_matrix(([1.0] * nx, (erows, list(range(nx)))), shape=(nl, nvar)).tocsr()
    b_eq = [float(model.ops[li].tasks) for li in range(nl)]

    def feasible(t: float) -> bool:
        b_ub = [slots * max(0.0, t - ab) for slots, ab in windows] + extra_b
        bounds = [(0, None) if p in allowed[li] and r[li][p] + ex[li][p] + q[li][p] <= t
                  else (0, 0) for li in range(nl) for p in range(npools)]
        bounds += [(0, None) if p in allowed[h] and c + ex[h][p] + q[h][p] <= t else (0, 0)
                   for h, c, _ in late for p in range(npools)]
        res = linprog([0.0] * nvar, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq,
                      bounds=bounds, method="highs")
        return res.status == 0

    if nvar == 0:
        return bound_cp
    return _bisect(feasible, bound_cp, tolerance)


#: late groups: at most this many completion waves per op, and ops looked at
LATE_WAVES = 3
LATE_OPS = 12


def _late_groups(model: GraphModel, pools: list, allowed: list[list[int]],
                 ex: list[list[float]], best: list[float], anc: list[int],
                 r: list[list[float]]) -> list[tuple[int, float, float]]:
    """Tasks that start late because an op before them has more tasks than the mesh
    runs at once: (op h, c, count) = in any schedule, at least ``count`` tasks of h
    start at c or later.

    Take an op g of m tasks. On pool p none of them starts before r[g][p] (the least
    release of its tasks there), and each takes ex[g][p] on one of the pool's slots,
    so fewer than N(c) = sum over p of slots_p * (ceil((c - r) / ex) - 1) of them
    finish before c. Whenever N(c) < m, at least m - N(c) of g's tasks (a set L)
    finish at c or later, and so does everything after them: a task d of a later op h
    with an ancestor in L starts at c or later, plus the least time of the tasks
    between (``dist``, at their fastest). The schedule chooses which tasks are early;
    d is early only if all of its a_d ancestors in g are, so splitting d over them
    (1 / a_d each, summed per ancestor j: u_j), the early tasks of h number at most
    the N(c) largest u_j: count = (tasks of h after g) - that sum."""
    layer = model.layer
    n = len(layer)
    nl = len(model.ops)
    by_op: list[list[int]] = [[] for _ in range(nl)]
    for i, li in enumerate(layer):
        by_op[li].append(i)

    def done_before(g: int, c: float) -> float:
        if any(ex[g][p] <= 0 and pools[p].slots > 0 and r[g][p] < c for p in allowed[g]):
            return math.inf  # a pool that runs the op in no time finishes any number
        return sum(pools[p].slots * max(0, math.ceil((c - r[g][p]) / ex[g][p] - 1e-9) - 1)
                   for p in allowed[g] if ex[g][p] > 0 and pools[p].slots > 0)

    waves: list[tuple[int, int, list[float]]] = []  # (late tasks, op, cut-offs)
    for g in range(nl):
        m = len(by_op[g])
        if m < 2:
            continue
        cuts = set()
        for p in allowed[g]:  # the completion waves: r + k ex
            if ex[g][p] <= 0 or pools[p].slots <= 0:
                continue
            for k in range(1, m + 1):
                cuts.add(r[g][p] + k * ex[g][p])
                if k * pools[p].slots >= m:
                    break
        late_cuts = sorted((c for c in cuts if done_before(g, c) < m), reverse=True)
        if late_cuts:
            waves.append((int(m - done_before(g, late_cuts[0])), g, late_cuts[:LATE_WAVES]))
    waves.sort(reverse=True)
    out: list[tuple[int, float, float]] = []
    for _, g, cuts in waves[:LATE_OPS]:
        tasks = by_op[g]
        mask = 0
        for j in tasks:
            mask |= 1 << j
        pos = {j: k for k, j in enumerate(tasks)}
        u: dict[int, list[float]] = {}  # op h -> u_j per task of g
        after: dict[int, int] = {}
        dist = [math.inf] * n
        near: dict[int, float] = {}  # op h -> the least dist of its tasks
        for j in tasks:
            dist[j] = 0.0
        for d in range(tasks[0] + 1, n):
            h = layer[d]
            bits = anc[d] & mask
            if h == g or not bits:
                continue
            dd = min((dist[e] + (best[layer[e]] if layer[e] != g else 0.0)
                      for e in model.deps[d] if dist[e] < math.inf), default=0.0)
            dist[d] = dd
            near[h] = min(near.get(h, math.inf), dd)
            a_d = bits.bit_count()
            row = u.setdefault(h, [0.0] * len(tasks))
            after[h] = after.get(h, 0) + 1
            while bits:
                low = bits & -bits
                row[pos[low.bit_length() - 1]] += 1.0 / a_d
                bits ^= low
        ranked = {h: sorted(row, reverse=True) for h, row in u.items()}
        for c in cuts:
            top = int(min(done_before(g, c), len(tasks)))
            for h, row in ranked.items():
                cnt = after[h] - sum(row[:top])
                if cnt > 1e-9:
                    out.append((h, c + near[h], cnt))
    return out


def _together_bound(model: GraphModel, pools: list, cost: CostModel,
                    allowed: list[list[int]], tolerance: float, parts: dict[str, Any],
                    lo: float) -> float:
    """Raise the bound ``lo`` by the tasks that must share a worker.

    For a task i and an ancestor a of it, say i runs on a worker w of pool p. If a did
    not run on w, i starts no earlier than key(a) (:func:`_away_keys`) and the schedule
    ends no earlier than key(a) + i's time on p + its least tail there. So in a schedule
    of makespan T, a ran on i's worker whenever that exceeds T for every pool i may run
    on (``threshold``(i, a) > T). Running on the same worker is an equivalence, so the
    tasks linked by such pairs (a connected component of them) all ran on one worker of
    one pool that allows them all; then that worker ran their work over its threads
    between the earliest of their release times and T less the least of their tails,
    and each of their paths with no transfer. A component whose every pool needs longer
    than T makes T infeasible: then no schedule takes T or less (it would have put each
    component on one worker, within T), whatever other T were found. Fewer pairs are
    forced as T grows, so feasibility mostly grows with T (not always: two groups that
    merge at a smaller T can fit where one of them alone does not, its release and tail
    being the later), and the bisection returns T shown infeasible or ``lo``: a bound
    either way, if not always the largest such T. Where moving data
    costs far more than computing it, every task is linked to its ancestors and the
    bound becomes the time of the whole graph on one worker (the random DAGs at high
    CCR); where it costs little, nothing is forced and ``lo`` stands."""
    ef, tail, ex = parts["ef"], parts["tail"], parts["ex"]
    best, threads = parts["best"], parts["threads"]
    anc, consumers = parts["anc"], parts["consumers"]
    layer, deps = model.layer, model.deps
    n = len(deps)
    npools = len(pools)
    inf = math.inf
    pairs: list[tuple[float, int, int]] = []
    for i in range(n):
        if not deps[i]:
            continue
        members, via = _towards(i, model, best, anc, consumers, DEEP_ANCESTORS)
        li = layer[i]
        thr = dict.fromkeys(members, inf)
        for p in allowed[li]:
            key = _away_keys(p, members, via, model, cost, ef, consumers, npools)
            end = ex[li][p] + tail[i][p]
            for a in members:
                t = key[a] + end
                if t < thr[a]:
                    thr[a] = t
        pairs.extend((t, i, a) for a, t in thr.items() if t > lo)
    if not pairs:
        return lo
    pairs.sort(reverse=True)
    allowed_sets = [set(a) for a in allowed]

    def least_time(group: list[int]) -> float:
        """The least time any one worker needs for ``group`` (in topological order)."""
        least = inf
        inside = set(group)
        for p in range(npools):
            if any(p not in allowed_sets[layer[k]] for k in group):
                continue
            release = min(ef[k][p] - ex[layer[k]][p] for k in group)
            rest = min(tail[k][p] for k in group)
            t = release + sum(ex[layer[k]][p] for k in group) / threads[p] + rest
            finish: dict[int, float] = {}
            for k in group:
                s = ef[k][p] - ex[layer[k]][p]
                for d in deps[k]:
                    if d in inside and finish[d] > s:
                        s = finish[d]
                finish[k] = s + ex[layer[k]][p]
                if finish[k] + tail[k][p] > t:
                    t = finish[k] + tail[k][p]
            least = min(least, t)
        return least

    def feasible(t: float) -> bool:
        # pairs are sorted by threshold, largest first: those above t are forced
        forced = ((i, a) for _, i, a in itertools.takewhile(lambda q: q[0] > t, pairs))
        groups: dict[int, list[int]] = {}
        for k, r in enumerate(_joined(n, forced)):
            groups.setdefault(r, []).append(k)
        return all(len(g) < 2 or least_time(g) <= t for g in groups.values())

    return _bisect(feasible, lo, tolerance)


def _bisect(feasible: Any, lo: float, tolerance: float) -> float:
    """``lo`` where it is ``feasible``; else a T shown infeasible, within ``tolerance``
    of the least feasible one found by doubling and bisection (below it, every T tried
    was infeasible: a valid bound)."""
    if feasible(lo):
        return lo
    hi = max(lo, 1e-9) * 2
    while not feasible(hi):
        lo, hi = hi, hi * 2
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    return lo


def one_device(model: GraphModel, devices: list[Device], links: Links = WAN) -> float:
    """Everything on the single device that runs it fastest, one task after another
    (no transfers; each linear chain fused, as Dask runs it): an achievable schedule,
    for reference."""
    solo = [build_pools([d])[0] for d in devices]
    cost = CostModel(solo, links, task_overhead=1e-4)
    allowed, _ = allowed_pools(model, solo, "auto")
    chain = chain_links(model, fusing=True)
    ov = cost.task_overhead
    best = math.inf
    for w, pool in enumerate(solo):
        if any(w not in a for a in allowed):
            continue
        ex = [cost.exec_time(op, pool) for op in model.ops]
        best = min(best, sum(ex[li] - (min(ov, ex[li]) if chain[i] >= 0 else 0.0)
                             for i, li in enumerate(model.layer)))
    return best


def random_dag(seed: int, n: int = 200, width: int = 12) -> GraphModel:
    """A HEFT-style random layered DAG of array ops with random sizes."""
    rng = random.Random(seed)
    classes = ["matmul", "elementwise", "fft", "reduction", "elementwise", "matmul"]
    ops, keys, layer, deps = [], [], [], []
    levels: list[list[int]] = []
    while len(keys) < n:
        level = []
        for _ in range(rng.randint(2, width)):
            if len(keys) >= n:
                break
            cls = rng.choice(classes)
            side = rng.choice([256, 512, 1024, 2048, 4096])
            size = 4
            elems = side * side
            flops = {"matmul": 2.0 * side**3, "fft": 5.0 * elems * math.log2(side),
                     "elementwise": float(elems), "reduction": float(elems)}[cls]
            i = len(keys)
            par = []
            if levels:
                pool = [t for lv in levels[-3:] for t in lv]
                par = rng.sample(pool, min(len(pool), rng.randint(1, 3)))
            in_b = sum(ops[layer[p]].out_bytes for p in par)
            op = OpInfo(name=f"{cls}-{i}", label=f"{cls}-{i}", op_class=cls, tasks=1,
                        flops=flops, out_bytes=elems * size, in_bytes=in_b,
                        mem_bytes=in_b + elems * size, itemsize=size,
                        native=frozenset({"numpy", "cupy", "jax"}))
            layer.append(len(ops))
            ops.append(op)
            keys.append(("t", i))
            deps.append(par)
            level.append(i)
        levels.append(level)
    return GraphModel(ops=ops, keys=keys, layer=layer, deps=deps, outputs=[keys[-1]])


#: the communication-to-computation ratios of the HEFT paper's random graphs
HEFT_CCRS = (0.1, 0.5, 1.0, 5.0, 10.0)


def heft_dag(seed: int, ccr: float, n: int = 200, width: int = 12,
             devices: list[Device] | None = None, links: Links = WAN) -> GraphModel:
    """A random layered DAG as in the HEFT paper (Topcuoglu et al. 2002), with a set
    communication-to-computation ratio: each task's output takes ``ccr`` times its mean
    computation time over the mesh's devices to cross the same-site network (times a
    random factor in [0.5, 1.5]); the WAN's latency comes on top. The ops are the
    array ops of :func:`random_dag`, so devices differ per op class as they do there."""
    base = random_dag(seed, n, width)
    solo = [build_pools([d])[0] for d in (devices or modelled_mesh(memory=False))]
    cost = CostModel(solo, links, task_overhead=1e-4)
    rng = random.Random(seed * 7919 + 1)
    for op in base.ops:
        mean = sum(cost.exec_time(op, p) for p in solo) / len(solo)
        op.out_bytes = max(8.0, ccr * mean * links.network_bandwidth * rng.uniform(0.5, 1.5))
    for i, ds in enumerate(base.deps):
        base.ops[base.layer[i]].in_bytes = sum(base.ops[base.layer[d]].out_bytes for d in ds)
    return base
