"""Errors of remote cells, shown by IPython through ``_render_traceback_``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import MeshError

_RED = "\x1b[0;31m"
_BOLD = "\x1b[1m"
_RESET = "\x1b[0m"


def _header(text: str) -> str:
    """``text`` in bold red, as IPython shows an exception's name, unless the shell's
    colours are off (``--colors=nocolor``, ``%colors nocolor``)."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        colors = str(getattr(shell, "colors", "")).lower() if shell is not None else ""
    except Exception:  # pragma: no cover - IPython is a dependency
        colors = ""
    if colors == "nocolor":
        return text
    return f"{_RED}{_BOLD}{text}{_RESET}"


@dataclass
class RemoteFailure:
    """One worker's exception: what it was, where it happened, and its traceback."""

    ename: str
    evalue: str
    traceback: str
    worker: str
    name: str
    kind: str
    backend: str

    @property
    def where(self) -> str:
        if self.name and self.name != self.worker:
            return f"worker {self.name} ({self.kind}:{self.backend}) at {self.worker}"
        # a worker started without a name (jupyter-mesh worker, dask worker)
        return f"a {self.kind}:{self.backend} worker at {self.worker}"


#: remote errors shown as their one line, without the remote traceback
ONE_LINE = frozenset({"RemoteMagicError", "StdinNotImplementedError"})


class RemoteCellError(MeshError):
    """A remote cell raised (or was stopped by ``--timeout``) on one or more workers.

    Attributes
    ----------
    ename, evalue, traceback:
        The remote exception's type name, message and formatted traceback (of the first
        failing worker).
    worker, kind, backend:
        Where it happened.
    failures:
        One :class:`RemoteFailure` per failing worker (several with ``--all``).
    results:
        With ``--all``: the :class:`CellResult` of each worker where the cell ran to
        its end (their values and pulled names; the magic shows their displays).
    """

    def __init__(self, failures: list[RemoteFailure], results: list[Any] | None = None
                 ) -> None:
        self.failures = failures
        self.results = list(results or ())
        first = failures[0]
        self.ename, self.evalue, self.traceback = first.ename, first.evalue, first.traceback
        self.worker, self.kind, self.backend = first.worker, first.kind, first.backend
        more = f" (and {len(failures) - 1} more workers)" if len(failures) > 1 else ""
        # (a one-line error ends in what to do: where it happened goes in parentheses)
        where = (f" (on {first.where}{more})" if first.ename in ONE_LINE
                 else f" on {first.where}{more}")
        # (an exception with nothing to say, raise KeyboardInterrupt: its name alone)
        said = f"{first.ename}: {first.evalue}" if first.evalue else first.ename
        super().__init__(f"{said}{where}")

    def _render_traceback_(self) -> list[str]:
        lines: list[str] = []
        for f in self.failures:
            if f.ename in ONE_LINE:
                # the cell asked for what a remote cell does not do (%pip, name?): the
                # message says what to do instead, and no traceback of the remote
                # shell's own frames helps
                lines += [f"{_header(f'Remote {f.ename}')}: {f.evalue} (on {f.where})", ""]
                continue
            lines.append(f"{_header(f'Remote {f.ename}')} on {f.where}")
            tb = f.traceback.rstrip("\n").splitlines()
            lines.extend(tb)
            if not _shows_exception(tb, f.ename, f.evalue):
                # e.g. a timeout: the remote traceback ends in the KeyboardInterrupt that
                # stopped the code; say why it was stopped
                lines.append(f"{f.ename}: {f.evalue}")
            lines.append("")
        return lines[:-1]


#: a frame's line in a Python traceback (a message's line that starts with File "..."
#: is none: the exception was said again after it)
_FRAME = re.compile(r'File ".*", line \d+')


def _shows_exception(tb: list[str], ename: str, evalue: str = "") -> bool:
    """Whether a traceback ends with the exception ``ename``'s own lines: after its last
    frame, whose message may have more lines, notes after it, or an exception group's
    ``|`` margin (only the last line was looked at, and the exception said again); or,
    where a line of the message looks like a frame (``File "a.csv", line 3: ...``),
    wherever the exception's first line is."""
    last = max((i for i, line in enumerate(tb) if _FRAME.match(line.lstrip(" |+"))),
               default=-1)
    if any(_ends_with_exception(line.lstrip(" |"), ename) for line in tb[last + 1:]):
        return True
    first = (evalue.splitlines() or [""])[0].strip()
    for line in tb:
        head, sep, rest = line.lstrip(" |").partition(":")
        if (head == ename or head.endswith("." + ename)) and (
                rest.strip() == first if sep else not first):
            return True
    return False


def _ends_with_exception(line: str, ename: str) -> bool:
    """Whether a traceback's last line is the exception ``ename``'s own: Python names an
    exception of a module with its module (``json.decoder.JSONDecodeError: ...``)."""
    head = line.split(":", 1)[0]
    return head == ename or head.endswith("." + ename)


class RemoteCellLost(MeshError):
    """A remote cell did not finish on some worker for a reason of the mesh's, not of
    its code (the worker died, its namespace was reset, a pull was missing...): one
    line that says why. ``results``: with ``--all``, the :class:`CellResult` of each
    worker where the cell ran to its end."""

    def __init__(self, message: str, results: list[Any] | None = None) -> None:
        super().__init__(message)
        self.results = list(results or ())


class RemoteInterrupt(KeyboardInterrupt):
    """Ctrl-C stopped a remote cell. IPython shows where the cell's code stopped on
    the worker, not the frames of the magic that waited for it."""

    def __init__(self, stopped: list[tuple[str, str]]) -> None:
        #: (where, the remote traceback up to where the code stopped) per worker
        self.stopped = stopped
        where = ", ".join(w for w, _ in stopped)
        # the one line nbclient and papermill show for the cell
        super().__init__(f"interrupted the remote cell{' on ' + where if where else ''}")

    def _render_traceback_(self) -> list[str]:
        lines: list[str] = []
        for where, tb in self.stopped:
            lines.append(f"{_header('Remote KeyboardInterrupt')} on {where}")
            lines.extend(tb.rstrip("\n").splitlines() or ["KeyboardInterrupt"])
        return lines or ["KeyboardInterrupt"]


class StoppedWaiting(KeyboardInterrupt):
    """Ctrl-C while a remote cell waited for a worker of its kind to come back: nothing
    ran. A ``KeyboardInterrupt``, so a loop that catches errors still stops; IPython
    shows its one line."""

    def _render_traceback_(self) -> list[str]:
        return [f"{_header('KeyboardInterrupt')}: {self}"]


class RemoteCellTimeout(RemoteCellError):
    """A remote cell ran longer than its ``timeout`` and was stopped."""


class CellSyntaxError(MeshError):
    """A remote cell does not compile; nothing was sent to a worker.

    IPython shows it as the syntax error alone (file, line, caret), without the frames
    of the magic that found it.
    """

    def __init__(self, error: SyntaxError | ValueError) -> None:
        self.error = error
        if isinstance(error, SyntaxError):
            where = f" (line {error.lineno})" if error.lineno else ""
            # ("source code string cannot contain null bytes (<string>)": no line)
            what = (error.msg or "invalid syntax").removesuffix(" (<string>)")
        else:
            where, what = "", str(error)
        super().__init__(f"{what}{where}; nothing was sent to a worker")

    def _render_traceback_(self) -> list[str]:
        import traceback

        lines = "".join(traceback.format_exception_only(type(self.error), self.error))
        return [*lines.rstrip("\n").splitlines(), "(nothing was sent to a worker)"]
