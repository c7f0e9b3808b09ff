"""IPython's cell syntax in remote cells: ``!cmd``, ``x = !cmd``, ``%time``, ``%timeit``,
top-level ``await``; other magics fail with one line and the worker stays usable."""

from __future__ import annotations

import _thread
import os
import re
import threading
import time

import pytest

from jupyter_mesh.remote import RemoteCellError
from jupyter_mesh.remote._shell import to_python

from .meshes import fresh_local_mesh, remote


@pytest.fixture(scope="module")
def mesh():
    with fresh_local_mesh(cpu=1) as m:
        yield m


def test_shell_command_runs_on_the_worker_and_its_output_reaches_the_notebook(
        ip, fresh, capsys):
    pid = fresh.run_cell("import os\nos.getpid()", value=True).value
    assert pid != os.getpid()
    remote(ip, "", "!echo pid $PPID; echo to-stderr >&2")
    out = capsys.readouterr().out
    # the shell's parent is the worker process, and stderr is shown as IPython shows it
    assert f"pid {pid}" in out and "to-stderr" in out


def test_shell_command_expands_the_cells_names_and_sets_exit_code(fresh):
    r = fresh.run_cell("name = 'mesh'\nlines = !echo hello {name}; echo $name; exit 3\n"
                       "(lines, _exit_code)", value=True)
    lines, code = r.value
    assert list(lines) == ["hello mesh", "mesh"] and code == 3
    assert lines.s == "hello mesh mesh"  # IPython's SList, as x = !cmd gives in a kernel


def test_interrupt_stops_a_running_shell_command(fresh, capsys):
    timer = threading.Timer(0.8, _thread.interrupt_main)
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        fresh.run_cell("!echo started; sleep 30; echo never")
    timer.join()
    assert time.monotonic() - started < 10
    out = capsys.readouterr().out
    assert "started" in out and "never" not in out
    # the worker runs the next cell at once: the command was stopped, not left running
    assert fresh.run_cell("1 + 1", value=True).value == 2


def test_time_and_timeit_run_on_the_worker(ip, fresh, capsys):
    remote(ip, "-o v", "import time\n%time v = sum(range(1000)); time.sleep(0.05)\nv")
    out = capsys.readouterr().out
    assert "Wall time:" in out and ip.user_ns["v"] == sum(range(1000))
    r = fresh.run_cell("%time 6 * 7", value=True)
    assert r.value == 42  # %time of an expression gives its value, as in IPython
    remote(ip, "", "%timeit sum(range(100))")
    assert "per loop (mean ± std. dev. of 7 runs" in capsys.readouterr().out
    remote(ip, "", "%timeit -n 3 -r 2 sum(range(100))")  # IPython's -n and -r
    assert "(mean ± std. dev. of 2 runs, 3 loops each)" in capsys.readouterr().out
    with pytest.raises(RemoteCellError, match="option -p not recognized; a remote cell's "
                                              "%timeit takes -n N, -r R and -q"):
        fresh.run_cell("%timeit -p 3 sum(range(100))")
    remote(ip, "", "%%timeit\nsum(range(100))")
    assert "per loop" in capsys.readouterr().out
    remote(ip, "", "%%time\nw = 5\nw * 2")
    assert "Wall time:" in capsys.readouterr().out


@pytest.mark.parametrize("cell, shown", [
    ("%who", "%who does not run in a remote cell"),
    ("%%writefile f.txt\nhello", "%%writefile does not run in a remote cell"),
    ("len?", "help (name? or name??) does not run in a remote cell"),
])
def test_kernel_only_magics_fail_with_one_line_and_the_worker_stays(fresh, cell, shown):
    fresh.run_cell("kept = 1")
    with pytest.raises(RemoteCellError) as info:
        fresh.run_cell(cell)
    assert info.value.ename == "RemoteMagicError" and shown in str(info.value)
    assert "run it in a kernel cell" in str(info.value) or "help(name)" in str(info.value)
    # where it ran in parentheses, after what to do (it read "... run it in a kernel
    # cell on worker cpu-0")
    assert re.search(r"\(on worker \S+ \(cpu:numpy\) at \S+\)$", str(info.value)), str(info.value)
    # shown as one line (the remote shell's own frames would help no one)
    (line,) = info.value._render_traceback_()
    assert shown in line and "on worker " in line
    assert fresh.run_cell("kept", value=True).value == 1  # nothing was lost


def test_top_level_await_runs_on_the_worker(fresh):
    r = fresh.run_cell(
        "import asyncio\n"
        "async def double(x):\n"
        "    await asyncio.sleep(0.01)\n"
        "    return 2 * x\n"
        "a = await double(4)\n"
        "await double(a)", value=True)
    assert r.value == 16
    assert fresh.run_cell("a", value=True).value == 8  # names it set stay
    # an object bound to the cell's loop (a queue) works in the next cell too
    fresh.run_cell("q = asyncio.Queue()\nawait q.put(5)")
    assert fresh.run_cell("await q.get()", value=True).value == 5


def test_interrupt_of_an_awaiting_cell(fresh):
    timer = threading.Timer(0.6, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        fresh.run_cell("import asyncio\nq = asyncio.Queue()\nafter = 0\n"
                       "async def later():\n"
                       "    global after\n"
                       "    await asyncio.sleep(2)\n"
                       "    after = 1\n"
                       "await later()")
    timer.join()
    # the interrupted coroutine was cancelled: it does not go on in the next cell
    # that awaits, and the loop (with what was made on it) stays usable
    r = fresh.run_cell("await q.put(3)\nawait asyncio.sleep(2.5)\n(await q.get(), after)",
                       value=True)
    assert r.value == (3, 0)


def test_plain_python_is_left_as_it_is():
    cell = 's = """\n!not a command\n%not a magic\n"""\nx = 1 if s else 2\n'
    assert to_python(cell) == cell


def test_background_commands(fresh):
    # a trailing & is refused, as IPython refuses it
    with pytest.raises(RemoteCellError, match="background processes are not supported"):
        fresh.run_cell("!sleep 5 &")
    # a job the command leaves running does not hold the cell: it ends with its shell
    started = time.monotonic()
    r = fresh.run_cell("out = !(sleep 3; echo late) & echo now\nout", value=True)
    assert list(r.value) == ["now"] and time.monotonic() - started < 2.5


def test_the_shell_survives_the_cells_own_get_ipython(fresh, capsys):
    fresh.run_cell("from IPython import get_ipython\nip = get_ipython()\n!echo one")
    fresh.run_cell("del get_ipython\n!echo two")
    out = capsys.readouterr().out
    assert "one" in out and "two" in out


def test_commands_run_on_a_terminal_in_the_users_shell(fresh, capsys):
    # as IPython's !: programs see a terminal (so they write line by line), and the
    # shell is $SHELL
    import shutil

    fresh.run_cell("!test -t 1 && echo on-a-tty; echo \"shell=$(readlink /proc/$$/exe)\"")
    out = capsys.readouterr().out
    assert "on-a-tty" in out and "\r" not in out
    shell = os.path.realpath(shutil.which(os.environ.get("SHELL") or "sh"))
    assert f"shell={shell}\n" in out


def test_a_trailing_semicolon_hides_the_value_of_a_magic(fresh):
    assert fresh.run_cell("%time 6 * 7;").data is None
    assert fresh.run_cell("%time 6 * 7").data["text/plain"] == "42"


def test_magic_misuse_is_one_line(fresh):
    with pytest.raises(RemoteCellError, match="%%time takes no statement on its own line"):
        fresh.run_cell("%%time x = 1\ny = 2")
    with pytest.raises(RemoteCellError, match="!pip install"):
        fresh.run_cell("%pip install numpy")
    with pytest.raises(RemoteCellError, match="os.chdir"):
        fresh.run_cell("%cd /tmp")
    with pytest.raises(RemoteCellError, match="-r takes a whole number"):
        fresh.run_cell("%timeit -r 0 pass")


def test_timeit_options_as_ipython_reads_them(fresh, capsys):
    fresh.run_cell("%timeit -qn3 pass")  # combined, quiet
    assert capsys.readouterr().out == ""
    fresh.run_cell("%timeit -n0 -r1   'a  b'.split()")  # -n 0 chooses; spacing kept
    out = capsys.readouterr().out
    assert "(mean ± std. dev. of 1 run, " in out
    loops = int(out.split("1 run, ")[1].split()[0].replace(",", ""))
    assert str(loops).strip("0") == "1"  # a power of ten, as IPython picks


def test_a_failing_timed_statement_shows_its_own_line(fresh):
    with pytest.raises(RemoteCellError) as info:
        fresh.run_cell("%time 1 / 0")
    text = "\n".join(info.value._render_traceback_())
    assert "ZeroDivisionError" in text and "1 / 0" in text
    assert "_shell.py" not in text and "timeit.py" not in text


def test_tasks_of_earlier_cells_outlive_an_interrupted_cell(fresh):
    fresh.run_cell(
        "import asyncio\nticks = 0\n"
        "async def tick():\n"
        "    global ticks\n"
        "    while True:\n"
        "        ticks += 1\n"
        "        await asyncio.sleep(0.01)\n"
        "t = asyncio.create_task(tick())\n"
        "await asyncio.sleep(0.1)")
    timer = threading.Timer(0.6, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        fresh.run_cell("await asyncio.sleep(30)")
    timer.join()
    r = fresh.run_cell("n = ticks\nawait asyncio.sleep(0.2)\n(t.cancelled(), ticks > n)",
                       value=True)
    assert r.value == (False, True)


def test_the_last_expression_of_an_awaiting_cell_runs_in_its_loop(fresh):
    r = fresh.run_cell("import asyncio\nawait asyncio.sleep(0)\n"
                       "(asyncio.current_task() is not None, "
                       "asyncio.get_event_loop() is asyncio.get_running_loop())",
                       value=True)
    assert r.value == (True, True)


def test_interrupt_stops_a_command_that_writes_elsewhere(fresh, tmp_path):
    # `cmd > log` lets go of the terminal at once: Ctrl-C must still stop it
    log = tmp_path / "log"
    timer = threading.Timer(0.8, _thread.interrupt_main)
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        fresh.run_cell(f"!sleep 30 > {log} 2>&1")
    timer.join()
    assert time.monotonic() - started < 10
    assert fresh.run_cell("1 + 1", value=True).value == 2


def test_interrupt_of_a_coroutine_that_never_yields(fresh):
    timer = threading.Timer(0.6, _thread.interrupt_main)
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        fresh.run_cell("import asyncio\nn = 0\nawait asyncio.sleep(0)\n"
                       "while True:\n    n += 1")
    timer.join()
    assert time.monotonic() - started < 10
    assert fresh.run_cell("await asyncio.sleep(0)\n5", value=True).value == 5
