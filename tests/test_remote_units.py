"""The pieces of remote cells that need no cluster: compile, run, stop, stream, render."""

from __future__ import annotations

import os
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from jupyter_mesh.errors import MeshError
from jupyter_mesh.remote import RemoteCellError, RemoteFailure, _client, _runner, _streams
from jupyter_mesh.remote._errors import RemoteInterrupt


class ListSink:
    def __init__(self):
        self.items = []

    def write(self, name, text):
        self.items.append((name, text))

    def display(self, data, metadata):
        self.items.append(("display", data))

    def flush(self):
        pass


def run_cell(code, namespace=None, **kwargs):
    done = threading.Event()
    box = {}

    def on_done(outcome):
        box["outcome"] = outcome
        done.set()

    sink = ListSink()
    cell = _runner.CellRun(code, "<test cell>", namespace if namespace is not None else {},
                           sink, on_done, **kwargs)
    cell.start()
    return cell, done, box, sink


def finish(done, box):
    assert done.wait(10)
    return box["outcome"]


def test_split_cell_separates_the_last_expression():
    body, last, quiet = _runner.split_cell("a = 1\na + 1", "<c>")
    ns = {}
    exec(body, ns)
    assert eval(last, ns) == 2 and not quiet
    assert _runner.split_cell("a = 1", "<c>")[1] is None
    # a trailing ; hides the value (as in IPython) but keeps it for -o
    _, last, quiet = _runner.split_cell("1 + 1;", "<c>")
    assert last is not None and eval(last) == 2 and quiet
    assert _runner.split_cell("6 * 7  # a comment; not code", "<c>")[2] is False
    assert _runner.split_cell("6 * 7;  # hidden", "<c>")[2] is True
    assert _runner.split_cell("s = ';'\ns", "<c>")[2] is False
    with pytest.raises(SyntaxError):
        _runner.split_cell("x = (", "<c>")


def test_a_cell_runs_with_its_output_captured():
    _streams.install()
    try:
        ns = {"__builtins__": __builtins__, "display": _runner.remote_display}
        cell, done, box, sink = run_cell(
            "import sys\nprint('out')\nprint('err', file=sys.stderr)\ndisplay(3)\nx = 5\nx * 2",
            ns, pull=["x"], want_value=True)
        outcome = finish(done, box)
    finally:
        _streams.uninstall()
    assert outcome["status"] == "ok"
    assert outcome["data"] == {"text/plain": "10"}
    assert set(outcome["pulled"]) == {"x"} and "value" in outcome
    assert ("stdout", "out") in sink.items and ("stderr", "err") in sink.items
    assert ("display", {"text/plain": "3"}) in sink.items
    assert ns["_"] == 10


def test_output_of_other_threads_is_not_captured(capsys):
    # a thread the cell did not start (e.g. a Dask task running beside it) keeps
    # writing to the worker's own streams
    _streams.install()
    try:
        sink = ListSink()
        go = threading.Event()

        def elsewhere():
            go.wait(5)
            print("elsewhere")

        other = threading.Thread(target=elsewhere)
        other.start()
        _streams.register(sink)
        try:
            go.set()
            other.join()
            print("mine")
        finally:
            _streams.unregister()
    finally:
        _streams.uninstall()
    assert sink.items == [("stdout", "mine"), ("stdout", "\n")]
    assert "elsewhere" in capsys.readouterr().out
    assert not isinstance(sys.stdout, _streams.ThreadRoutedStream)


def test_stop_interrupts_python_code():
    cell, done, box, _ = run_cell("n = 0\nwhile True:\n    n += 1")
    time.sleep(0.2)
    assert cell.stop("interrupted")
    assert not cell.stop("interrupted")  # once per cell
    outcome = finish(done, box)
    assert outcome["status"] == "interrupted" and outcome["ename"] == "KeyboardInterrupt"
    assert "<test cell>" in outcome["traceback"]
    assert not cell.stop("interrupted")


def test_stop_before_start():
    done = threading.Event()
    box = {}
    cell = _runner.CellRun("1", "<c>", {}, ListSink(), lambda o: (box.update(o=o), done.set()))
    assert cell.stop("timeout")
    cell.start()
    assert done.wait(5)
    assert box["o"]["status"] == "timeout"


def test_errors_keep_only_the_cells_frames():
    _, done, box, _ = run_cell("def f():\n    raise KeyError('k')\nf()")
    outcome = finish(done, box)
    assert outcome["status"] == "error" and outcome["ename"] == "KeyError"
    tb = outcome["traceback"]
    assert "_runner" not in tb and "<test cell>" in tb and "raise KeyError('k')" in tb


def test_errors_leave_out_what_the_runner_calls_for_the_cell_but_not_what_it_calls():
    # a failing __repr__ of the cell's value showed three frames of IPython's pretty
    # printer (which the runner calls to show it) above the cell's own
    code = ("class BadRepr:\n    def __repr__(self):\n        raise RuntimeError('repr broke')\n"
            "BadRepr()")
    _, done, box, _ = run_cell(code, want_value=True)
    outcome = finish(done, box)
    assert outcome["ename"] == "RuntimeError", outcome
    tb = outcome["traceback"]
    assert "IPython" not in tb and "pretty" not in tb, tb
    assert "<test cell>" in tb and "raise RuntimeError('repr broke')" in tb
    # Python's own library, called by the cell itself, stays in its traceback
    _, done, box, _ = run_cell("import json\njson.loads('{x')")
    tb = finish(done, box)["traceback"]
    assert "json" + os.sep in tb and "<test cell>" in tb, tb


def test_what_a_cell_hands_to_asyncio_keeps_its_frames():
    # asyncio's frames are the runner's to leave out, but a stdlib function the cell
    # itself hands to asyncio.to_thread lost its frames with them
    _, done, box, _ = run_cell("import asyncio, json\nasyncio.run(asyncio.to_thread("
                               "json.loads, '{'))")
    tb = finish(done, box)["traceback"]
    assert "json" + os.sep in tb and "<test cell>" in tb, tb


def test_a_stopped_shell_command_ends_at_the_cells_line():
    # the stop of a !command showed the selector's frame that polls it (ours) below
    # the cell's line
    from jupyter_mesh.remote._shell import RemoteShell

    namespace: dict = {}
    shell = RemoteShell(namespace)
    namespace["get_ipython"] = lambda: shell
    cell, done, box, _ = run_cell("get_ipython().system('sleep 30')", namespace,
                                  show_value=False)
    time.sleep(1.0)
    cell.stop("interrupted")
    tb = finish(done, box)["traceback"]
    assert "selectors" not in tb and "_shell" not in tb, tb
    assert "<test cell>" in tb


def test_system_exit_and_own_keyboard_interrupt_are_errors():
    for code, name in (("raise SystemExit(1)", "SystemExit"),
                       ("raise KeyboardInterrupt", "KeyboardInterrupt")):
        _, done, box, _ = run_cell(code)
        outcome = finish(done, box)
        assert (outcome["status"], outcome["ename"]) == ("error", name)


def test_missing_and_unsendable_pulls():
    _, done, box, _ = run_cell("a = 1", pull=["b"])
    assert finish(done, box)["status"] == "pull-missing"
    _, done, box, _ = run_cell("import threading\nlk = threading.Lock()", pull=["lk"])
    outcome = finish(done, box)
    assert outcome["status"] == "unsendable" and outcome["type"] == "lock"


def test_remote_error_renders_every_worker():
    fails = [RemoteFailure("ValueError", "bad", "Traceback ...\nValueError: bad\n",
                           "tcp://1:1", "cpu-0", "cpu", "numpy"),
             RemoteFailure("ValueError", "bad", "Traceback ...\nValueError: bad\n",
                           "tcp://1:2", "tpu-0", "tpu", "jax")]
    err = RemoteCellError(fails)
    lines = err._render_traceback_()
    assert "worker cpu-0 (cpu:numpy) at tcp://1:1" in lines[0]
    assert any("tpu-0 (tpu:jax)" in line for line in lines)
    assert str(err).startswith("ValueError: bad on worker cpu-0") and "1 more" in str(err)
    assert isinstance(err, MeshError)
    # an exception with nothing to say is named alone ("KeyboardInterrupt:  on ...")
    err = RemoteCellError([RemoteFailure("KeyboardInterrupt", "", "Traceback ...\n",
                                         "tcp://1:1", "cpu-0", "cpu", "numpy")])
    assert str(err).startswith("KeyboardInterrupt on worker cpu-0"), str(err)


def test_what_an_error_says_in_one_line():
    # Dask's serialization error has two arguments, what failed and the object's repr
    dask_error = TypeError("Could not serialize object of type lock", "<unlocked lock>")
    assert _runner.error_reason(dask_error) == "Could not serialize object of type lock"
    # any other error with several arguments says what str() says
    try:
        b"\xff".decode("utf-8")
    except UnicodeDecodeError as exc:
        assert _runner.error_reason(exc) == str(exc) and "can't decode byte" in str(exc)
    assert _runner.error_reason(KeyError("a", "b")) == "('a', 'b')"
    assert _runner.error_reason(ValueError("")) == "ValueError"


def test_an_exception_of_a_module_is_named_once():
    # Python names it with its module on the traceback's last line
    tb = ("Traceback ...\njson.decoder.JSONDecodeError: Expecting value: line 1 column 1 "
          "(char 0)\n")
    err = RemoteCellError([RemoteFailure("JSONDecodeError", "Expecting value: line 1 column "
                                         "1 (char 0)", tb, "tcp://1:1", "cpu-0", "cpu",
                                         "numpy")])
    shown = "\n".join(err._render_traceback_())
    assert shown.count("Expecting value") == 1


@pytest.mark.parametrize("colors, ansi", [("nocolor", False), ("linux", True)])
def test_remote_error_headers_follow_the_shells_colours(ip, colors, ansi):
    # a terminal started with --colors=nocolor (or %colors nocolor) gets no escapes
    fail = RemoteFailure("ValueError", "bad", "Traceback ...\nValueError: bad\n",
                         "tcp://1:1", "cpu-0", "cpu", "numpy")
    before = ip.colors
    try:
        ip.run_line_magic("colors", colors)
        for err in (RemoteCellError([fail]), RemoteInterrupt([("cpu-0", "KeyboardInterrupt")])):
            shown = "\n".join(err._render_traceback_())
            assert ("\x1b[" in shown) is ansi, shown
    finally:
        ip.run_line_magic("colors", before)


def test_an_interrupted_remote_cell_says_so_in_one_line():
    err = RemoteInterrupt([("worker cpu-0 (cpu:numpy)", "KeyboardInterrupt")])
    assert str(err) == "interrupted the remote cell on worker cpu-0 (cpu:numpy)"
    assert isinstance(err, KeyboardInterrupt)


def test_labels_follow_line_starts():
    state = {"stdout": "", "stderr": ""}
    out = _client._label_lines("a\nb", "[w] ", state, "stdout")
    assert out == "[w] a\n" and state["stdout"] == "b"  # the unfinished line waits
    out += _client._label_lines("c\n", "[w] ", state, "stdout")
    assert out == "[w] a\n[w] bc\n" and state["stdout"] == ""


def test_lines_of_two_workers_never_mix(capsys):
    """--all: pieces of one print() from two workers arrive interleaved."""
    runs = [
        _client._Run(device=SimpleNamespace(name=n, worker=n), message={}) for n in "ab"
    ]
    cells = _client.RemoteCells.__new__(_client.RemoteCells)
    for run, piece in [(runs[0], "pid"), (runs[1], "pid 2\n"), (runs[0], " 1\n"),
                       (runs[1], "tail")]:
        cells._show(run, ([["stream", "stdout", piece, 0.0]], 0.0), labelled=True)
    for run in runs:
        _client._flush_partial(run)
    assert capsys.readouterr().out.splitlines() == ["[b] pid 2", "[a] pid 1", "[b] tail"]


@pytest.mark.parametrize("bad", ["-1", "0", "x", "nan", "inf", True, -3, float("nan")])
def test_timeout_must_be_positive(bad):
    # named as the caller wrote it: run_cell's keyword, or the magic's flag
    with pytest.raises(MeshError, match="^timeout must be a positive number"):
        _client.check_timeout(bad)
    with _client.magic_words(), \
            pytest.raises(MeshError, match="^--timeout must be a positive number"):
        _client.check_timeout(bad)
    assert _client.opt("timeout", 0.5) == "timeout=0.5"


def test_names():
    assert _client.check_names(" a, b ,a", "--push") == ["a", "b"]
    assert _client.check_names(["x"], "--pull") == ["x"]
    for bad in ("a,,b", "1a", "for", "a.b"):
        with pytest.raises(MeshError):
            _client.check_names(bad, "--push")
    # Python's own names: a pulled __builtins__ replaced the notebook's with a dict
    for option in ("--pull", "--push"):
        with pytest.raises(MeshError, match=rf"^{option}: '__builtins__' is one of "
                                            r"Python's own names in a namespace: use a "
                                            r"name of your own$"):
            _client.check_names("x,__builtins__", option)
    with pytest.raises(MeshError, match="'__name__' is one of Python's own names"):
        _client.check_identifier("__name__", "-o")


@pytest.mark.parametrize("status, why", [
    ("worker-closing", r"the worker closed \(it restarted or left\)"),
    ("reset", r"its namespace was reset \(%mesh reset-remote\)"),
    ("client-gone", "the worker dropped this notebook's connection"),
])
def test_a_cell_the_worker_did_not_finish_is_one_line(status, why):
    # e.g. the worker restarts mid-cell: it answers "worker-closing"; the cell fails
    # with a line saying so (not an internal error), and its namespace is forgotten
    cells = _client.RemoteCells.__new__(_client.RemoteCells)
    cells.namespaces = {}
    dev = SimpleNamespace(name="cpu-0", worker="tcp://w:1", target="cpu:numpy")
    run = _client._Run(device=dev, message={}, final={"t": "done", "status": status})
    with pytest.raises(MeshError, match=rf"did not finish on cpu-0 \(cpu:numpy\): {why}; "
                                        r".* run the cell again"):
        cells._collect([run], interrupted=False, timeout=None)
    assert cells.namespaces == {}
    # when the user interrupted, it is the interrupt that is said
    with pytest.raises(KeyboardInterrupt):
        cells._collect([run], interrupted=True, timeout=None)


def test_a_namespaces_event_loop_is_kept_whichever_thread_runs_its_cells():
    import asyncio

    ns = {}

    def cell(code):
        body, last, _ = _runner.split_cell(code, "<loop test>")
        box = {}

        def go():
            in_loop = _runner.awaits(body, last)
            _runner.run_code(body, ns, in_loop)
            box["value"] = _runner.run_code(last, ns, in_loop) if last else None

        t = threading.Thread(target=go)  # a fresh thread for each cell
        t.start()
        t.join(10)
        return box.get("value")

    try:
        cell("import asyncio\nq = asyncio.Queue()\nawait q.put(7)\n"
             "async def forever():\n    await asyncio.sleep(3600)\n"
             "t = asyncio.get_running_loop().create_task(forever())")
        assert cell("await q.get()") == 7  # the queue's loop, in another thread
        task = ns["t"]
        assert not task.done()
    finally:
        # %mesh reset-remote: the loop's tasks are cancelled and the loop closed
        _runner.forget_loop(ns)
    assert task.cancelled() and task.get_loop().is_closed()
    assert isinstance(task.get_loop(), asyncio.AbstractEventLoop)


def test_a_cell_that_cancels_itself_is_not_taken_for_a_stop():
    import asyncio

    ns = {}
    body, last, _ = _runner.split_cell(
        "import asyncio\nasyncio.current_task().cancel()\nawait asyncio.sleep(1)",
        "<cancel test>")
    try:
        with pytest.raises(asyncio.CancelledError):
            _runner.run_code(body, ns, True)
    finally:
        _runner.forget_loop(ns)


def test_the_orphan_check_asks_a_scheduler_without_jupyter_mesh_once():
    # such a scheduler has no handler for the question: it logs a traceback and answers
    # None each time; the worker stops asking, and drops nothing
    import asyncio
    import types

    from jupyter_mesh.remote._worker_plugin import RemoteCellsPlugin, Session

    asked = []

    class PlainScheduler:
        async def jupyter_mesh_clients(self):
            asked.append(1)

    plugin = RemoteCellsPlugin()
    plugin.worker = types.SimpleNamespace(scheduler=PlainScheduler())
    session = Session("s1")
    session.client = "Client-gone"
    plugin.sessions["s1"] = session
    for _ in range(3):
        assert asyncio.run(plugin.drop_orphans()) == []
    assert asked == [1] and "s1" in plugin.sessions


def test_how_a_remote_cell_ended_on_each_worker_for_its_bar():
    def run(name, final=None, failure=None):
        r = _client._Run(SimpleNamespace(name=name, worker=f"tcp://{name}"), {})
        r.final, r.failure = final, failure
        return r

    runs = [run("a", {"status": "ok"}), run("b", {"status": "error"}),
            run("c", {"status": "timeout"}), run("d", {"status": "interrupted"}),
            run("e", failure=RuntimeError("lost the worker")),
            run("f", failure=_client._StillRunning(run("f"), False)),
            run("g", {"status": "pull-missing"}), run("h")]
    assert _client._ended(runs, pending={7}) == {
        "a": "finished", "b": "failed", "c": "timed out", "d": "stopped", "e": "failed",
        "f": "still running", "g": "failed"}


def test_only_the_remote_readers_deserialization_logs_are_left_out(caplog):
    # a failed pull is said in one line; Dask's own log of it is left out, but not that
    # of any other code deserializing meanwhile (a disabled logger dropped those too)
    import asyncio
    import logging

    log = logging.getLogger("distributed.protocol.pickle")

    async def reader():
        with _client._quiet_here():
            log.error("Failed to deserialize (the reader's)")
            await asyncio.sleep(0.01)  # another task runs meanwhile

    async def other():
        await asyncio.sleep(0)
        log.error("Failed to deserialize (another's)")

    async def both():
        await asyncio.gather(reader(), other())

    with caplog.at_level("ERROR", logger="distributed.protocol.pickle"):
        asyncio.run(both())
        log.error("Failed to deserialize (no loop)")
    assert [r.getMessage() for r in caplog.records] == [
        "Failed to deserialize (another's)", "Failed to deserialize (no loop)"]


def test_reset_waits_little_for_workers_of_a_scheduler_that_went_away():
    # %mesh reset-remote on a connected mesh whose scheduler died took about 10 s per
    # worker, waiting on a worker that is gone with it
    import asyncio
    import time
    from types import SimpleNamespace

    from jupyter_mesh.remote._client import RemoteCells

    class Hanging:
        async def jupyter_mesh_remote_reset(self, session):
            await asyncio.sleep(60)

    client = SimpleNamespace(status="closed", rpc=lambda addr: Hanging(),
                             sync=lambda fn: asyncio.run(fn()))
    cells = RemoteCells(SimpleNamespace(client=client, closed=False))
    cells.namespaces = {"tcp://127.0.0.1:9": SimpleNamespace(
        worker="tcp://127.0.0.1:9", name="cpu-0")}
    t0 = time.monotonic()
    assert cells.reset() == {"workers": []}
    assert time.monotonic() - t0 < 5
    assert cells.namespaces == {}


def test_the_names_ipython_keeps_for_itself():
    from jupyter_mesh.remote.magic import ipython_own

    for name in ("Out", "In", "_oh", "_", "___", "_7", "_i7", "_ii", "get_ipython", "exit"):
        assert ipython_own(name), name
    # a user's own names, some of them IPython's hidden ones after %pylab or a startup
    # file (mean, np): set from a worker as asked
    for name in ("mean", "np", "out", "_x", "_i7a", "result", "i"):
        assert not ipython_own(name), name


def test_a_stop_for_a_run_not_yet_begun_is_kept_while_an_older_cell_runs():
    # an older cell of the notebook, given up on, still runs when the stop for the next
    # one comes (its push on its way): that stop went to the older cell alone, and the
    # next one began all the same once it came
    from jupyter_mesh.remote._worker_plugin import RemoteCellsPlugin, Session

    class Running:
        done = False
        stopped = None

        def stop(self, reason):
            self.stopped = reason
            return True

    plugin = RemoteCellsPlugin()
    state = plugin.sessions["s"] = Session("s")
    state.running = old = Running()
    state.last_run = "old"
    assert plugin.interrupt("s", run="next") == {"running": False, "stopped": True,
                                                 "began": False}
    assert old.stopped == "interrupted" and "next" in plugin.cancelled
    # the run that runs: stopped, and said to run
    old.stopped = None
    assert plugin.interrupt("s", run="old") == {"running": True, "stopped": True}
    assert old.stopped == "interrupted" and "old" not in plugin.cancelled
    # the run that began and ended: its data on the way back, said so
    state.running = None
    assert plugin.interrupt("s", run="old") == {"running": False, "stopped": False,
                                                "began": True}
    assert "old" not in plugin.cancelled
