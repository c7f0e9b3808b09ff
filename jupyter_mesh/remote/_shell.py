"""IPython's cell syntax in remote cells: ``!cmd``, ``x = !cmd``, ``%time``, ``%timeit``.

The kernel turns a remote cell's IPython syntax into Python with IPython's own input
transformer (:func:`to_python`), exactly as the kernel does for its own cells:
``!ls`` becomes ``get_ipython().system('ls')``. On the worker there is no IPython shell,
so a remote namespace's ``get_ipython()`` answers :class:`RemoteShell`: it runs shell
commands on the worker with their output streamed into the notebook, times code like
``%time``/``%timeit``, and says in one line that any other magic runs in the kernel.
"""

from __future__ import annotations

import math
import os
import select
import subprocess
import sys
import time
import timeit
from typing import Any

#: magics a remote cell runs on the worker itself
REMOTE_MAGICS = ("time", "timeit")


class RemoteMagicError(Exception):
    """A magic that only the kernel has was used in a remote cell."""


def to_python(code: str) -> str:
    """Turn IPython syntax (``!cmd``, ``%magic``, ``x?``) into Python, as the kernel does."""
    from IPython.core.inputtransformer2 import TransformerManager

    try:
        return TransformerManager().transform_cell(code)
    except Exception:  # IPython could not read it: Python's compile says why
        return code


def _expand(cmd: str, depth: int) -> str:
    """``{name}`` and ``$name`` in a shell command, from the cell's names, as IPython does."""
    from IPython.utils.text import DollarFormatter

    frame = sys._getframe(depth + 1)
    names = {**frame.f_globals, **frame.f_locals}
    try:
        return DollarFormatter().vformat(cmd, args=[], kwargs=names)
    except Exception:  # as in IPython: what cannot be expanded is run as written
        return cmd


def _run(cmd: str, out: Any) -> int:
    """Run ``cmd`` in a shell on this worker; its output (stderr too) goes to ``out``
    while it runs. Ctrl-C in the notebook stops it (and raises KeyboardInterrupt)."""
    proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    pending = b""
    try:
        while True:
            # a short wait, so that a stop raised in this thread is seen within 0.1 s
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            text, pending = _decodable(pending)
            if text:
                out(text)
        if pending:
            out(pending.decode(errors="replace"))
        return proc.wait()
    except BaseException:
        _stop(proc)
        raise
    finally:
        proc.stdout.close()


def _decodable(data: bytes) -> tuple[str, bytes]:
    """Split off a trailing incomplete UTF-8 sequence (it arrives with the next read)."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode(), data[cut:]
        except UnicodeDecodeError:
            continue
    return data.decode(errors="replace"), b""


def _stop(proc: subprocess.Popen) -> None:
    """End a command and everything it started (its own process group)."""
    import signal

    for sig, wait in ((signal.SIGINT, 1.0), (signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _format_seconds(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


class RemoteShell:
    """What ``get_ipython()`` returns in a remote cell on a worker (not IPython's shell).

    Parameters
    ----------
    namespace:
        The notebook's namespace on this worker (``_exit_code`` is set there).
    """

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.user_ns = namespace

    def __repr__(self) -> str:
        return "<jupyter_mesh remote shell on a worker: !commands, %time and %timeit only>"

    # ------------------------------------------------------------ !cmd
    def system(self, cmd: str) -> None:
        """``!cmd``: run it on the worker; its output appears in the notebook."""
        code = _run(_expand(cmd, 1), sys.stdout.write)
        self.user_ns["_exit_code"] = code

    def getoutput(self, cmd: str, split: bool = True, depth: int = 0) -> Any:
        """``x = !cmd``: the command's output lines (stderr included), as IPython's SList."""
        from IPython.utils.text import SList

        parts: list[str] = []
        code = _run(_expand(cmd, depth + 1), parts.append)
        self.user_ns["_exit_code"] = code
        text = "".join(parts)
        return SList(text.splitlines()) if split else text

    # ------------------------------------------------------------ %magics
    def run_line_magic(self, name: str, line: str, _stack_depth: int = 1) -> Any:
        frame = sys._getframe(_stack_depth)
        if name == "time":
            return self._time(line, frame.f_globals, frame.f_locals)
        if name == "timeit":
            return self._timeit(line, None, frame.f_globals, frame.f_locals)
        raise RemoteMagicError(_refusal("%", name))

    def run_cell_magic(self, name: str, line: str, cell: str) -> Any:
        frame = sys._getframe(1)
        if name == "time":
            return self._time(cell, frame.f_globals, frame.f_locals)
        if name == "timeit":
            return self._timeit(line, cell, frame.f_globals, frame.f_locals)
        raise RemoteMagicError(_refusal("%%", name))

    def _time(self, source: str, globs: dict[str, Any], locs: Any) -> Any:
        import ast

        source = to_python(source)
        tree = ast.parse(source, "<remote %time>", "exec")
        last = None
        final = tree.body[-1] if tree.body else None
        if isinstance(final, ast.Expr):
            tree.body.pop()
            last = compile(ast.Expression(final.value), "<remote %time>", "eval")
        body = compile(tree, "<remote %time>", "exec")
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            exec(body, globs, locs)
            value = eval(last, globs, locs) if last is not None else None
        finally:
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            print(f"CPU time (this worker process): {_format_seconds(cpu)}\n"
                  f"Wall time: {_format_seconds(wall)}")
        return value

    def _timeit(self, line: str, cell: str | None, globs: dict[str, Any], locs: Any) -> None:
        """``%timeit [-n N] [-r R] [-q] STMT``, or ``%%timeit [-n N] [-r R] [-q] [SETUP]``
        with the cell as the statement."""
        options, rest = _timeit_options(line)
        stmt, setup = (rest, "") if cell is None else (cell, rest)
        stmt = to_python(stmt).strip() or "pass"
        setup = to_python(setup).strip() or "pass"
        names = {**globs, **(locs if isinstance(locs, dict) else {})}
        timer = timeit.Timer(stmt, setup, globals=names)
        number = options.get("n") or timer.autorange()[0]
        repeat = options.get("r") or 7
        runs = [t / number for t in timer.repeat(repeat=repeat, number=number)]
        if options.get("q"):
            return
        mean = sum(runs) / len(runs)
        std = math.sqrt(sum((r - mean) ** 2 for r in runs) / len(runs))
        loops = "loop" if number == 1 else "loops"
        print(f"{_format_seconds(mean)} ± {_format_seconds(std)} per loop "
              f"(mean ± std. dev. of {len(runs)} runs, {number:,} {loops} each)")


def _timeit_options(line: str) -> tuple[dict[str, int], str]:
    """IPython's ``%timeit`` options this shell has, and the rest of the line."""
    options: dict[str, int] = {}
    words = line.lstrip().split(None, 1)
    while words and words[0].startswith("-") and words[0] != "-":
        flag = words[0]
        rest = words[1] if len(words) > 1 else ""
        if flag == "-q":
            options["q"] = 1
            words = rest.split(None, 1)
            continue
        name, value = flag[1:2], flag[2:]
        if name in ("n", "r") and not value:
            value, _, rest = rest.partition(" ")
        if name not in ("n", "r") or not value.isdigit() or int(value) < 1:
            raise RemoteMagicError(
                f"%timeit takes -n N, -r R and -q only (whole numbers from 1), not {flag!r}; "
                f"other options run in a kernel cell")
        options[name] = int(value)
        words = rest.split(None, 1) if rest.strip() else []
    return options, " ".join(words)


def _refusal(prefix: str, name: str) -> str:
    if name in ("pinfo", "pinfo2"):
        return ("help (name? or name??) does not run in a remote cell: "
                "use help(name) there, or name? in a kernel cell")
    return (f"{prefix}{name} does not run in a remote cell (a worker has no IPython "
            f"shell; only !commands, %time and %timeit run there): run it in a kernel cell")
