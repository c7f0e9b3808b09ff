"""Apply a plan: device wrappers on the tasks and per-key restrictions for the scheduler.

Dask's fusion would flatten layers and merge annotations (a GPU op fused with a TPU op
would need both), so a routed graph is submitted unfused, and the restrictions travel
by key to the mesh's scheduler plugin, which sets them in ``update_graph`` before the
scheduler looks at the tasks.
"""

from __future__ import annotations

import pickle
import uuid
from dataclasses import dataclass, field
from typing import Any

from dask._task_spec import Task

from .._config import get_seconds
from ._device import DeviceCall
from .plan import Plan


@dataclass
class Routed:
    """A plan applied: the graph to submit and what the scheduler plugin needs."""

    plan_id: str
    graph: dict[Any, Any]
    keys: list[Any]
    #: key -> pool index
    restrictions: dict[Any, int]
    #: per pool: (resource name, worker addresses or None, label)
    pools: list[tuple[str, list[str] | None, str]] = field(default_factory=list)
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

    def payload(self) -> bytes:
        """What the scheduler plugin's ``jupyter_mesh_route`` handler receives."""
        return pickle.dumps({
            "plan_id": self.plan_id, "restrictions": self.restrictions,
            "pools": self.pools, "fallback": self.fallback, "timeout": self.timeout,
            "site": self.site, "pins": self.pins, "priorities": self.priorities,
            "layers": self.layers, "narrow": self.narrow,
        }, protocol=pickle.HIGHEST_PROTOCOL)


def rewrite(plan: Plan, *, fallback: bool = True, wrap: bool = True) -> Routed:
    """Wrap every task of ``plan`` and collect its per-key restrictions."""
    from .classify import no_gc

    with no_gc():
        return _rewrite(plan, fallback=fallback, wrap=wrap)


def _rewrite(plan: Plan, *, fallback: bool, wrap: bool) -> Routed:
    m = plan.model
    if m.tasks is None:
        raise ValueError("a synthetic model has no tasks to rewrite")
    plan_id = uuid.uuid4().hex
    to_host = plan.to_host
    graph: dict[Any, Any] = {}
    restrictions: dict[Any, int] = {}
    priorities: dict[Any, float] = {}
    free = getattr(plan, "unrestricted", False)
    host_only = frozenset({"numpy"})
    # one wrapper per (op, to_host, function): tasks share it and it reads the key of
    # the task it runs from the worker, so no per-task wrapper objects are built
    calls: dict[tuple[int, bool, int], DeviceCall] = {}
    layer = m.layer
    ops = m.ops
    tasks = m.tasks
    for i, key in enumerate(m.keys):
        node = tasks[key]
        if wrap and type(node) is Task:
            li = layer[i]
            th = to_host[i]
            ck = (li, th, id(node.func))
            call = calls.get(ck)
            if call is None or call.func is not node.func:
                call = calls[ck] = DeviceCall(
                    node.func, None, plan_id, th, host_only if free else ops[li].native)
            node = wrapped_task(node, call)
        graph[key] = node
    if not free:
        restrictions = dict(zip(m.keys, plan.pool_of, strict=True))
        priorities = dict(zip(m.keys, plan.start, strict=True))
    pins: dict[Any, str] = {}
    if m.pins:
        from .placement import _pins

        keys = m.keys
        pins = {keys[i]: s for i, s in enumerate(_pins(m)) if s is not None}
    multi_site = len({p.site for p in plan.pools}) > 1
    pools = [
        (p.resource, list(p.workers) if (multi_site or plan.site or pins) else None, p.label)
        for p in plan.pools
    ]
    return Routed(
        plan_id=plan_id, graph=graph, keys=list(m.outputs), restrictions=restrictions,
        pools=pools, fallback=fallback, timeout=get_seconds("fallback-timeout"),
        site=plan.site, pins=pins, priorities=priorities,
        narrow={} if free else narrowed(plan),
    )


def narrowed(plan: Plan) -> dict[int, list[str]]:
    """Per pool, the workers the plan uses when it uses only some of them."""
    worker_of = getattr(plan, "worker_of", None)
    if not worker_of:
        return {}
    address: list[tuple[int, str]] = []  # global worker number -> (pool, address)
    for p, pool in enumerate(plan.pools):
        address += [(p, a) for a in pool.workers[: len(pool.worker_threads())]]
    used: dict[int, set[str]] = {}
    for w in set(worker_of):
        if 0 <= w < len(address):
            p, a = address[w]
            used.setdefault(p, set()).add(a)
    return {p: sorted(ws) for p, ws in used.items()
            if len(ws) < len(plan.pools[p].workers)}


def wrapped_task(node: Task, call: DeviceCall) -> Task:
    """A shallow copy of ``node`` with ``call`` as its function (Task.__init__ would
    scan the arguments for dependencies again)."""
    t = Task.__new__(Task)
    t.key = node.key
    t.func = call
    t.args = node.args
    t.kwargs = node.kwargs
    t._dependencies = node._dependencies
    t._data_producer = node._data_producer
    t._token = t._is_coro = t._repr = None
    return t
