"""The Jupyter server extension behind the Mesh sidebar.

The state lives in :class:`~jupyter_mesh.server.manager.MeshManager`, which knows nothing
of Tornado; :mod:`jupyter_mesh.server.handlers` holds the thin, authenticated HTTP
handlers under ``/jupyter-mesh/api/``.
"""

from __future__ import annotations

from typing import Any

from .handlers import setup_handlers

__all__ = ["load_jupyter_server_extension"]


def _load_jupyter_server_extension(server_app: Any) -> None:
    """Register the handlers of the Mesh sidebar with a running Jupyter server."""
    setup_handlers(server_app.web_app)
    server_app.log.info("jupyter_mesh: server extension loaded at /jupyter-mesh/api/")


load_jupyter_server_extension = _load_jupyter_server_extension
