"""Per-thread stdout/stderr on a worker: a remote cell's output goes to its own sink.

A worker runs Dask tasks in other threads at the same time as a remote cell, so the
cell cannot simply replace ``sys.stdout``: :class:`ThreadRoutedStream` is installed once
and sends each write to the sink registered for the writing thread, or to the stream it
replaced when the thread runs no cell.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Protocol


class Sink(Protocol):
    def write(self, name: str, text: str) -> None: ...


#: thread ident -> sink of the remote cell running in that thread
_sinks: dict[int, Sink] = {}
_install_lock = threading.Lock()
_installed = 0


class ThreadRoutedStream:
    """A text stream that writes to the current thread's sink, else to ``fallback``."""

    def __init__(self, name: str, fallback: Any) -> None:
        self.name = name
        self.fallback = fallback

    def write(self, text: str) -> int:
        sink = _sinks.get(threading.get_ident())
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
        if threading.get_ident() not in _sinks:
            self.fallback.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, attr: str) -> Any:  # encoding, fileno, errors, buffer ...
        return getattr(self.fallback, attr)


def install() -> None:
    """Route ``sys.stdout``/``sys.stderr`` per thread (reference counted)."""
    global _installed
    with _install_lock:
        _installed += 1
        if _installed > 1:
            return
        if not isinstance(sys.stdout, ThreadRoutedStream):
            sys.stdout = ThreadRoutedStream("stdout", sys.stdout)
        if not isinstance(sys.stderr, ThreadRoutedStream):
            sys.stderr = ThreadRoutedStream("stderr", sys.stderr)


def uninstall() -> None:
    """Undo :func:`install` when its last user is gone, if nobody replaced the streams."""
    global _installed
    with _install_lock:
        _installed = max(0, _installed - 1)
        if _installed:
            return
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if isinstance(stream, ThreadRoutedStream):
                setattr(sys, name, stream.fallback)


def register(sink: Sink) -> None:
    """Send this thread's output to ``sink``."""
    _sinks[threading.get_ident()] = sink


def unregister() -> None:
    _sinks.pop(threading.get_ident(), None)
