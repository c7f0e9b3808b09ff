"""Dask preload that makes any Dask worker a mesh worker.

    dask worker tcp://scheduler:8786 --preload jupyter_mesh.worker --site edge-lab [--jax]

The site may also come from the ``JUPYTER_MESH_SITE`` environment variable.
"""

from __future__ import annotations

import os
from typing import Any

import click

from .devices._worker_plugin import MeshWorkerPlugin


@click.command()
@click.option("--site", default=None, help="site label of this worker")
@click.option("--jax", "use_jax", is_flag=True, help="drive the device with JAX")
def dask_setup(worker: Any, site: str | None, use_jax: bool) -> None:
    """Detect this worker's device before it registers with the scheduler."""
    from .mesh import check_site

    site = check_site(site or os.environ.get("JUPYTER_MESH_SITE") or "default")
    plugin = MeshWorkerPlugin(site=site, backend="jax" if use_jax else None)
    plugin.setup(worker)
