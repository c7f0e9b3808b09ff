"""The device-aware router: classify ops, cost them, place them, rewrite the graph.

The router is pure: a graph, an inventory and profiles go in, a :class:`Plan` comes
out. :mod:`.rewrite` applies a plan (per-key restrictions plus a device wrapper) and
:mod:`.api` runs it on a mesh.
"""

from __future__ import annotations

from . import jax_ops
from .backends import Backend, CupyBackend, JaxBackend, NumpyBackend, backend_names, get_backend
from .classify import CAPABILITIES, OP_CLASSES, GraphModel, OpInfo, model_collections
from .cost import CostModel, Links, Pool, build_pools
from .placement import plan_model
from .plan import Plan, Report

__all__ = [
    "CAPABILITIES", "OP_CLASSES", "Backend", "CostModel", "CupyBackend", "GraphModel",
    "JaxBackend", "Links", "jax_ops", "NumpyBackend", "OpInfo", "Plan", "Pool", "Report",
    "backend_names", "build_pools", "get_backend", "model_collections", "plan_collections",
    "plan_model",
]


def plan_collections(collections, devices, route="auto", *, site=None, links=None, pin=None):
    """Plan Dask collections over devices (an :class:`~jupyter_mesh.Inventory` or a list
    of :class:`~jupyter_mesh.Device`), without a cluster; ``pin={site: x}`` pins the
    data of input ``x`` to a site. Above ``mesh.router.layer-plan-threshold`` tasks
    (and without pins) the plan is made per layer, as ``Mesh.explain`` makes it."""
    from .api import apply_pins
    from .classify import _collection_graph, model_graph
    from .layers import model_layers, plan_layers, use_layer_plan

    graph, keys = _collection_graph(collections)
    pools = build_pools(devices)
    if not pin and use_layer_plan(graph):
        return plan_layers(model_layers(graph, keys), pools, route, site=site,
                           cost=CostModel(pools, links))
    model = model_graph(graph, keys)
    apply_pins(model, pin, pools)
    return plan_model(model, pools, route, site=site, cost=CostModel(pools, links))
