"""IPython's cell syntax in remote cells: ``!cmd``, ``x = !cmd``, ``%time``, ``%timeit``.

The kernel turns a remote cell's IPython syntax into Python with IPython's own input
transformer (:func:`to_python`), as the kernel does for its own cells: ``!ls`` becomes
a call of ``system('ls')`` on the shell. On the worker there is no IPython shell, so
the remote namespace has :class:`RemoteShell` instead (as ``get_ipython()`` and, for
the transformed lines, as ``__mesh_shell__()``, which a cell's own ``from IPython
import get_ipython`` cannot replace): it runs shell commands on the worker with their
output streamed into the notebook, times code like ``%time``/``%timeit``, and says in
one line what to do instead for any other magic.
"""

from __future__ import annotations

import getopt
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
import timeit
from typing import Any

#: the name transformed lines call for the shell (kept apart from ``get_ipython``)
SHELL_NAME = "__mesh_shell__"
#: the shell methods IPython's input transformer writes calls of
_GENERATED = ("system", "getoutput", "run_line_magic", "run_cell_magic")


class RemoteMagicError(Exception):
    """A magic that only the kernel has was used in a remote cell."""


def to_python(code: str) -> str:
    """Turn IPython syntax (``!cmd``, ``%magic``, ``x?``) into Python, as the kernel does."""
    from IPython.core.inputtransformer2 import TransformerManager

    from ._runner import ends_quiet

    try:
        out = TransformerManager().transform_cell(code)
    except Exception:  # IPython could not read it: Python's compile says why
        return code
    if out == code:
        return out
    # the calls IPython made (none of which the cell wrote itself) call the remote
    # shell by a name of its own, which the cell's `from IPython import get_ipython`
    # cannot shadow
    for call in _GENERATED:
        if f"get_ipython().{call}(" not in code:
            out = out.replace(f"get_ipython().{call}(", f"{SHELL_NAME}().{call}(")
    if ends_quiet(code) and not ends_quiet(out):
        out = out.rstrip("\n") + ";\n"  # `%time 6*7;` hides its value, as in IPython
    return out


def _expand(cmd: str, depth: int) -> str:
    """``{name}`` and ``$name`` in a shell command, from the cell's names, as IPython does."""
    from IPython.utils.text import DollarFormatter

    frame = sys._getframe(depth + 1)
    names = {**frame.f_globals, **frame.f_locals}
    try:
        return DollarFormatter().vformat(cmd, args=[], kwargs=names)
    except Exception:  # as in IPython: what cannot be expanded is run as written
        return cmd


def _shell() -> str:
    """The user's shell, as IPython's ``!`` uses (``$SHELL``, else ``sh``)."""
    return shutil.which(os.environ.get("SHELL") or "sh") or "/bin/sh"


def _run(cmd: str, out: Any, tty: bool) -> int:
    """Run ``cmd`` in a shell on this worker; its output (stderr too) goes to ``out``
    while it runs. With ``tty`` on a pseudo-terminal, as IPython's ``!`` does (programs
    then write line by line, in colour); else on a pipe. Ctrl-C in the notebook stops
    it and whatever it started (KeyboardInterrupt)."""
    if cmd.rstrip().endswith("&"):
        raise OSError("background processes are not supported in !commands (as in "
                      "IPython): use subprocess.Popen, or nohup CMD > log 2>&1 &")
    master = slave = -1
    if tty:
        import pty
        import termios

        master, slave = pty.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.ONLCR  # "\n" stays "\n"
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        sink: Any = slave
    else:
        sink = subprocess.PIPE
    try:
        proc = subprocess.Popen([_shell(), "-c", cmd], stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except BaseException:
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)
        raise
    if tty:
        os.close(slave)
        fd = master
    else:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
    pending = b""
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    exited_at = None
    try:
        while True:
            # a short wait, so that a stop raised in this thread is seen within 0.1 s
            if not sel.select(0.1):
                if proc.poll() is None:
                    continue
                # the shell ended; what it left running in the background may hold the
                # output open: read what is there, then stop waiting for it
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > 0.2:
                    break
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # a pseudo-terminal whose last writer closed it
                chunk = b""
            if not chunk:
                # the output closed (all of it sent, or the command writes elsewhere:
                # `cmd > log`): wait for the command in short steps, so a stop is seen
                sel.unregister(fd)
                while proc.poll() is None:
                    time.sleep(0.1)
                break
            pending += chunk
            text, pending = _decodable(pending)
            if text:
                out(text)
        if pending:
            out(pending.decode(errors="replace"))
        return _exit_code(proc.wait())
    except BaseException:
        _stop(proc)
        raise
    finally:
        sel.close()
        if tty:
            os.close(master)
        elif proc.stdout is not None:
            proc.stdout.close()


def _exit_code(code: int) -> int:
    """A command ended by signal N has exit code 128 + N, as a shell (and IPython) says."""
    return 128 - code if code < 0 else code


def _decodable(data: bytes) -> tuple[str, bytes]:
    """Split off a trailing incomplete UTF-8 sequence (it arrives with the next read)."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode(), data[cut:]
        except UnicodeDecodeError:
            continue
    return data.decode(errors="replace"), b""


def _stop(proc: subprocess.Popen) -> None:
    """End a command and everything it started (its own process group), even what it
    left running after its shell ended."""
    for sig, wait in ((signal.SIGINT, 1.0), (signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break  # nothing of the group is left
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        if not _group_alive(proc.pid):
            break
        time.sleep(0.05)
    proc.poll()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


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
        code = _run(_expand(cmd, 1), sys.stdout.write, tty=True)
        self.user_ns["_exit_code"] = code

    def getoutput(self, cmd: str, split: bool = True, depth: int = 0) -> Any:
        """``x = !cmd``: the command's output lines (stderr included), as IPython's SList."""
        from IPython.utils.text import SList

        parts: list[str] = []
        code = _run(_expand(cmd, depth + 1), parts.append, tty=False)
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
            if line.strip():
                raise RemoteMagicError("%%time takes no statement on its own line: put "
                                       "the code on the lines below it (as in IPython)")
            return self._time(cell, frame.f_globals, frame.f_locals)
        if name == "timeit":
            return self._timeit(line, cell, frame.f_globals, frame.f_locals)
        raise RemoteMagicError(_refusal("%%", name))

    def _time(self, source: str, globs: dict[str, Any], locs: Any) -> Any:
        import ast

        from ._runner import remember_source

        filename = "<remote %time>"
        source = to_python(source)
        remember_source(filename, source)
        tree = ast.parse(source, filename, "exec")
        last = None
        final = tree.body[-1] if tree.body else None
        if isinstance(final, ast.Expr):
            tree.body.pop()
            last = compile(ast.Expression(final.value), filename, "eval")
        body = compile(tree, filename, "exec")
        before, wall = os.times(), time.perf_counter()
        try:
            exec(body, globs, locs)
            value = eval(last, globs, locs) if last is not None else None
        finally:
            wall = time.perf_counter() - wall
            after = os.times()
            user, system = after.user - before.user, after.system - before.system
            print(f"CPU times (the worker process): user {_format_seconds(user)}, "
                  f"sys: {_format_seconds(system)}, "
                  f"total: {_format_seconds(user + system)}\n"
                  f"Wall time: {_format_seconds(wall)}")
        return value

    def _timeit(self, line: str, cell: str | None, globs: dict[str, Any], locs: Any) -> None:
        """``%timeit [-n N] [-r R] [-q] STMT``, or ``%%timeit [-n N] [-r R] [-q] [SETUP]``
        with the cell as the statement (IPython's options; ``-n 0`` chooses)."""
        options, rest = _timeit_options(line)
        stmt, setup = (rest, "") if cell is None else (cell, rest)
        stmt = to_python(stmt).strip() or "pass"
        setup = to_python(setup).strip() or "pass"
        names = {**globs, **(locs if isinstance(locs, dict) else {})}
        timer = timeit.Timer(stmt, setup, globals=names)
        number = options.get("n") or _autorange(timer)
        repeat = options.get("r") or 7
        runs = [t / number for t in timer.repeat(repeat=repeat, number=number)]
        if options.get("q"):
            return
        mean = sum(runs) / len(runs)
        std = math.sqrt(sum((r - mean) ** 2 for r in runs) / len(runs))
        loops = "loop" if number == 1 else "loops"
        what = "run" if len(runs) == 1 else "runs"
        print(f"{_format_seconds(mean)} ± {_format_seconds(std)} per loop "
              f"(mean ± std. dev. of {len(runs)} {what}, {number:,} {loops} each)")


def _autorange(timer: timeit.Timer) -> int:
    """Loops per run as IPython chooses them: the first power of 10 taking 0.2 s."""
    number = 1
    for power in range(10):
        number = 10 ** power
        if timer.timeit(number) >= 0.2:
            break
    return number


def _timeit_options(line: str) -> tuple[dict[str, int], str]:
    """IPython's ``%timeit`` options this shell has (``-n N -r R -q``, combined as
    getopt allows: ``-qn3``), and the rest of the line as it was written."""
    words = line.split()
    try:
        opts, rest = getopt.getopt(words, "n:r:q")
    except getopt.GetoptError as exc:
        raise RemoteMagicError(f"%timeit: {exc}; a remote cell's %timeit takes -n N, -r R "
                               f"and -q (other options run in a kernel cell)") from None
    options: dict[str, int] = {}
    for flag, value in opts:
        if flag == "-q":
            options["q"] = 1
            continue
        if not value.isdigit() or (flag == "-r" and int(value) < 1):
            raise RemoteMagicError(f"%timeit {flag} takes a whole number "
                                   f"({'0 chooses, ' if flag == '-n' else ''}from 1), "
                                   f"not {value!r}")
        options[flag[1]] = int(value)
    used = len(words) - len(rest)
    # the statement as written (its own spacing kept), after the option words
    statement = re.sub(rf"^\s*(?:\S+\s+){{{used}}}", "", line, count=1) if used else line
    return options, statement.strip() if rest else ""


#: what to use instead of a kernel magic in a remote cell
_INSTEAD = {
    "pip": "use !pip install ... to install on the worker",
    "conda": "use !conda ... to run it on the worker",
    "cd": "use os.chdir(path) on the worker",
    "env": "use os.environ on the worker",
    "pwd": "use os.getcwd() on the worker",
    "run": "use !python FILE, or exec(open(FILE).read())",
}


def _refusal(prefix: str, name: str) -> str:
    if name in ("pinfo", "pinfo2"):
        return ("help (name? or name??) does not run in a remote cell: "
                "use help(name) there, or name? in a kernel cell")
    instead = _INSTEAD.get(name, "run it in a kernel cell")
    return (f"{prefix}{name} does not run in a remote cell (a worker has no IPython "
            f"shell; only !commands, %time and %timeit run there): {instead}")
