"""Thin, authenticated Tornado handlers over :class:`~.manager.MeshManager`.

Routes, all under ``{base_url}jupyter-mesh/api/``:

=========================  ===========================================================
``GET health``             the extension answers, and its version
``GET meshes``             summaries of every mesh (sidebar, connected, kernels), and
                           ``server``: this server run's id (new after a restart)
``POST meshes``            start a local mesh; body: ``{"cpu": 1, "gpu": "auto", ...}``
``POST meshes/connect``    connect to a scheduler; body: ``{"address": "tcp://..."}``
``GET meshes/{id}``        one mesh: devices by kind and site, history, plans
``PATCH meshes/{id}``      scale a mesh this server started; body: ``{"cpu": 2}``
``DELETE meshes/{id}``     stop (or disconnect from) a mesh this server holds
=========================  ===========================================================

and ``GET {base_url}jupyter-mesh/static/bokeh-{version}.min.js``: the BokehJS of the
installed Bokeh, for a plan or report picture whose page lacks it (see
:mod:`jupyter_mesh.viz`).
"""

from __future__ import annotations

import json
from typing import Any

import tornado.web
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.utils import ensure_async, url_path_join

from .._version import __version__
from ..errors import said_json
from .manager import ManagerError, MeshManager

API = "jupyter-mesh/api"
STATIC = "jupyter-mesh/static"
MANAGER_KEY = "jupyter_mesh_manager"
#: any id: those the server makes are ASCII, and any other gets the JSON 404 of a mesh
#: that is not there (Jupyter's HTML page for an unknown path, otherwise)
_ID = r"(?P<mesh_id>[^/]+)"
#: what jupyter_server's Authorizer is asked about: reading the meshes (GET), or
#: changing them (POST, PATCH, DELETE: "write"), so a policy can make a user read-only
AUTH_RESOURCE = "jupyter_mesh"


class MeshAPIHandler(APIHandler):
    """Base: JSON in and out, manager errors mapped to their HTTP status."""

    auth_resource = AUTH_RESOURCE

    @property
    def manager(self) -> MeshManager:
        return self.settings[MANAGER_KEY]

    def json_body(self, like: str = '{"cpu": 1}') -> Any:
        """The request's JSON body; ``like``: an example of what this endpoint takes."""
        raw = self.request.body
        if not raw or not raw.strip():
            return None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise tornado.web.HTTPError(
                400, f"the body is not valid JSON ({exc}): send a JSON object, like "
                     f"{like}") from None
        except RecursionError:
            raise tornado.web.HTTPError(400, f"the body is not valid JSON here: nested too "
                                             f"deeply; send a JSON object, like {like}"
                                        ) from None

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # tornado keeps a message given without arguments with each "%" doubled (for its
        # log, written by now), and Jupyter's APIHandler sends it as it is: "%%mesh
        # connect" for "%mesh connect"
        exc = (kwargs.get("exc_info") or (None, None, None))[1]
        if not (isinstance(exc, tornado.web.HTTPError) and exc.log_message):
            super().write_error(status_code, **kwargs)
            return
        try:
            message = exc.log_message % exc.args
        except (TypeError, ValueError):
            message = exc.log_message
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"message": message, "reason": exc.reason}))

    # a method a route does not take: after the sign-in check, as every request here,
    # a JSON 405 that says which it takes (and Allow, as HTTP asks)
    @tornado.web.authenticated
    @authorized
    def _not_allowed(self, *args: Any, **kwargs: Any) -> None:
        allowed = [m for m in ("GET", "POST", "PATCH", "DELETE")
                   if getattr(type(self), m.lower()) is not getattr(MeshAPIHandler, m.lower())]
        self.set_header("Allow", ", ".join(allowed))
        raise tornado.web.HTTPError(
            405, f"{self.request.path} takes {' or '.join(allowed)}, not "
                 f"{self.request.method}")

    get = post = patch = delete = put = head = _not_allowed

    async def run(self, coro: Any, status: int = 200) -> None:
        try:
            result = await coro
        except ManagerError as exc:
            raise tornado.web.HTTPError(exc.status, str(exc)) from None
        except tornado.web.HTTPError:
            raise
        except Exception as exc:  # never a bare "Unhandled error": one line, and the log
            self.log.exception("jupyter_mesh: %s %s failed", self.request.method,
                               self.request.path)
            first = (str(exc).strip().splitlines() or [""])[0]
            raise tornado.web.HTTPError(
                500, f"{type(exc).__name__}: {first}; see the server's log") from None
        self.set_status(status)
        self.finish(json.dumps(result))


class BokehJSHandler(JupyterHandler):
    """The installed BokehJS, to signed-in users only (like every route here)."""

    auth_resource = AUTH_RESOURCE

    @tornado.web.authenticated
    @authorized
    def get(self, version: str) -> None:
        import bokeh

        from ..viz import bokehjs_source

        if version != bokeh.__version__:
            # the URL names the version a browser may keep it under: another one is not
            # here (a page from before an upgrade asks again, for the one it names)
            # (said in the body: Jupyter's error page would say only "Not Found")
            self.set_status(404)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(f"this server has BokehJS {bokeh.__version__}, not {version}: run "
                        f"the cell that made the picture again")
            return
        self.set_header("Content-Type", "application/javascript; charset=utf-8")
        # the URL names the Bokeh version, so a browser may keep it
        self.set_header("Cache-Control", "private, max-age=86400")
        self.finish(bokehjs_source())


class HealthHandler(MeshAPIHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.finish(json.dumps({"status": "ok", "version": __version__}))


class MeshesHandler(MeshAPIHandler):
    @tornado.web.authenticated
    @authorized
    async def get(self) -> None:
        await self.run(self._list())

    async def _list(self) -> dict[str, Any]:
        return {"meshes": await self.manager.list(), "server": self.manager.instance}

    @tornado.web.authenticated
    @authorized
    async def post(self) -> None:
        await self.run(self.manager.start(self.json_body()), status=201)


class ConnectHandler(MeshAPIHandler):
    @tornado.web.authenticated
    @authorized
    async def post(self) -> None:
        # a scheduler this server connects to sends it data that Dask unpickles in the
        # server's process: as much as running code there, so it takes the permission
        # to execute kernels too (for a policy that grants jupyter_mesh but not kernels)
        allowed = await ensure_async(
            self.authorizer.is_authorized(self, self.current_user, "execute", "kernels"))
        if not allowed:
            raise tornado.web.HTTPError(
                403, "connecting the server to a scheduler needs the permission to execute "
                     "kernels: connect from a notebook with %mesh connect ADDRESS")
        await self.run(self.manager.connect(self.json_body('{"address": "tcp://host:8786"}')))


class MeshHandler(MeshAPIHandler):
    @tornado.web.authenticated
    @authorized
    async def get(self, mesh_id: str) -> None:
        await self.run(self.manager.get(mesh_id))

    @tornado.web.authenticated
    @authorized
    async def patch(self, mesh_id: str) -> None:
        await self.run(self.manager.scale(mesh_id, self.json_body('{"cpu": 2}')))

    @tornado.web.authenticated
    @authorized
    async def delete(self, mesh_id: str) -> None:
        force = self.get_query_argument("force", "false")
        if force not in ("true", "false"):
            raise tornado.web.HTTPError(400, f"force must be true or false, not {said_json(force)}")
        await self.run(self.manager.stop(mesh_id, force=force == "true"))


class UnknownHandler(MeshAPIHandler):
    """Any other path under the API: a JSON 404 (Jupyter's HTML page, otherwise), to
    signed-in users only, as every route here."""

    def _unknown(self, *args: Any) -> None:
        raise tornado.web.HTTPError(
            404, f"no such endpoint: {self.request.method} {self.request.path} (the API "
                 f"has health, meshes, meshes/connect and meshes/ID)")

    @tornado.web.authenticated
    @authorized  # (it asks about the request's own method)
    def get(self, *args: Any) -> None:
        self._unknown()

    post = patch = delete = put = head = get


def api_root(web_app: Any) -> str:
    """Where the API is served: ``{base_url}jupyter-mesh/api/``."""
    return url_path_join(web_app.settings.get("base_url", "/"), API) + "/"


def setup_handlers(web_app: Any, manager: MeshManager) -> None:
    """Add the routes to a Jupyter server's Tornado application."""
    web_app.settings[MANAGER_KEY] = manager
    base = api_root(web_app)
    web_app.add_handlers(
        ".*$",
        [
            (url_path_join(base, "health"), HealthHandler),
            (url_path_join(base, "meshes"), MeshesHandler),
            (url_path_join(base, "meshes", "connect"), ConnectHandler),
            (url_path_join(base, "meshes", _ID), MeshHandler),
            (url_path_join(base, r".*"), UnknownHandler),  # last: what nothing else took
            (url_path_join(web_app.settings["base_url"], STATIC, r"bokeh-([0-9A-Za-z.+\-]+)\.min\.js"),
             BokehJSHandler),
        ],
    )
