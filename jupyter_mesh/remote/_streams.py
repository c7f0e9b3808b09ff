"""Per-thread stdout/stderr on a worker: a remote cell's output goes to its own sink.

A worker runs Dask tasks in other threads at the same time as a remote cell, so the
cell cannot simply replace ``sys.stdout``: :class:`ThreadRoutedStream` is installed once
and sends each write to the sink registered for the writing thread, or to the stream it
replaced when the thread runs no cell. Threads that a cell starts write to the cell's
sink too, while the cell runs; after it ended, to the worker's own streams.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Protocol


class Sink(Protocol):
    def write(self, name: str, text: str) -> None: ...

    def flush(self) -> None: ...


#: thread ident -> sink of the remote cell running in that thread (or that started it)
_sinks: dict[int, Sink] = {}
#: sinks of cells that ended: threads they started write to the worker's streams again
_ended: set[int] = set()
_install_lock = threading.Lock()
_installed = 0
_thread_start: Any = None


def current() -> Sink | None:
    """The sink of the running cell this thread writes for, if any."""
    sink = _sinks.get(threading.get_ident())
    if sink is None or id(sink) in _ended:
        return None
    return sink


def _start_with_sink(self: threading.Thread) -> None:
    """``Thread.start`` while cells can run: a thread started by a cell's thread (or by
    one of its threads) writes to that cell's sink."""
    sink = current()
    if sink is not None:
        run = self.run

        def run_for_cell() -> None:
            ident = threading.get_ident()
            _sinks[ident] = sink
            try:
                run()
            finally:
                _sinks.pop(ident, None)
                if not any(s is sink for s in _sinks.values()):
                    _ended.discard(id(sink))

        self.run = run_for_cell  # type: ignore[method-assign]
    _thread_start(self)


class ThreadRoutedStream:
    """A text stream that writes to the current thread's sink, else to ``fallback``."""

    def __init__(self, name: str, fallback: Any) -> None:
        self.name = name
        self.fallback = fallback

    def write(self, text: str) -> int:
        sink = current()
        if sink is None:
            return self.fallback.write(text)
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if text:
            sink.write(self.name, text)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        sink = current()
        if sink is None:
            self.fallback.flush()
        else:
            sink.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, attr: str) -> Any:  # encoding, fileno, errors, buffer ...
        return getattr(self.fallback, attr)


def install() -> None:
    """Route ``sys.stdout``/``sys.stderr`` per thread (reference counted)."""
    global _installed, _thread_start
    with _install_lock:
        _installed += 1
        if _installed > 1:
            return
        if _thread_start is None:
            _thread_start = threading.Thread.start
            threading.Thread.start = _start_with_sink  # type: ignore[method-assign]
        if not isinstance(sys.stdout, ThreadRoutedStream):
            sys.stdout = ThreadRoutedStream("stdout", sys.stdout)
        if not isinstance(sys.stderr, ThreadRoutedStream):
            sys.stderr = ThreadRoutedStream("stderr", sys.stderr)


def uninstall() -> None:
    """Undo :func:`install` when its last user is gone, if nobody replaced the streams."""
    global _installed, _thread_start
    with _install_lock:
        _installed = max(0, _installed - 1)
        if _installed:
            return
        if _thread_start is not None and threading.Thread.start is _start_with_sink:
            threading.Thread.start = _thread_start  # type: ignore[method-assign]
            _thread_start = None
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if isinstance(stream, ThreadRoutedStream):
                setattr(sys, name, stream.fallback)


def register(sink: Sink) -> None:
    """Send this thread's output (and that of threads it starts) to ``sink``."""
    _ended.discard(id(sink))
    _sinks[threading.get_ident()] = sink


def unregister() -> None:
    """The cell of this thread ended: threads it started write to the worker again."""
    sink = _sinks.pop(threading.get_ident(), None)
    if sink is not None and any(s is sink for s in _sinks.values()):
        _ended.add(id(sink))

