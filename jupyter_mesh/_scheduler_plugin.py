"""The scheduler side of the mesh: the inventory, kept as workers join and leave."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from ._version import __version__
from .devices._worker_plugin import METADATA_KEY

EXTENSION_NAME = "jupyter-mesh"
INVENTORY_HANDLER = "jupyter_mesh_inventory"
#: the ids of the clients connected now (a worker drops the remote-cell namespaces of
#: notebooks whose kernel left without saying so)
CLIENTS_HANDLER = "jupyter_mesh_clients"
#: what the notebook's side and this plugin exchange (its handlers, their arguments and
#: answers, the task metadata of routed tasks): raised when that changes, so a notebook
#: can tell a scheduler whose jupyter_mesh speaks otherwise (2: the inventory says it;
#: 3: plans on the client's stream, the task stream with a plan's records, the
#: connected clients for remote cells)
PROTOCOL = 3


def plain_worker_record(ws: Any) -> dict[str, Any]:
    """A worker that joined without the mesh's worker plugin: a CPU of unknown profile."""
    return {
        "kind": "cpu",
        "backend": "numpy",
        "model": "unknown (plain Dask worker)",
        "memory": int(ws.memory_limit or 0),
        "site": "unknown",
        "profile": None,
        "host": ws.host,
        "nthreads": ws.nthreads,
        "managed": False,
    }


def worker_record(ws: Any) -> dict[str, Any]:
    """The device record of one worker, with its live load."""
    meta = ws.extra.get(METADATA_KEY)
    record = dict(meta) if meta else plain_worker_record(ws)
    record.setdefault("managed", True)
    record.update(
        worker=ws.address,
        name=str(ws.name),
        nthreads=ws.nthreads,
        tasks=len(ws.processing),
        memory_used=int(ws.memory.process) if ws.memory is not None else 0,
        cpu_percent=float(ws.metrics.get("cpu", 0.0)) if ws.metrics else 0.0,
        status=str(getattr(ws.status, "name", ws.status)),
        resources=dict(ws.resources),
    )
    return record


class _NoProbeWarnings(logging.Filter):
    """Drops the TLS listener's warning of a peer that closed before its handshake:
    what a port check does (``%mesh connect`` and ``jupyter-mesh worker`` look whether
    anything listens before they connect: a refused port fails at once), which warned
    of a failed handshake at every connect and join that then succeeded."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("TLS handshake failed" in text and "EOF" in text)


class MeshSchedulerPlugin(SchedulerPlugin):
    """Keeps the mesh's inventory and answers ``jupyter_mesh_inventory`` in one call.

    It also records the join and leave events of devices, which the router's fallback
    and the sidebar use to notice that a device kind is gone.
    """

    name = EXTENSION_NAME
    idempotent = True

    def __init__(self) -> None:
        self.scheduler: Any = None
        self.devices: dict[str, dict[str, Any]] = {}
        self.events: deque[tuple[float, str, str, str]] = deque(maxlen=1000)
        from .router._scheduler import RouterState

        self.router = RouterState()

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        scheduler.extensions[EXTENSION_NAME] = self
        scheduler.handlers[INVENTORY_HANDLER] = self.inventory
        scheduler.handlers[CLIENTS_HANDLER] = self.clients
        self.router.start(scheduler)
        for ws in scheduler.workers.values():
            self.devices[ws.address] = worker_record(ws)
        log = logging.getLogger("distributed.comm.tcp")  # (TLS listeners' only)
        if not any(isinstance(f, _NoProbeWarnings) for f in log.filters):
            log.addFilter(_NoProbeWarnings())

    def clients(self, comm: Any = None) -> list[str]:
        return [str(c) for c in self.scheduler.clients]

    def add_worker(self, scheduler: Any, worker: str) -> None:
        ws = scheduler.workers.get(worker)
        if ws is None:
            return
        record = worker_record(ws)
        self.devices[worker] = record
        self.events.append((time.time(), "join", worker, record["kind"]))
        self.router.workers_changed()

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        record = self.devices.pop(worker, None)
        kind = record["kind"] if record else "?"
        self.events.append((time.time(), "leave", worker, kind))
        self.router.workers_changed()

    # ---------------------------------------------------------------- router
    def update_graph(self, scheduler: Any, *, tasks: Any = (), **kwargs: Any) -> None:
        """Set the per-key restrictions of routed computations (see router._scheduler)."""
        self.router.update_graph(scheduler, tasks, client=kwargs.get("client"))

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        self.router.transition(key, finish, kwargs)

    def inventory(self, comm: Any = None) -> dict[str, Any]:
        """Every live device with its load, plus the scheduler's identity."""
        sched = self.scheduler
        devices = [worker_record(ws) for ws in sched.workers.values()]
        return {
            "address": sched.address,
            "dashboard": dashboard_url(sched),
            "devices": devices,
            "events": [list(e) for e in list(self.events)[-50:]],
            "protocol": PROTOCOL,
            "version": __version__,
        }


def dashboard_url(sched: Any) -> str | None:
    """The scheduler's dashboard as a browser on its machine opens it: the interface
    Dask's HTTP server listens on (the scheduler's own where it listens on all of them),
    an IPv6 host in brackets; None without an HTTP server."""
    try:
        server = sched.http_server
        port = server.port
    except Exception:
        return None
    host = listening_host(server) or sched.ip
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/status"


def listening_host(server: Any) -> str | None:
    """The interface Dask's HTTP server ``server`` listens on; None where it listens
    on all of them (or cannot tell)."""
    for sock in list(getattr(server, "_sockets", {}).values()):
        with contextlib.suppress(Exception):
            bound = sock.getsockname()[0]
            if bound not in ("0.0.0.0", "::"):
                return str(bound)
    return None
