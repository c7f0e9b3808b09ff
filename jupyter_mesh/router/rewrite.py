"""Apply a plan: device wrappers on the tasks and per-key restrictions for the scheduler.

Dask's fusion would flatten layers and merge annotations (a GPU op fused with a TPU op
would need both), so a routed graph is submitted unfused, and the restrictions travel
by key to the mesh's scheduler plugin, which sets them in ``update_graph`` before the
scheduler looks at the tasks.
"""

from __future__ import annotations

import copy
import heapq
import operator
import pickle
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dask._task_spec import NestedContainer, Task, TaskRef

from .._config import get_seconds
from ..errors import MeshError
from ._device import BATCH_PREFIX, DeviceCall, Unwrapping, routed_batch, routed_chain
from .classify import peak_out
from .placement import chain_links, dask_fuses
from .plan import Plan

if TYPE_CHECKING:
    from .classify import GraphModel


@dataclass
class Routed:
    """A plan applied: the graph to submit and what the scheduler plugin needs."""

    plan_id: str
    #: the tasks by key; a HighLevelGraph for a plan made per layer
    graph: Mapping[Any, Any]
    keys: list[Any]
    #: key -> pool index
    restrictions: dict[Any, int]
    #: per pool: (resource name, the site it is kept to or None, label)
    pools: list[tuple[str | None, str | None, str]] = field(default_factory=list)
    fallback: bool = True
    timeout: float = 5.0
    site: str | None = None
    #: key -> site its data is pinned to (a fallback never moves it elsewhere)
    pins: dict[Any, str] = field(default_factory=dict)
    #: key -> planned start (s): the order in which workers run their ready tasks
    priorities: dict[Any, float] = field(default_factory=dict)
    #: layer name -> pool index, for every key of that layer (plans made per layer)
    layers: dict[str, int] = field(default_factory=dict)
    #: pool index -> the workers of it the plan uses, where it leaves some idle on
    #: purpose (e.g. one worker keeps a chain whose data costs more to move than to
    #: compute); the scheduler widens to the whole pool when they are all gone
    narrow: dict[int, list[str]] = field(default_factory=dict)
    #: submitted key -> the keys of the linear chain fused into it, in order
    fused: dict[Any, list[Any]] = field(default_factory=dict)
    #: (a per-layer plan) fused Blockwise layer -> its members before it, in order,
    #: each as the ``LayerKeys`` its device calls record under
    fused_layers: dict[str, list[Any]] = field(default_factory=dict)
    #: key -> the one worker it may run on while that worker is there (tasks the plan
    #: keeps together, see ``placement.kept_together``); its pool's otherwise
    workers: dict[Any, str] = field(default_factory=dict)

    def payload(self) -> bytes:
        """What the scheduler plugin's ``jupyter_mesh_route`` handler receives."""
        return pickle.dumps({
            "plan_id": self.plan_id, "restrictions": self.restrictions,
            "pools": self.pools, "fallback": self.fallback, "timeout": self.timeout,
            "site": self.site, "pins": self.pins, "priorities": self.priorities,
            "layers": self.layers, "narrow": self.narrow, "workers": self.workers,
        }, protocol=pickle.HIGHEST_PROTOCOL)


def rewrite(plan: Plan[GraphModel], *, fallback: bool = True, wrap: bool = True,
            fuse: bool | None = None, host_results: bool = False,
            batch: bool = True) -> Routed:
    """Wrap every task of ``plan`` and collect its per-key restrictions.

    ``host_results``: every submitted task hands over a host array (inside a fused
    chain results still stay on the device). For persists: Dask keeps the tasks behind
    persisted data for as long as the data lives, and a later plain graph that shares
    their keys gets those tasks in place of its own (dask/dask#9888), so their results
    must be what a plain task expects.

    ``fuse``: merge each linear chain of tasks that the plan runs one after the other on
    one worker into one task, as Dask's own array optimization fuses linear chains (one
    task to dispatch instead of several; the chain never spans two targets). None: as
    Dask's ``optimization.fuse.active`` says (on unless it is False).

    ``batch`` (with ``fuse``): run the tasks that the plan puts one after another on one
    worker as one task where that delays nothing the plan counts on (see
    :func:`worker_batches`).
    """
    from .classify import no_gc

    if fuse is None:
        fuse = dask_fuses()
    with no_gc():
        return _rewrite(plan, fallback=fallback, wrap=wrap, fuse=fuse,
                        host_results=host_results, batch=batch)


def _rewrite(plan: Plan[GraphModel], *, fallback: bool, wrap: bool,
             fuse: bool = False, host_results: bool = False, batch: bool = True
             ) -> Routed:
    m = plan.model
    if m.tasks is None:
        raise ValueError("a synthetic model has no tasks to rewrite")
    plan_id = uuid.uuid4().hex
    to_host = plan.to_host
    # Dask's P2P (a rechunk or shuffle through the workers' P2P extension) places its
    # own tasks: its scheduler plugin pins each output to a worker it picks among all
    # (or the barrier's worker restrictions), blind to resources; restricted by pool
    # too, an output pinned to a worker of another pool waited for ever ('no-worker')
    # (and the tasks that read a P2P barrier: its outputs, which Dask may have fused
    # with the ops after them under another name)
    keys = m.keys
    p2p = {i for i, k in enumerate(keys) if is_p2p(k) or any(
        is_barrier(keys[d]) for d in m.deps[i])}
    if p2p and (plan.site or m.pins):
        raise p2p_at_a_site()
    chains = linear_chains(plan) if fuse and wrap else []
    if fuse and wrap and getattr(plan, "unrestricted", False):
        # Dask places every task: what Dask's Blockwise fusion runs as one task, too
        nodes = [m.tasks[k] for k in m.keys]
        inside = set(m.keys)
        chains = with_block_groups(
            m.keys, m.deps, set(m.outputs),
            [type(t) is Task and not t.block_fusion for t in nodes], chains,
            [[d for d in t.dependencies if d not in inside] for t in nodes])
    if p2p:
        chains = [c for c in chains if not p2p.intersection(c)]
    if host_results:
        # a fused chain's members but its last hand over nothing outside the task
        inside = {i for chain in chains for i in chain[:-1]}
        to_host = [t or i not in inside for i, t in enumerate(to_host)]
    graph: dict[Any, Any] = {}
    restrictions: dict[Any, int] = {}
    priorities: dict[Any, float] = {}
    free = getattr(plan, "unrestricted", False)
    host_only = frozenset({"numpy"})
    # one wrapper per (op, to_host, function): tasks share it and it reads the key of
    # the task it runs from the worker, so no per-task wrapper objects are built
    calls: dict[tuple[int, bool, int, frozenset[str]], DeviceCall] = {}
    pool_of = plan.pool_of
    layer = m.layer
    natives: dict[tuple[int, int], frozenset[str]] = {}
    tasks = m.tasks
    for i, key in enumerate(m.keys):
        node = tasks[key]
        if wrap and type(node) is Task:
            li = layer[i]
            th = to_host[i]
            native = host_only
            if not free:
                got = natives.get((li, pool_of[i]))
                if got is None:
                    got = natives[li, pool_of[i]] = plan.native_for(li, pool_of[i])
                native = got
            ck = (li, th, id(node.func), native)
            call = calls.get(ck)
            if call is None or call.func is not node.func:
                call = calls[ck] = DeviceCall(node.func, None, plan_id, th, native)
            node = wrapped_task(node, call)
            # Dask names a task by tokenizing it, which pickles its function and
            # arguments (about 0.15 ms a task; a plain dict given to client.get pays
            # it for every task, see submission). A routed task is new and belongs to
            # this one submission: a name unique to it will do
            node._token = f"jupyter-mesh-{plan_id}-{i}"
        graph[key] = node
    if not free:
        restrictions = dict(zip(m.keys, plan.pool_of, strict=True))
        priorities = dict(zip(m.keys, plan.start, strict=True))
        for i in p2p:  # (left to Dask's P2P, see above)
            restrictions.pop(m.keys[i], None)
    pins: dict[Any, str] = {}
    fused: dict[Any, list[Any]] = {}
    if m.pins:
        from .placement import _pins

        keys = m.keys
        pins = {keys[i]: s for i, s in enumerate(_pins(m)) if s is not None}
    if fuse and wrap:
        fused = _fuse_chains(plan, chains, graph, restrictions, priorities, pins, plan_id)
        if batch and restrictions:
            _batch(plan, chains, graph, restrictions, priorities, pins, fused, plan_id)
    workers = {} if free else kept_workers(plan, fused)
    for i in p2p:
        workers.pop(m.keys[i], None)
    multi_site = len({p.site for p in plan.pools}) > 1
    pools: list[tuple[str | None, str | None, str]] = [
        (p.resource, p.site if (multi_site or plan.site or pins) else None, p.label)
        for p in plan.pools
    ]
    if free and plan.site:
        # restricted to nothing but the site (see site_only)
        restrictions = dict.fromkeys(graph, site_only(pools, plan.site))
    return Routed(
        plan_id=plan_id, graph=graph, keys=list(m.outputs), restrictions=restrictions,
        pools=pools, fallback=fallback, timeout=get_seconds("fallback-timeout"),
        site=plan.site, pins=pins, priorities=priorities,
        narrow={} if free else narrowed(plan), fused=fused, workers=workers,
    )


#: how the keys of Dask's P2P tasks begin (distributed.shuffle: a rechunk's outputs and
#: transfers, a shuffle's, and the barrier between them; a DataFrame's shuffle and
#: hash join name their outputs after their expressions, P2PShuffle and HashJoinP2P)
P2P_PREFIXES = ("shuffle-barrier-", "rechunk-p2p-", "rechunk-transfer-", "shuffle-p2p-",
                "shuffle-transfer-", "hash-join-", "p2pshuffle-", "hashjoinp2p-")
P2P_BARRIER = "shuffle-barrier-"


def p2p_at_a_site() -> MeshError:
    """Dask's P2P tasks go to any worker: a computation with them cannot be kept at a
    site; what to use instead, for arrays and for DataFrames."""
    return MeshError(
        "this computation moves data through Dask's P2P rechunk or shuffle, which "
        "places its tasks on any worker: it cannot be kept at a site (site=, pin=); use "
        "Dask's task-based method: rechunk(..., method='tasks') (or Dask's config "
        "array.rechunk.method 'tasks') for arrays, shuffle_method='tasks' (or "
        "dataframe.shuffle.method 'tasks') for a DataFrame's merge, set_index or shuffle")


def refuse_p2p_at_a_site(model: Any) -> None:
    """Raise :func:`p2p_at_a_site` where ``model`` (per task, or per layer) has Dask's
    P2P in it: a plan kept at a site (``site=``, ``pin=``) says so as it is made, as
    ``mesh.explain`` shows it too (the rewrite found it only once it ran)."""
    names = getattr(model, "names", None)
    if names is None:  # per task: deps are indices
        names, deps = model.keys, model.deps
    else:  # per layer: (index, how) pairs
        deps = [[d for d, _ in ds] for ds in model.deps]
    if any(is_p2p(n) or any(is_barrier(names[d]) for d in deps[i])
           for i, n in enumerate(names)):
        raise p2p_at_a_site()


def key_name(key: Any) -> Any:
    """The layer name a key belongs to: ``('add-ab12', 0, 3)`` -> ``'add-ab12'``."""
    return key[0] if type(key) is tuple and key else key


def is_p2p(key: Any) -> bool:
    """Whether ``key`` is a task of Dask's P2P rechunk or shuffle."""
    name = key_name(key)
    # (a plan per layer sees the barrier's layer by its name alone)
    return isinstance(name, str) and (name.startswith(P2P_PREFIXES)
                                      or name == P2P_BARRIER[:-1])


def is_barrier(key: Any) -> bool:
    """Whether ``key`` is the barrier of a P2P rechunk or shuffle: the tasks that read
    it are its outputs, which Dask's P2P pins to workers of its own choosing."""
    name = key_name(key)
    return isinstance(name, str) and (name.startswith(P2P_BARRIER)
                                      or name == P2P_BARRIER[:-1])


def site_only(pools: list[tuple[str | None, str | None, str]], site: str) -> int:
    """The index of a pool entry, added to ``pools``, that keeps a task at ``site`` and
    nothing else: for a plan that restricts nothing but its ``site=`` (every pool there
    runs every op equally fast), Dask places its tasks among that site's workers. If
    none is left there, the computation fails as one kept at a site does."""
    pools.append((None, site, f"any at {site}"))
    return len(pools) - 1


def submission(routed: Routed) -> Any:
    """What ``client.get`` receives for a graph rewritten per task: the graph as one
    materialized layer, named after the plan, of a Dask expression. Dask names such an
    expression without looking into it; a plain dict it names by tokenizing every task
    (on a small machine about 0.15 ms a task, 1.5 s for 10,000 tasks, paid before
    anything runs)."""
    from dask._expr import HLGExpr
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    name = f"jupyter-mesh-routed-{routed.plan_id}"
    layer = MaterializedLayer(routed.graph)
    return HLGExpr(dsk=HighLevelGraph({name: layer}, {name: set()}),
                   output_keys=list(routed.keys))


def _block_index(key: Any) -> tuple[int, ...] | None:
    """A block key's index (``("add-1f2e", 3, 0)`` -> ``(3, 0)``), or None."""
    if type(key) is tuple and len(key) > 1 and isinstance(key[0], str) and all(
            type(k) is int for k in key[1:]):
        return key[1:]
    return None


def block_groups(keys: list[Any], deps: list[list[int]], outputs: set[Any],
                 fusable: list[bool], outside: list[list[Any]] | None = None
                 ) -> list[list[int]]:
    """Groups of two or more tasks (indices into ``keys``, in topological order: a
    task listed before one of its inputs only misses the group it could have joined,
    since every group is checked whole below) that Dask's own Blockwise fusion would
    run as one task and that a linear chain cannot hold: the ops of one block that fan
    out and meet again (``sin(x)**2 + cos(x)**2``: the block of ``x``, its sine and
    cosine, both squares and their sum, one task per block as Dask runs it; unfused,
    each op went as a task of its own and the block of ``x`` often to a second worker).

    A group grows from one task (its *source*, whose inputs may be anything) through
    consumers of the same block index whose every input is a member: an input from
    outside entering later would hold the whole group back until it came (a 1-d sum's
    partial step, which reads blocks 0-3, joined the group of block 0, and block 0's
    ops waited for blocks 1-3). A block the graph holds as data (``from_array``'s) or
    reads from outside it (``outside[j]``: the keys task ``j`` reads that are not in
    ``keys``, a persisted array's) is a source too, not a member. It is kept only where
    one member alone (its last)
    hands anything on or is an output, so the group reduces to one key as
    ``Task.fuse`` needs, and nothing outside waits on part of it."""
    n = len(keys)
    index = [_block_index(k) for k in keys]
    #: each task's group: its own index (a source), a source's, or ("in", d) /
    #: ("out", key): the tasks that read nothing but the block of a data node d of the
    #: graph (``from_array``'s) or of a key outside it (a persisted array's)
    src: list[Any] = list(range(n))
    for j in range(n):
        if not fusable[j] or index[j] is None:
            continue
        mine: set[Any] = set()
        for d in deps[j]:
            if index[d] != index[j]:
                mine.add(None)  # another block's: it would hold the group back
            else:
                mine.add(src[d] if fusable[d] else ("in", d))
        for k in (outside[j] if outside is not None else ()):
            mine.add(("out", k) if _block_index(k) == index[j] else None)
        if len(mine) == 1 and None not in mine:
            src[j] = mine.pop()
    members: dict[Any, list[int]] = {}
    for j in range(n):
        members.setdefault(src[j], []).append(j)
    # what hands anything on outside its group, and what feeds a member of its own
    exits: dict[Any, set[int]] = {}
    inner: set[int] = set()
    for j in range(n):
        if keys[j] in outputs:
            exits.setdefault(src[j], set()).add(j)
        for d in deps[j]:
            if src[d] != src[j]:
                exits.setdefault(src[d], set()).add(d)
            elif d != j:
                inner.add(d)
    return [group for s, group in members.items()
            if len(group) > 1 and exits.get(s) == {group[-1]}
            and all(j in inner for j in group[:-1])]


def with_block_groups(keys: list[Any], deps: list[list[int]], outputs: set[Any],
                      fusable: list[bool], chains: list[list[int]],
                      outside: list[list[Any]] | None = None) -> list[list[int]]:
    """The :func:`block_groups` of a graph and those of its linear ``chains`` that
    share no task with them (a chain inside a group is part of it)."""
    groups = block_groups(keys, deps, outputs, fusable, outside)
    taken = {i for g in groups for i in g}
    return groups + [c for c in chains if taken.isdisjoint(c)]


def linear_chains(plan: Plan[GraphModel]) -> list[list[int]]:
    """Chains of two or more tasks (indices, in order) where each task is the only input
    of the next and the next its only consumer, none an output but the last, all placed
    on the same worker by the plan (on the same pool where the plan has no workers;
    anywhere when the plan restricts nothing, as Dask would fuse them)."""
    n = len(plan.model.keys)
    free = getattr(plan, "unrestricted", False)
    where: Any = None if free else (plan.worker_of or plan.pool_of)
    nxt = [-1] * n
    has_prev = [False] * n
    for j, i in enumerate(chain_links(plan.model, fusing=True)):
        if i >= 0 and (where is None or where[i] == where[j]):
            nxt[i] = j
            has_prev[j] = True
    chains = []
    for i in range(n):
        if nxt[i] >= 0 and not has_prev[i]:
            chain = [i]
            while nxt[chain[-1]] >= 0:
                chain.append(nxt[chain[-1]])
            chains.append(chain)
    return chains


def _fuse_chains(plan: Plan[GraphModel], chains: list[list[int]], graph: dict[Any, Any],
                 restrictions: dict[Any, int], priorities: dict[Any, float],
                 pins: dict[Any, str], plan_id: str) -> dict[Any, list[Any]]:
    """Replace each of the plan's :func:`linear_chains` in ``graph`` by one task under
    the last key; every member keeps its own device call, which records under its own
    key (the report still sees each op). Each fused task carries its token (see
    :func:`_rewrite`)."""
    m = plan.model
    keys = m.keys
    fused = {}
    for chain in chains:
        last = fuse_chain(graph, [keys[i] for i in chain],
                          f"jupyter-mesh-{plan_id}-{chain[-1]}-fused")
        fused[last] = [keys[i] for i in chain]
        if restrictions:
            for i in chain[:-1]:
                restrictions.pop(keys[i], None)
            priorities[last] = priorities.pop(keys[chain[0]], priorities.get(last, 0.0))
            for i in chain[1:-1]:
                priorities.pop(keys[i], None)
        sites = [pins.pop(keys[i]) for i in chain if keys[i] in pins]
        if sites:  # one pool, so one site
            pins[last] = sites[0]
    return fused


#: the most bytes of results a batch hands to tasks outside it: they travel, and stay in
#: memory, together (a consumer on another worker receives all of them)
BATCH_BYTES = 1 << 18
#: the most tasks (or fused chains) in one batch: a longer one gains little more and
#: holds back its first results for longer
BATCH_UNITS = 16
#: the slack a batch needs on each edge to or from another worker, in Dask's round
#: trips (a task's dispatch and a dependency's hand-over, as calibrated): a live run
#: drifts from its plan by a few of them, and a batch waits for all its inputs and
#: hands out its results at its end, so one made on an edge with no slack to spare
#: passes that drift on, to every consumer at once
BATCH_SLACK = 4
#: only tasks (or fused chains) that take at most this many round trips are batched:
#: Dask's dispatch is a small part of a longer one, and batching it would gain little
#: and hold back its results (and those of the batch before it) for longer
BATCH_SHORT = 4


def worker_batches(plan: Plan[GraphModel], chains: list[list[int]],
                   eligible: Callable[[int], bool]) -> list[list[list[int]]]:
    """Runs of tasks that the plan places one after another on one worker, each run to
    be submitted as one task (a *batch*): Dask's own cost per dispatched task (a round
    trip through the scheduler and the worker's bookkeeping, 1-5 ms on a small
    machine) is then paid once per run. Each member (a *unit*) is a task or one of the
    plan's fused ``chains`` (lists of task indices); a batch is a list of units in the
    order they run.

    A unit joins the batch before it on its worker only where that changes no time the
    plan counts on, give or take the dispatch it saves: its inputs have arrived when
    the batch starts; run after the batch's earlier members, it ends no later than
    planned (a worker with several threads may have planned it beside them); and every
    result of the batch that a task outside it waits for, handed over at the batch's
    end now, still arrives when that task was planned to start. Inputs from other
    workers and results for them need :data:`BATCH_SLACK` round trips to spare on top.
    Only units that take at most :data:`BATCH_SHORT` round trips are batched, at most
    :data:`BATCH_UNITS` of them in one batch. Never batched: the
    computation's outputs, tasks for which ``eligible(last index of the unit)`` is
    False, ops of the class ``other`` (a user's function: the model does not know how
    long it takes), and units whose results would take the batch's results handed out
    over :data:`BATCH_BYTES`."""
    m = plan.model
    worker_of = plan.worker_of
    if not worker_of:
        return []
    n = len(m.keys)
    deps = m.deps
    layer = m.layer
    start, finish, pool_of = plan.start, plan.finish, plan.pool_of
    cost = plan.cost
    out_b = [op.out_bytes for op in m.ops]
    # an op's largest block (chunks need not be even): what a batch may hand out, and
    # how much longer than the plan's (mean) time one of its tasks may take
    peak = [peak_out(op) for op in m.ops]
    longer = [max(1.0, pk / ob) if ob > 0 else 1.0 for pk, ob in zip(peak, out_b,
                                                                      strict=True)]
    # a function the model knows nothing of (a user's map_blocks, a delayed call) may
    # take far longer than planned: batched, it would hold back the others' results
    known = [op.op_class != "other" for op in m.ops]
    tol = cost.task_overhead
    margin = BATCH_SLACK * (cost.dependency_latency + cost.task_overhead)
    short = BATCH_SHORT * (cost.dependency_latency + cost.task_overhead)
    unit_of = list(range(n))  # task -> the last task of its unit
    first = list(range(n))  # last task of a unit -> its first
    for chain in chains:
        for i in chain:
            unit_of[i] = chain[-1]
        first[chain[-1]] = chain[0]
    consumers: list[list[int]] = [[] for _ in range(n)]
    for j in range(n):
        for d in deps[j]:
            consumers[d].append(j)
    outputs = set(m.outputs)
    keys = m.keys
    per_worker: dict[int, list[int]] = {}
    for u in range(n):
        if unit_of[u] == u:
            per_worker.setdefault(worker_of[u], []).append(u)

    chain_of = {chain[-1]: chain for chain in chains}
    batches: list[list[list[int]]] = []
    for w, units in per_worker.items():
        units.sort(key=lambda u: (start[first[u]], u))
        cur: list[int] = []
        inside: set[int] = set()
        begin = end = 0.0
        handed = 0.0
        waits: list[tuple[float, int, int]] = []  # (latest batch end, consumer, unit)
        for u in units:
            mem = chain_of.get(u, [u])
            nbytes = peak[layer[u]]
            # (a fused chain runs back to back: its members need not in the plan)
            took = sum((finish[i] - start[i]) * longer[layer[i]] for i in mem)
            ok_alone = (took <= short and keys[u] not in outputs and eligible(u)
                        and all(known[layer[i]] for i in mem))
            join = bool(cur) and ok_alone and len(cur) < BATCH_UNITS
            if join:
                here = set(mem)
                # its inputs, when the batch starts
                for i in mem:
                    for d in deps[i]:
                        if d in inside or d in here:
                            continue
                        a = finish[d] + cost.transfer(out_b[layer[d]], pool_of[d], pool_of[u],
                                                      same_worker=worker_of[d] == w)
                        if worker_of[d] != w:
                            a += margin
                        if a > begin + tol:
                            join = False
                            break
                    if not join:
                        break
            if join:
                new_end = end + took
                join = new_end <= finish[u] + tol
            if join:
                # what waits for the batch's results, less what joins it now
                while waits and (waits[0][1] in inside or waits[0][1] in here):
                    heapq.heappop(waits)
                join = not waits or new_end <= waits[0][0] + tol
            extra = nbytes if consumers[u] else 0.0  # (a unit's last has them all)
            if join and handed + extra > BATCH_BYTES:
                join = False
            if not join:
                if len(cur) > 1:
                    batches.append([chain_of.get(x, [x]) for x in cur])
                cur, inside, waits, handed = [], set(), [], 0.0
                if not ok_alone or extra > BATCH_BYTES:
                    continue
                begin = start[first[u]]
                end = begin + took
            else:
                end = new_end
            cur.append(u)
            inside.update(mem)
            handed += extra
            for j in consumers[u]:
                # a consumer elsewhere receives everything the batch hands out
                latest = start[j] - cost.transfer(BATCH_BYTES, pool_of[u], pool_of[j],
                                                  same_worker=worker_of[j] == w)
                if worker_of[j] != w:
                    latest -= margin
                heapq.heappush(waits, (latest, j, u))
        if len(cur) > 1:
            batches.append([chain_of.get(x, [x]) for x in cur])
    return batches


def _batch(plan: Plan[GraphModel], chains: list[list[int]], graph: dict[Any, Any],
           restrictions: dict[Any, int], priorities: dict[Any, float], pins: dict[Any, str],
           fused: dict[Any, list[Any]], plan_id: str) -> None:
    """Replace each of the plan's :func:`worker_batches` in ``graph`` (after its chains
    are fused) by one task (``_device.routed_batch``), under a key of its own; a task
    outside that needs a member's result takes it out of the batch's. Every member keeps
    its own device call, which records under its own key (the report still sees each
    op), and ``fused`` maps the batch's key to every task in it, in the order they run."""
    m = plan.model
    keys = m.keys

    def eligible(u: int) -> bool:
        node = graph.get(keys[u])
        # never data pinned to a site (pins): a consumer of another member of the batch,
        # at another site, would receive the whole batch's results, the pinned data with
        # them (a chain's pin is its last task's, see _fuse_chains)
        return type(node) is Task and keys[u] not in pins and keys[u] in restrictions \
            and (isinstance(node.func, DeviceCall) or node.func is routed_chain)

    batches = worker_batches(plan, chains, eligible)
    if not batches:
        return
    batch_of: dict[int, int] = {}
    for b, batch in enumerate(batches):
        for unit in batch:
            for i in unit:
                batch_of[i] = b
    # the members whose results a task outside their batch needs
    wanted: set[int] = set()
    for j, ds in enumerate(m.deps):
        bj = batch_of.get(j, -1)
        for d in ds:
            bd = batch_of.get(d)
            if bd is not None and bd != bj:
                wanted.add(d)
    redirect: dict[Any, Any] = {}
    for b, batch in enumerate(batches):
        bkey = f"{BATCH_PREFIX}{plan_id}-{b}"
        nodes = []
        ran: list[Any] = []
        inside: set[Any] = set()
        for unit in batch:
            k = keys[unit[-1]]
            node = graph.pop(k)
            call = node.func
            if isinstance(call, DeviceCall) and call.key is None:
                node = _keyed(node, k)
            nodes.append(node)
            inside.add(k)
            ran += fused.pop(k, [k])
        outer = sorted({d for node in nodes for d in node.dependencies} - inside, key=str)
        out = [keys[unit[-1]] for unit in batch if unit[-1] in wanted]
        task = Task(bkey, routed_batch, tuple(nodes), tuple(out), tuple(outer),
                    *(TaskRef(k) for k in outer))
        task._token = f"jupyter-mesh-{plan_id}-batch-{b}"
        graph[bkey] = task
        fused[bkey] = ran
        for j, k in enumerate(out):
            redirect[k] = Task(None, operator.getitem, TaskRef(bkey), j)
        units = [keys[unit[-1]] for unit in batch]
        restrictions[bkey] = restrictions[units[0]]
        priorities[bkey] = min(priorities.pop(k, float("inf")) for k in units)
        for k in units:
            restrictions.pop(k, None)
        sites = [pins.pop(k) for k in units if k in pins]
        if sites:  # one worker, so one site
            pins[bkey] = sites[0]
    for k, node in list(graph.items()):
        want = node.dependencies & redirect.keys()
        if want:
            token = node._token if isinstance(node, Task) else None
            node = node.substitute({d: redirect[d] for d in want})
            if node.key != k and isinstance(node, Task):
                # an alias of a member becomes the task that takes the member's result
                # out of the batch, under no key of its own: it keeps the alias's
                node = Task(k, node.func, *node.args, **node.kwargs)
            graph[k] = node
            if token is not None and isinstance(node, Task):
                node._token = f"{token}-b"


def fuse_chain(graph: dict[Any, Any], chain: list[Any], token: str) -> Any:
    """Replace the tasks of ``chain`` (keys, in order: each the only input of the next
    and the next its only consumer) in ``graph`` by one task under the last key, named
    ``token``; every member keeps its own device call, which records under its own key
    (the report still sees each op). Returns the last key."""
    members = []
    for key in chain:
        node = graph.pop(key)
        call = node.func
        if isinstance(call, DeviceCall) and call.key is None:
            node = _keyed(node, key)
        members.append(node)
    last = chain[-1]
    graph[last] = node = Task.fuse(*members, key=last)
    if isinstance(node, Task):  # a Task with the members as its subgraph
        node._token = token
        node.func = routed_chain  # Dask's runner, under a name that says so
    return last


def graph_chains(graph: dict[Any, Any], outputs: Any) -> list[list[Any]]:
    """The linear chains of a materialized graph that Dask would fuse (each task the
    only input of the next and the next its only consumer, none an output but the
    last), among its routed tasks (those whose function is a device call)."""
    from collections import Counter

    def fusable(node: Any) -> bool:
        return (type(node) is Task and isinstance(node.func, DeviceCall)
                and not node.block_fusion)

    deps = {k: node.dependencies for k, node in graph.items()}
    consumers = Counter(d for ds in deps.values() for d in ds)
    nxt: dict[Any, Any] = {}
    for j, ds in deps.items():
        if len(ds) == 1:
            (i,) = ds
            if (consumers[i] == 1 and i not in outputs and i in graph
                    and fusable(graph[i]) and fusable(graph[j])):
                nxt[i] = j
    follows = set(nxt.values())
    chains = []
    for i in nxt:
        if i not in follows:
            chain = [i]
            while chain[-1] in nxt:
                chain.append(nxt[chain[-1]])
            chains.append(chain)
    return chains


def _addresses(plan: Plan[GraphModel]) -> list[tuple[int, str]]:
    """(pool, address) of each worker, numbered across the pools as plans number them."""
    address: list[tuple[int, str]] = []
    for p, pool in enumerate(plan.pools):
        address += [(p, a) for a in pool.workers[: len(pool.worker_threads())]]
    return address


def kept_workers(plan: Plan[GraphModel], fused: dict[Any, list[Any]]) -> dict[Any, str]:
    """Submitted key -> address of the worker the plan keeps it on (``plan.kept``); a
    fused chain's task where any of its members is kept (they share a worker)."""
    kept = getattr(plan, "kept", None)
    worker_of = getattr(plan, "worker_of", None)
    if not kept or not worker_of:
        return {}
    address = _addresses(plan)
    keys = plan.model.keys
    out = {keys[i]: address[worker_of[i]][1] for i in kept
           if 0 <= worker_of[i] < len(address)}
    for last, members in fused.items():
        where = [out.pop(k) for k in members if k in out]
        if where:
            out[last] = where[0]
    return out


def narrowed(plan: Plan[GraphModel]) -> dict[int, list[str]]:
    """Per pool, the workers the plan uses when it uses only some of them."""
    worker_of = getattr(plan, "worker_of", None)
    if not worker_of:
        return {}
    address = _addresses(plan)  # global worker number -> (pool, address)
    used: dict[int, set[str]] = {}
    for w in set(worker_of):
        if 0 <= w < len(address):
            p, a = address[w]
            used.setdefault(p, set()).add(a)
    return {p: sorted(ws) for p, ws in used.items()
            if len(ws) < len(plan.pools[p].workers)}


def _keyed(node: Task, key: Any) -> Task:
    """A routed task whose device call records under ``key`` (a call shared by the
    tasks of an op reads the key of the task it runs from the worker; a task that runs
    inside another, fused or batched, must know its own). Its arguments stay as
    :func:`wrapped_task` made them."""
    call: DeviceCall = node.func  # type: ignore[assignment]
    t = Task.__new__(Task)
    t.key = node.key
    t.func = DeviceCall(call.func, key, call.plan_id, call.to_host, call.native)
    t.args, t.kwargs = node.args, node.kwargs
    t._dependencies = node._dependencies
    t._data_producer = node._data_producer
    t._token = t._is_coro = t._repr = None
    return t


def wrapped_task(node: Task, call: DeviceCall) -> Task:
    """A shallow copy of ``node`` with ``call`` as its function (Task.__init__ would
    scan the arguments for dependencies again); tasks nested in its arguments unwrap
    the results kept on a device (see ``_device.OnDevice``) that they get."""
    t = Task.__new__(Task)
    t.key = node.key
    t.func = call
    args = node.args
    for a in args:  # inline: it runs once per routed task
        if isinstance(a, Task):
            args = _nested_args(args)
            break
    t.args = args
    kwargs = node.kwargs
    for v in kwargs.values():
        if isinstance(v, Task):
            kwargs = _nested_kwargs(kwargs)
            break
    t.kwargs = kwargs
    t._dependencies = node._dependencies
    t._data_producer = node._data_producer
    t._token = t._is_coro = t._repr = None
    return t


def _nested_args(args: tuple[Any, ...]) -> tuple[Any, ...]:
    new = [_nested(a) for a in args]
    return args if all(a is b for a, b in zip(args, new, strict=True)) else tuple(new)


def _nested_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    new = {k: _nested(v) for k, v in kwargs.items()}
    return kwargs if all(new[k] is v for k, v in kwargs.items()) else new


def _nested(a: Any) -> Any:
    """A task in a routed task's arguments, its function (and those of the tasks in
    its own arguments) made to unwrap device results; anything else as it is."""
    if not isinstance(a, Task) or not a.dependencies:
        return a
    args, kwargs = _nested_args(a.args), _nested_kwargs(a.kwargs)
    container = isinstance(a, NestedContainer)  # builds a list/tuple/dict: no unwrapping
    if container and args is a.args and kwargs is a.kwargs:
        return a
    t = copy.copy(a)
    if not container and not isinstance(a.func, Unwrapping):
        t.func = Unwrapping(a.func)
    t.args, t.kwargs = args, kwargs
    t._token = t._repr = None
    return t
