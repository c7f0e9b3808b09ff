"""Classification: each layer of a Dask graph becomes an op class with a cost per task.

The router plans on the graph as the user built it (before Dask's fusion merges layers
and renames keys), so every layer still says what it computes. FLOPs and bytes per task
come from the layers' chunk shapes and dtypes; a layer that carries none inherits the
block size of its inputs.
"""

from __future__ import annotations

import math
import operator
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from dask._task_spec import Alias, DataNode, GraphNode, Task, convert_legacy_graph
from dask.core import flatten
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from dask.utils import key_split

from ..errors import MeshError

#: op classes, cheapest question first
OP_CLASSES: tuple[str, ...] = (
    "matmul", "linalg", "fft", "elementwise", "reduction", "creation", "movement", "other"
)
#: capabilities accepted by ``needs=``
CAPABILITIES: tuple[str, ...] = ("matmul", "linalg", "fft", "elementwise", "reduction")

#: Dask's tokens in layer names: 32 hex digits (dask.array), or a UUID (dask.delayed
#: of an impure call)
_TOKEN = re.compile(r"-(?:[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-"
                    r"[0-9a-f]{12})(?=$|-)")
_RULES: tuple[tuple[str, frozenset[str]], ...] = (
    ("matmul", frozenset({"matmul", "tensordot", "einsum", "dot", "outer", "vdot", "inner"})),
    ("linalg", frozenset({
        "qr", "qr2", "svd", "cholesky", "solve", "lstsq", "inv", "lu", "tsqr", "eig",
        "eigh", "compressed", "compression", "sfqr",
    })),
    ("reduction", frozenset({
        "aggregate", "partial", "combine", "sum", "nansum", "mean", "nanmean", "max", "min",
        "nanmax", "nanmin", "prod", "std", "var", "any", "all", "argmin", "argmax", "cumsum",
        "cumprod", "norm", "count", "moment", "agg", "chunk",
    })),
    ("creation", frozenset({
        "random", "normal", "uniform", "randint", "integers", "ones", "zeros", "full",
        "empty", "arange", "linspace", "eye", "tri", "standard", "random_sample",
    })),
    ("movement", frozenset({
        "rechunk", "getitem", "concatenate", "stack", "vstack", "hstack", "transpose",
        "reshape", "store", "array", "original", "squeeze", "expand", "broadcast", "swapaxes",
        "moveaxis", "finalize", "split", "merge", "slice", "blocks", "pad", "flip", "roll",
        "tile", "from", "asarray",
    })),
)
_SPLIT = re.compile(r"[-_.\s]+")
#: layers of dask.array's own whose names no token rule reads, whole names only (a
#: user's function merely named like them, e.g. reduce_rows, stays unclassified):
#: argmax/argmin's per-chunk step, topk's, and std's square root (through a wrapper)
_DASK_LABELS = {"arg-reduce": "reduction", "topk": "reduction", "argtopk": "reduction",
                "_sqrt": "elementwise"}


def layer_label(name: str) -> str:
    """A layer name without its token: ``matmul-3fa1...`` → ``matmul``."""
    label = _TOKEN.sub("", str(name))
    return label or str(name)


def classify_label(label: str, func: Any = None) -> str:
    """The op class of a layer from its label and (optionally) a sample task function."""
    low = label.lower()
    if "fft" in low:
        return "fft"
    if low in _DASK_LABELS:
        return _DASK_LABELS[low]
    tokens = {t for t in _SPLIT.split(low) if t}
    for cls, words in _RULES:
        if tokens & words:
            return cls
    f = _unwrap(func)
    if isinstance(f, np.ufunc) or getattr(f, "__module__", None) in ("_operator", "operator"):
        return "elementwise"
    if f is not None and getattr(f, "__name__", "") in _ELEMENTWISE_NAMES:
        return "elementwise"
    return "other"


_ELEMENTWISE_NAMES = {
    "add", "subtract", "multiply", "divide", "true_divide", "power", "sin", "cos", "exp",
    "log", "sqrt", "abs", "absolute", "negative", "where", "clip", "astype", "maximum",
    "minimum", "tanh", "square", "_astype",
}


def _unwrap(func: Any) -> Any:
    seen = 0
    while seen < 8 and func is not None:
        seen += 1
        if hasattr(func, "func") and hasattr(func, "keywords"):  # functools.partial
            func = func.func
        elif type(func).__name__ == "Compose" and hasattr(func, "first"):
            func = func.first
        else:
            break
    return func


@dataclass
class OpInfo:
    """One operation (graph layer) of a computation, as the cost model sees it."""

    name: str
    label: str
    op_class: str
    tasks: int = 0
    flops: float = 0.0          # per task
    mem_bytes: float = 0.0      # bytes streamed through device memory, per task
    out_bytes: float = 0.0      # bytes of one output block
    in_bytes: float = 0.0       # bytes of all inputs of one task (average)
    itemsize: int = 8
    block: tuple[float, ...] = ()
    func: Any = None
    #: backends that run this op natively (others would run it on host NumPy)
    native: frozenset[str] = frozenset({"numpy"})
    #: NumPy's kind of the dtype of the op's result ("f", "c", "i", "b"...), if known
    dtype_kind: str | None = None
    #: the name of that dtype ("float16", "int32"...), if known
    dtype_name: str | None = None
    #: why JAX does not run it, though its op table has the function ("integer
    #: data", "float16 data"...): what its tasks would run on a JAX worker is NumPy
    jax_off: str | None = None
    #: its data comes from arrays (its dtype is known, or that of an op before it:
    #: Dask's tsqr builds layers with no dtype of their own); False for a DataFrame's
    #: ops and a delayed call on Python values
    array_data: bool = False
    #: functions a task of the op passes to ``func`` as arguments (``map_blocks`` with
    #: ``enforce_ndim`` passes the user's to Dask's ``apply_and_enforce``)
    passes: tuple[Any, ...] = ()
    #: where the op's tasks shrink their input's block (a ``keepdims`` reduction's
    #: per-chunk step), the block its input has: what an input-less layer before it
    #: whose size is unknown takes (empty where the op keeps the block)
    in_block: tuple[float, ...] = ()
    #: bytes of the op's largest output block and of the largest inputs one task reads
    #: (chunks may differ in size: ``in_bytes`` and ``out_bytes`` are means); 0: as
    #: the means. What a device must hold at once (see ``placement.task_memory``)
    peak_out_bytes: float = 0.0
    peak_in_bytes: float = 0.0
    #: every task of the op is data the graph carries (``da.from_array``'s blocks, a
    #: ``delayed`` constant): no function runs, the worker that holds it hands it on
    data: bool = False
    #: every task of the op is an alias of another's result (a slice that is whole
    #: blocks): no function runs, Dask hands the blocks on
    aliases: bool = False
    #: every task of the op is a result persisted earlier (the graph holds its future)
    persisted: bool = False
    #: its tasks take one item of a tuple by its position (``getitem(qr_result, 0)``,
    #: how Dask's linear algebra takes Q of NumPy's ``(Q, R)``)
    picks_item: bool = False

    def to_row(self) -> dict[str, Any]:
        return {"op": self.label, "class": self.op_class, "tasks": self.tasks}


@dataclass
class GraphModel:
    """A computation as the planner sees it: tasks in topological order, with layers.

    ``keys[i]``, ``layer[i]`` (index into ``ops``), ``deps[i]`` (task indices) and
    ``out_bytes[i]`` describe task ``i``; ``tasks`` holds the Dask task objects for the
    rewrite (absent for synthetic models).
    """

    ops: list[OpInfo]
    keys: list[Any]
    layer: list[int]
    deps: list[list[int]]
    outputs: list[Any] = field(default_factory=list)
    tasks: dict[Any, GraphNode] | None = None
    pins: dict[int, str] = field(default_factory=dict)  # task index -> site

    def __len__(self) -> int:
        return len(self.keys)

    def consumers(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.keys]
        for i, ds in enumerate(self.deps):
            for d in ds:
                out[d].append(i)
        return out


def sample_node(nodes: Any) -> Any:
    """The first of a layer's tasks that calls a function (a cumulative sum's merge
    layer has aliases among its tasks: one of those, sampled, made the layer seem to
    call nothing, and JAX was planned for it), else the first; None for none."""
    first = None
    for node in nodes:
        if _sample_func(node) is not None:
            return node
        if first is None:
            first = node
    return first


def _sample_func(node: Any) -> Any:
    """A task's function; for Dask's ``_enforce_dtype`` (an elementwise op with a 0-d
    array operand, ``x - x.mean()``, which Dask wraps to convert the result's dtype) the
    op it wraps, which is what runs (and what a backend's op table knows)."""
    if isinstance(node, Task):
        inner = _enforced(node.func, node.kwargs)
        return node.func if inner is None else inner
    if isinstance(node, tuple) and node and callable(node[0]):
        return node[0]
    return None


def _enforced(func: Any, kwargs: Any) -> Any:
    """The op inside Dask's ``_enforce_dtype`` call, or None for any other function."""
    if getattr(func, "__name__", None) != "_enforce_dtype" or \
            getattr(func, "__module__", None) != "dask.array.core":
        return None
    inner = (kwargs or {}).get("enforce_dtype_function")
    inner = getattr(inner, "value", inner) if isinstance(inner, DataNode) else inner
    return inner if callable(inner) else None


def picks_item(node: Any) -> bool:
    """Whether a task takes an item of what it reads by a whole-number position
    (``getitem(x, 0)``), not a slice of an array (Dask's slicing passes a tuple)."""
    if isinstance(node, Task):
        args: Any = node.args
        func = node.func
    elif isinstance(node, tuple) and node and callable(node[0]):
        func, args = node[0], node[1:]
    else:
        return False
    if func is not operator.getitem or len(args) != 2:
        return False
    index = args[1].value if isinstance(args[1], DataNode) else args[1]
    return type(index) is int


def passed_callables(node: Any) -> tuple[Any, ...]:
    """The functions among a task's arguments (not the tasks and keys it reads)."""

    if isinstance(node, Task):
        values: list[Any] = [*node.args, *node.kwargs.values()]
    elif isinstance(node, tuple) and node and callable(node[0]):
        values = list(node[1:])
    else:
        return ()
    out = []
    for v in values:
        if isinstance(v, DataNode):
            v = v.value
        if callable(v) and not isinstance(v, (type, GraphNode)):
            out.append(v)
    return tuple(out)


def _layer_meta(layer: Any, sample: Any = None
                ) -> tuple[tuple[float, ...], int, tuple[float, ...]] | None:
    """A layer's mean block shape and itemsize, from its collection annotations;
    ``sample`` (one of its tasks) corrects the axes a ``keepdims`` reduction shrinks,
    and the block the annotations give comes third (see ``OpInfo.in_block``)."""
    ann = getattr(layer, "collection_annotations", None) or {}
    chunks = ann.get("chunks")
    dtype = ann.get("dtype")
    if not chunks:
        return None
    try:
        block = tuple(sum(c) / max(len(c), 1) for c in chunks)
        size = np.dtype(dtype).itemsize if dtype is not None else 8
    except Exception:
        return None
    if any(isinstance(b, float) and math.isnan(b) for b in block):
        return None
    kept = _kept_dims(block, sample)
    return kept, int(size), block if kept != block else ()


def _largest_block_bytes(layer: Any, sample: Any = None) -> float:
    """Bytes of a layer's largest block, from its collection annotations (0 where they
    do not say)."""
    ann = getattr(layer, "collection_annotations", None) or {}
    chunks = ann.get("chunks")
    if not chunks:
        return 0.0
    try:
        largest = tuple(float(max(c)) if len(c) else 0.0 for c in chunks)
        dtype = ann.get("dtype")
        size = np.dtype(dtype).itemsize if dtype is not None else 8
    except Exception:
        return 0.0
    if any(math.isnan(b) for b in largest):
        return 0.0
    return float(math.prod(_kept_dims(largest, sample))) * size


def peak_out(op: OpInfo) -> float:
    """Bytes of ``op``'s largest output block."""
    return max(op.peak_out_bytes, op.out_bytes)


def _kept_dims(block: tuple[float, ...], sample: Any) -> tuple[float, ...]:
    """``block`` with the axes that ``sample`` reduces with ``keepdims=True`` at 1.

    Dask's reductions build their per-chunk step (``x.sum(axis=0)``'s first layer) with
    the input's chunks and set the reduced ones to 1 afterwards, so the layer's
    annotations keep the input's: a 2500 x 2500 block where the task returns 1 x 2500."""
    kwargs = getattr(sample, "kwargs", None)
    if not isinstance(kwargs, dict) or kwargs.get("keepdims") is not True:
        return block
    axis = kwargs.get("axis")
    if isinstance(axis, DataNode):
        axis = axis.value
    if axis is None:
        return tuple(1.0 for _ in block)
    axes = axis if isinstance(axis, tuple | list) else (axis,)
    try:
        shrunk = {int(a) % len(block) for a in axes} if block else set()
    except (TypeError, ValueError):
        return block
    return tuple(1.0 if k in shrunk else b for k, b in enumerate(block))


def _collection_graph(collections: Iterable[Any]) -> tuple[HighLevelGraph, list[Any]]:
    import dask

    colls = list(collections)
    if not colls:
        raise MeshError("nothing to route: pass one or more Dask collections")
    graphs = []
    flat: dict[Any, Any] = {}
    keys: list[Any] = []
    for c in colls:
        if not dask.is_dask_collection(c):
            if isinstance(c, list | tuple) and any(dask.is_dask_collection(v) for v in c):
                raise MeshError(
                    f"the router takes Dask collections as separate arguments, not in a "
                    f"{type(c).__name__}: unpack it, e.g. mesh.compute(*arrays)")
            raise MeshError(
                f"the router needs Dask collections (dask.array, dask.delayed, ...), not "
                f"{type(c).__name__}: compute plain values directly"
            )
        g = c.__dask_graph__()
        if isinstance(g, HighLevelGraph):
            graphs.append(g)
        else:  # (a DataFrame's lowered expression): made layers below, all together
            flat.update(g)
        keys.extend(flatten(c.__dask_keys__()))
    if flat:
        # its ops as layers, as Dask names them (grouped one collection at a time, two
        # delayed values' tasks of one function made two layers of one name, and
        # merging kept one)
        graphs.append(_group_dict(flat))
    hlg = HighLevelGraph.merge(*graphs) if len(graphs) > 1 else graphs[0]
    return hlg, keys


def model_collections(collections: Iterable[Any]) -> GraphModel:
    """Build the :class:`GraphModel` of Dask collections (culled, unfused)."""
    hlg, keys = _collection_graph(collections)
    return model_graph(hlg, keys)


def model_graph(graph: HighLevelGraph | dict, keys: list[Any]) -> GraphModel:
    """Build the :class:`GraphModel` of a graph for the output ``keys``."""
    with no_gc():
        return _model_graph(graph, keys)


class no_gc:
    """Pause the cyclic garbage collector while building many small objects that are
    all kept (task objects, index lists): its passes over them would find nothing."""

    def __enter__(self) -> None:
        import gc

        self.was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: Any) -> None:
        import gc

        if self.was:
            gc.enable()


def _model_graph(graph: HighLevelGraph | dict, keys: list[Any]) -> GraphModel:
    if not isinstance(graph, HighLevelGraph):
        graph = _group_dict(graph)
    keyset = set(keys)
    built = graph
    try:
        graph = graph.cull(keyset)
    except Exception:
        pass
    order = _layer_order(graph)
    raw: dict[Any, Any] = {}
    layer_of_key: dict[Any, int] = {}
    ops: list[OpInfo] = []
    metas: list[tuple[tuple[float, ...], int, tuple[float, ...]] | None] = []
    for name in order:
        layer = graph.layers[name]
        items = _in_key_order(dict(layer))
        if not items:
            continue
        idx = len(ops)
        sample = sample_node(items.values())
        func = _sample_func(sample)
        label = layer_label(name)
        # culling rebuilds a materialized layer without its annotations, under the
        # old name and a token: its dtype, chunks and metas are read from the layer
        # before it (an integer sum's dtype was lost, and JAX planned for it)
        before = built.layers.get(name) or built.layers.get(name.rsplit("-", 1)[0])
        ops.append(OpInfo(name=name, label=label, op_class=classify_label(label, func),
                          func=func,
                          dtype_kind=layer_dtype_kind(layer if before is None else before),
                          dtype_name=layer_dtype_name(layer if before is None else before),
                          passes=passed_callables(sample), picks_item=picks_item(sample)))
        metas.append(_layer_meta(layer if before is None else before, sample))
        ops[-1].peak_out_bytes = _largest_block_bytes(layer if before is None else before,
                                                      sample)
        for k in items:
            layer_of_key[k] = idx
        raw.update(items)
    missing = [k for k in keyset if k not in raw]
    if missing:
        raise MeshError(f"the graph has no task for key {missing[0]!r}")
    if all(type(v) is Task for v in raw.values()):
        tasks = raw  # already task objects (e.g. blockwise layers): nothing to convert
    else:
        tasks = convert_legacy_graph(raw)
    tasks = _needed_only(tasks, keyset)
    if len(tasks) < len(layer_of_key):
        # drop the ops left without tasks, and number the others again
        kept = sorted({layer_of_key[k] for k in tasks})
        renumber = {old: new for new, old in enumerate(kept)}
        ops = [ops[i] for i in kept]
        metas = [metas[i] for i in kept]
        layer_of_key = {k: renumber[layer_of_key[k]] for k in tasks}
    computed = {layer_of_key[k] for k, v in tasks.items() if not isinstance(v, DataNode)}
    called = {layer_of_key[k] for k, v in tasks.items()
              if not isinstance(v, (DataNode, Alias))}
    for idx, op in enumerate(ops):
        op.data = idx not in computed
        op.aliases = idx in computed and idx not in called
    fast = _build_model_by_layer(tasks, layer_of_key, ops, metas, keys)
    if fast is not None:
        return fast
    return _build_model(tasks, layer_of_key, ops, metas, keys)


def _build_model_by_layer(tasks: dict[Any, GraphNode], layer_of_key: dict[Any, int],
                          ops: list[OpInfo], metas: list[Any], outputs: list[Any],
                          ) -> GraphModel | None:
    """The common case in one pass: layers come in topological order and no task reads
    another task of its own or a later layer, so layer order is a topological order.
    None when that does not hold (the general path sorts the tasks)."""
    keys = list(tasks)
    index: dict[Any, int] = {}
    layer: list[int] = []
    last = -1
    for i, k in enumerate(keys):
        li = layer_of_key.get(k, 0)
        if li < last:
            return None
        last = li
        index[k] = i
        layer.append(li)
    deps: list[list[int]] = []
    append = deps.append
    for i, k in enumerate(keys):
        ds = tasks[k].dependencies
        if not ds:
            append([])
            continue
        # sorted: a task's dependencies are a set, in an order that changes with the
        # hash seed (the planner breaks ties among inputs in their order)
        row = sorted(index[d] for d in ds if d in index)
        li = layer[i]
        for d in row:
            if layer[d] >= li:
                return None
        append(row)
    read = _fill_costs(ops, metas, layer, deps)
    for op in ops:
        op.tasks = 0
    for li in layer:
        ops[li].tasks += 1
    for li, op in enumerate(ops):
        op.native = op_native(op, [ops[p] for p in read[li] if p != li])
    return GraphModel(ops=ops, keys=keys, layer=layer, deps=deps, outputs=list(outputs),
                      tasks=tasks)


def _needed_only(tasks: dict[Any, Any], keys: set[Any]) -> dict[Any, Any]:
    """The tasks that ``keys`` need. Dask's culling of a HighLevelGraph keeps a whole
    layer where it is asked for as many keys as the layer has tasks, whichever keys
    (an svd's singular values kept the layer of its Q); the scheduler culls by key,
    and the plan counted tasks that never ran."""
    seen = set(keys)
    work = list(keys)
    while work:
        node = tasks.get(work.pop())
        if node is None:
            continue
        for d in node.dependencies:
            if d not in seen:
                seen.add(d)
                work.append(d)
    if len(seen) >= len(tasks):
        return tasks
    return {k: v for k, v in tasks.items() if k in seen}


def _group_dict(dsk: Any) -> HighLevelGraph:
    """A flat graph (what Dask's expressions lower to: a DataFrame's, or a computation
    as Dask hands it to a scheduler) as layers, with the dependencies between them
    that culling needs: without them, culling walked the layers in any order and
    dropped tasks still needed, whose keys later tasks then took as literal values
    (a DataFrame's mean divided a tuple of key names). Block keys group by their name
    (one op each), others by the name Dask gives their function (``inc-<token>`` ->
    ``inc``: one op for a delayed function's calls); layers that would need each other
    are merged into one (a MaterializedLayer culls within itself)."""
    tasks = convert_legacy_graph(dict(dsk))
    name_of: dict[Any, str] = {}
    for k in tasks:
        name_of[k] = k[0] if type(k) is tuple and k and isinstance(k[0], str) else key_split(k)
    needs: dict[str, set[str]] = {n: set() for n in name_of.values()}
    for k, node in tasks.items():
        mine = name_of[k]
        for d in node.dependencies:
            other = name_of.get(d)
            if other is not None and other != mine:
                needs[mine].add(other)
    merged = _cycles_merged(needs)
    groups: dict[str, dict[Any, Any]] = {}
    for k, node in tasks.items():
        groups.setdefault(merged[name_of[k]], {})[k] = node
    deps: dict[str, set[str]] = {n: set() for n in groups}
    for n, ds in needs.items():
        deps[merged[n]].update(merged[d] for d in ds if merged[d] != merged[n])
    return HighLevelGraph({n: MaterializedLayer(g) for n, g in groups.items()}, deps)


def _cycles_merged(needs: dict[str, set[str]]) -> dict[str, str]:
    """Each name -> the name of its group, where names that need each other (directly
    or not: a strongly connected component) form one group (Tarjan's algorithm,
    without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: dict[str, str] = {}
    for root in needs:
        if root in index:
            continue
        work = [(root, iter(sorted(needs[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(needs.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                members = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    members.append(w)
                    if w == v:
                        break
                head = min(members)
                for w in members:
                    out[w] = head
    return out


def _in_key_order(items: dict[Any, Any]) -> dict[Any, Any]:
    """A layer's tasks sorted by key where the keys compare (``(name, i, j)``): culling
    builds a layer from a set of keys, in an order that changes with the hash seed."""
    try:
        return {k: items[k] for k in sorted(items)}
    except TypeError:
        return items


def _layer_order(graph: HighLevelGraph) -> list[str]:
    try:
        return list(graph._toposort_layers())
    except Exception:
        return list(graph.layers)


def _build_model(tasks: dict[Any, GraphNode], layer_of_key: dict[Any, int], ops: list[OpInfo],
                 metas: list[Any], outputs: list[Any]) -> GraphModel:
    # Kahn's algorithm, seeded in layer order, so tasks come out in topological order
    keys_in = sorted(tasks, key=lambda k: layer_of_key.get(k, 0))
    indeg: dict[Any, int] = {}
    children: dict[Any, list[Any]] = {}
    for k in keys_in:
        ds = [d for d in tasks[k].dependencies if d in tasks]
        indeg[k] = len(ds)
        for d in ds:
            children.setdefault(d, []).append(k)
    ready = deque(k for k in keys_in if indeg[k] == 0)
    keys: list[Any] = []
    while ready:
        k = ready.popleft()
        keys.append(k)
        for c in children.get(k, ()):
            indeg[c] -= 1
            if indeg[c] == 0:
                ready.append(c)
    if len(keys) != len(tasks):
        raise MeshError("the graph has a cycle: it cannot be routed")
    index = {k: i for i, k in enumerate(keys)}
    layer = [layer_of_key.get(k, 0) for k in keys]
    deps = [sorted(index[d] for d in tasks[k].dependencies if d in index) for k in keys]
    read = _fill_costs(ops, metas, layer, deps)
    for k in keys:
        ops[layer_of_key.get(k, 0)].tasks += 1
    for li, op in enumerate(ops):
        op.native = op_native(op, [ops[p] for p in read[li] if p != li])
    return GraphModel(ops=ops, keys=keys, layer=layer, deps=deps, outputs=list(outputs),
                      tasks=tasks)


_JAX_CLASSES = frozenset({"matmul", "fft", "elementwise", "reduction", "movement"})


#: the dtypes JAX computes as NumPy does (``jax_ops._SAME_DTYPES``)
_JAX_DTYPES = frozenset({"float32", "float64", "complex64", "complex128"})
_KIND_WORDS = {"i": "integer", "u": "unsigned integer", "b": "boolean", "M": "datetime",
               "m": "timedelta", "O": "object", "U": "text", "S": "bytes", "V": "record"}


def op_native(op: OpInfo, inputs: list[OpInfo] | tuple[OpInfo, ...] = ()) -> frozenset[str]:
    """:func:`native_backends` of ``op``, without JAX where its result or an input it
    reads (``inputs``: the ops it reads) is of a dtype JAX does not compute as NumPy
    does (integer, boolean, float16, longdouble...), and for ordering functions (max,
    argmin...) of complex data: such a task would run NumPy on a JAX worker anyway (see
    ``jax_ops.same_numbers``); ``op.jax_off`` says why."""
    native = native_backends(op.op_class, op.func, op.passes)
    op.jax_off = None
    op.array_data = op.dtype_kind is not None or any(
        getattr(i, "array_data", False) for i in inputs)
    if "jax" in native:
        op.jax_off = _jax_off(op, inputs)
        if op.jax_off is not None:
            native = native - {"jax"}
    return native


def _jax_off(op: OpInfo, inputs: Any) -> str | None:
    from . import jax_ops

    if not op.array_data:
        # what comes from no known array (a DataFrame's columns, a delayed value's
        # Python objects or lists): NumPy and pandas run it, on the host
        return "data of no known array type (a DataFrame's, a delayed value's)"
    if op.picks_item and any(i.op_class == "linalg" for i in inputs):
        # Q of NumPy's (Q, R): the tuple is no array JAX takes, and the item is NumPy's
        return "an item of a linalg op's results"
    complex_data = False
    for o in (op, *inputs):
        kind, name = o.dtype_kind, o.dtype_name
        if kind is None:
            continue
        if kind not in "fc":
            return f"{_KIND_WORDS.get(kind, kind)} data"
        if name is not None and name not in _JAX_DTYPES:
            return f"{name} data"
        complex_data = complex_data or kind == "c"
    if complex_data and op.func is not None and jax_ops.complex_differs(op.func):
        # JAX orders complex NaNs its own way, takes the other side of a branch cut
        # (sqrt(-4-0j)), computes sinh of small numbers less exactly...
        return "complex data"
    return None


def _layer_dtype(layer: Any) -> np.dtype[Any] | None:
    """A layer's result dtype, from its collection annotations (None: not known)."""
    ann = getattr(layer, "collection_annotations", None) or {}
    try:
        dtype = ann.get("dtype")
        return None if dtype is None else np.dtype(dtype)
    except Exception:
        return None


def layer_dtype_name(layer: Any) -> str | None:
    """The name of a layer's result dtype ("float32"), if known."""
    dtype = _layer_dtype(layer)
    return None if dtype is None else dtype.name


def layer_dtype_kind(layer: Any) -> str | None:
    """NumPy's kind of a layer's result dtype ("f", "i"...), if known."""
    dtype = _layer_dtype(layer)
    return None if dtype is None else dtype.kind


def native_backends(op_class: str, func: Any = None, passes: tuple[Any, ...] = ()
                    ) -> frozenset[str]:
    """The backends that run an op natively: NumPy always; CuPy (and a backend from the
    entry-point group) for the op classes it declares, where the function is one it
    runs (NumPy's and Dask's own; a user's own chunk function may call SciPy or
    np.asarray, which fail on device arrays, so it gets host arrays); JAX only for
    functions in its op table (when ``func`` is None, by op class alone)."""
    from . import jax_ops
    from .backends import get_backend, plugin_backends

    out = {"numpy"}
    for b in (get_backend("cupy"), *plugin_backends()):
        if op_class in b.op_classes and (func is None or b.runs(func)) and all(
                b.runs(f) for f in passes):
            out.add(b.name)
    if op_class in _JAX_CLASSES and (func is None or jax_ops.supported(func)):
        if func is not None or op_class != "movement":
            out.add("jax")
    return frozenset(out)


def _fill_costs(ops: list[OpInfo], metas: list[Any], layer: list[int],
                deps: list[list[int]]) -> list[set[int]]:
    """Per-layer block sizes, then FLOPs and bytes per task from them; the layers each
    layer reads."""
    n = len(ops)
    dep_layers: list[set[int]] = [set() for _ in range(n)]
    in_sum = [0.0] * n
    counts = [0] * n
    for i, ds in enumerate(deps):
        li = layer[i]
        counts[li] += 1
        for d in ds:
            dep_layers[li].add(layer[d])
    # block sizes in layer (topological) order; layers without metadata inherit from
    # their inputs, and input-less ones (e.g. random creation) from their consumers
    known = [False] * n
    for li, op in enumerate(ops):
        meta = metas[li]
        if meta is None:
            parents = [p for p in dep_layers[li] if p != li and known[p]]
            if parents:
                src = ops[max(parents, key=lambda p: ops[p].out_bytes)]
                op.block, op.itemsize = src.block, src.itemsize
                op.out_bytes, op.peak_out_bytes = src.out_bytes, src.peak_out_bytes
                known[li] = True
            else:
                op.block, op.itemsize, op.out_bytes = (), 8, 8.0
        else:
            op.block, op.itemsize, op.in_block = meta
            op.out_bytes = float(math.prod(op.block)) * op.itemsize if op.block else 8.0
            known[li] = True
    children: list[set[int]] = [set() for _ in range(n)]
    for li in range(n):
        for p in dep_layers[li]:
            if p != li:
                children[p].add(li)
    inherit_sizes(ops, known, children)
    in_peak = [0.0] * n
    outs = [op.out_bytes for op in ops]
    peaks = [peak_out(op) for op in ops]
    for i, ds in enumerate(deps):
        li = layer[i]
        peak = 0.0
        for d in ds:
            ld = layer[d]
            in_sum[li] += outs[ld]
            peak += peaks[ld]  # each input at its layer's largest block: a bound
        if peak > in_peak[li]:
            in_peak[li] = peak
    for li, op in enumerate(ops):
        op.peak_in_bytes = in_peak[li]
        op.in_bytes = in_sum[li] / counts[li] if counts[li] else 0.0
        op.flops, op.mem_bytes = task_cost(op, [ops[p] for p in dep_layers[li] if p != li])
    return dep_layers


def task_cost(op: OpInfo, parents: list[OpInfo]) -> tuple[float, float]:
    """(FLOPs, bytes through memory) of one task of ``op``."""
    size = max(op.itemsize, 1)
    o = op.out_bytes / size
    # the inputs' elements, by their own item size (a comparison of float64 blocks
    # returns bools: by the output's, it counted 8 elements per input element)
    in_size = (sum(max(p.itemsize, 1) for p in parents) / len(parents)) if parents else size
    i = op.in_bytes / in_size
    cls = op.op_class
    mem = op.in_bytes + op.out_bytes
    if cls == "matmul":
        k = (i / 2.0) / math.sqrt(o) if o > 0 else 0.0
        return 2.0 * o * k, mem
    if cls == "linalg":
        block = parents[0].block if parents and parents[0].block else op.block
        dims = sorted(block, reverse=True)[:2] if block else [math.sqrt(max(i, 1))] * 2
        m = dims[0]
        nn = dims[1] if len(dims) > 1 else dims[0]
        return 4.0 * m * nn * nn, mem
    if cls == "fft":
        length = max(op.block) if op.block else max(o, 2)
        return 5.0 * o * math.log2(max(length, 2)), mem
    if cls == "elementwise":  # one operation per element it writes
        return o, mem
    if cls == "reduction":
        return max(i, o), mem
    if cls == "creation":
        return 10.0 * o, op.out_bytes
    return 0.0, mem


def synthetic_model(layers: list[dict[str, Any]]) -> GraphModel:
    """A model built from layer descriptions, for tests and the simulator.

    Each layer: ``name``, ``op_class``, ``tasks``, ``flops``, ``out_bytes`` and
    ``deps``: a list of (layer index, "map"|"all"|"pairs") edges: ``map`` links task j to
    task j of the parent (modulo its size), ``all`` links every task to every parent
    task, and an int k links task j to k consecutive parent tasks (a tree reduction).
    """
    ops: list[OpInfo] = []
    keys: list[Any] = []
    layer: list[int] = []
    deps: list[list[int]] = []
    starts: list[int] = []
    for li, spec in enumerate(layers):
        op = OpInfo(
            name=spec["name"], label=spec.get("label", spec["name"]),
            op_class=spec["op_class"], flops=float(spec.get("flops", 0.0)),
            out_bytes=float(spec.get("out_bytes", 8.0)), itemsize=int(spec.get("itemsize", 8)),
            native=frozenset(spec["native"]) if "native" in spec
            else native_backends(spec["op_class"]),
            # (arrays of the sizes given: float, unless said otherwise)
            dtype_kind=spec.get("dtype_kind", "f"),
        )
        starts.append(len(keys))
        for j in range(int(spec["tasks"])):
            ds: list[int] = []
            for parent, how in spec.get("deps", []):
                p0, pn = starts[parent], ops[parent].tasks
                if how == "map":
                    ds.append(p0 + j % pn)
                elif how == "all":
                    ds.extend(range(p0, p0 + pn))
                else:
                    k = int(how)
                    ds.extend(p0 + (j * k + t) % pn for t in range(k))
            keys.append((op.name, j))
            layer.append(li)
            deps.append(ds)
        op.tasks = int(spec["tasks"])
        in_b = sum(ops[p].out_bytes * (ops[p].tasks if h == "all" else (1 if h == "map" else int(h)))
                   for p, h in spec.get("deps", []))
        op.in_bytes = float(spec.get("in_bytes", in_b))
        op.mem_bytes = float(spec.get("mem_bytes", op.in_bytes + op.out_bytes))
        ops.append(op)
    return GraphModel(ops=ops, keys=keys, layer=layer, deps=deps, outputs=[keys[-1]])


__all__ = [
    "CAPABILITIES", "OP_CLASSES", "GraphModel", "OpInfo", "classify_label", "layer_label",
    "model_collections", "model_graph", "synthetic_model", "task_cost",
]


def inherit_sizes(ops: list[OpInfo], known: list[bool], children: Any) -> None:
    """A layer whose chunk sizes are unknown takes those of its largest known consumer
    (layers in topological order; ``children[i]`` are the layers reading layer ``i``)."""
    for li in range(len(ops) - 1, -1, -1):
        if not known[li]:
            kids = [c for c in children[li] if known[c]]
            if kids:
                src = ops[max(kids, key=lambda c: _in_block_bytes(ops[c]))]
                ops[li].block, ops[li].itemsize = src.in_block or src.block, src.itemsize
                ops[li].out_bytes = _in_block_bytes(src)
                known[li] = True


def _in_block_bytes(op: OpInfo) -> float:
    """Bytes of the block ``op`` reads from an input that has its shape."""
    if op.in_block:
        return float(math.prod(op.in_block)) * op.itemsize
    return op.out_bytes
