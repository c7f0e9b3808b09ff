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

    def payload(self) -> bytes:
        """What the scheduler plugin's ``jupyter_mesh_route`` handler receives."""
        return pickle.dumps({
            "plan_id": self.plan_id, "restrictions": self.restrictions,
            "pools": self.pools, "fallback": self.fallback, "timeout": self.timeout,
            "site": self.site,
        }, protocol=pickle.HIGHEST_PROTOCOL)


def rewrite(plan: Plan, *, fallback: bool = True, wrap: bool = True) -> Routed:
    """Wrap every task of ``plan`` and collect its per-key restrictions."""
    m = plan.model
    if m.tasks is None:
        raise ValueError("a synthetic model has no tasks to rewrite")
    plan_id = uuid.uuid4().hex
    to_host = plan.to_host
    graph: dict[Any, Any] = {}
    restrictions: dict[Any, int] = {}
    ops = m.ops
    free = getattr(plan, "unrestricted", False)
    host_only = frozenset({"numpy"})
    for i, key in enumerate(m.keys):
        node = m.tasks[key]
        if wrap and type(node) is Task:
            op = ops[m.layer[i]]
            node = Task(
                key, DeviceCall(node.func, key, plan_id, to_host[i],
                                host_only if free else op.native),
                *node.args, _data_producer=getattr(node, "data_producer", False),
                **node.kwargs,
            )
        graph[key] = node
        if not free:
            restrictions[key] = plan.pool_of[i]
    multi_site = len({p.site for p in plan.pools}) > 1
    pools = [
        (p.resource, list(p.workers) if (multi_site or plan.site) else None, p.label)
        for p in plan.pools
    ]
    return Routed(
        plan_id=plan_id, graph=graph, keys=list(m.outputs), restrictions=restrictions,
        pools=pools, fallback=fallback, timeout=get_seconds("fallback-timeout"),
        site=plan.site,
    )
