"""The client side of remote cells: pick workers, send cells, stream what comes back.

The notebook's main thread waits on a queue that the client's event loop fills with the
worker's messages, so output is written (and flushed) from the thread that runs the
cell, and a kernel interrupt (``KeyboardInterrupt`` in that thread) is turned into a stop
request to the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import keyword
import logging
import math
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distributed.comm.core import CommClosedError
from distributed.protocol.serialize import Serialized, serialize

from .. import _config, progress
from ..errors import MeshError, check_flag
from ..inventory import Device
from ..targets import DEFAULT_BACKEND, Target, parse_target
from ._errors import (
    CellSyntaxError,
    RemoteCellError,
    RemoteCellLost,
    RemoteCellTimeout,
    RemoteFailure,
    RemoteInterrupt,
    StoppedWaiting,
)
from ._runner import TOP_LEVEL_AWAIT, defer, error_reason, future_in, quiet_logger
from ._shell import to_python
from ._worker_plugin import EXTENSION_NAME, INTERRUPT, RUN, RemoteCellsPlugin

if TYPE_CHECKING:
    from ..mesh import Mesh

SERIALIZERS = ("dask", "pickle")
#: why a cell asked to stop may still run: what the notebook cannot tell apart
NOT_STOPPED = ("blocked outside Python, it stops when it returns to Python; or its code "
               "caught the KeyboardInterrupt")
_NOTHING = object()


@dataclass
class CellResult:
    """What one worker sent back for one remote cell.

    Attributes
    ----------
    worker, name, kind, backend, site:
        The worker that ran the cell.
    data, metadata:
        The MIME bundle of the last expression's value (None when there was none).
    value:
        The last expression's value itself, when it was asked for (``-o``); else None.
    has_value:
        Whether ``value`` was sent: it was asked for and the cell ends with an
        expression (a cell that ends with a statement has no value, not None).
    pulled:
        The pulled names and their values.
    elapsed:
        Seconds from sending the cell to its end, as the notebook saw them.
    stream_latency:
        Seconds from each remote write to its arrival here, one per output message.
    """

    worker: str
    name: str
    kind: str
    backend: str
    site: str
    data: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    value: Any = None
    pulled: dict[str, Any] = field(default_factory=dict)
    has_value: bool = False
    elapsed: float = 0.0
    stream_latency: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name or self.worker

    def __repr__(self) -> str:
        shown = (self.data or {}).get("text/plain", "no value")
        return f"<CellResult on {self.label} ({self.kind}:{self.backend}): {shown}>"


class RemoteOutput:
    """The last expression's value as the worker rendered it, shown as ``Out[n]``."""

    def __init__(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        self.data = without_widget(data)
        self.metadata = metadata or {}

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Any:
        return self.data, self.metadata

    def __repr__(self) -> str:
        return str(self.data.get("text/plain", "<remote value>"))


# ---------------------------------------------------------------- validation
#: whether messages name a cell's options as ``%%mesh --remote``'s flags (``--on``), as
#: the magic has them, or as ``mesh.run_cell``'s keywords (``on=``), the default
MAGIC_WORDS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "jupyter_mesh_remote_magic_words", default=False)
#: the flag of each keyword where it is not ``--`` and the keyword
_FLAGS = {"value": "-o"}


@contextlib.contextmanager
def magic_words() -> Any:
    """Within: messages name options as the magic's flags (see :data:`MAGIC_WORDS`)."""
    token = MAGIC_WORDS.set(True)
    try:
        yield
    finally:
        MAGIC_WORDS.reset(token)


def opt(keyword: str, value: Any = None) -> str:
    """An option as the caller wrote it: ``--on gpu`` in the magic, ``on='gpu'`` from
    Python; without ``value`` its name alone (``--on``, ``on``)."""
    magic = MAGIC_WORDS.get()
    name = _FLAGS.get(keyword, f"--{keyword}") if magic else keyword
    if value is None:
        return name
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text = f"{value:g}"
    else:
        text = str(value) if magic else repr(str(value))
    return f"{name} {text}" if magic else f"{name}={text}"


def _wanted(target: Any, site: str | None) -> str:
    """What a cell asked for, as the caller wrote it (``--on gpu --site lab``)."""
    return " ".join(x for x in (opt("on", target) if target else "",
                                opt("site", site) if site else "") if x)


def check_names(names: Any, option: str) -> list[str]:
    """Names for push/pull: a comma-separated string or an iterable of identifiers."""
    if names is None:
        return []
    if isinstance(names, str):
        items = names.split(",")
    elif isinstance(names, (list, tuple, set, frozenset)):
        items = list(names)
    else:
        raise MeshError(f"{option}: give names as 'a,b' or a list of names, not "
                        f"{type(names).__name__}")
    out = []
    for raw in items:
        if not isinstance(raw, str):
            raise MeshError(f"{option}: names must be strings, not {type(raw).__name__}")
        name = raw.strip()
        if not name:
            raise MeshError(f"{option}: empty name in {names!r}: use a,b,c")
        check_identifier(name, option)
        if name not in out:
            out.append(name)
    return out


def check_identifier(name: Any, option: str) -> str:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise MeshError(f"{option}: {name!r} is not a valid Python name")
    if name.startswith("__") and name.endswith("__"):
        # __builtins__, __name__...: Python's own in each namespace (pulled, the
        # notebook's builtins would become the worker's dict)
        raise MeshError(f"{option}: {name!r} is one of Python's own names in a "
                        f"namespace: use a name of your own")
    return name


def check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    value = timeout
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise MeshError(f"{opt('timeout')} "
                        f"must be a positive number of seconds, not {timeout!r}")
    return float(value)


def pack(name: str, value: Any) -> Serialized:
    """Serialize a pushed value now, so a failure names the variable; the worker
    rebuilds it in the cell's handler (see ``_runner.defer``), so that one it cannot
    rebuild (a class of a module it lacks) is a line of the cell's error, not Dask's
    logs of a message it could not read."""
    where = future_in(value)
    if where is not None:  # it would arrive, unusable, without its client
        held = repr(name) if not where else f"{name}{where} (in {name!r})"
        raise MeshError(
            f"{opt('push')}: {held} is a Dask future, which works only with its client: push "
            f"its value ({name}{where}.result()) instead")
    try:
        with quiet_logger("distributed.protocol.pickle"):
            header, frames = serialize(value, serializers=SERIALIZERS, on_error="raise")
    except Exception as exc:
        reason = error_reason(exc)
        raise MeshError(
            f"{opt('push')}: cannot send {name!r} ({type(value).__module__}.{type(value).__qualname__}):"
            f" it cannot be serialized ({reason})"
        ) from None
    return defer(header, frames)


def _describe(devices: Iterable[Device]) -> str:
    counts: dict[str, int] = {}
    for d in devices:
        key = f"{d.target} @ {d.site}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} x {k}" for k, n in sorted(counts.items())) or "no workers"


class _Gone(Exception):
    """The worker could not be reached before the cell was sent."""


@dataclass
class _Run:
    """One cell on one worker, as the main thread tracks it."""

    device: Device
    message: dict[str, Any]
    sent: float = 0.0
    future: Any = None
    final: dict[str, Any] | None = None
    failure: BaseException | None = None
    latencies: list[float] = field(default_factory=list)
    #: the worker's answer to a stop (a concurrent future of its dict, or None)
    stop_reply: Any = None
    #: names this run to the worker: a stop that comes before its cell begins (a large
    #: push still on its way) keeps the cell from starting at all
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: with --all, the unfinished last line per stream, held back so that the lines of
    #: several workers never mix within one line
    partial: dict[str, str] = field(default_factory=lambda: {"stdout": "", "stderr": ""})
    #: whether the worker said it has the cell (see _worker_plugin.run), and when the
    #: connection broke (0: it did not)
    heard: bool = False
    broke_at: float = 0.0

    @property
    def label(self) -> str:
        return self.device.name or self.device.worker


#: seconds a remote cell whose worker died waits to see whether the scheduler goes too
#: (a mesh closed by its owner closes its workers first)
SCHEDULER_GRACE = 2.0

#: the largest first_line of a cell (its code is sent after as many blank lines)
MAX_FIRST_LINE = 100_000


class RemoteCells:
    """Remote cells of one notebook (one :class:`Mesh` client) on the mesh's workers.

    It holds the notebook's session id (its namespaces on the workers carry it), which
    worker each ``(target, site)`` sticks to, and on which workers namespaces exist.
    """

    #: when the scheduler was last asked whether it goes away, and what it said
    _leaving: tuple[float, bool] = (-math.inf, False)

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.session = uuid.uuid4().hex
        self.sticky: dict[tuple[str | None, str | None], Device] = {}
        #: requests that some worker matched before: if none matches now, one is
        #: probably restarting, so a cell waits for it (remote.worker-wait)
        self.seen: set[tuple[str | None, str | None]] = set()
        self.namespaces: dict[str, Device] = {}
        self.cells = 0
        self._installed = False
        #: one cell at a time, as in a kernel: cells run from several threads take turns
        #: (the worker refuses a second cell in a namespace while one runs)
        self._turn = threading.RLock()
        #: while a cell whose worker was gone waits for another: redraws its bar
        self._waiting_tick: Any = None

    @property
    def client(self) -> Any:
        return self.mesh.client

    # ------------------------------------------------------------ public
    def run(
        self,
        code: str,
        on: str | Target | None = None,
        site: str | None = None,
        all: bool = False,
        push: Mapping[str, Any] | None = None,
        pull: Any = None,
        timeout: Any = None,
        *,
        want_value: bool = False,
        filename: str | None = None,
        show_value: bool = True,
        first_line: int = 1,
    ) -> CellResult | list[CellResult]:
        self.mesh._check_open()
        # a scheduler that went away is said as %mesh says it, before anything is sent
        self.mesh._check_reachable()
        if not isinstance(code, str):
            raise MeshError(f"code must be a string, not {type(code).__name__}")
        if not isinstance(all, bool):
            raise MeshError(f"all= takes True (every matching worker) or False, not {all!r}")
        check_flag("value", want_value)
        if filename is not None and not isinstance(filename, str):
            raise MeshError(f"filename must be a string, not {type(filename).__name__}")
        self.cells += 1
        filename = filename or f"<remote cell {self.cells}>"
        # IPython syntax (!cmd, %time) becomes Python, as in a kernel cell; a cell that
        # does not compile is rejected here, before anything is sent
        if (type(first_line) is not int or not 1 <= first_line <= MAX_FIRST_LINE):
            raise MeshError(f"first_line must be a whole number from 1 to "
                            f"{MAX_FIRST_LINE} (the number of the code's first line in "
                            f"tracebacks), not {first_line!r}")
        # numbered from first_line: blank lines before it (the Python that IPython's
        # syntax became keeps its lines, so this is after it)
        # (IPython's transform drops the cell's leading blank lines: counted back)
        blank = len(code) - len(code.lstrip("\n \t\r\f"))
        blank = code[:blank].count("\n")
        code = "\n" * (first_line - 1 + blank) + to_python(code)
        try:
            compile(code, filename, "exec", flags=TOP_LEVEL_AWAIT)
        except (SyntaxError, ValueError) as exc:  # (ValueError: a NUL byte, before 3.12)
            raise CellSyntaxError(exc) from None
        target = self._target(on)
        if site is not None and not isinstance(site, str):
            raise MeshError(f"{opt('site')} must be a site name, not "
                            f"{type(site).__name__}")
        pull_names = check_names(pull, opt("pull"))
        timeout = check_timeout(timeout)
        packed: dict[str, Serialized] = {}
        if push is not None:
            if not isinstance(push, Mapping):
                raise MeshError("push must be a mapping of names to values")
            for name, value in push.items():
                packed[check_identifier(name, opt("push"))] = pack(name, value)
        devices = self._pick(target, site, all, timeout)
        self._install()
        message = {
            "op": RUN, "reply": True, "session": self.session, "client": self.client.id,
            "code": code,
            "filename": filename, "push": packed, "pull": pull_names,
            "want_value": want_value, "show_value": show_value, "timeout": timeout,
        }
        with self._turn:
            results = self._execute(devices, message, target, site, all, timeout)
        if not results:  # e.g. stopped on the worker's side: never an internal error
            raise MeshError("the cell did not finish on any worker: run it again")
        return results if all else results[0]

    def reset(self) -> dict[str, Any]:
        """Drop this notebook's namespaces on every worker that has one."""
        workers = list(self.namespaces.values())
        dropped = []
        # a worker of a scheduler that went away is most likely gone too (Dask's
        # connect retries a refused port until its timeout): not waited for long
        wait = 10 if getattr(self.client, "status", "running") == "running" else 2

        async def reset_one(dev: Device) -> None:
            try:
                reply = await asyncio.wait_for(
                    self.client.rpc(dev.worker).jupyter_mesh_remote_reset(
                        session=self.session), wait)
                if reply.get("existed"):
                    dropped.append(dev)
            except Exception:
                pass  # a worker that is gone has no namespace left to drop

        async def reset_all() -> None:
            # not those the scheduler no longer has (a worker that died): each was
            # waited for its whole wait, and %mesh reset-remote (or close) froze
            try:
                info = await asyncio.wait_for(
                    self.client.scheduler.identity(n_workers=-1), wait)
                live = set(info.get("workers", {}))
            except Exception:
                live = {d.worker for d in workers}
            await asyncio.gather(*(reset_one(d) for d in workers if d.worker in live))

        try:
            if workers and not self.mesh.closed:
                self.client.sync(reset_all)
        finally:  # (stopped half-way too: the namespaces are to be forgotten)
            self.namespaces.clear()
            self.sticky.clear()
        return {"workers": [d.name or d.worker for d in dropped]}

    def forget_kinds_but(self, kinds: list[tuple[str, str]]) -> None:
        """Wait no more for a worker of a request that none of ``kinds`` (``(kind,
        backend)`` pairs the mesh still has) can take: it is gone on purpose."""
        for key in list(self.seen):
            target = parse_target(key[0]) if key[0] else None
            if target is not None and not any(target.matches(k, b) for k, b in kinds):
                self.seen.discard(key)

    # ------------------------------------------------------------ picking
    @staticmethod
    def _target(on: Any) -> Target | None:
        if on is None or isinstance(on, Target):
            return on
        try:
            return parse_target(on)
        except ValueError as exc:
            raise MeshError(f"{opt('on')}: {exc}") from None

    def _pick(self, target: Target | None, site: str | None, every: bool,
              timeout: float | None = None) -> list[Device]:
        key = _request_key(target, site)
        if not every and key in self.sticky:
            return [self.sticky[key]]
        return self._choose(target, site, every, timeout)

    def _choose(self, target: Target | None, site: str | None, every: bool,
                timeout: float | None = None) -> list[Device]:
        key = _request_key(target, site)
        inventory = self.mesh.inventory()
        matching = inventory.select(target=target, site=site)
        if not len(matching) and key in self.seen:
            inventory, matching = self._wait_for_match(target, site, timeout)
        if not len(matching):
            if site is not None and site not in inventory.by_site():
                raise MeshError(
                    f"{opt('site')}: no worker at site {site!r}: the mesh's sites are "
                    f"{', '.join(sorted(inventory.by_site())) or 'none (no workers)'}"
                )
            wanted = _wanted(target, site)
            raise MeshError(
                f"no worker matches {wanted or 'the request'}: the mesh has "
                f"{_describe(inventory)}"
            )
        self.seen.add(key)
        devices = list(matching)
        if every:
            return devices
        # a kind alone (--on cpu) is its own backend's worker where it has one (NumPy's
        # for cpu: it went to a JAX CPU worker, which --on cpu:jax names); then the
        # least loaded; on a tie, one that already holds this notebook's namespace
        plain = target is not None and target.backend is None
        devices.sort(key=lambda d: (plain and d.backend != DEFAULT_BACKEND.get(d.kind),
                                    d.tasks, d.worker not in self.namespaces,
                                    d.name, d.worker))
        chosen = devices[0]
        self.sticky[key] = chosen
        return [chosen]

    def _wait_for_match(self, target: Target | None, site: str | None,
                        timeout: float | None = None) -> tuple[Any, Any]:
        """A worker of this kind was here before (its nanny may be restarting it): wait
        up to ``remote.worker-wait`` seconds for one, or the cell's ``timeout`` where
        that is shorter; Ctrl-C stops waiting."""
        wait = _config.get_seconds("remote.worker-wait")
        why = "mesh.remote.worker-wait"
        if timeout is not None and timeout < wait:
            wait, why = timeout, opt("timeout")
        wanted = _wanted(target, site)
        if wait:
            print(f"jupyter_mesh: no worker matches {wanted or 'the request'} right now "
                  f"(the one this notebook used is gone); waiting up to {wait:g} s for one "
                  f"({why}).", file=sys.stderr, flush=True)
        deadline = time.monotonic() + wait
        try:
            while True:
                inventory = self.mesh.inventory()
                matching = inventory.select(target=target, site=site)
                if len(matching) or time.monotonic() >= deadline:
                    break
                if self._waiting_tick is not None:  # a cell's bar, while it waits
                    self._waiting_tick()
                time.sleep(0.2)
        except KeyboardInterrupt:
            raise StoppedWaiting(
                f"stopped waiting for a worker matching {wanted or 'the request'} "
                f"(interrupted): the cell did not run") from None
        if not len(matching):
            # none came back: the next cell that asks for it fails at once (the kind
            # was scaled away, or the machine is gone for good)
            self.seen.discard(_request_key(target, site))
        return inventory, matching

    def _install(self) -> None:
        if self._installed:
            return
        try:
            self.client.register_plugin(RemoteCellsPlugin(), name=EXTENSION_NAME)
        except Exception as exc:
            # Some workers could not load it (e.g. jupyter_mesh is not installed there);
            # the others can still run cells, and a cell sent to such a worker says so.
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(
                f"jupyter_mesh: remote cells could not be installed on every worker "
                f"({reason}); cells sent to those workers will fail.",
                file=sys.stderr, flush=True,
            )
        self._installed = True

    # ------------------------------------------------------------ running
    def _execute(self, devices: list[Device], message: dict[str, Any],
                 target: Target | None, site: str | None, every: bool,
                 timeout: float | None) -> list[CellResult]:
        events: queue.SimpleQueue = queue.SimpleQueue()
        runs = [_Run(d, message) for d in devices]
        # a bad setting fails before the cell is sent anywhere (as a MeshConfigError,
        # not as a line of the cell's failure on a worker)
        grace = _config.get_seconds("remote.interrupt-grace")
        _config.get_seconds("remote.connect-timeout", allow_zero=False)
        _config.get_seconds("remote.worker-wait")
        watch = progress.RemoteWatch([r.label for r in runs], timeout)  # after progress-after
        for r in runs:
            self._start(r, events)
        pending = set(range(len(runs)))
        index = {id(r): i for i, r in enumerate(runs)}
        started = time.monotonic()
        stop_sent_at: float | None = None
        give_up_at = math.inf
        interrupted = False
        try:
            while pending:
                try:  # Ctrl-C may land while the progress bar draws, too
                    watch.tick(_ended(runs, pending))
                    try:
                        kind, run, payload = events.get(timeout=0.2)
                    except queue.Empty:
                        now = time.monotonic()
                        if stop_sent_at is None and timeout is not None and \
                                now > started + timeout + min(1.0, grace / 2):
                            # the worker's own timer did not stop it: ask again, and
                            # give up once the grace after the timeout is over
                            self._send_stop([runs[i] for i in pending], "timeout")
                            stop_sent_at = now
                            give_up_at = started + timeout + grace
                        elif stop_sent_at is not None and (now > give_up_at or all(
                                self._not_running(runs[i]) for i in pending)):
                            # (no code of the cell runs: no use waiting out the grace)
                            self._abandon([runs[i] for i in pending], interrupted)
                            pending.clear()
                        continue
                    i = index[id(run)]
                    if kind == "out":
                        watch.clear_line()
                        self._show(run, payload, labelled=every, watch=watch)
                    elif kind == "done":
                        run.final = payload
                        pending.discard(i)
                    elif kind == "gone" and not every:
                        # the sticky worker died since the last cell: say so, pick another
                        watch.clear_line()  # (the message starts a line of its own)
                        watch.wait_for(run.label, f"looking for another worker "
                                                  f"({_wanted(target, site) or 'any'})")
                        watch.tick({})
                        self._waiting_tick = lambda: watch.tick({})
                        try:
                            new = self._repick(run, target, site, timeout)
                        finally:
                            self._waiting_tick = None
                        replacement = _Run(new, message)
                        watch.relabel(run.label, replacement.label)
                        runs[i] = replacement
                        index[id(replacement)] = i
                        self._start(replacement, events)
                    else:  # "fail", or "gone" with --all
                        run.failure = payload
                        pending.discard(i)
                except KeyboardInterrupt as exc:
                    if isinstance(exc, StoppedWaiting):  # no cell runs: nothing to stop
                        raise
                    if interrupted:  # a second Ctrl-C: stop waiting
                        # (_collect says so, and keeps the busy namespaces for %mesh
                        # reset-remote)
                        self._abandon([runs[i] for i in pending], True)
                        pending.clear()  # (the bar says they still run)
                        continue
                    interrupted = True
                    stop_sent_at = time.monotonic()
                    give_up_at = stop_sent_at + grace
                    self._send_stop([runs[i] for i in pending], "interrupted")
        except BaseException:
            # the bar's line ends before the error is shown
            watch.done(False, _ended(runs, pending))
            raise
        watch.done(not interrupted and not any((r.final or {}).get("status") != "ok"
                                               for r in runs), _ended(runs, pending))
        return self._collect(runs, interrupted, timeout)

    def _start(self, run: _Run, events: queue.SimpleQueue) -> None:
        run.sent = time.time()
        loop = self.client.loop.asyncio_loop
        run.future = asyncio.run_coroutine_threadsafe(self._drive(run, events), loop)

    async def _drive(self, run: _Run, events: queue.SimpleQueue) -> None:
        """Send the cell and forward every message into ``events`` (on the client loop)."""
        try:
            comm = await self._connect(run.device.worker)
        except _Gone as exc:
            events.put(("gone", run, exc))
            return
        except BaseException as exc:
            events.put(("fail", run, exc))
            return
        pool = self.client.rpc
        finished = False
        try:
            await comm.write({**run.message, "run_id": run.run_id})
            while True:
                try:
                    # Dask logs a failed deserialization as CRITICAL with its traceback;
                    # the one line below says what it means here
                    with _quiet_here():
                        msg = await comm.read()
                except Exception as exc:
                    # (TCP's read turns a broken stream into CommClosedError; an OSError
                    # here is the unpickling's own, a file only the worker has, say)
                    if comm.closed() or isinstance(exc, CommClosedError):
                        raise
                    # it arrived whole, but this process cannot rebuild what it holds
                    events.put(("fail", run, _Unreadable(exc)))
                    return
                arrived = time.time()
                run.heard = True
                tag = msg.get("t") if isinstance(msg, dict) else None
                if tag == "out":
                    if msg["items"]:  # (none: the worker has the cell, see _worker_plugin)
                        events.put(("out", run, (msg["items"], arrived)))
                    continue
                finished = True
                if tag == "done":
                    events.put(("done", run, msg))
                else:
                    events.put(("fail", run, _worker_error(run.device, msg)))
                return
        except BaseException as exc:
            if isinstance(exc, (CommClosedError, OSError)):
                run.broke_at = time.time()
            events.put(("fail", run, exc))
        finally:
            if not finished:
                comm.abort()
            pool.reuse(run.device.worker, comm)

    async def _connect(self, address: str) -> Any:
        """A pooled comm to the worker, or :class:`_Gone` when the scheduler lost it."""
        pool = self.client.rpc
        if any(not c.closed() for c in pool.available.get(address, ())):
            # a pooled comm: nothing to wait for
            comm = await pool.connect(address)
            if not _peer_closed(comm):
                return comm
            # the worker closed it (it died or restarted) since the last cell
            comm.abort()
            pool.reuse(address, comm)
        timeout = _config.get_seconds("remote.connect-timeout", allow_zero=False)
        task = asyncio.ensure_future(pool.connect(address, timeout=timeout))
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if not done and not await self._alive(address):
            task.cancel()
            raise _Gone(address)
        try:
            return await task
        except OSError:
            if not await self._alive(address):
                raise _Gone(address) from None
            raise

    def _scheduler_gone(self, run: _Run) -> str:
        return (f"the mesh's scheduler at {self.mesh.address} went away while the cell "
                f"ran on {run.label} (its owner closed the mesh, or it stopped); the "
                f"remote namespaces went with it: run %mesh close, then %mesh start or "
                f"%mesh connect ADDRESS")

    def _scheduler_leaving(self) -> bool:
        """Whether the scheduler stops answering within ``SCHEDULER_GRACE`` seconds
        (asked once for the workers of one cell: the answer of the last ask is kept
        that long)."""
        now = time.monotonic()
        asked_at, leaving = self._leaving
        if now - asked_at < SCHEDULER_GRACE:
            return leaving
        leaving = self._scheduler_stops(now + SCHEDULER_GRACE)
        self._leaving = (time.monotonic(), leaving)
        return leaving

    def _scheduler_stops(self, deadline: float) -> bool:
        while True:
            try:
                self.client.sync(self.client.scheduler.identity, n_workers=0,
                                 callback_timeout=5)
            except Exception:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    async def _alive(self, address: str) -> bool:
        info = await self.client.scheduler.identity(n_workers=-1)
        return address in info.get("workers", {})

    def _repick(self, run: _Run, target: Target | None, site: str | None,
                timeout: float | None = None) -> Device:
        old = run.device
        self.namespaces.pop(old.worker, None)
        self.sticky.pop(_request_key(target, site), None)
        try:
            new = self._choose(target, site, False, timeout)[0]
        except MeshError as exc:
            raise MeshError(
                f"worker {run.label} ({old.target}) is gone, and with it this notebook's "
                f"remote namespace there; no other worker can take the cell: {exc}"
            ) from None
        print(
            f"jupyter_mesh: worker {run.label} ({old.target}, {old.worker}) is gone, and "
            f"with it this notebook's remote namespace there. This cell and the next run "
            f"on {new.name or new.worker} ({new.target}).",
            file=sys.stderr, flush=True,
        )
        return new

    def _send_stop(self, runs: list[_Run], reason: str) -> None:
        loop = self.client.loop.asyncio_loop
        for run in runs:
            call = self.client.rpc(run.device.worker)
            run.stop_reply = asyncio.run_coroutine_threadsafe(
                _quietly(getattr(call, INTERRUPT)(session=self.session, reason=reason,
                                                  run=run.run_id)), loop
            )

    @staticmethod
    def _not_running(run: _Run) -> bool:
        """Whether the worker answered a stop that no code of the cell runs there: it
        had not begun (a large ``--push`` on its way) or had ended (its pulled names or
        value on their way back)."""
        reply = run.stop_reply
        if reply is None or not reply.done() or reply.cancelled():
            return False
        answer = reply.result()
        return isinstance(answer, dict) and answer.get("running") is False

    def _abandon(self, runs: list[_Run], interrupted: bool) -> None:
        for run in runs:
            if run.future is not None:
                run.future.cancel()
            run.failure = _StillRunning(run, interrupted)
            if self._not_running(run):
                run.failure.running = False
                began = bool(run.stop_reply.result().get("began"))
                print(
                    f"jupyter_mesh: stopped waiting for {run.label} ({run.device.target}) "
                    f"while data went between it and the notebook: "
                    + ("the cell ran to its end there (its names are defined on the "
                       "worker), and its --pull names or value were on their way back"
                       if began else
                       "its --push was on its way, and the cell will not begin")
                    + "; nothing was set in the notebook, and the worker and its namespace "
                      "stay usable.",
                    file=sys.stderr, flush=True,
                )
                continue
            print(
                f"jupyter_mesh: the cell is still running on {run.label} "
                f"({run.device.target}): it did not stop ({NOT_STOPPED}). The worker stays "
                f"usable; its namespace is busy until then (%mesh reset-remote starts a "
                f"fresh one).",
                file=sys.stderr, flush=True,
            )

    # ------------------------------------------------------------ output
    def _show(self, run: _Run, payload: Any, labelled: bool,
              watch: progress.RemoteWatch | None = None) -> None:
        items, arrived = payload
        for item in items:
            run.latencies.append(arrived - item[-1])
            if item[0] == "stream":
                _, name, text, _ts = item
                stream = sys.stdout if name == "stdout" else sys.stderr
                if labelled:
                    text = _label_lines(text, f"[{run.label}] ", run.partial, name)
                stream.write(text)
                # a whole line goes out at once; the pieces of one print() wait for its
                # newline (the kernel flushes what is left by itself), so they stay one line
                if text.endswith(("\n", "\r")):
                    stream.flush()
                if watch is not None:
                    watch.wrote(text)
            elif item[0] == "clear":
                _clear_output(item[1])
                if watch is not None:  # the bars went with the rest
                    watch.show_again()
            else:
                if item[0] == "display-id":
                    _, data, metadata, display_id, update, _ts = item
                else:
                    _, data, metadata, _ts = item
                    display_id, update = None, False
                if labelled and not update:
                    sys.stdout.write(f"[{run.label}] display:\n")
                    sys.stdout.flush()
                _display(data, metadata, display_id, update)

    def _collect(self, runs: list[_Run], interrupted: bool,
                 timeout: float | None) -> list[CellResult]:
        failures: list[RemoteFailure] = []
        usage: list[str] = []
        results: list[CellResult] = []
        stopped_at: list[tuple[str, str]] = []
        #: the workers where Ctrl-C stopped the cell
        stopped: list[str] = []
        stopped_by_timeout = False
        for run in runs:
            _flush_partial(run)
        for run in runs:
            dev = run.device
            final = run.final
            if run.failure is not None:
                if isinstance(run.failure, _StillRunning):
                    # the worker holds this notebook's namespace, busy: %mesh
                    # reset-remote must reach it
                    self.namespaces[dev.worker] = dev
                    if not interrupted:  # past --timeout, and blocked outside Python
                        stopped_by_timeout = True
                        why = (f"the cell ran longer than {opt('timeout', timeout)} s and did "
                               f"not stop ({NOT_STOPPED}); the worker stays usable"
                               if run.failure.running else
                               f"the cell's data took longer than {opt('timeout', timeout)} s "
                               f"to go between the worker and the notebook; nothing was set "
                               f"in the notebook, and the worker stays usable")
                        failures.append(RemoteFailure(
                            ename="TimeoutError", evalue=why,
                            traceback="", worker=dev.worker, name=dev.name, kind=dev.kind,
                            backend=dev.backend,
                        ))
                    continue
                if isinstance(run.failure, _Unreadable):
                    # the cell ended there; its namespace is there, with the value
                    self.namespaces[dev.worker] = dev
                    asked = [repr(n) for n in run.message.get("pull") or ()]
                    if run.message.get("want_value"):
                        asked.append("the value of the last expression")
                    usage.append(
                        f"the cell ran on {run.label}, but the notebook cannot deserialize "
                        f"what it sent back ({' or '.join(asked) or 'its answer'}: "
                        f"{run.failure}): import or install here what its class needs, "
                        f"or pull something plainer; the names stay on the worker")
                    continue
                usage.append(self._lost(run, several=len(runs) > 1))
                continue
            assert final is not None
            status = final.get("status")
            if status != "busy" and final.get("fresh") and dev.worker in self.namespaces:
                print(
                    f"jupyter_mesh: the remote namespace on {run.label} was empty: the "
                    f"worker restarted, and names defined there before are gone.",
                    file=sys.stderr, flush=True,
                )
            # every answer means a namespace of this notebook's there (a busy one too:
            # %mesh reset-remote must reach it)
            self.namespaces[dev.worker] = dev
            if status == "ok":
                results.append(CellResult(
                    worker=dev.worker, name=dev.name, kind=dev.kind, backend=dev.backend,
                    site=dev.site, data=final.get("data"),
                    metadata=final.get("metadata") or {},
                    value=final.get("value"), has_value="value" in final,
                    pulled=dict(final.get("pulled") or {}),
                    elapsed=time.time() - run.sent, stream_latency=run.latencies,
                ))
            elif status in ("error", "timeout"):
                if status == "timeout":
                    stopped_by_timeout = True
                    final = dict(final, ename="TimeoutError", evalue=(
                        f"the cell ran longer than {opt('timeout', timeout)} s and was "
                        f"stopped; "
                        f"the worker and its namespace stay usable"))
                failures.append(RemoteFailure(
                    ename=final["ename"], evalue=final["evalue"],
                    traceback=final["traceback"], worker=dev.worker, name=dev.name,
                    kind=dev.kind, backend=dev.backend,
                ))
            elif status == "interrupted":
                stopped.append(run.label)
                if final.get("traceback"):
                    stopped_at.append((f"{run.label} ({dev.target})", final["traceback"]))
                continue
            elif status in ("client-gone", "reset", "worker-closing"):
                self.namespaces.pop(dev.worker, None)
                why = {"worker-closing": "the worker closed (it restarted or left)",
                       "reset": "its namespace was reset (%mesh reset-remote)",
                       "client-gone": "the worker dropped this notebook's connection"}[status]
                usage.append(f"the cell did not finish on {run.label} ({dev.target}): {why}; "
                             f"names defined there are gone: run the cell again")
            elif status == "busy":
                usage.append(
                    f"the previous cell is still running on {run.label} ({dev.target}): "
                    f"wait for it to end, or %mesh reset-remote (a fresh namespace there)"
                )
            elif status == "pull-missing":
                defined = ", ".join(final.get("defined") or []) or "nothing yet"
                usage.append(
                    f"{opt('pull')}: {final['name']!r} is not defined on {run.label} after the "
                    f"cell ran (defined there: {defined})"
                )
            elif status == "unreadable-push":
                usage.append(
                    f"{opt('push')}: {final['name']!r} cannot be rebuilt on {run.label} "
                    f"({final['reason']}): install or import there what its class needs, "
                    f"or push something plainer; the cell did not run"
                )
            elif status == "unsendable":
                usage.append(
                    f"cannot bring back {final['what']} from {run.label}: a "
                    f"{final['type']} cannot be serialized ({final['reason']})"
                )
            else:
                usage.append(f"unexpected answer from {run.label}: {status!r}")
        if interrupted:
            # with --all, what the other workers did first is said too: a failure, a
            # death (the one exception raised is the interrupt)
            if failures:
                cls = RemoteCellTimeout if stopped_by_timeout else RemoteCellError
                print("\n".join(cls(failures)._render_traceback_()), file=sys.stderr,
                      flush=True)
            for line in usage:
                print(f"jupyter_mesh: {line}", file=sys.stderr, flush=True)
            if stopped:
                print(f"jupyter_mesh: interrupted the remote cell on {', '.join(stopped)}; "
                      f"the worker and its namespace stay usable.", file=sys.stderr,
                      flush=True)
            raise RemoteInterrupt(stopped_at)
        if failures:
            for line in usage:  # (with --all, a worker that died meanwhile, say)
                print(f"jupyter_mesh: {line}", file=sys.stderr, flush=True)
            cls = RemoteCellTimeout if stopped_by_timeout else RemoteCellError
            raise cls(failures, results)  # (with --all, those that ran to their end)
        if usage:
            # with --all, the workers where it ran to its end: the magic shows them
            raise RemoteCellLost("; ".join(usage), results)
        return results

    def _lost(self, run: _Run, several: bool = False) -> str:
        exc = run.failure
        if isinstance(exc, MeshError):
            return str(exc)
        if self.mesh.closed:  # (from another thread or cell)
            return (f"the mesh was closed while the cell ran on {run.label} (mesh.close "
                    f"or %mesh close); its remote namespace is gone with it")
        try:  # the scheduler went away during the cell: that is what to say
            self.mesh._check_reachable()
        except MeshError as gone:
            return str(gone)
        # the scheduler may take a moment to notice a worker that just died
        alive = True
        unanswered = False
        deadline = time.monotonic() + _config.get_seconds("remote.interrupt-grace")
        while alive and time.monotonic() < deadline:
            try:
                alive = self.client.sync(self._alive, run.device.worker)
            except Exception:
                unanswered = True  # (the scheduler did not answer: see below)
                break
            if alive:
                time.sleep(0.1)
        if unanswered and not getattr(self.mesh, "owns_cluster", False) \
                and self._scheduler_leaving():
            return self._scheduler_gone(run)
        if not alive:
            self.namespaces.pop(run.device.worker, None)
            if run.device.name in getattr(self.mesh, "_scaled_away", ()):
                return (f"worker {run.label} ({run.device.target}) was closed by "
                        f"mesh.scale (or %mesh scale) while it ran the cell; its remote "
                        f"namespace is gone with it (the next cell "
                        f"{'runs on the workers left' if several else 'picks another worker'})")
            if not getattr(self.mesh, "owns_cluster", False) and self._scheduler_leaving():
                # a mesh closed by its owner (another notebook) closes its workers
                # first: the cell's worker was not lost, the whole mesh was
                return self._scheduler_gone(run)
            after = (f"its remote namespace is lost (the next cell "
                     f"{'runs on the workers left' if several else 'picks another worker'})")
            if not run.heard and run.broke_at:
                # the connection broke before the worker said it had the cell (a pooled
                # connection to a worker killed a moment before looks alive): it died
                # before the cell began
                return (f"worker {run.label} ({run.device.target}) died before the cell "
                        f"reached it, so the cell did not run (out of memory is the usual "
                        f"cause, a large --push for one: its nanny, where it has one, "
                        f"restarts it); {after}")
            return (f"worker {run.label} ({run.device.target}) died while running the "
                    f"cell (out of memory is the usual cause: its nanny, where it has one, "
                    f"restarts it); {after}")
        reason = str(exc).splitlines()[0] if exc is not None and str(exc) else \
            type(exc).__name__
        return f"lost the connection to worker {run.label} during the cell ({reason})"


class _QuietTasks(logging.Filter):
    """Drops the records of Dask's deserialization loggers that come from the tasks it
    holds (a remote cell's reader: its one-line error says what failed); those of any
    other code in the process pass."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks: set[Any] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no event loop in this thread
            return True
        return task is None or task not in self.tasks


_QUIET = _QuietTasks()
for _name in ("distributed.protocol.core", "distributed.protocol.pickle"):
    logging.getLogger(_name).addFilter(_QUIET)


@contextlib.contextmanager
def _quiet_here() -> Any:
    """While inside (in a coroutine): Dask's deserialization logs of this task alone are
    left out, not the whole process's (a logger disabled meanwhile would be)."""
    task = asyncio.current_task()
    _QUIET.tasks.add(task)
    try:
        yield
    finally:
        _QUIET.tasks.discard(task)


class _Unreadable(Exception):
    """The worker's answer arrived, but the notebook cannot deserialize a value in it
    (a pulled name, ``-o``): its class lives in a module only the worker has, or its
    pickle runs code that fails here."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(error_reason(cause))
        self.cause = cause


class _StillRunning(Exception):
    def __init__(self, run: _Run, interrupted: bool) -> None:
        super().__init__(run.label)
        self.interrupted = interrupted
        #: False: no code of the cell ran there, its data was on its way (see _abandon)
        self.running = True


def _worker_error(device: Device, msg: Any) -> MeshError:
    if msg is None:
        return MeshError(
            f"worker {device.name or device.worker} cannot run remote cells: install "
            f"jupyter_mesh where that worker runs (or pick another with "
            f"{opt('on')}/{opt('site')})"
        )
    text = msg.get("exception_text") if isinstance(msg, dict) else None
    if text and "unexpected keyword argument" in text:
        # the only way a handler of ours refuses a keyword this notebook sends: the
        # worker's jupyter_mesh is an older one, whose handler takes fewer
        from .._version import __version__

        return MeshError(
            f"worker {device.name or device.worker} runs an older jupyter_mesh than "
            f"this notebook ({__version__}): install the same version of jupyter_mesh "
            f"there and restart the worker (or pick another with "
            f"{opt('on')}/{opt('site')})"
        )
    return MeshError(
        f"worker {device.name or device.worker} could not take the cell"
        f"{': ' + text if text else ''} (a pushed value may need a module the worker lacks)"
    )


def _peer_closed(comm: Any) -> bool:
    """Whether the other end of an idle TCP comm has closed it (a cheap peek)."""
    sock = getattr(getattr(comm, "stream", None), "socket", None)
    if sock is None:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):  # ValueError: TLS sockets take no flags; assume open
        return isinstance(sys.exc_info()[1], OSError)


async def _quietly(awaitable: Any) -> Any:
    try:
        return await awaitable
    except Exception:
        return None


def _label_lines(text: str, label: str, partial: dict[str, str], name: str) -> str:
    """The complete lines of ``partial[name] + text``, each labelled; the unfinished
    rest waits in ``partial`` (see :func:`_flush_partial`)."""
    lines = (partial[name] + text).splitlines(True)
    partial[name] = lines.pop() if lines and not lines[-1].endswith("\n") else ""
    return "".join(label + line for line in lines)


def _flush_partial(run: _Run) -> None:
    """Write what a labelled run left without a final newline, once it is over."""
    for name, rest in run.partial.items():
        if rest:
            stream = sys.stdout if name == "stdout" else sys.stderr
            stream.write(f"[{run.label}] {rest}\n")
            stream.flush()
            run.partial[name] = ""


def _request_key(target: Target | None, site: str | None) -> tuple[str | None, str | None]:
    """What a cell asked for (``--on``, ``--site``): the key of its sticky worker."""
    return (str(target) if target else None, site)


#: the MIME type of a Jupyter widget's view
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def without_widget(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without a widget's view, said on stderr: a widget made in a remote cell
    has its model on the worker, which no frontend reaches ("Error displaying widget:
    model not found" in its place); its text stays."""
    if WIDGET_MIME not in data:
        return data
    print("jupyter_mesh: a widget made in a remote cell cannot show here (its model "
          "lives on the worker, and a widget needs this kernel): make it in a local "
          "cell; its text is shown", file=sys.stderr, flush=True)
    rest = {k: v for k, v in data.items() if k != WIDGET_MIME}
    return rest or {"text/plain": "<widget>"}


def _display(data: dict[str, Any], metadata: dict[str, Any], display_id: str | None = None,
             update: bool = False) -> None:
    data = without_widget(data)
    try:
        from IPython.core.interactiveshell import InteractiveShell

        if InteractiveShell.initialized():
            from IPython.display import display

            extra: dict[str, Any] = {}
            if display_id is not None:
                extra = {"display_id": display_id, "update": update}
            display(data, raw=True, metadata=metadata, **extra)
            return
    except ImportError:
        pass
    print(data.get("text/plain", ""))


def _clear_output(wait: bool) -> None:
    try:
        from IPython.core.interactiveshell import InteractiveShell

        if InteractiveShell.initialized():
            from IPython.display import clear_output

            clear_output(wait=wait)
    except ImportError:
        pass


def _ended(runs: list[_Run], pending: set[int]) -> dict[str, str]:
    """How a remote cell ended on each worker it ended on (for its progress bar):
    "finished", "failed", "timed out" or "stopped"."""
    out = {}
    for i, run in enumerate(runs):
        if i in pending:
            continue
        status = (run.final or {}).get("status")
        if isinstance(run.failure, _StillRunning):
            out[run.label] = "still running"
        elif run.failure is not None or status is None:
            out[run.label] = "failed"
        else:
            out[run.label] = {"ok": "finished", "timeout": "timed out",
                              "interrupted": "stopped"}.get(status, "failed")
    return out
