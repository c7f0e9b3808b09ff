"""Run one remote cell in its own thread on a worker (no Dask here).

A cell runs in its own thread (reused between cells) so that a stop request can raise ``KeyboardInterrupt``
inside it (``PyThreadState_SetAsyncExc``) without touching the worker's event loop or
its task threads. The thread reports one *outcome* dict when it ends.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import contextvars
import ctypes
import functools
import inspect
import linecache
import logging
import os
import queue
import threading
import time
import timeit
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from distributed.protocol.serialize import (
    Serialized,
    register_serialization_family,
    serialize,
)

from . import _streams

#: ``serialize`` families tried for values sent back; Dask's own first (zero-copy arrays)
SERIALIZERS = ("dask", "pickle")


def split_cell(code: str, filename: str) -> tuple[Any, Any | None, bool]:
    """Compile a cell like IPython does: statements, then the last expression apart.

    Returns ``(body, last, quiet)``: code objects (``last`` None when the cell does not
    end with an expression), and whether the cell ends with ``;`` (a comment after it
    aside), which, as in IPython, hides the value but does not drop it (``-o`` keeps it).
    """
    tree = ast.parse(code, filename, "exec")
    last = None
    final = tree.body[-1] if tree.body else None
    if isinstance(final, ast.Expr):
        tree.body.pop()
        last = compile(ast.Expression(final.value), filename, "eval", flags=TOP_LEVEL_AWAIT)
    return compile(tree, filename, "exec", flags=TOP_LEVEL_AWAIT), last, ends_quiet(code)


#: compile flag: ``await`` at a cell's top level, as in IPython (the cell then runs in an
#: event loop of its thread on the worker)
TOP_LEVEL_AWAIT = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT


def awaits(*codes: Any) -> bool:
    """Whether any of these code objects (None aside) has a top-level ``await``."""
    return any(c is not None and c.co_flags & inspect.CO_COROUTINE for c in codes)


def run_code(code: Any, ns: dict[str, Any], in_loop: bool = False) -> Any:
    """Run a code object from :func:`split_cell`. One with top-level ``await`` runs to
    the end as a task of the namespace's event loop; with ``in_loop`` (another part of
    the cell awaits) plain code runs inside that loop too, as in IPython, so that
    ``asyncio.current_task()`` and the like answer there."""
    if code.co_flags & inspect.CO_COROUTINE:
        return _in_cell_loop(eval(code, ns), ns)
    if in_loop:
        async def inside() -> Any:
            return eval(code, ns)

        return _in_cell_loop(inside(), ns)
    return eval(code, ns)


#: id(namespace) -> its event loop (see _cell_loop)
_loops: dict[int, asyncio.AbstractEventLoop] = {}
#: cell thread -> (loop, the cell's task) while a cell awaits (a stop cancels the task)
_awaiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]] = {}
_loops_lock = threading.Lock()
#: the cells' tasks a stop cancelled (their CancelledError is the stop's KeyboardInterrupt)
_stopped: set[asyncio.Task[Any]] = set()


def _in_cell_loop(coro: Any, ns: dict[str, Any]) -> Any:
    loop = _cell_loop(ns)
    task = loop.create_task(coro)
    me = threading.get_ident()
    _awaiting[me] = (loop, task)
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        if task in _stopped:  # cancelled by a stop (see stop_awaiting)
            raise KeyboardInterrupt from None
        raise
    except BaseException:
        if not loop.is_running() and not task.done():
            # interrupted outside the task (in the loop itself): the cell's own task
            # is cancelled, as asyncio.run does on Ctrl-C (it does not go on later)
            task.cancel()
            try:
                loop.run_until_complete(asyncio.wait([task], timeout=5))
            except BaseException:  # it cannot be settled: a fresh loop next time
                forget_loop(ns)
        raise
    finally:
        _awaiting.pop(me, None)
        _stopped.discard(task)
        with _loops_lock:
            orphaned = _loops.get(id(ns)) is not loop
        if orphaned:  # the namespace was dropped while the cell ran
            _shut(loop)


def stop_awaiting(thread_id: int) -> bool:
    """Stop the cell of ``thread_id`` if it awaits in its loop: its task is cancelled
    (a KeyboardInterrupt raised in the thread could land in another task of an
    earlier cell instead). Returns whether it was awaiting."""
    entry = _awaiting.get(thread_id)
    if entry is None:
        return False
    loop, task = entry
    _stopped.add(task)
    try:
        loop.call_soon_threadsafe(task.cancel)
    except RuntimeError:  # the loop just closed: the cell has ended
        return False
    return True


def _cell_loop(ns: dict[str, Any]) -> asyncio.AbstractEventLoop:
    """The event loop of a notebook's namespace on this worker: kept between its cells
    (tasks and objects made in one cell, like an async client, belong to it) whichever
    thread runs them, never the worker's own loop; it is the thread's current loop, so
    ``asyncio.get_event_loop()`` finds it."""
    with _loops_lock:
        loop = _loops.get(id(ns))
        if loop is None or loop.is_closed():
            loop = _loops[id(ns)] = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


def forget_loop(ns: dict[str, Any]) -> None:
    """A namespace is dropped (``%mesh reset-remote``, the worker closing): its loop's
    tasks are cancelled and the loop closed (by the cell running in it, if one is)."""
    with _loops_lock:
        loop = _loops.pop(id(ns), None)
    if loop is not None and not loop.is_running():
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            _shut(loop)
        else:
            # called on the worker's own event loop (reset, teardown): another loop
            # cannot run in this thread, so the cell loop's tasks end in one of their own
            threading.Thread(target=_shut, args=(loop,), daemon=True,
                             name="jupyter-mesh-remote-shut").start()


def _shut(loop: asyncio.AbstractEventLoop) -> None:
    if loop.is_closed():
        return
    try:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks, timeout=2))
    except BaseException:
        pass
    finally:
        loop.close()


def ends_quiet(code: str) -> bool:
    """Whether the cell's last token (comments and blank lines aside) is ``;``."""
    import io
    import tokenize

    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER,
            tokenize.INDENT, tokenize.DEDENT}
    last = None
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type not in skip:
                last = tok
    except (tokenize.TokenError, SyntaxError):
        return code.rstrip().endswith(";")
    return last is not None and last.type == tokenize.OP and last.string == ";"


def remember_source(filename: str, code: str) -> None:
    """Let tracebacks on this worker show the lines of the cell."""
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)


def format_bundle(obj: Any, strict: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """The MIME bundle a notebook would show for ``obj``. ``strict`` (a cell's value):
    where its text cannot be made, the error is raised, as a kernel's cell fails with
    it (``display(obj)`` shows what it can, as IPython's does)."""
    if strict:
        from IPython.lib.pretty import pretty

        pretty(obj)  # what IPython's plain-text formatter calls; it raises here
    try:
        data, md = _formatter().format(obj)
    except Exception:
        try:
            text = repr(obj)
        except Exception as exc:
            text = f"<repr of {type(obj).__name__} failed: {exc!r}>"
        data, md = {"text/plain": text}, {}
    return dict(data), dict(md or {})


_display_formatter: Any = None


def _formatter() -> Any:
    global _display_formatter
    if _display_formatter is None:
        from IPython.core.formatters import DisplayFormatter

        _display_formatter = DisplayFormatter()
    return _display_formatter


class RemoteDisplayHandle:
    """What ``display(obj, display_id=...)`` returns in a remote cell, like IPython's
    ``DisplayHandle``: ``update(obj)`` replaces that output in the notebook."""

    def __init__(self, display_id: str) -> None:
        self.display_id = display_id

    def display(self, obj: Any, **kwargs: Any) -> None:
        remote_display(obj, display_id=self.display_id, **kwargs)

    def update(self, obj: Any, **kwargs: Any) -> None:
        remote_display(obj, display_id=self.display_id, update=True, **kwargs)

    def __repr__(self) -> str:
        return f"<RemoteDisplayHandle display_id={self.display_id}>"


def remote_display(*objs: Any, raw: bool = False, metadata: dict[str, Any] | None = None,
                   display_id: Any = None, update: bool = False,
                   **kwargs: Any) -> RemoteDisplayHandle | None:
    """``display()`` inside a remote cell: the objects appear in the notebook cell.

    ``display_id`` (a string, or True for a new one) names the output so that
    ``update_display`` or the returned handle can replace it later; ``update=True``
    replaces the output of that id. Called from a thread that runs no remote cell, it
    prints the objects instead.
    """
    if display_id is True:
        display_id = uuid.uuid4().hex
    if display_id is not None and not isinstance(display_id, str):
        raise TypeError(f"display_id must be a string or True, not {display_id!r}")
    if update and display_id is None:
        raise TypeError("update=True needs a display_id")
    sink = _streams.current()
    for obj in objs:
        if raw:
            data, md = dict(obj), dict(metadata or {})
        else:
            data, md = format_bundle(obj)
            if metadata:
                md.update(metadata)
        if sink is None:
            print(data.get("text/plain", repr(obj)))
        elif display_id is None:
            sink.display(data, md)  # type: ignore[attr-defined]
        else:
            sink.display(data, md, display_id, update)  # type: ignore[attr-defined]
    return RemoteDisplayHandle(display_id) if display_id is not None else None


def remote_update_display(obj: Any, *, display_id: str, **kwargs: Any) -> None:
    """``update_display()`` inside a remote cell: replace the output of ``display_id``."""
    remote_display(obj, display_id=display_id, update=True, **kwargs)


def remote_clear_output(wait: bool = False) -> None:
    """``clear_output()`` inside a remote cell: clear the notebook cell's output
    (``wait=True``: when the next output arrives)."""
    sink = _streams.current()
    if sink is not None:
        sink.clear(bool(wait))  # type: ignore[attr-defined]


def route_ipython_display() -> None:
    """Make IPython's own ``display``, ``update_display`` and ``clear_output`` on this
    worker reach the notebook while a remote cell runs: ``from IPython.display import
    display`` in a cell (the usual idiom) would otherwise rebind the namespace's
    ``display`` to one that, with no IPython shell here, prints ``<... object>``. Off a
    remote cell they do what they did."""
    import importlib

    remote = {"display": remote_display, "update_display": remote_update_display,
              "clear_output": remote_clear_output}
    for modname in ("IPython.core.display_functions", "IPython.core.display",
                    "IPython.display"):
        try:
            mod = importlib.import_module(modname)
        except Exception:
            continue
        for name, ours in remote.items():
            orig = getattr(mod, name, None)
            if orig is None or getattr(orig, "_jupyter_mesh_remote", False):
                continue
            setattr(mod, name, _in_cell_or(ours, orig))


def remote_input(prompt: Any = "", *args: Any, **kwargs: Any) -> str:
    """``input()`` (and ``getpass.getpass()``) in a remote cell: there is no notebook
    to type into from a worker."""
    from IPython.core.error import StdinNotImplementedError

    raise StdinNotImplementedError(
        "a remote cell cannot read input from the notebook: ask for it in a local cell "
        "and send it with --push NAME (push= from mesh.run_cell)")


def route_getpass() -> None:
    """``getpass.getpass()`` in a remote cell fails as ``input()`` does (it would warn
    that the password may be echoed, then fail to read); elsewhere it is unchanged."""
    import getpass

    if not getattr(getpass.getpass, "_jupyter_mesh_remote", False):
        getpass.getpass = _in_cell_or(remote_input, getpass.getpass)


def _in_cell_or(ours: Any, orig: Any) -> Any:
    @functools.wraps(orig)
    def call(*args: Any, **kwargs: Any) -> Any:
        if _streams.current() is not None:
            return ours(*args, **kwargs)
        return orig(*args, **kwargs)

    call._jupyter_mesh_remote = True  # type: ignore[attr-defined]
    return call


def format_remote_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` in the cell's own frames: those of this package's
    remote runner, of asyncio running an awaiting cell and of timeit running a
    ``%timeit`` are left out."""
    te = traceback.TracebackException(type(exc), exc, exc.__traceback__)
    frames = list(te.stack)
    # stopped (Ctrl-C, --timeout) inside the cell's output (a print that streams to
    # the notebook): the cell's own line is where it stopped, not the frames that send
    # its text (an error of the cell's own code that the output called, a generator
    # given to writelines, keeps its frames)
    cut = len(frames)
    if isinstance(exc, KeyboardInterrupt):
        cut = next((i for i, f in enumerate(frames) if f.filename in _OUTPUT), cut)
    kept = []
    called_by_ours = False
    for f in frames[:cut]:
        if _machinery(f.filename):
            # (asyncio's frames are left out too, but what they call may be the cell's
            # own: a stdlib function it hands to asyncio.to_thread keeps its frames)
            called_by_ours = called_by_ours or f.filename in _MACHINERY
            continue
        if called_by_ours and _helper(f.filename):
            # what the runner calls on the cell's behalf (IPython's pretty printer for
            # its value, a selector polling a !command): the cell's own frames only
            continue
        called_by_ours = False
        kept.append(f)
    te.stack = traceback.StackSummary.from_list(kept)
    return "".join(te.format())


def _machinery(filename: str) -> bool:
    return filename in _MACHINERY or os.path.dirname(filename) == _ASYNCIO_DIR


def _helper(filename: str) -> bool:
    """A frame of Python's own library (not a package installed beside it) or of
    IPython's."""
    path = os.path.abspath(filename)
    if _IPYTHON_DIR and path.startswith(_IPYTHON_DIR):
        return True
    return path.startswith(_STDLIB_DIR) and not any(
        part in ("site-packages", "dist-packages") for part in path.split(os.sep))


_MACHINERY = {__file__, os.path.join(os.path.dirname(__file__), "_shell.py"),
              timeit.__file__}
_ASYNCIO_DIR = os.path.dirname(asyncio.__file__)
_STDLIB_DIR = os.path.dirname(os.path.abspath(os.__file__)) + os.sep


def _package_dir(name: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(name)
    origin = spec.origin if spec is not None else None
    return os.path.dirname(os.path.abspath(origin)) + os.sep if origin else ""


_IPYTHON_DIR = _package_dir("IPython")
#: the modules that carry a cell's output to the notebook
_OUTPUT = {os.path.join(os.path.dirname(__file__), name)
           for name in ("_streams.py", "_worker_plugin.py")}


def error_record(exc: BaseException) -> dict[str, Any]:
    try:
        evalue = str(exc)
    except Exception:
        evalue = "<str() of the exception failed>"
    return {
        "ename": type(exc).__name__,
        "evalue": evalue,
        "traceback": format_remote_traceback(exc),
    }


def _ours(value: Any) -> bool:
    """Whether a namespace's value is one the remote cells put there (``display``,
    ``input``, ``get_ipython``...), not the user's."""
    return str(getattr(value, "__module__", None) or "").startswith(__package__ + ".")


def error_reason(exc: BaseException) -> str:
    """The first line of what an exception says. Dask raises its serialization errors
    with two arguments (what failed, the object's repr), whose ``str`` is a tuple."""
    args = exc.args
    dasks = (isinstance(exc, TypeError) and len(args) == 2 and isinstance(args[0], str)
             and args[0].startswith("Could not serialize"))
    text = args[0] if dasks else str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Silence one logger for a block: Dask logs a multi-line traceback before raising
    a serialization error, and the one-line error the user gets says it all."""
    log = logging.getLogger(name)
    disabled, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = disabled


#: the serialization family of a pushed value: the worker's comm does not rebuild it
#: as it reads the message (one it cannot rebuild, a class of a module it lacks, was
#: logged there as ~60 lines of Dask's tracebacks); the cell's handler does, and says
#: in one line what failed. Its frames travel as any Dask data, without a copy.
DEFERRED = "jupyter-mesh-deferred"


class Deferred:
    """A pushed value as the worker received it: its serialized header and frames."""

    __slots__ = ("frames", "header")

    def __init__(self, header: dict[str, Any], frames: list[Any]) -> None:
        self.header, self.frames = header, frames

    def nbytes(self) -> int:
        return sum(memoryview(f).nbytes for f in self.frames)

    def load(self) -> Any:
        """The value (what failed to rebuild it raises here)."""
        from distributed.protocol.serialize import deserialize

        with quiet_logger("distributed.protocol.pickle"):
            return deserialize(self.header, self.frames)


def defer(header: dict[str, Any], frames: list[Any]) -> Serialized:
    """A serialized value that the receiving comm hands over as a :class:`Deferred`."""
    return Serialized({"serializer": DEFERRED, "inner": header}, frames)


def _no_dumps(x: Any) -> Any:  # a value is deferred by defer(), never by Dask itself
    raise NotImplementedError(DEFERRED)


def _as_deferred(header: dict[str, Any], frames: list[Any]) -> Deferred:
    return Deferred(header["inner"], list(frames))


register_serialization_family(DEFERRED, _no_dumps, _as_deferred)


def future_in(obj: Any, depth: int = 4, budget: int = 10_000) -> str | None:
    """Where a Dask future is in ``obj``: ``""`` for ``obj`` itself, ``"[0]['k']"`` for
    one in its lists, tuples, sets or dicts (a few levels down, and a bounded number
    of items); None where there is none. A future travels, but arrives unusable
    without the client that made it."""
    from distributed import Future

    left = [budget]

    def find(x: Any, level: int) -> str | None:
        left[0] -= 1
        if isinstance(x, Future):
            return ""
        if level == 0 or left[0] <= 0:
            return None
        if isinstance(x, dict):
            items: Iterable[tuple[str, Any]] = ((f"[{k!r}]", v) for k, v in x.items())
        elif isinstance(x, (list, tuple)):
            items = ((f"[{i}]", v) for i, v in enumerate(x))
        elif isinstance(x, (set, frozenset)):
            items = (("(an item)", v) for v in x)
        else:
            return None
        for where, v in items:
            if left[0] <= 0:
                return None
            inner = find(v, level - 1)
            if inner is not None:
                return where + inner
        return None

    return find(obj, depth)


def pack(obj: Any) -> Serialized:
    """Serialize now (in the cell's thread, not on the event loop) for the reply. A
    device array (CuPy's, JAX's), alone or in a list, tuple or dict, goes as a NumPy
    array: the kernel that asked for it need not have the device or its library."""
    from ..router._device import _map
    from ..router.backends import is_any_device_array, to_host_any

    found: list[bool] = []

    def device(x: Any) -> Any:
        if is_any_device_array(x):
            found.append(True)
        return x

    where = future_in(obj)
    if where is not None:
        raise TypeError(f"a Dask future{f' (at {where})' if where else ''} works only with "
                        f"the client that made it: bring back its value (.result()) instead")
    _map(device, obj)
    if found:  # otherwise the object as it is (a list subclass stays one)
        obj = _map(to_host_any, obj)
    with quiet_logger("distributed.protocol.pickle"):
        header, frames = serialize(obj, serializers=SERIALIZERS, on_error="raise")
    return Serialized(header, frames)


def _async_raise(thread_id: int, exc_type: type[BaseException] | None) -> int:
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc_type) if exc_type else None
    )


class _Threads:
    """Idle threads kept for the next cells: starting a thread costs ~0.1 ms.

    A thread takes one cell at a time, and a cell's :meth:`CellRun._main` clears any
    stop still pending before it returns, so a reused thread starts clean.
    """

    def __init__(self, idle_seconds: float = 60.0) -> None:
        self.idle_seconds = idle_seconds
        self._work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def run(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._work.put(fn)
                return
        threading.Thread(target=self._loop, args=(fn,), daemon=True,
                         name="jupyter-mesh-cell").start()

    def _loop(self, fn: Callable[[], None]) -> None:
        while True:
            fn()
            with self._lock:
                self._idle += 1
            try:
                fn = self._work.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._lock:
                    try:  # work handed to this thread just as it timed out
                        fn = self._work.get_nowait()
                    except queue.Empty:
                        self._idle -= 1
                        return


_threads = _Threads()


class CellRun:
    """One remote cell executing in its own daemon thread.

    Parameters
    ----------
    code, filename:
        The cell's source and the name its tracebacks show.
    namespace:
        The notebook's namespace on this worker (globals of the cell).
    sink:
        Receives the cell's stdout, stderr and displays.
    on_done:
        Called once, from the thread, with the outcome dict.
    pull:
        Names to send back after the cell ran.
    want_value:
        Send back the value of the last expression itself (``-o NAME``).
    context:
        Context variables the cell runs with (the worker's, so ``get_worker()`` works).
    """

    def __init__(self, code: str, filename: str, namespace: dict[str, Any], sink: Any,
                 on_done: Callable[[dict[str, Any]], None], pull: Iterable[str] = (),
                 want_value: bool = False, show_value: bool = True,
                 context: contextvars.Context | None = None) -> None:
        self.code = code
        self.context = context
        self.filename = filename
        self.namespace = namespace
        self.sink = sink
        self.on_done = on_done
        self.pull = list(pull)
        self.want_value = want_value
        self.show_value = show_value
        self.stop_reason: str | None = None
        self.started = 0.0
        self._state = "new"  # new -> running -> (stopping) -> done
        self._lock = threading.Lock()
        self._thread_id: int | None = None

    @property
    def done(self) -> bool:
        return self._state == "done"

    def start(self) -> None:
        _threads.run(self._main)

    def stop(self, reason: str = "interrupted") -> bool:
        """Raise ``KeyboardInterrupt`` in the cell's thread; at most once per cell.

        Returns whether a stop was newly requested. Code blocked outside Python (a C
        call, ``time.sleep``) stops when it returns to Python.
        """
        with self._lock:
            if self._state == "new":
                self._state, self.stop_reason = "stopping", reason
                return True
            if self._state != "running" or self._thread_id is None:
                return False
            self._state, self.stop_reason = "stopping", reason
            entry = _awaiting.get(self._thread_id)
            if entry is not None and stop_awaiting(self._thread_id):
                # a coroutine that does not yield to its loop (a CPU loop) is stopped
                # as any other code, a moment later
                timer = threading.Timer(1.0, self._raise_if_stuck, (entry,))
                timer.daemon = True
                timer.start()
            else:
                _async_raise(self._thread_id, KeyboardInterrupt)
            return True

    def _raise_if_stuck(self, entry: Any) -> None:
        with self._lock:
            if (self._state == "stopping" and self._thread_id is not None
                    and _awaiting.get(self._thread_id) is entry):
                _async_raise(self._thread_id, KeyboardInterrupt)

    # ------------------------------------------------------------ in the thread
    def _main(self) -> None:
        outcome: dict[str, Any] | None = None
        _streams.register(self.sink)
        try:
            try:
                with self._lock:
                    self._thread_id = threading.get_ident()
                    stop_first = self._state == "stopping"
                    if not stop_first:
                        self._state = "running"
                self.started = time.time()
                if stop_first:
                    outcome = {"status": self.stop_reason or "interrupted",
                               "ename": "KeyboardInterrupt", "evalue": "",
                               "traceback": "stopped before it started\n"}
                elif self.context is not None:
                    outcome = self.context.run(self._execute)
                else:
                    outcome = self._execute()
            finally:
                with self._lock:
                    self._state = "done"
                # a stop asked for just as the cell finished must not leak out of it
                _async_raise(threading.get_ident(), None)
        except BaseException as exc:  # a stop that landed outside the user's code
            if outcome is None:
                outcome = self._stopped(exc)
        finally:
            _streams.unregister()
            self.on_done(outcome or {"status": "error", "ename": "RuntimeError",
                                     "evalue": "the cell ended without an outcome",
                                     "traceback": ""})

    def _stopped(self, exc: BaseException) -> dict[str, Any]:
        record = error_record(exc)
        record["status"] = self.stop_reason or "interrupted"
        return record

    def _execute(self) -> dict[str, Any]:
        ns = self.namespace
        try:
            remember_source(self.filename, self.code)
            body, last, quiet = split_cell(self.code, self.filename)
            in_loop = awaits(body, last)
            run_code(body, ns, in_loop)
            value = run_code(last, ns, in_loop) if last is not None else None
        except KeyboardInterrupt as exc:
            if self.stop_reason is not None:
                return self._stopped(exc)
            return {"status": "error", **error_record(exc)}
        except BaseException as exc:  # SystemExit too: it must not end the worker thread
            return {"status": "error", **error_record(exc)}
        outcome: dict[str, Any] = {"status": "ok", "elapsed": time.time() - self.started}
        if last is not None and value is not None and not quiet:
            if self.show_value:
                try:
                    outcome["data"], outcome["metadata"] = format_bundle(value, strict=True)
                except Exception as exc:  # its repr failed: the cell fails, as in a kernel
                    return {"status": "error", **error_record(exc)}
            ns["_"] = value
        if self.want_value and last is not None:
            try:
                outcome["value"] = pack(value)
            except Exception as exc:
                return self._unsendable("the value of the last expression", value, exc)
        pulled = {}
        for name in self.pull:
            # the remote cells' own helpers (display, input...) are not the cell's: the
            # notebook's own would be replaced by them
            if name not in ns or _ours(ns[name]):
                return {"status": "pull-missing", "name": name,
                        "defined": sorted(k for k, v in ns.items()
                                          if not k.startswith("_") and not _ours(v))[:20]}
            try:
                pulled[name] = pack(ns[name])
            except Exception as exc:
                return self._unsendable(repr(name), ns[name], exc)
        outcome["pulled"] = pulled
        return outcome

    @staticmethod
    def _unsendable(what: str, value: Any, exc: BaseException) -> dict[str, Any]:
        reason = error_reason(exc)
        return {"status": "unsendable", "what": what, "type": type(value).__name__,
                "reason": reason}
