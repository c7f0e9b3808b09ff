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


def test_the_scheduler_plugin_links_the_interface_its_dashboard_listens_on():
    import socket
    from types import SimpleNamespace

    from jupyter_mesh._scheduler_plugin import dashboard_url

    def sched(*bound, ip="10.0.0.5"):
        socks = {}
        for host in bound:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks[s.fileno()] = s
        return SimpleNamespace(ip=ip, http_server=SimpleNamespace(port=8787, _sockets=socks))

    assert dashboard_url(sched("127.0.0.1")) == "http://127.0.0.1:8787/status"
    # another interface than the scheduler's own: the one it listens on
    assert dashboard_url(sched("127.0.0.2")) == "http://127.0.0.2:8787/status"
    # every interface: the scheduler's address
    assert dashboard_url(sched("0.0.0.0")) == "http://10.0.0.5:8787/status"
    # IPv6 in brackets
    if socket.has_ipv6:
        assert dashboard_url(sched("::1", ip="::1")) == "http://[::1]:8787/status"
    assert dashboard_url(SimpleNamespace(ip="x", http_server=None)) is None


def test_an_ipv6_mesh_links_its_dashboard(no_mesh, monkeypatch):
    import dask

    import jupyter_mesh as jm

    # (Dask's own link names the host unbracketed: no URL a browser opens)
    from jupyter_mesh import discovery

    with dask.config.set({"mesh.local.dashboard-address": "[::1]:0"}), \
            jm.Mesh.local(cpu=1, jax_cpu=0, gpu=0, tpu=0, threads_per_worker=1, host="::1",
                          set_current=True) as mesh:
        # the kernel's registration (made when it became current) has it too
        import json

        path = discovery.registration_of(mesh)
        assert path is not None
        assert json.loads(path.read_text())["dashboard"] == mesh.dashboard_link
        # at once, before anything asked for the inventory (the sidebar and the
        # kernel's registration read it right after the start)
        first = mesh.dashboard_link
        inv = mesh.inventory()
        assert first == inv.dashboard
        assert inv.dashboard is not None
        assert inv.dashboard.startswith("http://[::1]:") and inv.dashboard.endswith("/status")
        assert mesh.dashboard_link == inv.dashboard
        # on a hub, through the server's proxy
        monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ada/")
        port = inv.dashboard.split("]:")[1].split("/")[0]
        assert mesh.dashboard_link == f"/user/ada/proxy/{port}/status"
