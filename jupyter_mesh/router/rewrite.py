"""Apply a plan: device wrappers on the tasks and per-key restrictions for the scheduler.

Dask's fusion would flatten layers and merge annotations (a GPU op fused with a TPU op
would need both), so a routed graph is submitted unfused, and the restrictions travel
by key to the mesh's scheduler plugin, which sets them in ``update_graph`` before the
scheduler looks at the tasks.
"""

from __future__ import annotations

import copy
import pickle
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dask._task_spec import NestedContainer, Task

from .._config import get_seconds
from ._device import DeviceCall, Unwrapping, routed_chain
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
            fuse: bool | None = None, host_results: bool = False) -> Routed:
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
    """
    from .classify import no_gc

    if fuse is None:
        fuse = dask_fuses()
    with no_gc():
        return _rewrite(plan, fallback=fallback, wrap=wrap, fuse=fuse,
                        host_results=host_results)


def _rewrite(plan: Plan[GraphModel], *, fallback: bool, wrap: bool,
             fuse: bool = False, host_results: bool = False) -> Routed:
    m = plan.model
    if m.tasks is None:
        raise ValueError("a synthetic model has no tasks to rewrite")
    plan_id = uuid.uuid4().hex
    to_host = plan.to_host
    if host_results:
        # a fused chain's members but its last hand over nothing outside the task
        inside = ({i for chain in linear_chains(plan) for i in chain[:-1]}
                  if fuse and wrap else set())
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
    pins: dict[Any, str] = {}
    fused: dict[Any, list[Any]] = {}
    if m.pins:
        from .placement import _pins

        keys = m.keys
        pins = {keys[i]: s for i, s in enumerate(_pins(m)) if s is not None}
    if fuse and wrap:
        fused = _fuse_chains(plan, graph, restrictions, priorities, pins, plan_id)
    workers = {} if free else kept_workers(plan, fused)
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


def _fuse_chains(plan: Plan[GraphModel], graph: dict[Any, Any], restrictions: dict[Any, int],
                 priorities: dict[Any, float], pins: dict[Any, str], plan_id: str
                 ) -> dict[Any, list[Any]]:
    """Replace each of the plan's :func:`linear_chains` in ``graph`` by one task under
    the last key; every member keeps its own device call, which records under its own
    key (the report still sees each op). Each fused task carries its token (see
    :func:`_rewrite`)."""
    m = plan.model
    keys = m.keys
    fused = {}
    for chain in linear_chains(plan):
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
            node = wrapped_task(node, DeviceCall(call.func, key, call.plan_id,
                                                 call.to_host, call.native))
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
