"""Every route of the sidebar's REST API through a real Jupyter server (jp_fetch)."""

from __future__ import annotations

import json

import pytest

# pytest-jupyter's fixtures for this module only: registering it as a plugin would
# install its global hooks (which run every test function) for the whole suite.
from pytest_jupyter.jupyter_server import *  # noqa: F403
from tornado.httpclient import HTTPClientError

from jupyter_mesh import __version__
from jupyter_mesh.server.handlers import MANAGER_KEY

ROUTES = [
    ("GET", ("health",), None),
    ("GET", ("meshes",), None),
    ("POST", ("meshes",), {"cpu": 1}),
    ("POST", ("meshes", "connect"), {"address": "tcp://127.0.0.1:9"}),
    ("GET", ("meshes", "local-1234"), None),
    ("PATCH", ("meshes", "local-1234"), {"cpu": 2}),
    ("DELETE", ("meshes", "local-1234"), None),
    ("GET", ("meshes", "local-1234", "else"), None),  # a path no route has
]


@pytest.fixture
def jp_server_config():
    # jupyter-server-proxy is a dependency: installing jupyter_mesh enables both
    return {"ServerApp": {"jpserver_extensions": {"jupyter_mesh": True,
                                                  "jupyter_server_proxy": True}}}


@pytest.fixture
def api(jp_fetch, jp_serverapp, jp_asyncio_loop):
    """Call the API on the server's loop; returns (status, parsed JSON body)."""

    async def acall(method, *parts, body=None, raw=None, headers=None, params=None):
        kwargs = {"method": method}
        if params is not None:
            kwargs["params"] = params
        if raw is not None:
            kwargs["body"] = raw
        elif body is not None:
            kwargs["body"] = json.dumps(body)
        elif method in ("POST", "PATCH"):
            kwargs["body"] = ""
        try:
            response = await jp_fetch("jupyter-mesh", "api", *parts, headers=headers, **kwargs)
        except HTTPClientError as err:
            payload = err.response.body if err.response is not None else b""
            return err.code, (json.loads(payload) if payload else None)
        return response.code, json.loads(response.body)

    def call(*args, **kwargs):
        return jp_asyncio_loop.run_until_complete(acall(*args, **kwargs))

    yield call
    # meshes a test started die with its server
    jp_serverapp.web_app.settings[MANAGER_KEY].close_sync()


@pytest.mark.parametrize("method, parts, body", ROUTES)
def test_every_route_refuses_unauthenticated_requests(api, method, parts, body):
    code, _ = api(method, *parts, body=body, headers={"Authorization": ""})
    assert code == 403
    # and the refused request changed nothing
    assert listed(api) == []


def test_bokehjs_is_served_to_signed_in_users_only(jp_fetch, jp_asyncio_loop):
    # plan pictures whose page lacks BokehJS load it from here (jupyter_mesh.viz)
    import bokeh

    async def get(headers=None, version=bokeh.__version__):
        try:
            r = await jp_fetch("jupyter-mesh", "static", f"bokeh-{version}.min.js",
                               headers=headers, follow_redirects=False)
        except HTTPClientError as err:
            return err.code, err.response.body if err.response else b"", None
        return r.code, r.body, r.headers.get("Content-Type")

    code, body, ctype = jp_asyncio_loop.run_until_complete(get())
    assert code == 200 and ctype.startswith("application/javascript")
    assert len(body) > 500_000 and b"Bokeh" in body
    code, _, _ = jp_asyncio_loop.run_until_complete(get({"Authorization": ""}))
    assert code in (302, 403)
    # another version is not here (a browser keeps what a URL names for a day)
    code, body, _ = jp_asyncio_loop.run_until_complete(get(version="9.9.9"))
    assert code == 404
    assert body.decode() == (f"this server has BokehJS {bokeh.__version__}, not 9.9.9: run "
                             f"the cell that made the picture again")


def test_health(api):
    assert api("GET", "health") == (200, {"status": "ok", "version": __version__})


def listed(api):
    """The meshes GET meshes lists (its reply checked for its keys)."""
    code, body = api("GET", "meshes")
    assert code == 200 and set(body) == {"meshes", "server"}, (code, body)
    return body["meshes"]


def test_no_meshes(api):
    assert listed(api) == []


def test_the_list_names_this_server_run(api, jp_serverapp):
    # the sidebar tells a restarted server (whose meshes stopped with the old one)
    # from a mesh stopped elsewhere by this id: the same for the life of the server
    first, again = api("GET", "meshes")[1]["server"], api("GET", "meshes")[1]["server"]
    assert isinstance(first, str) and len(first) >= 8 and first == again
    # and another for the next run (a new manager)
    from jupyter_mesh.server.manager import MeshManager

    assert MeshManager().instance != first


@pytest.mark.parametrize(
    "method, parts",
    [
        ("GET", ("meshes", "local-nope")),
        ("PATCH", ("meshes", "local-nope")),
        ("DELETE", ("meshes", "local-nope")),
    ],
)
def test_unknown_mesh_is_404(api, method, parts):
    code, body = api(method, *parts, body={"cpu": 1} if method == "PATCH" else None)
    assert code == 404
    assert "no mesh with id 'local-nope'" in body["message"]


@pytest.mark.parametrize("method, parts", [
    ("GET", ("meshes", "local-1", "workers")),
    ("POST", ("nonsense",)),
    ("DELETE", ("meshes", "a", "b", "c")),
])
def test_any_other_path_is_a_json_404(api, method, parts):
    code, body = api(method, *parts)
    assert code == 404
    # (the test server has a base URL of its own)
    assert body["message"].startswith(f"no such endpoint: {method} /")
    assert body["message"].endswith(f"/jupyter-mesh/api/{'/'.join(parts)} (the API has "
                                    f"health, meshes, meshes/connect and meshes/ID)")


WRONG_METHODS = [
    ("PUT", ("meshes",), "GET or POST"),
    ("DELETE", ("meshes",), "GET or POST"),
    ("GET", ("meshes", "connect"), "POST"),
    ("PUT", ("meshes", "local-1234"), "GET or PATCH or DELETE"),
    ("POST", ("health",), "GET"),
    ("HEAD", ("meshes",), "GET or POST"),
]


@pytest.mark.parametrize("method, parts, allowed", WRONG_METHODS)
def test_a_method_a_route_does_not_take_is_a_405_that_says_which(api, method, parts, allowed):
    code, body = api(method, *parts, body={} if method in ("PUT", "POST") else None)
    assert code == 405
    if method != "HEAD":  # (a reply to HEAD has no body)
        assert body["message"].endswith(
            f"/jupyter-mesh/api/{'/'.join(parts)} takes {allowed}, not {method}")
    # and only to a signed-in user: no route tells a stranger what it takes
    code, _ = api(method, *parts, body={} if method in ("PUT", "POST") else None,
                  headers={"Authorization": ""})
    assert code == 403


@pytest.mark.parametrize("mesh_id", ["mesh-\u00e9t\u00e9", "a b", "x'y", "<b>"])
def test_an_unknown_id_of_any_characters_is_a_json_404(api, mesh_id):
    # ids the server makes are plain ASCII; any other is no mesh's, and the sidebar
    # gets JSON that says so (not Jupyter's HTML page for a path it has no route for)
    code, body = api("GET", "meshes", mesh_id)  # (the client quotes the path)
    assert code == 404
    assert body["message"].startswith(f"no mesh with id {mesh_id!r}: ")


@pytest.mark.parametrize(
    "method, parts, raw, message",
    [
        ("POST", ("meshes",), "{cpu: 1", "not valid JSON"),
        ("POST", ("meshes",), '{"cpu": -1}', "cpu must be a whole number from 0 to"),
        ("POST", ("meshes",), '{"gpu": "lots"}', "gpu must be"),
        ("POST", ("meshes",), '{"nodes": 4}', "unknown option(s) nodes"),
        ("POST", ("meshes",), "[1, 2]", "JSON object"),
        ("POST", ("meshes", "connect"), "", "JSON object"),
        ("POST", ("meshes", "connect"), "{oops", "not valid JSON"),
        # the example is what this endpoint takes (it said {"cpu": 1})
        ("POST", ("meshes", "connect"), "{oops",
         'send a JSON object, like {"address": "tcp://host:8786"}'),
        ("POST", ("meshes", "connect"), '{"address": "no such thing"}', "malformed address"),
        ("POST", ("meshes", "connect"), '{"address": "tcp://h:1", "timeout": "x"}', "timeout"),
        ("POST", ("meshes",), '{"site": "a b"}', "site must be a name of letters, digits"),
        ("POST", ("meshes",), '{"cpu": 1, "site": "../x"}', "site must be a name"),
        ("POST", ("meshes", "connect"), '{"address": "tcp://h:1", "timeout": 0}',
         "timeout must be a number of seconds in (0, 120], not 0"),
        ("POST", ("meshes", "connect"), '{"address": "tcp://h:1", "timeout": 121}',
         "timeout must be a number of seconds in (0, 120], not 121"),
        ("POST", ("meshes", "connect"), '{"address": "tcp://h:1", "timeout": true}',
         "timeout must be a number of seconds in (0, 120], not true"),
        ("POST", ("meshes", "connect"), '{"address": "tcp://h:1", "timeout": NaN}',
         "timeout must be a number of seconds in (0, 120], not NaN"),
        # nested past Python's recursion limit: a 400, not a 500 with a traceback
        ("POST", ("meshes",), "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("POST", ("meshes", "connect"), '{"address": ' + "[" * 100_000 + "]" * 100_000 + "}",
         "nested too deeply"),
        # schemes a mesh does not connect over, and a host no resolver takes
        ("POST", ("meshes", "connect"), '{"address": "inproc://x"}', "not \"inproc\""),
        ("POST", ("meshes", "connect"), '{"address": "ucx://127.0.0.1:5"}',
         "starts with tcp:// or tls:// or ws:// or wss://, not \"ucx\""),
        ("POST", ("meshes", "connect"), '{"address": "\\ud800:9"}', "malformed address"),
    ],
)
def test_bad_input_is_400_with_a_message(api, method, parts, raw, message):
    code, body = api(method, *parts, raw=raw)
    assert code == 400
    assert message in body["message"] and "\n" not in body["message"]
    assert listed(api) == []  # nothing started


def test_a_huge_bad_request_gets_a_short_message(api):
    # the message repeated every unknown key and the whole value (megabytes)
    keys = {f"k{i}": 1 for i in range(20_000)}
    code, body = api("POST", "meshes", body=keys)
    assert code == 400 and len(body["message"]) < 300, len(body["message"])
    assert body["message"].startswith("unknown option(s) k0, k1, k10, ")
    assert " and 19992 more: use cpu, " in body["message"]
    code, body = api("POST", "meshes", body={"cpu": 1, "site": "x" * 100_000})
    assert code == 400 and len(body["message"]) < 400, len(body["message"])
    assert body["message"].endswith("... (100002 characters)")
    code, body = api("GET", "meshes", "m" * 20_000)
    assert code == 404 and len(body["message"]) < 300, len(body["message"])
    code, body = api("POST", "meshes", "connect", body={"address": "x" * 50_000})
    assert code == 400 and len(body["message"]) < 300, len(body["message"])
    # and a body that is no JSON says what to send
    code, body = api("POST", "meshes", raw="cpu=1")
    assert (code, body["message"]) == (400, 'the body is not valid JSON (Expecting value: '
                                             'line 1 column 1 (char 0)): send a JSON '
                                             'object, like {"cpu": 1}')
    assert listed(api) == []


def test_stop_takes_force_true_or_false_only(api):
    code, body = api("DELETE", "meshes", "local-1", params={"force": "yes"})
    assert (code, body["message"]) == (400, "force must be true or false, not \"yes\"")
    # (a good one reaches the mesh: here there is none)
    assert api("DELETE", "meshes", "local-1", params={"force": "true"})[0] == 404


def test_a_message_keeps_its_percent_signs(api):
    # tornado doubles "%" in a message given without arguments, and Jupyter's API
    # handler sent it so: "%%mesh connect" told users to type a cell magic
    code, body = api("POST", "meshes", "connect", body={"address": "tls://127.0.0.1:9"})
    assert code == 400 and "%mesh connect tls://127.0.0.1:9" in body["message"]
    assert "%%" not in body["message"]


def test_connect_to_nothing_says_where(api):
    code, body = api(
        "POST", "meshes", "connect", body={"address": "tcp://127.0.0.1:9", "timeout": 1}
    )
    assert code == 502
    assert "127.0.0.1:9" in body["message"]


@pytest.fixture
def scheduler_address():
    """A plain Dask cluster on its own loop thread, as any remote scheduler would be."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        protocol="tcp://",
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    ) as cluster:
        yield cluster.scheduler_address


def test_connect_and_disconnect(api, scheduler_address):
    code, mesh = api("POST", "meshes", "connect", body={"address": scheduler_address})
    assert code == 200, mesh
    assert mesh["origin"] == "connected"
    assert mesh["can_stop"] and not mesh["can_scale"]
    assert mesh["devices"] == 1
    assert mesh["groups"][0]["kind"] == "cpu"

    assert [m["id"] for m in listed(api)] == [mesh["id"]]

    code, body = api("PATCH", "meshes", mesh["id"], body={"cpu": 2})
    assert code == 409
    assert "not started by this server" in body["message"]

    code, body = api("DELETE", "meshes", mesh["id"])
    assert (code, body["disconnected"]) == (200, True)
    assert listed(api) == []


@pytest.mark.slow
def test_start_get_scale_stop(api):
    code, mesh = api("POST", "meshes", body={"cpu": 1, "gpu": 0, "tpu": 0})
    assert code == 201, mesh
    assert mesh["origin"] == "sidebar" and mesh["status"] == "running"
    assert mesh["counts"] == {"cpu": 1}
    device = mesh["groups"][0]["devices"][0]
    assert device["kind"] == "cpu" and device["memory"] > 0

    code, detail = api("GET", "meshes", mesh["id"])
    assert code == 200
    assert detail["address"] == mesh["address"]
    assert detail["history"]

    code, body = api("PATCH", "meshes", mesh["id"], raw="{bad")
    assert code == 400 and "not valid JSON" in body["message"]
    code, body = api("PATCH", "meshes", mesh["id"], body={"cpu": -1})
    assert code == 400 and "cpu must be" in body["message"]
    code, body = api("PATCH", "meshes", mesh["id"], body={"gpu": 1})
    assert code == 400 and "no CUDA GPU" in body["message"]

    code, scaled = api("PATCH", "meshes", mesh["id"], body={"cpu": 2})
    assert code == 200, scaled
    assert scaled["counts"] == {"cpu": 2}

    code, body = api("DELETE", "meshes", mesh["id"])
    assert (code, body) == (200, {"id": mesh["id"], "stopped": True, "disconnected": False})
    code, body = api("GET", "meshes", mesh["id"])
    assert code == 404


def test_a_loopback_dashboard_is_linked_through_the_servers_proxy(
        api, scheduler_address, jp_fetch, jp_serverapp, jp_asyncio_loop, jp_base_url):
    # on a shared hub the browser reaches the Jupyter server only: the sidebar's
    # dashboard link is the server's authenticated proxy path, and it serves the page
    from urllib.parse import urlsplit

    from distributed import Client

    with Client(scheduler_address) as c:
        port = urlsplit(c.dashboard_link).port
    code, mesh = api("POST", "meshes", "connect", body={"address": scheduler_address})
    assert code == 200, mesh
    assert mesh["dashboard"] == f"{jp_base_url}proxy/{port}/status"

    async def get(headers=None):
        try:
            r = await jp_fetch("proxy", str(port), "status", headers=headers,
                               follow_redirects=False)
        except HTTPClientError as err:
            return err.code, b""
        return r.code, r.body

    code, page = jp_asyncio_loop.run_until_complete(get())
    assert code == 200 and b"Dask" in page
    # without Jupyter's token: refused (a redirect to the login page or 403)
    code, _ = jp_asyncio_loop.run_until_complete(get({"Authorization": ""}))
    assert code in (302, 403)


def test_an_unexpected_failure_is_one_line_not_unhandled(api, jp_serverapp, monkeypatch):
    manager = jp_serverapp.web_app.settings[MANAGER_KEY]

    async def broken(body):
        raise ValueError("something Dask did not expect\nand a second line")

    monkeypatch.setattr(manager, "start", broken)
    status, body = api("POST", "meshes", body={"cpu": 1})
    assert status == 500
    assert body["message"] == ("ValueError: something Dask did not expect; see the "
                               "server's log")
    assert listed(api) == []  # the server goes on


@pytest.mark.parametrize("method, parts, body", ROUTES)
def test_every_route_asks_the_authorizer(api, jp_serverapp, monkeypatch, method, parts, body):
    # a policy (jupyter_server's Authorizer) may make users read-only: reading the
    # meshes is "read" on resource jupyter_mesh, starting, scaling and stopping "write"
    asked = []

    def read_only(handler, user, action, resource):
        asked.append((action, resource))
        return action == "read"

    monkeypatch.setattr(jp_serverapp.web_app.settings["authorizer"], "is_authorized", read_only)
    code, _ = api(method, *parts, body=body)
    action = "read" if method == "GET" else "write"
    assert asked == [(action, "jupyter_mesh")]
    if action == "write":
        assert code == 403
    else:
        assert code != 403


def test_connecting_the_server_takes_the_permission_to_execute_kernels(
        api, jp_serverapp, monkeypatch):
    def mesh_but_no_kernels(handler, user, action, resource):
        return resource == "jupyter_mesh"

    monkeypatch.setattr(jp_serverapp.web_app.settings["authorizer"], "is_authorized",
                        mesh_but_no_kernels)
    code, body = api("POST", "meshes", "connect", body={"address": "tcp://127.0.0.1:1"})
    assert code == 403 and "permission to execute kernels" in body["message"]


def test_a_refused_request_is_logged_once(api, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        code, _ = api("DELETE", "meshes", "local-1", params={"force": "yes"})
    assert code == 400
    said = [r for r in caplog.records
            if "force must be true or false, not \"yes\"" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]


def test_the_servers_log_names_the_api_under_its_base_url(tmp_path, caplog, monkeypatch):
    # under JupyterHub the server has a base_url (/user/NAME/): the log said
    # /jupyter-mesh/api/, where Jupyter answers 404
    import logging
    from types import SimpleNamespace

    from tornado.web import Application

    from jupyter_mesh.server import AUTOSTART_ENV, _load_jupyter_server_extension

    monkeypatch.delenv(AUTOSTART_ENV, raising=False)
    app = SimpleNamespace(runtime_dir=str(tmp_path), jpserver_extensions={},
                          web_app=Application(base_url="/user/alice/"),
                          log=logging.getLogger("test-jupyter-mesh-load"))
    with caplog.at_level(logging.INFO, logger="test-jupyter-mesh-load"):
        _load_jupyter_server_extension(app)
    assert caplog.messages == ["jupyter_mesh: Mesh sidebar API at /user/alice/jupyter-mesh/api/"]
    # and that is where it answers (a Tornado route for its health endpoint)
    from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

    from jupyter_mesh.server.handlers import HealthHandler

    found = app.web_app.find_handler(HTTPServerRequest(start_line=RequestStartLine(
        "GET", "/user/alice/jupyter-mesh/api/health", "HTTP/1.1"),
        headers=HTTPHeaders({"Host": "127.0.0.1"})))
    assert found.handler_class is HealthHandler
