"""Placement: earliest-finish-time list scheduling (HEFT-like) of tasks over device pools.

Tasks are taken in decreasing upward rank (the classic HEFT priority); each goes to the
allowed pool where it would finish first, counting the time its inputs need to arrive
from the pools that produce them. Work is linear in tasks × pools (× inputs per task).
"""

from __future__ import annotations

import heapq
from typing import Any

from ..errors import MeshError
from ..targets import Target, parse_route
from .classify import GraphModel
from .cost import CostModel, Pool
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
    notes: list[str] = []
    idx = list(range(len(pools)))
    if site is not None:
        idx = [i for i in idx if pools[i].site == site]
        if not idx:
            sites = sorted({p.site for p in pools})
            raise MeshError(
                f"no worker at site {site!r}: the mesh has sites {', '.join(sites) or 'none'}"
            )
    if not idx:
        raise MeshError("the mesh has no live workers to route to")
    matching = idx
    if isinstance(route, Target):
        matching = [i for i in idx if route.matches(pools[i].kind, pools[i].backend)]
        if not matching:
            where = f" at site {site!r}" if site else ""
            raise MeshError(
                f"no live {route} worker{where}: the mesh has {_have([pools[i] for i in idx])}; "
                f"use route='auto' or one of those targets"
            )
    host = [i for i in idx if pools[i].backend == "numpy"]
    allowed: list[list[int]] = []
    for op in model.ops:
        native = [i for i in matching if pools[i].backend in op.native]
        if native:
            allowed.append(native)
            continue
        if isinstance(route, Target):
            fallback = [i for i in host if op.op_class in ("creation", "other")] or host
            notes.append(
                f"{op.label}: {route} does not run {op.op_class} ops natively; "
                f"placed on {'host NumPy' if fallback else route}"
            )
            allowed.append(fallback or matching)
        else:
            allowed.append(host or idx)
    return allowed, notes


def place(model: GraphModel, pools: list[Pool], cost: CostModel,
          allowed: list[list[int]]) -> tuple[list[int], list[float], list[float]]:
    """Assign every task a pool. Returns (pool per task, start, finish)."""
    n = len(model.keys)
    ops = model.ops
    layer = model.layer
    deps = model.deps
    exec_t = [[cost.exec_time(op, p) for p in pools] for op in ops]
    out_b = [op.out_bytes for op in ops]
    lat = cost.latency
    inv = cost.inv_bw
    # site pins (data residency): propagate to consumers
    pin: list[str | None] = [None] * n
    if model.pins:
        for i in range(n):
            s = model.pins.get(i)
            for d in deps[i]:
                ds = pin[d]
                if ds is not None:
                    if s is not None and s != ds:
                        raise MeshError(
                            f"task {model.keys[i]!r} reads data pinned to sites {s!r} and "
                            f"{ds!r}: data pinned to a site never leaves it"
                        )
                    s = ds
            pin[i] = s
    # upward rank with the mean cost over each layer's allowed pools
    w = [max(sum(exec_t[li][p] for p in allowed[li]) / len(allowed[li]), 1e-12)
         for li in range(len(ops))]
    rank = [0.0] * n
    for i in range(n - 1, -1, -1):
        rank[i] += w[layer[i]]
        r = rank[i]
        for d in deps[i]:
            if rank[d] < r:
                rank[d] = r
    order = sorted(range(n), key=rank.__getitem__, reverse=True)
    free = [[0.0] * max(p.slots, 1) for p in pools]
    pool_of = [-1] * n
    start = [0.0] * n
    finish = [0.0] * n
    site_of = [p.site for p in pools]
    for i in order:
        li = layer[i]
        cand = allowed[li]
        if pin[i] is not None:
            cand = [p for p in cand if site_of[p] == pin[i]]
            if not cand:
                raise MeshError(
                    f"{ops[li].label}: no allowed worker at site {pin[i]!r}, where its data "
                    f"is pinned"
                )
        ex = exec_t[li]
        ds = deps[i]
        best = float("inf")
        bp = cand[0]
        bs = 0.0
        for p in cand:
            ready = 0.0
            for d in ds:
                q = pool_of[d]
                f = finish[d]
                if q != p:
                    f += lat[q][p] + out_b[layer[d]] * inv[q][p]
                if f > ready:
                    ready = f
            s = free[p][0]
            if ready > s:
                s = ready
            f = s + ex[p]
            if f < best:
                best, bp, bs = f, p, s
        heapq.heapreplace(free[bp], best)
        pool_of[i] = bp
        start[i] = bs
        finish[i] = best
    return pool_of, start, finish


def plan_model(model: GraphModel, pools: list[Pool], route: Any = "auto", *,
               site: str | None = None, cost: CostModel | None = None) -> Plan:
    """Plan a computation: the pool of every task and the per-op summary."""
    route = parse_route_or_error(route)
    cost = cost or CostModel(pools)
    if route == "off":
        allowed = [list(range(len(pools)))] * len(model.ops)
        notes = ["route is off: Dask places every task itself (estimates assume any worker)"]
    else:
        allowed, notes = allowed_pools(model, pools, route, site)
    if not model.keys:
        return Plan(model, pools, str(route), [], [], [], cost, notes=notes)
    pool_of, start, finish = place(model, pools, cost, allowed)
    return Plan(model, pools, str(route), pool_of, start, finish, cost, notes=notes,
                site=site)
