"""The worker side of remote cells: per-notebook namespaces and three comm handlers.

The client talks to the worker directly (``client.rpc`` connection pool, no scheduler,
no task graph): one request runs a cell, and the worker answers on the same comm with a
stream of ``out`` messages while the cell runs, then one ``done`` message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import threading
import time
from typing import Any

from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.utils import offload

from . import _streams
from ._runner import (
    CellRun,
    Deferred,
    error_reason,
    forget_loop,
    remote_clear_output,
    remote_display,
    remote_input,
    remote_update_display,
    route_getpass,
    route_ipython_display,
)
from ._shell import SHELL_NAME, RemoteShell

EXTENSION_NAME = "jupyter-mesh-remote"
RUN = "jupyter_mesh_remote_run"
INTERRUPT = "jupyter_mesh_remote_interrupt"
#: how many stopped runs a worker remembers (see RemoteCellsPlugin.cancelled)
CANCELLED_KEPT = 256
RESET = "jupyter_mesh_remote_reset"
ORPHANS = "jupyter-mesh-remote-orphans"
#: seconds between two looks for namespaces whose notebook is gone (a kernel that died
#: or was killed never says so): a namespace whose client has been missing from the
#: scheduler at two looks in a row is dropped (one look may fall in a reconnect)
ORPHAN_CHECK = 30.0


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class CellSink:
    """Collects a running cell's output (from its thread) for the event loop to send.

    Consecutive writes to one stream are merged, and the loop is woken once per batch,
    so a tight ``print`` loop costs few messages.
    """

    #: longest a ``flush()`` waits for its output to be sent
    FLUSH_WAIT = 2.0

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._sent_cond = threading.Condition(self._lock)
        self._items: list[list[Any]] = []
        self._woken = False
        #: items added, and items handed to the comm (or dropped: nobody listens)
        self._added = 0
        self._sent = 0
        self._closed = False
        self.wake = asyncio.Event()

    def write(self, name: str, text: str) -> None:
        with self._lock:
            self._added += 1
            items = self._items
            if items and items[-1][0] == "stream" and items[-1][1] == name:
                items[-1][2] += text
            else:
                items.append(["stream", name, text, time.time()])
            self._kick()

    def display(self, data: dict[str, Any], metadata: dict[str, Any],
                display_id: str | None = None, update: bool = False) -> None:
        with self._lock:
            self._added += 1
            if display_id is None:
                self._items.append(["display", data, metadata, time.time()])
            else:
                self._items.append(["display-id", data, metadata, display_id, update,
                                    time.time()])
            self._kick()

    def clear(self, wait: bool) -> None:
        with self._lock:
            self._added += 1
            self._items.append(["clear", wait, time.time()])
            self._kick()

    def _kick(self) -> None:
        if not self._woken:
            self._woken = True
            self._loop.call_soon_threadsafe(self.wake.set)

    def take(self) -> tuple[list[list[Any]], int]:
        """The items to send, and the count to pass to :meth:`sent` once they are."""
        with self._lock:
            items, self._items = self._items, []
            self._woken = False
            self.wake.clear()
            return items, self._added

    def sent(self, upto: int) -> None:
        with self._lock:
            self._sent = max(self._sent, upto)
            self._sent_cond.notify_all()

    def close(self) -> None:
        """Nothing more will be sent: no flush waits any longer."""
        with self._lock:
            self._closed = True
            self._sent_cond.notify_all()

    def flush(self) -> None:
        """Wait (``FLUSH_WAIT`` s at most) until what was written is sent, as a
        kernel's ``flush()`` does: output flushed just before the worker process
        dies (``os._exit``, a crash) still reaches the notebook."""
        if _in_loop(self._loop):
            return  # the loop sends it: waiting here would stop it
        deadline = time.monotonic() + self.FLUSH_WAIT
        with self._lock:
            target = self._added
            if self._sent >= target or self._closed:
                return
            self._kick()
            while self._sent < target and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._sent_cond.wait(left)

    def kick(self) -> None:
        """Wake the pump from the loop itself (to end it)."""
        with self._lock:
            self._kick()


class Session:
    """One notebook's namespace on this worker."""

    def __init__(self, session_id: str) -> None:
        self.id = session_id
        self.namespace: dict[str, Any] = {
            "__name__": "__main__",
            "__builtins__": __builtins__,
            "display": remote_display,
            "update_display": remote_update_display,
            "clear_output": remote_clear_output,
            "input": remote_input,
        }
        shell = RemoteShell(self.namespace)
        self.namespace["get_ipython"] = self.namespace[SHELL_NAME] = lambda: shell
        self.running: CellRun | None = None
        #: the run id of the last cell that began here (see RemoteCellsPlugin.interrupt)
        self.last_run: str | None = None
        self.cells = 0
        #: the Dask client of the notebook (None: it did not say)
        self.client: str | None = None
        #: looks at the scheduler's clients in a row that missed this one
        self.missed = 0


#: bytes of a pushed value past which it is rebuilt in Dask's offload thread (Dask's
#: own threshold for messages, distributed.comm.offload)
OFFLOAD = 10 * 2**20


class RemoteCellsPlugin(WorkerPlugin):
    """Give a worker remote-cell namespaces; installed by the client on first use."""

    name = EXTENSION_NAME
    idempotent = True

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.worker: Any = None
        #: the scheduler cannot say which clients it has (no jupyter_mesh there): the
        #: orphan check asks no more (each ask logged a traceback there)
        self.clients_unknown = False
        #: runs stopped before their cell began (their message, a large push, still on
        #: its way or being rebuilt): they never start (the latest CANCELLED_KEPT)
        self.cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()

    def setup(self, worker: Any) -> None:
        self.worker = worker
        worker.extensions[EXTENSION_NAME] = self
        worker.handlers[RUN] = self.run
        worker.handlers[INTERRUPT] = self.interrupt
        worker.handlers[RESET] = self.reset
        _streams.install()
        route_ipython_display()
        route_getpass()
        from tornado.ioloop import PeriodicCallback

        check = PeriodicCallback(self.drop_orphans, ORPHAN_CHECK * 1000)
        worker.periodic_callbacks[ORPHANS] = check
        check.start()

    def teardown(self, worker: Any) -> None:
        check = worker.periodic_callbacks.pop(ORPHANS, None)
        if check is not None:
            check.stop()
        for session in self.sessions.values():
            if session.running is not None:
                session.running.stop("worker-closing")
            forget_loop(session.namespace)
        self.sessions.clear()
        for op in (RUN, INTERRUPT, RESET):
            worker.handlers.pop(op, None)
        worker.extensions.pop(EXTENSION_NAME, None)
        _streams.uninstall()

    # ------------------------------------------------------------ handlers
    async def run(self, comm: Any, session: str, code: str, filename: str,
                  push: dict[str, Any] | None = None, pull: list[str] | None = None,
                  want_value: bool = False, show_value: bool = True,
                  timeout: float | None = None, client: str | None = None,
                  run_id: str | None = None) -> Any:
        """Run a cell; answer with ``out`` messages, then one ``done`` message."""
        received = time.time()
        # that the cell arrived (an "out" of nothing, as any client reads it), before
        # its pushed values are rebuilt: a connection that breaks before this says the
        # cell never reached the worker (one that died a moment before the cell was
        # sent, or as its message came), one that breaks after, that it died with it
        with contextlib.suppress(Exception):
            await comm.write({"t": "out", "items": []})
        state = self.sessions.get(session)
        fresh = state is None
        if state is None:
            state = self.sessions[session] = Session(session)
        if client is not None:
            state.client, state.missed = client, 0
        if state.running is not None and not state.running.done:
            await comm.write({"t": "done", "status": "busy", "fresh": fresh,
                              "since": state.running.started})
            return Status.dont_reply
        if push:
            values = {}
            for name, value in push.items():
                try:  # (what the comm handed over unbuilt: see _runner.defer)
                    if isinstance(value, Deferred):
                        # a large one off the event loop, as Dask's comm rebuilds one
                        value = (await offload(value.load) if value.nbytes() > OFFLOAD
                                 else value.load())
                    values[name] = value
                except Exception as exc:  # a class of a module this worker lacks
                    await comm.write({"t": "done", "status": "unreadable-push", "name": name,
                                      "reason": error_reason(exc), "fresh": fresh})
                    return Status.dont_reply
        if run_id is not None and run_id in self.cancelled:
            del self.cancelled[run_id]
            # stopped while its message came (the notebook stopped waiting then): the
            # cell never starts, and nothing of it is set here
            with contextlib.suppress(Exception):
                await comm.write({"t": "done", "status": "interrupted", "fresh": fresh})
            return Status.dont_reply
        if push:
            state.namespace.update(values)
        state.last_run = run_id
        state.cells += 1
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[dict[str, Any]] = loop.create_future()

        def on_done(outcome: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(_set_result, finished, outcome)

        sink = CellSink(loop)
        cell = CellRun(code, filename, state.namespace, sink, on_done, pull=pull or (),
                       want_value=want_value, show_value=show_value,
                       context=self._context())
        state.running = cell
        pump = asyncio.ensure_future(self._pump(comm, sink, cell, finished))
        timer = loop.call_later(timeout, cell.stop, "timeout") if timeout else None
        cell.start()
        try:
            outcome = await asyncio.shield(finished)
        finally:
            if timer is not None:
                timer.cancel()
        sink.kick()
        await pump
        outcome.update(t="done", fresh=fresh, received=received, replied=time.time())
        if state.running is cell:
            state.running = None
        await comm.write(outcome)
        return Status.dont_reply

    async def drop_orphans(self) -> list[str]:
        """Drop the namespaces of notebooks whose Dask client has been gone from the
        scheduler at two looks in a row (see ORPHAN_CHECK); the ids dropped. A
        scheduler without jupyter_mesh cannot say: nothing is dropped."""
        from .._scheduler_plugin import CLIENTS_HANDLER

        owned = [s for s in self.sessions.values() if s.client is not None]
        if not owned or self.worker is None or self.clients_unknown:
            return []
        try:
            answer = await getattr(self.worker.scheduler, CLIENTS_HANDLER)()
        except Exception:
            return []
        if not isinstance(answer, (list, tuple)):  # one without the handler says None
            self.clients_unknown = True
            return []
        alive = set(answer)
        dropped = []
        for state in owned:
            if state.client in alive:
                state.missed = 0
                continue
            state.missed += 1
            if state.missed >= 2 and self.sessions.get(state.id) is state:
                if state.running is not None and not state.running.done:
                    state.running.stop("client-gone")
                forget_loop(state.namespace)
                del self.sessions[state.id]
                dropped.append(state.id)
        return dropped

    def _context(self) -> contextvars.Context:
        """A context in which ``distributed.get_worker()`` (and so ``get_client()``)
        answer this worker, as they do inside a task."""
        ctx = contextvars.copy_context()
        try:
            from distributed.worker import _worker_cvar
        except ImportError:  # a Dask without it: get_worker() stays unavailable
            return ctx
        ctx.run(_worker_cvar.set, self.worker)
        return ctx

    async def _pump(self, comm: Any, sink: CellSink, cell: CellRun,
                    finished: asyncio.Future) -> None:
        client_gone = False
        while True:
            await sink.wake.wait()
            items, upto = sink.take()
            if items and not client_gone:
                try:
                    await comm.write({"t": "out", "items": items})
                except Exception:
                    # nobody is listening any more (kernel gone): stop the cell
                    client_gone = True
                    cell.stop("client-gone")
                    sink.close()
            sink.sent(upto)
            if finished.done() and not sink._items:
                sink.close()
                return

    def interrupt(self, session: str, reason: str = "interrupted",
                  run: str | None = None) -> dict[str, Any]:
        """Stop the running cell of a session; say whether one was running. With no
        cell running, the run ``run`` (its message still on its way) never starts."""
        state = self.sessions.get(session)
        cell = state.running if state is not None else None
        began = state is not None and run is not None and state.last_run == run
        if run is not None and not began:
            # (whatever runs now, an older cell of this notebook given up on, is not
            # this run: this one must not begin once it comes)
            self.cancelled[run] = None
            while len(self.cancelled) > CANCELLED_KEPT:
                self.cancelled.popitem(last=False)
        if cell is None or cell.done:
            # began: it ran to its end, and what it sends back is on its way
            return {"running": False, "stopped": False, "began": began}
        stopped = cell.stop(reason)
        if run is not None and not began:
            # the cell that runs is an older one (stopped too): this one never begins
            return {"running": False, "stopped": stopped, "began": False}
        return {"running": True, "stopped": stopped}

    def reset(self, session: str) -> dict[str, Any]:
        """Forget a session's namespace, stopping its running cell."""
        state = self.sessions.pop(session, None)
        if state is None:
            return {"existed": False, "names": 0}
        if state.running is not None and not state.running.done:
            state.running.stop("reset")
        forget_loop(state.namespace)  # and the tasks its cells left running
        names = sum(1 for k in state.namespace if not k.startswith("__"))
        return {"existed": True, "names": names}


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)
