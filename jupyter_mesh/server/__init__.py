"""The Jupyter server extension behind the Mesh sidebar.

The state lives in :class:`~jupyter_mesh.server.manager.MeshManager`, which knows nothing
of Tornado; :mod:`jupyter_mesh.server.handlers` holds the thin, authenticated HTTP
handlers under ``/jupyter-mesh/api/``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
from typing import Any

from .handlers import api_root, setup_handlers
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
    manager = MeshManager(runtime_dir, kernel_paths=_kernel_paths_of(server_app),
                          dashboard_proxy=_proxy_prefix(server_app))
    setup_handlers(server_app.web_app, manager)
    quiet_client_tracebacks()
    # Meshes the sidebar started die with the server, like its kernels.
    atexit.register(manager.close_sync)
    server_app.log.info("jupyter_mesh: Mesh sidebar API at %s", api_root(server_app.web_app))
    autostart = os.environ.get(AUTOSTART_ENV, "").strip()
    if autostart:
        _autostart(server_app, manager, autostart)


AUTOSTART_ENV = "JUPYTER_MESH_AUTOSTART"


class OneLineClientErrors(logging.Filter):
    """Dask's client logs a traceback when a scheduler it holds goes away (it tries to
    reconnect, and gives up); in the server's log, where the sidebar already says what
    happened, each becomes one line: the message and the error's first line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            first = (str(exc).strip().splitlines() or [""])[0]
            record.msg = f"{record.getMessage()} ({type(exc).__name__}" + (
                f": {first})" if first else ")")
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_client_tracebacks() -> None:
    """Install :class:`OneLineClientErrors` on Dask's client logger (once a process)."""
    log = logging.getLogger("distributed.client")
    if not any(isinstance(f, OneLineClientErrors) for f in log.filters):
        log.addFilter(OneLineClientErrors())


def _proxy_prefix(server_app: Any) -> str | None:
    """``{base_url}proxy/`` when jupyter-server-proxy is enabled in this server (it
    serves the server's loopback ports there, behind Jupyter's authentication)."""
    from jupyter_server.utils import url_path_join

    enabled = getattr(server_app, "jpserver_extensions", None) or {}
    if not enabled.get("jupyter_server_proxy"):
        return None
    from .._links import proxy_available

    if not proxy_available():
        return None
    return url_path_join(server_app.web_app.settings.get("base_url", "/"), "proxy/")


def parse_autostart(text: str) -> dict[str, Any]:
    """``cpu=2,jax_cpu=1`` (or a JSON object) -> the body of ``POST meshes``."""
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not valid JSON ({exc}): give a JSON object like "
                             f'{{"cpu": 2}}, or KEY=VALUE pairs like cpu=2,jax_cpu=1') from None
    body: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"expected KEY=VALUE pairs like cpu=2,jax_cpu=1 (or a JSON "
                             f"object), got {part!r}")
        key, value = key.strip(), value.strip()
        # a count is a number; a site is a name, digits or not (site=2024)
        # (ASCII digits only: "²" is a digit to str.isdigit, and no number to int)
        plain = value.isascii() and value.isdigit()
        body[key] = int(value) if plain and key != "site" else value
    return body


def _autostart(server_app: Any, manager: MeshManager, text: str) -> None:
    """Start an embedded local mesh with the server (``make lab`` does this)."""
    from tornado.ioloop import IOLoop

    from .manager import validate_start

    try:
        body = parse_autostart(text)
        validate_start(body)
    except Exception as exc:
        server_app.log.error("jupyter_mesh: ignoring %s=%r: %s", AUTOSTART_ENV, text, exc)
        return

    async def start() -> None:
        try:
            detail = await manager.start(body)
            server_app.log.info("jupyter_mesh: started a local mesh at %s", detail.get("address"))
        except Exception as exc:
            server_app.log.error("jupyter_mesh: could not start the local mesh: %s", exc)

    IOLoop.current().add_callback(start)


load_jupyter_server_extension = _load_jupyter_server_extension
