"""Pictures of the router's decisions: timelines (Gantt) by worker and a graph of ops.

:func:`plan_figure` and :func:`report_figure` build Bokeh layouts; :func:`plan_html` and
:func:`report_html` embed them as HTML that renders without a network (a notebook
offline, a saved HTML file, a headless browser): BokehJS travels inline with the first
picture a kernel shows, and later pictures use that copy (``mesh.viz.bokehjs``).

Bars and nodes are coloured by target (``KIND:BACKEND``), so NumPy and JAX workers of
the same ``cpu`` kind stay apart. A report's timeline uses the scheduler's task stream
(start and stop of every task) when it was recorded, and otherwise lays each worker's
measured task seconds end to end (then the picture says so).
"""

from __future__ import annotations

import html
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeGuard

from . import _config
from .errors import MeshConfigError

if TYPE_CHECKING:
    from bokeh.model import Model

    from .router.layers import LayerPlan
    from .router.plan import Plan, PlanModel, Report

#: fixed colours for the common targets, so a picture reads the same in every notebook
COLOURS = {
    "cpu:numpy": "#4C72B0",
    "cpu:jax": "#55A868",
    "gpu:cupy": "#C44E52",
    "tpu:jax": "#8172B2",
    "any (pools equivalent)": "#8C8C8C",
}
_SPARE = ("#DD8452", "#937860", "#DA8BC3", "#CCB974", "#64B5CD", "#8DA0CB")
#: the most task bars a timeline draws (about 100 bytes each in the notebook)
MAX_BARS = 2000
#: the most ops an op-graph picture shows (those giving the results, then those with
#: the most tasks)
MAX_NODES = 200
#: the most nodes of the graph of ops one above another (more take more columns)
GRAPH_COLUMN = 12
#: the tallest an op-graph picture gets (pixels)
MAX_GRAPH_HEIGHT = 1200
#: the op graph's width per column of ops it needs at least (a node and a short label),
#: and the most it widens to for that
MIN_COLUMN_PX = 48
MAX_GRAPH_WIDTH = 2400


def colour_of(target: str) -> str:
    """The colour of a target label (``cpu:jax``, ``gpu:cupy@us-east``)."""
    base = target.split("@", 1)[0]
    if base in COLOURS:
        return COLOURS[base]
    return _SPARE[sum(map(ord, base)) % len(_SPARE)]


#: how far the sites of one target are shaded at most, towards white or black
_SITE_SHADE_MOST = 0.75


def colours_of(targets: Any) -> dict[str, str]:
    """The colour of each target label of one picture: :func:`colour_of`, and where a
    target runs at several sites (``cpu:numpy@edge``, ``cpu:numpy@local``), a shade of
    it per site, so that the sites stay apart (they had one colour)."""
    targets = set(targets)
    sites: dict[str, set[str]] = defaultdict(set)
    for t in targets:
        base, _, site = t.partition("@")
        sites[base].add(site)
    out = {}
    for t in targets:
        base, _, site = t.partition("@")
        colour = colour_of(t)
        if len(sites[base]) > 1:
            colour = _shade(colour, _site_shade(sorted(sites[base]).index(site),
                                                len(sites[base])))
        out[t] = colour
    return out


def _site_shade(k: int, n: int) -> float:
    """The shade of the ``k``-th of ``n`` sites: none for the first, then lighter and
    darker in turn, each further one further, all of them apart."""
    if k == 0:
        return 0.0
    steps = math.ceil((n - 1) / 2)
    by = _SITE_SHADE_MOST * math.ceil(k / 2) / steps
    return by if k % 2 else -by


def _shade(colour: str, by: float) -> str:
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    to = 255 if by > 0 else 0
    return "#" + "".join(f"{round(c + (to - c) * abs(by)):02X}" for c in rgb)


# ---------------------------------------------------------------- data
#: how far measured bars of one worker may overlap and still share a lane: the task
#: stream's times of consecutive tasks on one thread overlap by a millisecond or so
#: (a one-thread worker was drawn with a second lane for it)
MEASURED_SLACK = 0.005


def _lanes(bars: list[dict[str, Any]], group: str, slack: float = 1e-12,
           most: dict[str, int] | None = None) -> None:
    """Give every bar a lane within its group so overlapping bars do not hide each
    other: the first lane free at the bar's start (as list scheduling fills slots),
    give or take ``slack`` seconds; never more lanes in a group than ``most`` says (a
    worker's threads: the task stream's times of one thread's tasks may overlap by
    more than the slack on a loaded host), the one free soonest instead."""
    # the bars of one task (a fused chain's members, one after another) share its lane:
    # placed one by one, the next task's first bar, starting a moment before the chain's
    # last member, took the lane and pushed that member to a second one
    spans: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for i, bar in enumerate(bars):
        spans[bar.get("task", ("bar", i))].append(bar)
    ends: dict[str, list[float]] = defaultdict(list)
    for members in sorted(spans.values(), key=lambda ms: (
            ms[0][group], min(b["start"] for b in ms), max(b["end"] for b in ms))):
        first, last = min(b["start"] for b in members), max(b["end"] for b in members)
        lanes = ends[members[0][group]]
        for j, end in enumerate(lanes):
            if end <= first + slack:
                lanes[j] = last
                break
        else:
            cap = (most or {}).get(members[0][group])
            if cap and len(lanes) >= cap:
                j = min(range(len(lanes)), key=lanes.__getitem__)
                lanes[j] = max(lanes[j], last)
            else:
                j = len(lanes)
                lanes.append(last)
        for bar in members:
            bar["row"] = bar[group] if j == 0 else f"{bar[group]} #{j + 1}"


def _short(address: str) -> str:
    return address.split("://", 1)[-1]


def _made_per_layer(plan: Plan[PlanModel]) -> TypeGuard[LayerPlan]:
    """Whether the plan was made per layer (it keeps no per-task lists). A plan made
    per task may have no tasks either, so the type tells, not the empty lists."""
    from .router.layers import LayerPlan

    return isinstance(plan, LayerPlan)


def _layer_lookup(plan: Plan[PlanModel]) -> Callable[[Any], int | None]:
    """key -> index of its op (layer) in the plan's model, or None."""
    if _made_per_layer(plan):
        return plan.layer_of_key  # a plan made per layer keeps no per-task lists
    m = plan.model
    return {k: m.layer[i] for i, k in enumerate(m.keys)}.get


def planned_bars(plan: Plan[PlanModel],
                 names: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One bar per task as the plan placed it, in a lane of one of its pool's workers;
    for a plan made per layer, one bar per layer in a lane of its pool."""
    names = names or {}
    if _made_per_layer(plan):
        return _layer_bars(plan)
    m = plan.model
    per_pool: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(plan.pool_of):
        per_pool[p].append(i)
    bars: list[dict[str, Any]] = []
    for p, tasks in per_pool.items():
        pool = plan.pools[p]
        slots = max(pool.slots, 1)
        workers = pool.workers or [pool.label]
        free = [0.0] * slots
        for i in sorted(tasks, key=lambda i: (plan.start[i], plan.finish[i])):
            # the slot the placement filled: the first one free at the task's start
            j = next((j for j, f in enumerate(free) if f <= plan.start[i] + 1e-12),
                     min(range(slots), key=free.__getitem__))
            free[j] = plan.finish[i]
            worker = workers[j * len(workers) // slots]
            bars.append({
                "worker": names.get(worker, _short(worker)),
                "start": plan.start[i], "end": plan.finish[i],
                "target": _planned(plan, m.layer[i], p), "op": m.ops[m.layer[i]].label,
                "key": str(m.keys[i]),
            })
    _lanes(bars, "worker")
    return bars


def _planned(plan: Plan[PlanModel], li: int, p: int) -> str:
    """The target a plan shows for op ``li`` on pool ``p``: as its rows show it (any
    pool, where it restricts nothing; ``cpu:jax (numpy)`` where a JAX CPU worker runs
    the op with NumPy; Dask's own, for a step of its P2P shuffle or rechunk)."""
    from .router.plan import P2P_TARGET
    from .router.rewrite import is_p2p

    if is_p2p(plan.model.ops[li].name):
        return P2P_TARGET
    return plan.free_target if plan.unrestricted else plan.target_label(li, p)


def _layer_bars(plan: LayerPlan) -> list[dict[str, Any]]:
    bars = []
    for li, op in enumerate(plan.model.ops):
        if not op.tasks:
            continue
        label = plan.pools[plan.layer_pool[li]].label
        bars.append({"worker": label, "start": plan.layer_start[li],
                     "end": plan.layer_finish[li],
                     "target": _planned(plan, li, plan.layer_pool[li]), "op": op.label,
                     "key": f"{op.tasks} tasks"})
    _lanes(bars, "worker")
    return bars


def measured_bars(report: Report) -> tuple[list[dict[str, Any]], bool]:
    """One bar per task as it ran; True when the times are real starts and stops."""
    plan = report.plan
    m = plan.model
    layer_of = _layer_lookup(plan)
    # (a worker that joined since the plan: its kind as the mesh read it then)
    kind_of = {**getattr(report, "worker_kinds", {}),
               **{w: pool.kind for pool in plan.pools for w in pool.workers}}
    label_of = {w: pool.target for pool in plan.pools for w in pool.workers}
    names = report.worker_names

    def target(worker: str, key: Any) -> str:
        rec = report.records.get(key)
        if rec is not None and rec[0] == worker:
            return f"{kind_of.get(worker, '?')}:{rec[1]}"
        # no record from this worker (it died with its records): its pool's target
        return label_of.get(worker, "?")

    def op(key: Any) -> str:
        li = layer_of(key)
        return m.ops[li].label if li is not None else str(key)

    bars: list[dict[str, Any]] = []
    stream = getattr(report, "timeline", None) or []
    fused = getattr(report, "fused", None) or {}
    fused_layers = getattr(report, "fused_layers", None) or {}

    def members_of(key: Any) -> list[Any]:
        got = fused.get(key)
        if got:
            return got
        # a per-layer plan's fused Blockwise layers: their members' keys in this task
        inside = fused_layers.get(key[0] if isinstance(key, tuple) and key else key)
        if inside:
            return [m.key_of(key) for m in inside] + [key]
        return [key]

    for rec in stream:
        key = rec.get("key")
        if layer_of(key) is None and key not in fused:  # (a batch has a key of its own)
            continue
        for ss in rec.get("startstops", ()):
            if ss.get("action") != "compute":
                continue
            worker = ss.get("worker") or rec.get("worker", "?")
            name = names.get(worker, _short(worker))
            # a fused chain ran as one task: a bar per member, each as long as its
            # own device call took, the last one to the task's end
            start, stop = ss["start"], ss["stop"]
            members = members_of(key)
            task = len(bars)  # (its members share a lane: see _lanes)
            for j, k in enumerate(members):
                end = stop if j == len(members) - 1 else min(
                    stop, start + report.records.get(k, ("", "", 0.0))[2])
                bars.append({"worker": name, "start": start, "end": end, "task": task,
                             "target": target(worker, k), "op": op(k), "key": str(k)})
                start = end
    if bars:
        t0 = min(b["start"] for b in bars)
        for b in bars:
            b["start"] -= t0
            b["end"] -= t0
        _lanes(bars, "worker", MEASURED_SLACK, getattr(plan, "worker_threads", None))
        return bars, True
    clock: dict[str, float] = defaultdict(float)
    for key, (worker, _backend, secs) in report.records.items():
        name = names.get(worker, _short(worker))
        start = clock[name]
        clock[name] = start + secs
        bars.append({"worker": name, "start": start, "end": start + secs,
                     "target": target(worker, key), "op": op(key), "key": str(key)})
    for b in bars:
        b["row"] = b["worker"]
    return bars, False


def op_graph(plan: Plan[PlanModel], report: Report | None = None,
             most: int | None = None) -> dict[str, Any]:
    """Nodes (ops) with a position, a target and a size, and edges between ops: one
    node per row of the plan's table (a loop of 300 ``dask.delayed`` calls of one
    function is one op), at most ``most`` (``MAX_NODES``) of them, those with the most
    tasks; ``shown`` and ``ops`` say how many of how many."""
    most = MAX_NODES if most is None else most
    m = plan.model
    nops = len(m.ops)
    layer_plan = plan if _made_per_layer(plan) else None
    targets: list[Counter[str]] = [Counter() for _ in range(nops)]
    if report is not None and report.records:
        kind_of = {w: pool.kind for pool in plan.pools for w in pool.workers}
        layer_of = _layer_lookup(plan)
        for k, rec in report.records.items():
            li = layer_of(k)
            if li is not None:
                targets[li][f"{kind_of.get(rec[0], '?')}:{rec[1]}"] += 1
    elif layer_plan is not None:
        for li, p in enumerate(layer_plan.layer_pool):
            targets[li][_planned(plan, li, p)] += m.ops[li].tasks
    else:
        for i, p in enumerate(plan.pool_of):
            targets[m.layer[i]][_planned(plan, m.layer[i], p)] += 1
    _ = plan.rows  # (fills the layers of each row)
    groups = [[li for li in layers if m.ops[li].tasks] for layers in plan._row_layers]
    groups = [g for g in groups if g]
    total = len(groups)
    if total > most:
        # the ops that give the results, then those with the most tasks; in the
        # table's order
        layer_of = _layer_lookup(plan)
        out_layers = {layer_of(k) for k in m.outputs}
        ends = [g for g in range(total) if out_layers.intersection(groups[g])]
        kept = set(ends)
        rest = sorted((g for g in range(total) if g not in kept),
                      key=lambda g: -sum(m.ops[li].tasks for li in groups[g]))
        keep = sorted((ends + rest)[:most])
        groups = [groups[g] for g in keep]
    index = {li: n for n, g in enumerate(groups) for li in g}
    if layer_plan is not None:
        pairs = {(d, li) for li, ds in enumerate(layer_plan.model.deps) for d, _ in ds}
    else:
        pairs = {(m.layer[d], m.layer[i]) for i, ds in enumerate(m.deps) for d in ds}
    edges: set[tuple[int, int]] = {(index[a], index[b]) for a, b in pairs
                                   if a in index and b in index and index[a] != index[b]}
    # depth: longest path from a source, by Kahn's order over the op graph (a cycle
    # between merged rows leaves its nodes at the depth reached so far)
    succ: dict[int, list[int]] = defaultdict(list)
    indeg = [0] * len(groups)
    for a, b in edges:
        succ[a].append(b)
        indeg[b] += 1
    depth = [0] * len(groups)
    ready = [n for n in range(len(groups)) if indeg[n] == 0]
    while ready:
        a = ready.pop()
        for b in succ[a]:
            depth[b] = max(depth[b], depth[a] + 1)
            indeg[b] -= 1
            if indeg[b] == 0:
                ready.append(b)
    per_depth: dict[int, list[int]] = defaultdict(list)
    for n in range(len(groups)):
        per_depth[depth[n]].append(n)
    # a depth of many ops (thousands of independent delayed calls) takes several
    # columns of at most GRAPH_COLUMN nodes, not one column taller than the picture
    y = [0.0] * len(groups)
    x = [0.0] * len(groups)
    column = 0
    for d in sorted(per_depth):
        ns = per_depth[d]
        rows = min(len(ns), GRAPH_COLUMN)
        for r, n in enumerate(ns):
            x[n] = float(column + r // GRAPH_COLUMN)
            y[n] = r % GRAPH_COLUMN - (rows - 1) / 2
        column += -(-len(ns) // GRAPH_COLUMN)
    nodes = []
    for n, g in enumerate(groups):
        c: Counter[str] = sum((targets[li] for li in g), Counter())
        main = c.most_common(1)[0][0] if c else "?"
        op = m.ops[g[0]]
        nodes.append({
            "op": op.label, "class": op.op_class, "tasks": sum(m.ops[li].tasks for li in g),
            "target": main,
            "targets": " + ".join(f"{t}×{k}" for t, k in c.most_common()) or "-",
            "x": x[n], "y": y[n],
        })
    return {"nodes": nodes, "edges": sorted(edges), "shown": len(nodes), "ops": total}


# ---------------------------------------------------------------- figures
def sampled_bars(bars: list[dict[str, Any]], title: str,
                 most: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """At most ``most`` (``MAX_BARS``) of ``bars`` for a picture, taken evenly from
    every row (worker), so that none drops out; the title then says how many of how
    many are shown."""
    most = MAX_BARS if most is None else most
    if len(bars) <= most:
        return bars, title
    by_row: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for b in bars:
        by_row[b["row"]].append(b)
    kept: list[dict[str, Any]] = []
    for row in by_row.values():
        share = max(1, most * len(row) // len(bars))
        step = len(row) / share
        kept.extend(row[int(i * step)] for i in range(min(share, len(row))))
    return kept, f"{title} (showing {len(kept)} of {len(bars)} tasks, every row sampled)"


def _timeline(bars: list[dict[str, Any]], title: str, x_label: str, width: int) -> Model:
    from bokeh.models import ColumnDataSource, FactorRange, HoverTool
    from bokeh.plotting import figure

    bars, title = sampled_bars(bars, title)
    rows = sorted({b["row"] for b in bars}, reverse=True) or ["(no tasks)"]
    colours = colours_of(b["target"] for b in bars)
    data = {
        "row": [b["row"] for b in bars], "left": [b["start"] for b in bars],
        "right": [b["end"] for b in bars], "target": [b["target"] for b in bars],
        "op": [b["op"] for b in bars], "key": [b["key"] for b in bars],
        "colour": [colours[b["target"]] for b in bars],
        "ms": [(b["end"] - b["start"]) * 1e3 for b in bars],
    }
    fig = figure(y_range=FactorRange(factors=rows), height=max(140, 60 + 26 * len(rows)),
                 width=width, title=title, x_axis_label=x_label, toolbar_location="above",
                 tools="xpan,xwheel_zoom,reset,save")
    fig.hbar(y="row", left="left", right="right", height=0.8, source=ColumnDataSource(data),
             fill_color="colour", line_width=0.5,
             # thin white edges part a few bars; with many they would wash the colour out
             line_color="white" if len(bars) < 200 else None,
             legend_field="target")
    fig.add_tools(HoverTool(tooltips=[("op", "@op"), ("target", "@target"),
                                      ("task", "@key"), ("ms", "@ms{0.000}")]))
    fig.legend.label_text_font_size = "9pt"
    fig.add_layout(fig.legend[0], "right")
    fig.ygrid.grid_line_color = None
    return fig


def _size(node: dict[str, Any]) -> float:
    """A node's circle, in pixels across: larger for more tasks."""
    return 10 + min(node["tasks"], 64) ** 0.5 * 3


def _graph(graph: dict[str, Any], title: str, width: int) -> Model:
    from bokeh.models import ColumnDataSource, HoverTool, Range1d
    from bokeh.models.annotations import LabelSet
    from bokeh.plotting import figure

    nodes = graph["nodes"]
    if graph.get("ops", 0) > len(nodes):
        title = (f"{title} (showing {len(nodes)} of {graph['ops']} ops: those giving the "
                 f"results, and those with the most tasks)")
    xs = [n["x"] for n in nodes] or [0.0]
    ys = [n["y"] for n in nodes] or [0.0]
    height = min(MAX_GRAPH_HEIGHT, max(200, 80 + 60 * int(max(ys) - min(ys) + 1)))
    # labels centred on their nodes, above and below in turn along each row: those on
    # one side are two columns apart, and no longer than that leaves room for (about
    # 6.5 px a character at 9pt); the ends leave room for half a label
    pad = 0.8
    # a long chain widens the picture (up to MAX_GRAPH_WIDTH) rather than crowding
    # its nodes: at 40 ops in a row they overlapped and their labels ran together
    columns = max(xs) - min(xs) + 2 * pad
    width = int(max(width, min(MAX_GRAPH_WIDTH, columns * MIN_COLUMN_PX / 0.75)))
    per_column = 0.75 * width / max(columns, 1.0)
    fits = int(2 * per_column / 6.5) - 1
    # (no room for even a few characters: no labels, the hover names each node)
    chars = min(22, max(6, fits)) if fits >= 4 else 0
    if not chars:
        title = f"{title} (hover over a node for its op)"
    pad = max(pad, (chars * 6.5 / 2 + 4) / per_column)
    # and circles no wider than their columns
    most_px = max(6.0, 0.8 * per_column)
    side: dict[int, int] = {}
    for row in {n["y"] for n in nodes}:
        along = sorted((n["x"], k) for k, n in enumerate(nodes) if n["y"] == row)
        for j, (_, k) in enumerate(along):
            side[k] = j % 2
    fig = figure(width=width, height=height,
                 title=title, x_range=Range1d(start=min(xs) - pad, end=max(xs) + pad),
                 y_range=Range1d(start=min(ys) - 0.8, end=max(ys) + 0.8),
                 tools="pan,wheel_zoom,reset,save", toolbar_location="above")
    fig.axis.visible = False
    fig.grid.visible = False
    if graph["edges"]:
        fig.segment(x0=[nodes[a]["x"] for a, _ in graph["edges"]],
                    y0=[nodes[a]["y"] for a, _ in graph["edges"]],
                    x1=[nodes[b]["x"] for _, b in graph["edges"]],
                    y1=[nodes[b]["y"] for _, b in graph["edges"]],
                    line_color="#999999", line_width=1.5)
    colours = colours_of(n["target"] for n in nodes)
    source = ColumnDataSource({
        "x": xs[: len(nodes)], "y": ys[: len(nodes)], "op": [n["op"] for n in nodes],
        "label": ["" if not chars else n["op"] if len(n["op"]) <= chars
                  else n["op"][: chars - 1] + "…" for n in nodes],
        # clear of the node's circle, above or below it
        "dy": [(min(_size(n), most_px) / 2 + 3) if side.get(k, 0) == 0
               else -(min(_size(n), most_px) / 2 + 13) for k, n in enumerate(nodes)],
        "class": [n["class"] for n in nodes],
        "tasks": [n["tasks"] for n in nodes], "target": [n["target"] for n in nodes],
        "targets": [n["targets"] for n in nodes],
        "colour": [colours[n["target"]] for n in nodes],
        "size": [min(_size(n), most_px) for n in nodes],
    })
    fig.scatter(x="x", y="y", size="size", source=source, fill_color="colour",
                line_color="#333333", legend_field="target")
    fig.add_layout(LabelSet(x="x", y="y", text="label", source=source, x_offset=0,
                            y_offset="dy", text_align="center", text_font_size="9pt"))
    fig.add_tools(HoverTool(tooltips=[("op", "@op"), ("class", "@class"),
                                      ("tasks", "@tasks"), ("target", "@targets")]))
    fig.legend.label_text_font_size = "9pt"
    fig.add_layout(fig.legend[0], "right")
    return fig


def worker_names() -> dict[str, str]:
    """Worker address -> name on the active mesh (empty without one)."""
    from . import _state

    mesh = _state.active()
    if mesh is None:
        return {}
    try:
        return {d.worker: d.name for d in mesh.inventory() if d.name}
    except Exception:
        return {}


def _with_floor(title: str, plan: Plan[PlanModel], bars: list[dict[str, Any]]) -> str:
    """``title``, and where the plan's estimate is longer than its bars (Dask's own
    costs, a floor its notes explain), that estimate: the header said one figure and
    the picture ended at another."""
    from .router.plan import _secs

    end = max((b["end"] for b in bars), default=0.0)
    if plan.makespan > 1.05 * end and plan.makespan > 0:
        return f"{title}; est. {_secs(plan.makespan)} with Dask's own costs (see the notes)"
    return title


def plan_figure(plan: Plan[PlanModel], width: int = 900) -> Model:
    """The plan's timeline by worker and its graph of ops, coloured by target."""
    from bokeh.layouts import column

    by = "pool: planned per layer" if _made_per_layer(plan) else "worker"
    bars = planned_bars(plan, plan.worker_names or worker_names())
    return column(
        _timeline(bars, _with_floor(f"Planned timeline (estimated, by {by})", plan, bars),
                  "estimated seconds", width),
        _graph(op_graph(plan), "Operations, coloured by planned target", width),
    )


def report_figure(report: Report, width: int = 900) -> Model:
    """Planned and measured timelines side by side, and the ops coloured by where they
    ran."""
    from bokeh.layouts import column, row

    plan = report.plan
    half = max(width // 2, 300)
    measured, real = measured_bars(report)
    how = "measured" if real else "measured task seconds laid end to end"
    bars = planned_bars(plan, {**(plan.worker_names or worker_names()),
                               **report.worker_names})
    return column(
        row(
            _timeline(bars, _with_floor("Planned (estimated)", plan, bars),
                      "estimated seconds", half),
            _timeline(measured, f"Ran ({how})", "seconds since the first task", half),
        ),
        _graph(op_graph(plan, report), "Operations, coloured by where they ran", width),
    )


# ---------------------------------------------------------------- embedding
#: whether this kernel has already shown a picture that carries BokehJS
_bokehjs_sent = False

#: how long a picture without BokehJS waits for it on the page before it says so
BOKEHJS_WAIT_MS = 15000

_NO_BOKEHJS = (
    "(no picture: BokehJS, which came inline with the first jupyter_mesh picture this "
    "kernel showed, is not on this page. Run dask.config.set({'mesh.viz.bokehjs': "
    "'every'}) and show the picture again, or restart the kernel: its first picture "
    "carries BokehJS again.)"
)


def bokehjs_source() -> str:
    """The installed BokehJS (the part the pictures use), as one script."""
    global _bokehjs_text
    if _bokehjs_text is None:
        from bokeh.resources import Resources

        _bokehjs_text = "\n".join(Resources(mode="inline", components=["bokeh"]).js_raw)
    return _bokehjs_text


_bokehjs_text: str | None = None


def _bokehjs_mode() -> str:
    mode = _config.get("viz.bokehjs")
    if mode not in ("once", "every"):
        raise MeshConfigError(
            f"config mesh.viz.bokehjs must be 'once' or 'every', not {mode!r}"
        )
    return str(mode)


def embed(layout: Model) -> str:
    """HTML for a Bokeh layout that renders offline.

    BokehJS (about 1.3 MB of JavaScript) goes inline with the first picture a kernel
    shows; later pictures wait for that copy on the page instead of carrying their own,
    so a notebook does not grow by 1.3 MB per picture (``mesh.viz.bokehjs: every``
    puts it in every picture, for outputs that travel alone)."""
    global _bokehjs_sent
    import json
    import uuid

    from bokeh.embed import components
    from bokeh.resources import Resources

    script, div = components(layout)
    if _bokehjs_mode() == "every" or not _bokehjs_sent:
        js = Resources(mode="inline", components=["bokeh"]).render_js()
        _bokehjs_sent = True
        return f"<div class='jupyter-mesh-picture'>{js}{div}{script}</div>"
    import bokeh

    body = script.strip()
    body = body[body.index(">") + 1: body.rindex("</script>")]
    box = f"jm-picture-{uuid.uuid4().hex}"
    # in a Jupyter page whose first picture is gone (its output cleared or re-run),
    # BokehJS comes from the jupyter_mesh server extension instead
    served = json.dumps(f"jupyter-mesh/static/bokeh-{bokeh.__version__}.min.js")
    waiter = (
        "<script>(function() {"
        f" const run = function() {{ {body} }};"
        f" const box = {json.dumps(box)}; let waited = 0;"
        " const fetchIt = function() {"
        "  const cfg = document.getElementById('jupyter-config-data');"
        "  if (!cfg || window.__jupyterMeshBokehJS) { return; }"
        "  let base; try { base = JSON.parse(cfg.textContent).baseUrl; } catch (e) { return; }"
        "  if (!base) { return; }"
        "  window.__jupyterMeshBokehJS = true;"
        "  const s = document.createElement('script');"
        f"  s.src = base.replace(/\\/?$/, '/') + {served};"
        "  document.head.appendChild(s);"
        " };"
        " (function wait() {"
        "  if (window.Bokeh !== undefined) { run(); return; }"
        "  waited += 50; if (waited === 500) { fetchIt(); }"
        f"  if (waited > {int(BOKEHJS_WAIT_MS)}) {{"
        "   const el = document.getElementById(box);"
        f"   if (el) {{ el.textContent = {json.dumps(_NO_BOKEHJS)}; }} return; }}"
        "  setTimeout(wait, 50);"
        " })();"
        "})();</script>"
    )
    return f"<div class='jupyter-mesh-picture' id='{box}'>{div}{waiter}</div>"


def _safe(build: Any, what: str) -> str:
    try:
        return embed(build())
    except Exception as exc:  # a picture must never break the table it sits under
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return f"<p><i>(no picture of this {what}: {html.escape(reason)})</i></p>"


def plan_html(plan: Plan[PlanModel]) -> str:
    """The plan's picture as embeddable HTML (empty for a plan without tasks)."""
    if not plan.ntasks:
        return ""
    return _safe(lambda: plan_figure(plan), "plan")


def report_html(report: Report) -> str:
    """The report's picture as embeddable HTML (empty for a report without tasks)."""
    if not report.plan.ntasks:
        return ""
    return _safe(lambda: report_figure(report), "report")


def save_html(layout: Model, path: str, title: str = "jupyter_mesh") -> str:
    """Write a standalone HTML file (BokehJS inline) for a layout; return its path."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    with open(path, "w", encoding="utf-8") as f:
        f.write(file_html(layout, resources=INLINE, title=title))
    return path
