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


@pytest.mark.parametrize("link", ["javascript:alert(1)", "JAVASCRIPT:alert(1)",
                                  "data:text/html,<script>x</script>", "//evil.example/x",
                                  "file:///etc/passwd", "http://", "", 42])
@pytest.mark.parametrize("prefix", [None, "/user/ada/proxy/"])
def test_a_link_a_browser_must_not_open_is_dropped(link, prefix):
    # a scheduler (or a registration file) gives the dashboard link: only http(s)
    # addresses and paths of this server reach the notebook and the sidebar
    assert proxied(link, prefix) is None


def test_an_inventory_and_its_html_carry_only_safe_links():
    from jupyter_mesh.inventory import Inventory

    assert Inventory([], "tcp://x:1", "javascript:alert(1)").dashboard is None
    inv = Inventory([], "tcp://x:1", "http://127.0.0.1:8787/status")
    assert "rel='noopener noreferrer'" in inv._repr_html_()
