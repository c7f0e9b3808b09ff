"""What earlier routed computations measured, folded into the cost model's estimates.

A device's profile is measured once per host (a matmul, a copy) on a quiet machine, and
the cost model scales it by the share of the cores a worker gets. What a task takes in
practice also depends on what the profile does not see: other users' processes on a
shared hub node, arrays freshly allocated for every result, block shapes the profile did
not time. So after each routed computation the mesh compares, per op class, kind
of device, site and backend, what its tasks took (the seconds each device call measured, in the report) with what
the cost model said the work alone takes there, and remembers the ratio: the median
over the tasks (a JAX compilation or a first CuPy call makes one task slow, not the
median), blended with what earlier computations measured (``mesh.router.learn``: the
weight of the newest; 0 learns nothing). Later plans scale the work of that op class with
that backend on that kind of device at that site by it, as StarPU's history-based performance models and Dask's own learned
task durations do. Ratios are kept within 1/8 and 8 of the profile, and forgotten after
``MAX_AGE`` seconds without a new measurement, so that a pool that was slow once for a
passing reason is tried again.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from typing import TYPE_CHECKING, Any

from .. import _config
from ..errors import MeshConfigError

if TYPE_CHECKING:
    from .classify import OpInfo
    from .cost import CostModel, Pool
    from .plan import Plan

#: ratios are kept within [1 / LIMIT, LIMIT]
LIMIT = 8.0
#: a ratio not measured again for this many seconds is forgotten
MAX_AGE = 600.0
#: fewest tasks of an op class on a pool that a computation learns from
MIN_TASKS = 3
#: least work (seconds, as modelled) per task worth learning from: below it Python's
#: own call overhead is all a measurement sees
MIN_WORK = 1e-5


def learn_weight() -> float:
    """``mesh.router.learn``: the weight of the newest computation's ratio, 0 to 1."""
    w = _config.get_number("router.learn")
    if not 0.0 <= w <= 1.0:  # NaN too
        raise MeshConfigError(
            f"config mesh.router.learn must be a number from 0 (learn nothing) to 1 (the "
            f"last computation alone), not {_config.get('router.learn')!r}"
        )
    return w


def pool_key(pool: Pool) -> tuple[str, str]:
    """What a ratio is kept for, with the op class and the backend that ran it: the
    device kind and site. Pools of one kind at one site run one backend on the same
    hardware (a JAX CPU worker's NumPy tasks and a NumPy worker's share their ratio),
    so measurement noise never makes them look different to the planner."""
    return (pool.kind, pool.site)


class RunHistory:
    """Per (device kind, site, op class, backend that ran it): the ratio of measured to
    modelled seconds, and when it was last measured."""

    def __init__(self) -> None:
        self._ratios: dict[tuple[str, str, str, str], tuple[float, float, int]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ratios)

    def forget(self) -> None:
        """Drop everything learned (``mesh.forget_history()``)."""
        with self._lock:
            self._ratios.clear()

    def ratio(self, pool: Pool, op_class: str, backend: str,
              now: float | None = None) -> float:
        """The learned ratio for ``op_class`` run with ``backend`` on ``pool``; where
        that backend was not measured, what the others measured on the same hardware
        (their geometric mean, on CPUs: a loaded host slows every backend on it, and a
        backend never measured must not look faster than a measured one for want of a
        figure); 1.0 where nothing was learned, or too long ago."""
        now = now if now is not None else time.monotonic()
        kind, site = pool_key(pool)
        with self._lock:  # learn() may run in another thread meanwhile
            entry = self._ratios.get((kind, site, op_class, backend))
            if entry is not None and now - entry[1] <= MAX_AGE:
                return entry[0]
            if pool.accelerator:
                # its own backend runs on the device, NumPy on the host: not the same
                # hardware, so neither stands in for the other
                return 1.0
            others = [math.log(r) for (k, s, o, _), (r, when, _) in self._ratios.items()
                      if (k, s, o) == (kind, site, op_class) and now - when <= MAX_AGE]
        return math.exp(sum(others) / len(others)) if others else 1.0

    def learned(self) -> list[tuple[str, str, str, str, float, int]]:
        """(kind, site, op class, backend, ratio, computations) of every live entry."""
        now = time.monotonic()
        with self._lock:
            items = sorted(self._ratios.items())
        return [(*k, r, n) for k, (r, when, n) in items if now - when <= MAX_AGE]

    def learn(self, plan: Plan[Any], records: dict[Any, tuple[str, str, float]],
              weight: float) -> int:
        """Fold in what ``records`` (key -> (worker, backend, seconds), a report's)
        measured for ``plan``'s tasks; returns how many ratios changed."""
        if weight <= 0 or not records:
            return 0
        model = plan.model
        op_of = _op_lookup(model)
        where: dict[str, int] = {}
        for p, pool in enumerate(plan.pools):
            for addr in pool.workers:
                where[addr] = p
        cost: CostModel = plan.cost
        # the speeds the plan was timed with: where it leaves pools idle, those it uses
        # have the cores to themselves (see cost.reshared), which is no ratio to learn
        from .cost import reshared

        pools = plan.pools
        if not getattr(plan, "unrestricted", False):
            used = set(getattr(plan, "pool_of", None) or ())
            pools = reshared(plan.pools, used) or plan.pools if used else plan.pools
        samples: dict[tuple[str, str, str, str], list[float]] = {}
        # per (op, pool, backend): the modelled work and where its samples go (a large
        # computation has many tasks of few ops)
        seen: dict[tuple[int, int, str], tuple[float, list[float]]] = {}
        for key, (addr, backend, secs) in records.items():
            op = op_of(key)
            p = where.get(addr, -1)
            # (an op of no known array type, a DataFrame's or a delayed value's, has
            # block sizes the model guesses: its times would scale array ops' estimates;
            # an op with no dtype of its own that reads arrays, as Dask's tsqr builds
            # them, is array work: see classify.op_native)
            if op is None or p < 0 or secs <= 0 or (
                    getattr(op, "dtype_kind", None) is None
                    and not getattr(op, "array_data", False)):
                continue
            got = seen.get((id(op), p, backend))
            if got is None:
                pool = pools[p]
                native = backend == pool.backend or pool.backend == "numpy"
                work = cost.work_seconds(op, pool, native)
                got = seen[id(op), p, backend] = (work, samples.setdefault(
                    (*pool_key(pool), op.op_class, backend), []))
            work, into = got
            if work >= MIN_WORK:
                into.append(secs / work)
        now = time.monotonic()
        changed = 0
        with self._lock:
            for k, ratios in samples.items():
                if len(ratios) < MIN_TASKS:
                    continue
                measured = min(max(statistics.median(ratios), 1 / LIMIT), LIMIT)
                old = self._ratios.get(k)
                if old is not None and now - old[1] <= MAX_AGE:
                    # blended in log space: a ratio of 2 and one of 1/2 average to 1
                    r = math.exp((1 - weight) * math.log(old[0]) + weight * math.log(measured))
                    n = old[2] + 1
                else:
                    r, n = measured, 1
                self._ratios[k] = (r, now, n)
                changed += 1
        return changed

    def note(self, plan: Plan[Any]) -> str | None:
        """A line for the plan's notes naming the learned ratios it planned with."""
        used = {pool_key(p) for p in plan.pools}
        ops = {op.op_class for op in getattr(plan.model, "ops", ())}
        parts = []
        for kind, site, op_class, backend, r, _ in self.learned():
            if (kind, site) in used and op_class in ops and abs(math.log(r)) > 0.05:
                parts.append(f"{op_class} with {backend} on {kind}@{site} {r:.2g}x")
        if not parts:
            return None
        return ("estimates scaled by the task times of earlier computations (against the "
                "profiles'): " + ", ".join(parts)
                + "; mesh.forget_history() forgets them, mesh.router.learn = 0 learns none")


def _op_lookup(model: Any) -> Any:
    """key -> the op (OpInfo) of its task in ``model``, or None."""
    ops = model.ops
    by_layer = getattr(model, "layer_of_key", None)
    if by_layer is not None:  # a plan per layer: keys map to layers by name
        def of_layer(key: Any) -> Any:
            li = by_layer(key)
            return ops[li] if li is not None else None
        return of_layer
    layer = model.layer
    index = {k: i for i, k in enumerate(model.keys)}

    def of_task(key: Any) -> Any:
        i = index.get(key)
        return ops[layer[i]] if i is not None else None
    return of_task


def scaled_work(history: RunHistory | None, op: OpInfo, pool: Pool, native: bool,
                work: float) -> float:
    """``work`` seconds of ``op`` on ``pool`` scaled by what ``history`` learned."""
    if history is None or not len(history):
        return work
    backend = pool.backend if native else "numpy"
    return work * history.ratio(pool, op.op_class, backend)
