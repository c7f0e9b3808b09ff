"""Dashboard links a browser can open.

A mesh's scheduler serves its dashboard on the machine it runs on, usually at
``http://127.0.0.1:PORT/status``. That address works for a browser on the same machine;
on a shared hub the browser is elsewhere and reaches the Jupyter server only. There,
``jupyter-server-proxy`` (a dependency) serves ``{base_url}proxy/PORT/...`` from the
server's own loopback ports, behind Jupyter's authentication, and these helpers turn a
loopback link into that path.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def safe_link(link: Any) -> str | None:
    """``link`` if a browser may open it: an ``http(s)://`` address or a path on this
    server; None for anything else (a ``javascript:`` link from a scheduler, say,
    would run in Jupyter's page)."""
    if not isinstance(link, str) or not link.strip():
        return None
    if link.startswith("/") and not link.startswith("//"):
        return link
    parts = urlsplit(link)
    if parts.scheme in ("http", "https") and parts.netloc:
        return link
    return None


def proxied(link: str | None, proxy_prefix: str | None) -> str | None:
    """``link`` through the proxy at ``proxy_prefix`` (e.g. ``/user/ada/proxy/``) when it
    points at a loopback port; any other safe link (another host, already a path) as it
    is, and none that is not :func:`safe_link`."""
    link = safe_link(link)
    if not link or not proxy_prefix:
        return link
    parts = urlsplit(link)
    if parts.scheme not in ("http", "https") or parts.hostname not in LOOPBACK:
        return link
    try:
        port = parts.port
    except ValueError:
        return link
    if port is None:
        return link
    path = parts.path or "/"
    query = f"?{parts.query}" if parts.query else ""
    return f"{proxy_prefix.rstrip('/')}/{port}{path}{query}"


def proxy_available() -> bool:
    """Whether jupyter-server-proxy is installed where this runs."""
    from importlib.util import find_spec

    return find_spec("jupyter_server_proxy") is not None


def hub_proxy_prefix() -> str | None:
    """In a JupyterHub single-user server's kernel (``JUPYTERHUB_SERVICE_PREFIX`` set),
    the proxy path of that server, when jupyter-server-proxy is installed; else None."""
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX")
    if not prefix or not proxy_available():
        return None
    return prefix.rstrip("/") + "/proxy/"


def browser_link(link: str | None) -> str | None:
    """The dashboard link to show in a notebook: proxied on a hub, else as Dask gives it."""
    return proxied(link, hub_proxy_prefix())
