"""The Jupyter server extension behind the Mesh sidebar.

The state lives in :class:`~jupyter_mesh.server.manager.MeshManager`, which knows nothing
of Tornado; :mod:`jupyter_mesh.server.handlers` holds the thin, authenticated HTTP
handlers under ``/jupyter-mesh/api/``.
"""

from __future__ import annotations

import atexit
from typing import Any

from .handlers import setup_handlers
from .manager import MeshManager

__all__ = ["MeshManager", "load_jupyter_server_extension"]


def _kernel_paths_of(server_app: Any):
    async def kernel_paths() -> dict[str, str]:
        sessions = await server_app.session_manager.list_sessions()
        return {
            s["kernel"]["id"]: s.get("path") or s.get("name") or ""
            for s in sessions
            if s.get("kernel")
        }

    return kernel_paths


def _load_jupyter_server_extension(server_app: Any) -> None:
    """Register the handlers of the Mesh sidebar with a running Jupyter server."""
    from jupyter_core.paths import jupyter_runtime_dir

    runtime_dir = getattr(server_app, "runtime_dir", None) or jupyter_runtime_dir()
    manager = MeshManager(runtime_dir, kernel_paths=_kernel_paths_of(server_app))
    setup_handlers(server_app.web_app, manager)
    # Meshes the sidebar started die with the server, like its kernels.
    atexit.register(manager.close_sync)
    server_app.log.info("jupyter_mesh: Mesh sidebar API at /jupyter-mesh/api/")


load_jupyter_server_extension = _load_jupyter_server_extension
