"""Dashboard links through the Jupyter server's proxy (pure)."""

from __future__ import annotations

import pytest

from jupyter_mesh._links import browser_link, proxied


@pytest.mark.parametrize("link, expected", [
    ("http://127.0.0.1:8787/status", "/user/ada/proxy/8787/status"),
    ("http://localhost:41234/status?x=1", "/user/ada/proxy/41234/status?x=1"),
    ("https://[::1]:9000/", "/user/ada/proxy/9000/"),
    ("http://127.0.0.1:8787", "/user/ada/proxy/8787/"),
    # another host: the server's proxy would not reach it, the link stays
    ("http://10.1.2.3:8787/status", "http://10.1.2.3:8787/status"),
    # already a path (a dask config that proxies it), no port, or not a port
    ("/user/ada/proxy/8787/status", "/user/ada/proxy/8787/status"),
    ("http://127.0.0.1/status", "http://127.0.0.1/status"),
    ("http://127.0.0.1:notaport/status", "http://127.0.0.1:notaport/status"),
    (None, None),
])
def test_proxied(link, expected):
    assert proxied(link, "/user/ada/proxy/") == expected


def test_no_proxy_leaves_the_link():
    assert proxied("http://127.0.0.1:8787/status", None) == "http://127.0.0.1:8787/status"


def test_browser_link_needs_a_hub(monkeypatch):
    monkeypatch.delenv("JUPYTERHUB_SERVICE_PREFIX", raising=False)
    assert browser_link("http://127.0.0.1:8787/status") == "http://127.0.0.1:8787/status"
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ada")
    assert browser_link("http://127.0.0.1:8787/status") == "/user/ada/proxy/8787/status"
