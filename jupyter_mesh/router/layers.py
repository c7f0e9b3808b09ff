"""The router's fast path for large graphs: plan and rewrite per layer, not per task.

Above ``mesh.router.layer-plan-threshold`` tasks, building the per-task model of the
unfused graph costs more than Dask's own graph construction. Every task of a
HighLevelGraph layer computes the same op on blocks of the same shape, so this path:

- classifies each layer from its metadata (name, one sample function, the array's
  chunks and dtype); a Blockwise layer is never materialized;
- places each layer on one pool by earliest finish time at layer granularity (a
  layer's tasks spread over that pool's task slots; inputs from another pool pay the
  link between them);
- rewrites per layer: a Blockwise layer holds one task template, whose function is
  wrapped once in the device wrapper; a materialized layer has its tasks wrapped (it
  holds them already). The target of each layer travels by layer name to the scheduler
  plugin, whose ``update_graph`` turns it into restrictions on that layer's keys. The
  Blockwise layers the plan puts on one pool are fused as Dask fuses them (a fused
  layer keeps its last layer's name, and so its target); nothing is fused across two
  pools, and nothing else is fused, so layer names stay the keys' names. Where the plan
  restricts nothing, the graph is materialized and fused as Dask would fuse it.

The device wrapper still converts every task's inputs to the backend of the worker it
actually runs on: placement never decides correctness.
"""

from __future__ import annotations

import copy
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from dask._task_spec import Alias, DataNode, GraphNode, Task
from dask.blockwise import Blockwise
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from .. import _config
from ..errors import MeshError
from ._device import DeviceCall, LayerKeys, routed_chain
from .classify import (
    OpInfo,
    _largest_block_bytes,
    _layer_meta,
    _layer_order,
    _sample_func,
    classify_label,
    inherit_sizes,
    layer_dtype_kind,
    layer_dtype_name,
    layer_label,
    op_native,
    passed_callables,
    peak_out,
    picks_item,
    sample_node,
    task_cost,
)
from .cost import CostModel, Pool, reshared
from .placement import (
    dask_fuses,
    forced_backend,
    parse_route_or_error,
    relax_if_equivalent,
    route_constraints,
)
from .plan import Plan, merged_rows
from .rewrite import Routed, is_barrier, is_p2p, key_name, p2p_at_a_site, wrapped_task

DEFAULT_THRESHOLD = 20_000


def layer_plan_threshold() -> int:
    """``mesh.router.layer-plan-threshold``: graphs with more tasks are planned per layer."""
    return _config.get_count("router.layer-plan-threshold", unit="tasks",
                             default=DEFAULT_THRESHOLD)


def count_tasks(graph: Any) -> int:
    """Tasks in a HighLevelGraph without materializing its Blockwise layers."""
    if not isinstance(graph, HighLevelGraph):
        return len(graph)
    return sum(len(layer) for layer in graph.layers.values())


def use_layer_plan(graph: Any) -> bool:
    return isinstance(graph, HighLevelGraph) and count_tasks(graph) > layer_plan_threshold()


@dataclass
class LayerModel:
    """A computation as layers: ``ops[i]`` is layer ``names[i]``, in topological order;
    ``deps[i]`` lists (layer index, bytes read from it per task)."""

    graph: HighLevelGraph
    ops: list[OpInfo]
    names: list[str]
    deps: list[list[tuple[int, float]]]
    outputs: list[Any]
    index: dict[str, int] = field(default_factory=dict)
    #: the per-task lists of :class:`GraphModel`, empty: nothing here is per task
    keys: list[Any] = field(default_factory=list)
    layer: list[int] = field(default_factory=list)
    pins: dict[int, str] = field(default_factory=dict)
    #: layers that hold the very tasks of an earlier one (Dask's ``lu`` gives its
    #: three outputs one dict of tasks), and the index of that layer's op: planned
    #: as one op, so that a task has one target (each was planned apart, and the
    #: scheduler ran the shared tasks where the last said, not where its row said)
    aliases: dict[str, int] = field(default_factory=dict)

    @property
    def ntasks(self) -> int:
        return sum(op.tasks for op in self.ops)

    def __len__(self) -> int:
        return self.ntasks

    def layer_of_key(self, key: Any) -> int | None:
        return self.index.get(key_name(key))


def model_layers(graph: HighLevelGraph, outputs: list[Any]) -> LayerModel:
    """Classify every layer of ``graph`` from its metadata (no task is materialized
    for Blockwise layers). The graph is not culled here (that would build every key):
    the scheduler culls it at submission (:func:`submission`), so task counts are
    those of the layers as built."""
    order = _layer_order(graph)
    ops: list[OpInfo] = []
    names: list[str] = []
    metas: list[Any] = []
    reads: list[dict[str, float]] = []
    index: dict[str, int] = {}
    aliases: dict[str, int] = {}
    #: the key sets of the materialized layers so far, and their ops' indices
    key_sets: dict[frozenset[Any], int] = {}
    #: names of keys that a layer of another name holds (``to_delayed`` puts an
    #: array's keys in a layer named ``delayed-<name>``), and that layer's op
    foreign: dict[Any, int] = {}
    for name in order:
        layer = graph.layers[name]
        if isinstance(layer, Blockwise):
            n = len(layer)
            # (the op inside Dask's _enforce_dtype, as the per-task model plans it)
            func: Any = _sample_func(layer.task) if isinstance(layer.task, Task) else None
            passes = passed_callables(layer.task)
            per_arg: dict[str, float] = {}
            out_ind = set(layer.output_indices)
            for arg, ind in layer.indices:
                if not isinstance(arg, str) or ind is None:
                    continue
                blocks = layer.numblocks.get(arg)
                if blocks is None:
                    continue
                k = math.prod(b for b, i in zip(blocks, ind, strict=False) if i not in out_ind)
                per_arg[arg] = per_arg.get(arg, 0.0) + float(k)
        else:
            mapping = layer.mapping if isinstance(layer, MaterializedLayer) else dict(layer)
            n = len(mapping)
            if n:
                same = key_sets.setdefault(frozenset(mapping), len(ops))
                for held in mapping:
                    if key_name(held) != name:
                        foreign.setdefault(key_name(held), same)
                if same != len(ops):  # the tasks of an earlier layer, all of them
                    index[name] = aliases[name] = same
                    continue
            sample = sample_node(mapping.values())
            func = _sample_func(sample)
            passes = passed_callables(sample)
            per_arg = {}
        if not n:
            continue
        label = layer_label(name)
        index[name] = len(ops)
        ops.append(OpInfo(name=name, label=label, op_class=classify_label(label, func),
                          tasks=n, func=func, dtype_kind=layer_dtype_kind(layer),
                          dtype_name=layer_dtype_name(layer),
                          passes=passes,
                          picks_item=picks_item(
                              layer.task if isinstance(layer, Blockwise) else sample)))
        # data the graph carries (from_array's blocks), as the per-task model tells
        ops[-1].data = not isinstance(layer, Blockwise) and all(
            _is_data(v) for v in mapping.values())
        # results persisted earlier (the graph holds their futures), and aliases (a
        # slice that is whole blocks: Dask hands the blocks on, no function runs)
        ops[-1].persisted = ops[-1].data and all(_is_future(v) for v in mapping.values())
        ops[-1].aliases = not isinstance(layer, Blockwise) and bool(mapping) and all(
            isinstance(v, Alias) for v in mapping.values())
        names.append(name)
        metas.append(_layer_meta(layer, layer.task if isinstance(layer, Blockwise) else sample))
        ops[-1].peak_out_bytes = _largest_block_bytes(
            layer, layer.task if isinstance(layer, Blockwise) else sample)
        reads.append(per_arg)
    for kn, li in foreign.items():
        index.setdefault(kn, li)
    missing = {key_name(k) for k in outputs} - set(index)
    if missing:
        raise MeshError(f"the graph has no layer for output {sorted(map(str, missing))[0]!r}")
    dep_idx: list[list[int]] = []
    for li, name in enumerate(names):
        # sorted: the dependencies are a set, in an order the hash seed changes
        dep_idx.append(sorted(index[d] for d in graph.dependencies.get(name, ())
                              if d in index and index[d] != li))
    _layer_costs(ops, metas, dep_idx)
    deps: list[list[tuple[int, float]]] = []
    for li, op in enumerate(ops):
        row: list[tuple[int, float]] = []
        in_bytes = in_peak = 0.0
        for d in dep_idx[li]:
            per = reads[li].get(names[d])
            if per is None:  # spread the producer's blocks over this layer's tasks
                per = max(ops[d].tasks / op.tasks, 1.0)
            nb = per * ops[d].out_bytes
            row.append((d, nb))
            in_bytes += nb
            in_peak += per * peak_out(ops[d])
        deps.append(row)
        op.in_bytes = in_bytes
        op.peak_in_bytes = in_peak
        op.flops, op.mem_bytes = task_cost(op, [ops[d] for d in dep_idx[li]])
        op.native = op_native(op, [ops[d] for d in dep_idx[li]])
    return LayerModel(graph=graph, ops=ops, names=names, deps=deps, outputs=list(outputs),
                      index=index, aliases=aliases)


def _is_future(value: Any) -> bool:
    """Whether a layer's value is a Dask future (what a persisted collection holds)."""
    value = value.value if isinstance(value, DataNode) else value
    return type(value).__name__ == "Future" and hasattr(value, "key")


def _is_data(value: Any) -> bool:
    """Whether a layer's value is data, not a task: a DataNode, or a plain value such
    as a NumPy block (a tuple, list, dict or string may be a task or a key: not said
    to be data)."""
    if isinstance(value, DataNode):
        return True
    return value is not None and not isinstance(
        value, (GraphNode, tuple, list, dict, str, bytes))


def _layer_costs(ops: list[OpInfo], metas: list[Any], dep_idx: list[list[int]]) -> None:
    """Block size and bytes of one output block per layer; layers without metadata
    inherit them from their inputs, or (input-less ones) from their consumers."""
    known = [False] * len(ops)
    for li, op in enumerate(ops):
        meta = metas[li]
        if meta is not None:
            op.block, op.itemsize, op.in_block = meta
            op.out_bytes = float(math.prod(op.block)) * op.itemsize if op.block else 8.0
            known[li] = True
            continue
        parents = [p for p in dep_idx[li] if known[p]]
        if parents:
            src = ops[max(parents, key=lambda p: ops[p].out_bytes)]
            op.block, op.itemsize, op.out_bytes = src.block, src.itemsize, src.out_bytes
            op.peak_out_bytes = src.peak_out_bytes
            known[li] = True
        else:
            op.block, op.itemsize, op.out_bytes = (), 8, 8.0
    children: list[list[int]] = [[] for _ in ops]
    for li, ds in enumerate(dep_idx):
        for d in ds:
            children[d].append(li)
    inherit_sizes(ops, known, children)


class LayerPlan(Plan[LayerModel]):
    """A plan made per layer: every task of a layer goes to one pool."""

    def __init__(self, model: LayerModel, pools: list[Pool], route: str,
                 layer_pool: list[int], start: list[float], finish: list[float],
                 est: list[float], moved: list[float], cost: CostModel, *,
                 notes: list[str] | None = None, site: str | None = None) -> None:
        super().__init__(model, pools, route, [], [], [], cost, notes=notes, site=site)
        self.layer_pool = layer_pool
        self.layer_start = start
        self.layer_finish = finish
        self._est = est
        self._moved = moved

    @property
    def ntasks(self) -> int:
        return self.model.ntasks

    @property
    def makespan(self) -> float:
        return max(self.layer_finish, default=0.0)

    def layer_of_key(self, key: Any) -> int | None:
        return self.model.layer_of_key(key)

    @property
    def layer_to_host(self) -> list[bool]:
        """Per layer: whether its results are handed over as host arrays (a consumer
        layer on another kind or backend, an output, or a host result)."""
        m = self.model
        if self.unrestricted:
            return [True] * len(m.ops)
        kind = [self._kind_of(p, li) for li, p in enumerate(self.layer_pool)]
        flags = [k == ("cpu", "numpy") for k in kind]
        for li, row in enumerate(m.deps):
            for d, _ in row:
                if kind[d] != kind[li]:
                    flags[d] = True
        for name in {key_name(k) for k in m.outputs}:
            out = m.index.get(name)
            if out is not None:
                flags[out] = True
        # a layer of nodes that are not tasks (aliases, e.g. of plain slicing) runs no
        # wrapper: it hands on what its inputs returned, so they must return host
        # arrays wherever it must (inputs come first)
        for li in range(len(flags) - 1, -1, -1):
            if flags[li] and _passes_values(m.graph.layers[m.names[li]]):
                for d, _ in m.deps[li]:
                    flags[d] = True
        return flags

    @property
    def to_host(self) -> list[bool]:
        return self.layer_to_host

    def _make_rows(self) -> list[dict[str, Any]]:
        from collections import Counter

        targets = [Counter({self.target_label(li, p): op.tasks})
                   for li, (p, op) in enumerate(zip(self.layer_pool, self.model.ops,
                                                    strict=True))]
        rows, self._row_layers = merged_rows(self.model.ops, targets, self._est, self._moved,
                                             self.routed,
                                             self.unrestricted and self.free_target)
        return rows

    def _op_pools(self) -> set[tuple[int, int]]:
        return set(enumerate(self.layer_pool))

    def assignment(self) -> None:
        """None: the progress bars group tasks by their names (layers) instead."""
        return None

    @property
    def bytes_between_sites(self) -> float:
        """As a per-task plan's: each layer reads its inputs' bytes (per task, as the
        model has them) from the site of their layer's pool."""
        sites = [p.site for p in self.pools]
        if len(set(sites)) < 2 or self.unrestricted:
            return 0.0
        m = self.model
        return float(sum(nb * m.ops[li].tasks for li, row in enumerate(m.deps)
                         for d, nb in row
                         if sites[self.layer_pool[d]] != sites[self.layer_pool[li]]))

    def _header(self) -> str:
        return super()._header() + " (planned per layer)"


def plan_layers(model: LayerModel, pools: list[Pool], route: Any = "auto", *,
                site: str | None = None, cost: CostModel | None = None) -> LayerPlan:
    """Place each layer on one pool: earliest finish time over layers in topological
    order, a layer taking ceil(tasks / slots) task times on its pool."""
    pools = forced_backend(pools, parse_route_or_error(route))
    route, cost, allowed, notes = route_constraints(model, pools, route, site, cost)
    notes.append(f"{model.ntasks} tasks: planned per layer (above "
                 f"mesh.router.layer-plan-threshold), counting every task of the graph as "
                 f"built; Dask's scheduler runs those the results need")
    unrestricted, allowed = relax_if_equivalent(model, pools, route, site, cost, allowed,
                                                notes)
    slots = [max(sum(p.worker_threads()), 1) for p in pools]
    nworkers = [max(len(p.workers), 1) for p in pools]
    # a plan that restricts nothing goes fused (see _fuse_unrestricted): a layer that is
    # the one input of its one consumer, task for task, costs no dispatch of its own
    inside = fused_layers(model) if unrestricted and dask_fuses() else set()
    free = [0.0] * len(pools)
    # CPU workers the route leaves idle (a forced one) take no share of their hosts'
    # cores: the others are timed at their share among themselves
    timed = reshared(pools, {p for a in allowed for p in a}) or pools
    nl = len(model.ops)
    layer_pool = [0] * nl
    start = [0.0] * nl
    finish = [0.0] * nl
    est = [0.0] * nl
    moved = [0.0] * nl
    for li, op in enumerate(model.ops):
        n = op.tasks
        if not allowed[li]:
            raise MeshError(f"{op.label}: no pool may run it")
        best = (math.inf, allowed[li][0], 0.0)
        saved = cost.task_overhead if li in inside else 0.0
        for p in allowed[li]:
            e = cost.exec_time(op, timed[p]) - saved
            ready = 0.0
            for d, nb in model.deps[li]:
                q = layer_pool[d]
                a = finish[d]
                if q != p:
                    links = min(nworkers[p], nworkers[q])
                    a += cost.latency[q][p] + n * nb * cost.inv_bw[q][p] / links
                else:  # the scheduler's round trip (a transfer includes it)
                    a += cost.dependency_latency
                ready = max(ready, a)
            s = max(ready, free[p])
            f = s + math.ceil(n / slots[p]) * e
            if f < best[0]:
                best = (f, p, s)
        f, p, s = best
        layer_pool[li], start[li], finish[li] = p, s, f
        free[p] = f
        est[li] = n * (cost.exec_time(op, timed[p]) - saved)
    plan = LayerPlan(model, pools, str(route), layer_pool, start, finish, est, moved, cost,
                     notes=notes, site=site)
    for li, op in enumerate(model.ops):
        # between the (kind, backend) that run them: a JAX CPU worker running an op with
        # NumPy hands over NumPy arrays
        kp = plan._kind_of(layer_pool[li], li)
        moved[li] = float(sum(op.tasks * nb for d, nb in model.deps[li]
                              if plan._kind_of(layer_pool[d], d) != kp))
    plan.unrestricted = unrestricted
    plan.note_numpy_runs()
    return plan


def _passes_values(layer: Any) -> bool:
    """Whether some node of ``layer`` hands on another task's value without running a
    function of its own (an alias), so no device wrapper converts it."""
    if isinstance(layer, Blockwise) and isinstance(layer.task, Task):
        return False
    mapping = layer.mapping if isinstance(layer, MaterializedLayer) else dict(layer)
    return any(type(node) is not Task
               and not (type(node) is tuple and node and callable(node[0]))
               for node in mapping.values())


def fused_layers(model: LayerModel) -> set[int]:
    """The layers whose tasks a fused submission runs inside their consumers' tasks:
    each the one input of its one consumer layer, with as many tasks, and no output
    (a linear chain, layer by layer, as :func:`rewrite.graph_chains` finds it task by
    task)."""
    consumers: dict[int, list[int]] = {}
    for li, row in enumerate(model.deps):
        for d, _ in row:
            consumers.setdefault(d, []).append(li)
    outputs = {model.index.get(key_name(k)) for k in model.outputs}
    return {d for d, users in consumers.items()
            if len(users) == 1 and len(model.deps[users[0]]) == 1 and d not in outputs
            and model.ops[d].tasks == model.ops[users[0]].tasks}


def rewrite_layers(plan: LayerPlan, *, fallback: bool = True, host_results: bool = False,
                   fuse: bool | None = None) -> Routed:
    """Wrap each layer's function(s) in the device wrapper; restrictions per layer.

    A plan that restricts nothing is submitted materialized, its linear chains fused
    (see :func:`_fuse_unrestricted`; ``fuse``: None as Dask's ``optimization.fuse.active``
    says, on unless it is False); ``routed.graph`` is then a dict of tasks, not a
    HighLevelGraph."""
    if fuse is None:
        fuse = dask_fuses()
    m = plan.model
    plan_id = uuid.uuid4().hex
    to_host = list(plan.layer_to_host)
    if host_results:  # see rewrite.rewrite
        to_host = [True] * len(to_host)
    # a Blockwise layer that concatenates its input blocks (concatenate=True, as every
    # map_blocks that drops or merges axes) has Dask join them outside the device
    # wrapper, with NumPy: its inputs come as host arrays
    for li, name in enumerate(m.names):
        layer = m.graph.layers[name]
        if isinstance(layer, Blockwise) and layer.concatenate:
            for d, _ in m.deps[li]:
                to_host[d] = True
    free = plan.unrestricted
    # a restricted plan's Blockwise layers on one pool are fused as Dask fuses them
    # (see _fuse_blockwise_by_pool): each keeps its own key in the report
    by_pool = not free and fuse is not False
    host_only = frozenset({"numpy"})
    layers: dict[str, Any] = dict(m.graph.layers)
    by_layer: dict[str, int] = {}
    by_key: dict[Any, int] = {}
    for li in range(len(m.ops)):
        name = m.names[li]
        layer = layers[name]
        pool = plan.layer_pool[li]
        native = host_only if free else plan.native_for(li, pool)
        # Dask's P2P places its own tasks (see rewrite.is_p2p): never restricted
        p2p = is_p2p(name) or any(is_barrier(m.names[d]) for d, _ in m.deps[li])
        if p2p and plan.site:
            raise p2p_at_a_site()
        if not free and not p2p:
            by_layer[name] = pool
        calls: dict[int, DeviceCall] = {}

        def wrap(func: Any, li: int = li, native: frozenset[str] = native,
                 calls: dict[int, DeviceCall] = calls, key: Any = None) -> DeviceCall:
            call = calls.get(id(func))
            if call is None or call.func is not func:
                call = calls[id(func)] = DeviceCall(func, key, plan_id, to_host[li], native)
            return call

        if isinstance(layer, Blockwise) and isinstance(layer.task, Task):
            new = copy.copy(layer)
            new.__dict__.pop("_cached_dict", None)
            new.task = wrapped_task(layer.task, wrap(
                layer.task.func, key=LayerKeys(name) if by_pool else None))
            layers[name] = new
            continue
        mapping = layer.mapping if isinstance(layer, MaterializedLayer) else dict(layer)
        out: dict[Any, Any] = {}
        for key, node in mapping.items():
            if type(node) is Task:
                node = wrapped_task(node, wrap(node.func))
            elif type(node) is tuple and node and callable(node[0]):
                node = (wrap(node[0]),) + node[1:]
            out[key] = node
            if key_name(key) != name and not p2p and not is_p2p(key):
                by_key[key] = pool
        layers[name] = MaterializedLayer(
            out, annotations=getattr(layer, "annotations", None),
            collection_annotations=getattr(layer, "collection_annotations", None))
    for alias, li in m.aliases.items():  # the same tasks, wrapped the same way
        layers[alias] = layers[m.names[li]]
    graph = HighLevelGraph(layers, m.graph.dependencies)
    multi_site = len({p.site for p in plan.pools}) > 1
    pools: list[tuple[str | None, str | None, str]] = [
        (p.resource, p.site if (multi_site or plan.site) else None, p.label)
        for p in plan.pools]
    if free and plan.site:
        from .rewrite import site_only

        # restricted to nothing but the site
        anywhere = site_only(pools, plan.site)
        by_layer = dict.fromkeys(m.names, anywhere)
        by_key = dict.fromkeys(by_key, anywhere)
    elif free:
        by_key = {}
    for alias, li in m.aliases.items():
        if m.names[li] in by_layer:
            by_layer[alias] = by_layer[m.names[li]]
    routed = Routed(plan_id=plan_id, graph=graph, keys=list(m.outputs), restrictions=by_key,
                    pools=pools, fallback=fallback,
                    timeout=_config.get_seconds("fallback-timeout"), site=plan.site,
                    layers=by_layer)
    if free and fuse is not False:
        _fuse_unrestricted(routed, graph)
    elif by_pool:
        routed.graph, routed.fused_layers = _fuse_blockwise_by_pool(
            graph, by_layer, list(m.outputs), m.names)
    return routed


#: the layer annotation that keeps Dask's Blockwise fusion inside one pool (taken off
#: again before the graph is submitted)
POOL_ANNOTATION = "jupyter_mesh_pool"


def _fuse_blockwise_by_pool(graph: HighLevelGraph, by_layer: dict[str, int],
                            outputs: list[Any], order: list[str]
                            ) -> tuple[HighLevelGraph, dict[str, list[LayerKeys]]]:
    """Dask's own Blockwise fusion (``optimize_blockwise``, which dask.array's
    optimization runs) of a restricted plan's graph, never across pools: each Blockwise
    layer carries its pool as an annotation while Dask fuses, and Dask fuses only
    layers whose annotations are equal. A fused layer keeps the name of its last layer,
    whose pool (in ``by_layer``) is every member's. Without it every op of a chain of
    elementwise ops went as tasks of its own: at 10^5 tasks the scheduler materialized
    2.7 times as many tasks as for Dask's own graph.

    Also returns, per fused layer, its members (``order``: the layers in the order
    they run), each as the :class:`LayerKeys` its device calls now record under: the
    member's block index read from the fused task's (see :func:`_member_keys`)."""
    from dask.blockwise import optimize_blockwise
    from dask.core import flatten

    marked = dict(graph.layers)
    own: dict[str, Any] = {}
    for name, layer in marked.items():
        if isinstance(layer, Blockwise) and name in by_layer:
            own[name] = layer.annotations
            new = copy.copy(layer)
            new.annotations = {**(layer.annotations or {}), POOL_ANNOTATION: by_layer[name]}
            marked[name] = new
    if len(own) < 2:
        return graph, {}
    fused = optimize_blockwise(HighLevelGraph(marked, graph.dependencies),
                               keys=list(flatten(outputs)))
    layers = dict(fused.layers)
    rank = {name: i for i, name in enumerate(order)}
    groups: dict[str, list[LayerKeys]] = {}
    for name, layer in layers.items():
        ann = getattr(layer, "annotations", None)
        if ann and POOL_ANNOTATION in ann:
            rest = {k: v for k, v in ann.items() if k != POOL_ANNOTATION}
            new = copy.copy(layer)
            new.__dict__.pop("_cached_dict", None)
            new.annotations = rest or None
            layers[name] = new
            members = _member_keys(new, set(own) - set(layers))
            if members:
                groups[name] = sorted(members, key=lambda k: rank.get(k.name, -1))
    return HighLevelGraph(layers, fused.dependencies), groups


def _member_keys(layer: Any, gone: set[str]) -> list[LayerKeys]:
    """Give the fused Blockwise ``layer`` a task whose members (of the layers in
    ``gone``) record under :class:`LayerKeys` that read each member's block index from
    the fused task's, and whose function says it is routed (``routed_chain``, which
    runs Dask's fused subgraph: Dask's log and dashboard name it, as
    :class:`SharedKeyFilter` does); returns the members, in the fused task's order.
    Dask names a member's task inside the fused one ``NAME_.i_.j`` (``NAME_`` for a
    0-d one), ``.i`` and ``.j`` being entries of the fused layer's output index
    (``layer.output_indices``). Each member gets a device call of its own: one layer
    read twice (``X`` and ``X.T`` in one task) records under each reading's key."""
    from dask._task_spec import Task, _execute_subgraph

    task = layer.task
    if not (isinstance(task, Task) and task.func is _execute_subgraph and task.args
            and isinstance(task.args[0], dict)):
        return []
    out = list(layer.output_indices)
    by_length = sorted(gone, key=len, reverse=True)
    members: list[LayerKeys] = []
    inner: dict[Any, Any] = {}
    for inner_key, node in task.args[0].items():
        call = getattr(node, "func", None)
        name = next((n for n in by_length if isinstance(inner_key, str)
                     and inner_key.startswith(n + "_")), None)
        if name is None or type(node) is not Task or not isinstance(call, DeviceCall):
            inner[inner_key] = node
            continue
        rest = inner_key[len(name) + 1:]
        entries = rest.split("_") if rest else []
        positions = (tuple(out.index(e) for e in entries)
                     if all(e in out for e in entries) else None)
        key = LayerKeys(name, positions)
        own = DeviceCall(call.func, key, call.plan_id, call.to_host, call.native)
        inner[inner_key] = Task(node.key, own, *node.args, **node.kwargs)
        if key not in members:
            members.append(key)
    layer.task = Task(task.key, routed_chain, inner, *task.args[1:], **task.kwargs)
    return members


def _fuse_unrestricted(routed: Routed, graph: HighLevelGraph) -> None:
    """A plan that restricts nothing (every pool runs every op equally fast) lets Dask
    place every task: ``routed`` then gets the graph materialized with its linear chains
    fused, as Dask's own optimization fuses them (one task to dispatch instead of
    several; unfused, a graph of small blocks ran about twice as long as plain Dask),
    each member still recording under its own key. No layer keeps a target of its own,
    so nothing needs the layer names; with ``site=`` every task is kept at the site."""
    from dask._task_spec import convert_legacy_graph
    from dask.core import flatten

    from .rewrite import block_groups, fuse_chain, graph_chains

    flat = convert_legacy_graph(dict(cull_graph(graph, routed.keys)))
    outputs = set(flatten(routed.keys))
    fused: dict[Any, list[Any]] = {}
    # what Dask's Blockwise fusion runs as one task (see rewrite.block_groups), then
    # the linear chains outside those
    # layer by layer, in the layers' order: (as good as) a topological order, and far
    # cheaper to find than one over every task (a task before one of its inputs would
    # only miss a group, never join a wrong one: see block_groups)
    rank = {name: i for i, name in enumerate(_layer_order(graph))}
    keys = sorted(flat, key=lambda k: rank.get(key_name(k), len(rank)))
    at = {k: i for i, k in enumerate(keys)}
    nodes = [flat[k] for k in keys]
    groups = [[keys[i] for i in g] for g in block_groups(
        keys, [[at[d] for d in node.dependencies if d in at] for node in nodes], outputs,
        [type(node) is Task and isinstance(node.func, DeviceCall) and not node.block_fusion
         for node in nodes],
        [[d for d in node.dependencies if d not in at] for node in nodes])]
    taken = {k for g in groups for k in g}
    for chain in groups + [c for c in graph_chains(flat, outputs) if taken.isdisjoint(c)]:
        last = fuse_chain(flat, chain, f"jupyter-mesh-{routed.plan_id}-{len(fused)}-fused")
        fused[last] = chain
    if routed.layers:  # site=: every task of every layer kept there (see site_only)
        anywhere = next(iter(routed.layers.values()))
        routed.restrictions = dict.fromkeys(flat, anywhere)
    routed.layers = {}
    routed.graph = flat
    routed.fused = fused


def cull_graph(dsk: HighLevelGraph, keys: Any) -> HighLevelGraph:
    """Dask's own culling, run where the graph is materialized (the scheduler)."""
    from dask.core import flatten

    return dsk.cull(set(flatten(keys)))


def submission(routed: Routed) -> Any:
    """What ``client.get`` receives for a graph rewritten per layer: the graph as a
    Dask expression whose only optimization is culling, which the scheduler runs when
    it materializes the graph (no fusion: layer names stay the keys' names)."""
    from dask._expr import HLGExpr

    return HLGExpr(dsk=routed.graph, low_level_optimizer=cull_graph,
                   output_keys=list(routed.keys))


__all__ = ["LayerModel", "LayerPlan", "count_tasks", "key_name", "layer_plan_threshold",
           "model_layers", "plan_layers", "rewrite_layers", "submission", "use_layer_plan"]
