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
    data of input ``x`` to a site."""
    from .api import apply_pins

    model = model_collections(collections)
    pools = build_pools(devices)
    apply_pins(model, pin, pools)
    return plan_model(model, pools, route, site=site, cost=CostModel(pools, links))
