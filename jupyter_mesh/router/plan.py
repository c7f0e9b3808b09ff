"""What the router decided (:class:`Plan`) and what then happened (:class:`Report`).

Both expose ``rows``: one dict per operation (graph layer) with ``op``, ``target``,
``tasks``, ``est_seconds`` (summed task seconds the cost model expects) and
``bytes_moved`` (bytes that cross between device kinds on the way into the op); a
report adds ``backends``, ``workers`` and ``seconds`` (summed measured task seconds).
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from ..errors import MeshError
from ..inventory import format_bytes, plural
from .classify import OpInfo
from .cost import CostModel, Pool


class PlanModel(Protocol):
    """What a plan needs of its model: the ops (layers) in topological order and the
    per-task lists, which a model made per layer
    (:class:`~jupyter_mesh.router.layers.LayerModel`) keeps empty."""

    @property
    def ops(self) -> list[OpInfo]: ...

    @property
    def keys(self) -> list[Any]: ...

    @property
    def layer(self) -> list[int]: ...

    @property
    def deps(self) -> Sequence[Sequence[Any]]: ...

    @property
    def outputs(self) -> list[Any]: ...

    @property
    def pins(self) -> dict[int, str]: ...


#: the model a plan was made from: a per-task
#: :class:`~jupyter_mesh.router.classify.GraphModel`, or a ``LayerModel`` for a
#: :class:`~jupyter_mesh.router.layers.LayerPlan`
ModelT = TypeVar("ModelT", bound=PlanModel, covariant=True)


class Plan(Generic[ModelT]):
    """The router's decision for one computation."""

    def __init__(self, model: ModelT, pools: list[Pool], route: str, pool_of: list[int],
                 start: list[float], finish: list[float], cost: CostModel, *,
                 notes: list[str] | None = None, site: str | None = None) -> None:
        self.model = model
        self.pools = pools
        self.route = route
        self.pool_of = pool_of
        self.start = start
        self.finish = finish
        self.cost = cost
        self.notes = list(notes or [])
        self.site = site
        #: per task, the worker the planner had in mind (index over the pools' workers,
        #: in pool order); the scheduler restricts by pool and picks the worker itself
        self.worker_of: list[int] | None = None
        #: tasks the rewrite keeps on their planned worker, not only its pool
        #: (see ``placement.kept_together``)
        self.kept: list[int] = []
        #: every pool is equivalent for this computation: the scheduler places tasks
        #: freely (no restrictions), every task runs on host NumPy
        self.unrestricted = False
        self._rows: list[dict[str, Any]] | None = None
        self._to_host: list[bool] | None = None
        #: (op, pool) -> whether the op's tasks run with NumPy there (see runs_numpy)
        self._numpy: dict[tuple[int, int], bool] = {}
        #: the model's layers (ops) behind each row
        self._row_layers: list[list[int]] = []
        #: the least the computation can take at the mesh's measured pace of dispatch
        #: (its dispatched tasks one after another; see ``CostModel.task_interval``)
        self.floor = 0.0
        #: worker address -> name on the live mesh it was planned on (empty otherwise)
        self.worker_names: dict[str, str] = {}
        #: each worker's (by its name) threads: at most as many tasks run on it at once
        self.worker_threads: dict[str, int] = {}

    # ------------------------------------------------------------------ summary
    @property
    def routed(self) -> bool:
        return self.route != "off"

    @property
    def ntasks(self) -> int:
        return len(self.model.keys)

    @property
    def makespan(self) -> float:
        """Estimated seconds from start to the last task's end."""
        return max(max(self.finish) if self.finish else 0.0, self.floor)

    @property
    def bytes_moved(self) -> float:
        return float(sum(r["bytes_moved"] for r in self.rows))

    @property
    def bytes_between_sites(self) -> float:
        """Bytes the plan sends from one site to another (over the modelled WAN link):
        each input a task reads from a task planned at another site."""
        sites = [p.site for p in self.pools]
        if len(set(sites)) < 2 or self.unrestricted:
            return 0.0
        m = self.model
        pool_of = self.pool_of
        return float(sum(m.ops[m.layer[d]].out_bytes
                         for i, p in enumerate(pool_of) for d in m.deps[i]
                         if sites[pool_of[d]] != sites[p]))

    def runs_numpy(self, li: int, p: int) -> bool:
        """Whether the tasks of op ``li`` planned on pool ``p`` run with NumPy on their
        worker's host (``CostModel.runs_numpy``): NumPy pools, ops the pool's backend
        does not run, and ops that a JAX CPU worker runs faster with NumPy."""
        got = self._numpy.get((li, p))
        if got is None:
            got = self._numpy[li, p] = self.cost.runs_numpy(self.model.ops[li], self.pools[p])
        return got

    def native_for(self, li: int, p: int) -> frozenset[str]:
        """The backends the device wrapper of op ``li``'s tasks on pool ``p`` may run
        them with: the op's own, less the pool's backend where the plan runs the op
        there with NumPy because NumPy is faster (a JAX CPU worker); a fallback to a
        worker of another backend still runs its own."""
        op = self.model.ops[li]
        if self._numpy_by_choice(li, p):
            return op.native - {self.pools[p].backend}
        return op.native

    def _numpy_by_choice(self, li: int, p: int) -> bool:
        """Whether pool ``p`` runs op ``li`` with NumPy where its own backend runs the
        op too: a JAX CPU worker for which NumPy is the faster."""
        pool = self.pools[p]
        return (pool.numpy_profile is not None and pool.backend in self.model.ops[li].native
                and self.runs_numpy(li, p))

    def _kind_of(self, p: int, li: int) -> tuple[str, str]:
        """The (kind, backend) that runs op ``li`` on pool ``p``: a CPU pool of another
        backend running it with NumPy hands over NumPy arrays, as a NumPy pool does."""
        pool = self.pools[p]
        if pool.kind == "cpu" and pool.backend != "numpy" and self.runs_numpy(li, p):
            return "cpu", "numpy"
        return pool.kind, pool.backend

    def _op_pools(self) -> set[tuple[int, int]]:
        """Every (op, pool) pair the plan uses."""
        return set(zip(self.model.layer, self.pool_of, strict=True))

    def note_numpy_runs(self) -> None:
        """A note naming the ops that CPU workers of another backend (JAX on the CPU)
        run with NumPy because NumPy is faster there, with the two times per task."""
        if self.unrestricted or not self.routed:
            return
        ops = self.model.ops
        by_pool: dict[int, list[str]] = {}
        for li, p in sorted(self._op_pools()):
            if self._numpy_by_choice(li, p):
                own = self.cost.seconds(ops[li], self.pools[p], True)
                numpy = self.cost.seconds(ops[li], self.pools[p], False)
                by_pool.setdefault(p, []).append(
                    f"{ops[li].label} ({_secs(numpy)} against {_secs(own)} a task)")
        for p, what in by_pool.items():
            pool = self.pools[p]
            self.notes.append(
                f"the {pool.label} workers run {', '.join(dict.fromkeys(what))} with NumPy, "
                f"faster there than {pool.backend} (route=\"{pool.target}\" runs "
                f"{pool.backend})")

    def target_label(self, li: int, p: int) -> str:
        """Where op ``li`` runs on pool ``p``, for rows and progress bars: the pool's
        label, and ``(numpy)`` after it where a CPU pool of another backend runs the op
        with NumPy."""
        pool = self.pools[p]
        if self._kind_of(p, li) != (pool.kind, pool.backend):
            return f"{pool.label} (numpy)"
        return pool.label

    @property
    def to_host(self) -> list[bool]:
        """Per task: whether its result is handed over as a host array.

        True where a consumer runs on another kind or backend, for the computation's
        outputs, and for host (NumPy) results; False keeps the result on the device for
        consumers on the same device kind.
        """
        if self._to_host is None:
            m = self.model
            if self.unrestricted:
                self._to_host = [True] * len(m.keys)
                return self._to_host
            outputs = set(m.outputs)
            # one number per (kind, backend) that runs a task instead of tuples per task
            kinds: dict[tuple[str, str], int] = {}
            op_kind: dict[tuple[int, int], int] = {}
            kind = []
            for li, p in zip(m.layer, self.pool_of, strict=True):
                k = op_kind.get((li, p))
                if k is None:
                    k = op_kind[li, p] = kinds.setdefault(self._kind_of(p, li), len(kinds))
                kind.append(k)
            numpy_kind = kinds.get(("cpu", "numpy"), -1)
            flags = [k == numpy_kind for k in kind]
            for i, ds in enumerate(m.deps):
                ki = kind[i]
                for d in ds:
                    if kind[d] != ki:
                        flags[d] = True
            for i, k in enumerate(m.keys):
                if k in outputs:
                    flags[i] = True
            # a node that is not a task (an alias, e.g. of plain slicing) runs no
            # wrapper: it hands on what its input's task returned, so that task must
            # return a host array wherever the node must (inputs come first in keys)
            from dask._task_spec import Task

            tasks = getattr(m, "tasks", None)  # a per-task model's nodes
            if tasks:
                for i in range(len(m.keys) - 1, -1, -1):
                    if flags[i] and type(tasks.get(m.keys[i])) is not Task:
                        for d in m.deps[i]:
                            flags[d] = True
            self._to_host = flags
        return self._to_host

    @property
    def rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows = self._make_rows()
        return self._rows

    def _make_rows(self) -> list[dict[str, Any]]:
        m = self.model
        nops = len(m.ops)
        targets: list[Counter[str]] = [Counter() for _ in range(nops)]
        est = [0.0] * nops
        moved = [0.0] * nops
        for i, p in enumerate(self.pool_of):
            li = m.layer[i]
            targets[li][self.target_label(li, p)] += 1
            est[li] += self.finish[i] - self.start[i]
            kp = self._kind_of(p, li)
            for d in m.deps[i]:
                if self._kind_of(self.pool_of[d], m.layer[d]) != kp:
                    moved[li] += m.ops[m.layer[d]].out_bytes
        rows, self._row_layers = merged_rows(m.ops, targets, est, moved, self.routed,
                                             self.unrestricted and self.free_target)
        return rows

    @property
    def free_target(self) -> str:
        """What rows and bars show as the target of a plan that restricts nothing (see
        ``unrestricted``): any pool; with ``site=``, the site's one pool, or any at it."""
        if not self.site:
            return EQUIVALENT
        here = [p.label for p in self.pools if p.site == self.site]
        return here[0] if len(here) == 1 else f"any at {self.site} (pools equivalent)"

    def assignment(self) -> dict[Any, str] | None:
        """``{key: pool label}`` for every task (None for a plan made per layer, which
        keeps no per-task lists)."""
        if self.unrestricted:  # Dask places every task: no target to group by
            return dict.fromkeys(self.model.keys, self.free_target)
        from .rewrite import is_p2p

        layer = self.model.layer
        return {k: P2P_TARGET if is_p2p(k) else self.target_label(layer[i], p)
                for i, (k, p) in enumerate(zip(self.model.keys, self.pool_of, strict=False))}

    # ------------------------------------------------------------------ display
    def _header(self) -> str:
        return (
            f"Plan (route={self.route}{', site=' + self.site if self.site else ''}): "
            f"{plural(self.ntasks, 'task')} in {plural(len(self.rows), 'op')} over "
            f"{', '.join(f'{p.label}×{len(p.workers)}' for p in self._pools_shown()) or 'no devices'}; "
            f"est. {_secs(self.makespan)} makespan, "
            f"{format_bytes(self.bytes_moved) if self.bytes_moved else 'nothing'} "
            f"moved between kinds"
            + self._between_sites()
        )

    def _between_sites(self) -> str:
        """What the header says of the WAN: on a mesh of several sites, how much the
        plan sends between them ("nothing" too); elsewhere, or where Dask places every
        task (no restrictions), nothing."""
        if self.unrestricted or len({p.site for p in self._pools_shown()}) < 2:
            return ""
        wan = self.bytes_between_sites
        return f", {format_bytes(wan) if wan else 'nothing'} between sites"

    def _pools_shown(self) -> list[Any]:
        """The pools the plan may use: with ``site=``, those at that site only."""
        return [p for p in self.pools if not self.site or p.site == self.site]

    def __repr__(self) -> str:
        lines = [self._header()]
        lines.append(_text_table(self.rows, PLAN_COLUMNS))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        return (
            f"<div class='jupyter-mesh-plan'><b>{html.escape(self._header())}</b>"
            f"{_html_table(self.rows, PLAN_COLUMNS)}"
            + (f"<ul>{notes}</ul>" if notes else "") + _picture("plan_html", self) + "</div>"
        )


class Report:
    """What happened in one routed computation, next to its plan."""

    def __init__(self, plan: Plan[PlanModel], records: dict[Any, tuple[str, str, float]],
                 wall_seconds: float, *, fallbacks: list[str] | None = None,
                 worker_names: dict[str, str] | None = None,
                 worker_kinds: dict[str, str] | None = None) -> None:
        self.plan = plan
        #: key -> (worker address, backend that ran it, seconds)
        self.records = records
        self.wall_seconds = wall_seconds
        self.fallbacks = list(fallbacks or [])
        self.worker_names = dict(worker_names or {})
        #: device kinds of workers the plan did not know (one that joined since)
        self.worker_kinds = dict(worker_kinds or {})
        #: the scheduler's task stream (starts and stops per task), for the picture
        self.timeline: list[dict[str, Any]] | None = None
        #: submitted key -> the keys fused into it, in the order they ran
        self.fused: dict[Any, list[Any]] = {}
        #: (a per-layer plan) fused Blockwise layer -> its members before it, in the
        #: order they ran, as ``LayerKeys`` (a task's members: their ``key_of`` it)
        self.fused_layers: dict[str, list[Any]] = {}
        #: whether its HTML draws the picture (a %%mesh cell of several computations
        #: draws it for the last one only: each is a megabyte or so of the notebook)
        self.picture = True
        self._rows: list[dict[str, Any]] | None = None

    @property
    def rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            m = self.plan.model
            nops = len(m.ops)
            backends: list[set[str]] = [set() for _ in range(nops)]
            workers: list[set[str]] = [set() for _ in range(nops)]
            secs = [0.0] * nops
            pairs: Iterable[tuple[int | None, tuple[str, str, float] | None]]
            by_layer = getattr(self.plan, "layer_of_key", None)
            if by_layer is not None:  # a plan made per layer: no per-task lists
                pairs = ((by_layer(k), rec) for k, rec in self.records.items())
            else:
                pairs = ((m.layer[i], self.records.get(k)) for i, k in enumerate(m.keys))
            for li, rec in pairs:
                if rec is None or li is None:
                    continue
                addr, backend, s = rec
                backends[li].add(backend)
                workers[li].add(self.worker_names.get(addr, addr))
                secs[li] += s
            rows = []
            plan_rows = self.plan.rows
            for row, layers in zip(plan_rows, self.plan._row_layers, strict=False):
                rows.append(dict(row, backends=sorted(set().union(*(backends[li] for li in layers))),
                                 workers=sorted(set().union(*(workers[li] for li in layers))),
                                 seconds=sum(secs[li] for li in layers)))
            self._rows = rows
        return self._rows

    @property
    def notes(self) -> list[str]:
        """What the rows alone do not say: ops of the plan that no worker ran here (no
        backend, 0 s): data the graph carries (no function to run), or results that
        came from elsewhere (persisted, held, or another graph's of the same keys)."""
        from .rewrite import is_p2p

        if not self.plan.ntasks:
            return ["nothing ran: the results were held on the workers already (persisted "
                    "earlier), and Dask handed them over"]
        ops = self.plan.model.ops
        data: list[str] = []
        held: list[str] = []
        p2p: list[str] = []
        aliases: list[str] = []
        persisted: list[str] = []
        for row, layers in zip(self.rows, self.plan._row_layers, strict=False):
            if row["tasks"] and not row["backends"]:

                def every(flag: str, layers: Any = layers) -> bool:
                    return bool(layers) and all(getattr(ops[li], flag, False)
                                                for li in layers)

                if layers and all(is_p2p(ops[li].name) for li in layers):
                    p2p.append(row["op"])
                elif every("persisted"):
                    persisted.append(row["op"])
                elif every("data"):
                    data.append(row["op"])
                elif every("aliases"):
                    aliases.append(row["op"])
                else:
                    held.append(row["op"])
        notes = []
        if p2p:
            notes.append(f"{', '.join(p2p)}: steps of Dask's P2P shuffle or rechunk, which "
                         f"Dask places and runs itself (no routed task records "
                         f"{'it' if len(p2p) == 1 else 'them'})")
        if data:
            notes.append(f"{', '.join(data)}: data the graph carries (values given to "
                         f"Dask as they are: from_array's blocks, from_pandas's "
                         f"partitions, a constant): Dask hands {'it' if len(data) == 1 else 'them'} "
                         f"to the tasks that read {'it' if len(data) == 1 else 'them'}; no "
                         f"routed task runs")
        if persisted:
            notes.append(f"{', '.join(persisted)}: results persisted earlier, held on the "
                         f"workers: no task of this computation runs "
                         f"{'it' if len(persisted) == 1 else 'them'}")
        if aliases:
            notes.append(f"{', '.join(aliases)}: {'a slice' if len(aliases) == 1 else 'slices'} "
                         f"that {'is' if len(aliases) == 1 else 'are'} whole blocks of what "
                         f"{'it reads' if len(aliases) == 1 else 'they read'}: Dask hands "
                         f"the blocks on, and no function runs")
        if held:
            from .layers import LayerPlan

            per_layer = isinstance(self.plan, LayerPlan)
            notes.append(f"{', '.join(held)}: not run by this computation: "
                         + ("the results did not need "
                            f"{'it' if len(held) == 1 else 'them'} (a plan made per layer "
                            f"counts the graph as built; Dask's scheduler culls it), or "
                            if per_layer else "")
                         + f"{'its' if len(held) == 1 else 'their'} results came from "
                         f"elsewhere (persisted, still held from an earlier computation, or "
                         f"computed by another graph that shares the keys, from another "
                         f"thread or client)")
        return notes

    def ran_on(self, op_label: str) -> list[str]:
        """Backends that ran the op whose label starts with ``op_label``."""
        if not isinstance(op_label, str):
            raise MeshError(f"ran_on takes an op's label (a row's 'op', e.g. 'matmul'), "
                            f"not {type(op_label).__name__}")
        out: set[str] = set()
        for row in self.rows:
            if row["op"].startswith(op_label):
                out.update(row["backends"])
        return sorted(out)

    def _header(self) -> str:
        return (
            f"Report (route={self.plan.route}"
            f"{', site=' + self.plan.site if self.plan.site else ''}): "
            f"{plural(self.plan.ntasks, 'task')}, "
            f"{_secs(self.wall_seconds)} wall, est. {_secs(self.plan.makespan)}"
        )

    def __repr__(self) -> str:
        lines = [self._header(), _text_table(self.rows, REPORT_COLUMNS)]
        lines.extend(f"fallback: {f}" for f in self.fallbacks)
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        fb = "".join(f"<li>{html.escape(f)}</li>" for f in [*self.fallbacks, *self.notes])
        return (
            f"<div class='jupyter-mesh-report'><b>{html.escape(self._header())}</b>"
            f"{_html_table(self.rows, REPORT_COLUMNS)}"
            + (f"<ul>{fb}</ul>" if fb else "")
            + (_picture("report_html", self) if self.picture else
               "<p><i>picture left out (a cell shows its last computation's): set "
               "<code>report.picture = True</code> and display the report to draw "
               "it</i></p>") + "</div>"
        )


def _picture(name: str, obj: Any) -> str:
    """The Bokeh picture (timeline and op graph) from :mod:`jupyter_mesh.viz`."""
    from .. import viz

    return str(getattr(viz, name)(obj))


#: the target of an op where the plan restricts nothing (every pool runs it as fast)
EQUIVALENT = "any (pools equivalent)"

#: the target of a step of Dask's P2P shuffle or rechunk: Dask places it, never the plan
P2P_TARGET = "any (Dask's P2P places it)"

PLAN_COLUMNS = ("op", "class", "target", "tasks", "est_seconds", "bytes_moved")
REPORT_COLUMNS = PLAN_COLUMNS + ("backends", "workers", "seconds")


def merged_rows(ops: Sequence[OpInfo], targets: Sequence[Counter[str]], est: Sequence[float],
                moved: Sequence[float], routed: bool, unrestricted: str | bool
                ) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """One row per operation: the layers of one name and class in one row (a
    dask.delayed call is a layer of its own, so a loop of 300 calls of one function is
    one row of 300 tasks, not 300 rows), in the order they first appear; and the layers
    of each row."""
    groups: dict[tuple[str, str], list[int]] = {}
    for li, op in enumerate(ops):
        if op.tasks:
            groups.setdefault((op.label, op.op_class), []).append(li)
    from .rewrite import is_p2p

    rows = []
    for (label, op_class), layers in groups.items():
        if not routed:
            target = "any (not routed)"
        elif all(is_p2p(ops[li].name) for li in layers):
            # the rewrite leaves Dask's P2P steps unrestricted, whatever the route
            target = P2P_TARGET
        elif unrestricted:  # the plan's free_target, or True for any pool
            target = unrestricted if isinstance(unrestricted, str) else EQUIVALENT
        else:
            target = _target_text(sum((targets[li] for li in layers), Counter()))
        rows.append({
            "op": label,
            "class": op_class,
            "target": target,
            "tasks": sum(ops[li].tasks for li in layers),
            "est_seconds": sum(est[li] for li in layers),
            "bytes_moved": sum(moved[li] for li in layers),
        })
    return rows, list(groups.values())


def _target_text(c: Counter[str]) -> str:
    if len(c) == 1:
        return next(iter(c))
    return " + ".join(f"{label}×{n}" for label, n in c.most_common())


def _secs(s: float) -> str:
    if s != s or s in (float("inf"), float("-inf")):
        return f"{s} s"  # (no unit to pick; rounding it raised ValueError)
    # by the number as it is written: 0.99996 s is 1.00 s, not 1000.0 ms
    if round(s * 1e3, 1) >= 1000:
        return f"{s:.2f} s"
    if round(s * 1e6) >= 1000:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def _cell(col: str, v: Any) -> str:
    if col in ("est_seconds", "seconds"):
        return _secs(float(v))
    if col == "bytes_moved":
        return format_bytes(v) if v else "0 B"
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    return str(v)


#: the most rows a plan's or report's table shows (a graph of thousands of distinct
#: ``delayed`` functions has as many ops): those of the largest estimates, in order
MAX_ROWS = 200


def _shown(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """At most ``MAX_ROWS`` of ``rows`` (those with the largest estimates, in their
    order), and what the rest are, in words (None when all are shown)."""
    if len(rows) <= MAX_ROWS:
        return rows, None
    by_cost = sorted(range(len(rows)), key=lambda i: -float(rows[i].get("est_seconds") or 0))
    keep = set(by_cost[:MAX_ROWS])
    rest = [r for i, r in enumerate(rows) if i not in keep]
    tasks = sum(int(r.get("tasks") or 0) for r in rest)
    secs = sum(float(r.get("est_seconds") or 0) for r in rest)
    return ([r for i, r in enumerate(rows) if i in keep],
            f"… {len(rest)} more ops ({tasks} tasks, est. {_secs(secs)} in all) not shown: "
            f"the {MAX_ROWS} of the largest estimates are; .rows has every op")


def _text_table(rows: list[dict[str, Any]], cols: tuple[str, ...]) -> str:
    rows, rest = _shown(rows)
    cells = [[_cell(c, r.get(c, "")) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[j]) for row in cells]) for j, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*cols), fmt.format(*("-" * w for w in widths))]
    out.extend(fmt.format(*row) for row in cells)
    if rest:
        out.append(rest)
    return "\n".join(line.rstrip() for line in out)


_NOWRAP = " style='white-space:nowrap'"
#: the columns that list several names
_LISTS = frozenset({"workers", "backends"})


#: the most characters of an op's name a table cell shows (the whole on hover): a layer
#: named at length (``name=``) made both tables 2,000 px wide, the times off-screen
HTML_OP_MOST = 60


def _html_cell(col: str, text: str) -> str:
    nowrap = _NOWRAP if col not in _LISTS else ""
    if col == "op" and len(text) > HTML_OP_MOST:
        return (f"<td{nowrap} title='{html.escape(text, quote=True)}'>"
                f"{html.escape(text[:HTML_OP_MOST - 1])}…</td>")
    return f"<td{nowrap}>{html.escape(text)}</td>"


def _html_table(rows: list[dict[str, Any]], cols: tuple[str, ...]) -> str:
    rows, rest = _shown(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        # (no cell wraps mid-word: "130.8 / ms", "any (pools / equivalent)"; lists of
        # workers and backends may wrap between their items)
        "<tr>" + "".join(_html_cell(c, _cell(c, r.get(c, ""))) for c in cols) + "</tr>"
        for r in rows
    )
    if rest:
        body += f"<tr><td colspan='{len(cols)}'><i>{html.escape(rest)}</i></td></tr>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
