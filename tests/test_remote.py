"""Remote cells in this process: ``Mesh.run_cell`` and the ``%%mesh --remote`` magic.

One small mesh (a NumPy CPU worker and a JAX CPU worker) is shared by the module;
the IPython shell (``ip``) is the session-wide one from conftest.py.
"""

from __future__ import annotations

import _thread
import re
import threading
import time

import numpy as np
import pytest
from IPython.core.error import UsageError

import jupyter_mesh as jm
from jupyter_mesh import _state
from jupyter_mesh.remote import (
    CellSyntaxError,
    RemoteCellError,
    RemoteCellTimeout,
    _client,
    _worker_plugin,
)

from .meshes import fresh_local_mesh, record_remote_output, remote, when_whole


@pytest.fixture(scope="module")
def mesh():
    with fresh_local_mesh(cpu=1, jax_cpu=1, site="lab") as m:
        yield m




def worker_sessions(mesh):
    def count(dask_worker):
        ext = dask_worker.extensions.get("jupyter-mesh-remote")
        return {s.id: s.cells for s in ext.sessions.values()} if ext else {}

    return mesh.client.run(count)


# ---------------------------------------------------------------- state, push, pull
def test_push_state_and_pull_through_the_magic(ip, fresh, capsys):
    ip.user_ns["a"] = 21
    remote(ip, "--push a", "b = a * 2\nprint(b)")
    assert capsys.readouterr().out == "42\n"
    assert "b" not in ip.user_ns or ip.user_ns["b"] != 42
    remote(ip, "--pull b", "b = b + 1")
    assert ip.user_ns["b"] == 43


def test_later_cells_stick_to_one_worker(fresh):
    pids = {fresh.run_cell("import os\nos.getpid()", on="cpu", value=True).value
            for _ in range(3)}
    assert len(pids) == 1
    r = fresh.run_cell("x = 1", on="cpu")
    assert fresh.run_cell("x + 1", on="cpu", value=True).value == 2
    assert fresh.run_cell("x", on="cpu").worker == r.worker


def test_last_expression_is_the_cells_output(ip, fresh):
    result = ip.run_cell("%%mesh --remote\n6 * 7")
    assert result.success
    assert repr(result.result) == "42"
    assert ip.run_cell("%%mesh --remote\n6 * 7;").result is None
    assert ip.run_cell("%%mesh --remote\nnone = None\nnone").result is None


def test_output_option_stores_the_value(ip, fresh, capsys):
    remote(ip, "-o res", "import numpy as np\nnp.arange(4) * 2")
    np.testing.assert_array_equal(ip.user_ns["res"], [0, 2, 4, 6])
    # a trailing ; hides the value, as in a local cell, but -o still stores it
    result = ip.run_cell("%%mesh --remote -o res\n6 * 7;")
    assert result.success and result.result is None and ip.user_ns["res"] == 42
    # a ; in a comment hides nothing
    assert repr(ip.run_cell("%%mesh --remote\n6 * 7  # done;").result) == "42"
    # a value of None is stored; a cell that ends with a statement has no value, and
    # the name keeps what it held (it is not overwritten with None), with a note
    remote(ip, "-o res", "None")
    assert "res" in ip.user_ns and ip.user_ns["res"] is None
    ip.user_ns["keep"] = "precious"
    for flags in ("-o keep", "--all -o keep"):
        capsys.readouterr()
        result = ip.run_cell(f"%%mesh --remote {flags}\nz = 1")
        assert result.success and ip.user_ns["keep"] == "precious"
        err = capsys.readouterr().err
        assert "-o keep: the cell does not end with an expression" in err
        assert err.count("\n") == 1


def test_large_arrays_push_and_pull(ip, fresh):
    big = np.random.default_rng(0).random(4_000_000)  # 32 MB
    ip.user_ns["big"] = big
    remote(ip, "--push big --pull twice", "twice = big * 2")
    np.testing.assert_array_equal(ip.user_ns["twice"], big * 2)


def test_rich_display_comes_back(fresh, monkeypatch):
    shown = []
    monkeypatch.setattr(_client, "_display", lambda data, md, *extra: shown.append(data))
    r = fresh.run_cell(
        "from IPython.display import HTML\ndisplay(HTML('<b>hi</b>'))\nHTML('<i>last</i>')"
    )
    assert shown[0]["text/html"] == "<b>hi</b>"
    assert r.data["text/html"] == "<i>last</i>"
    # IPython's own display, imported as usual, reaches the notebook too, in this cell
    # and in the next ones (it printed "<IPython.core.display.HTML object>" before)
    fresh.run_cell("from IPython.display import display, HTML, clear_output\n"
                   "display(HTML('<b>ipython</b>'))")
    fresh.run_cell("class H:\n    def _repr_html_(self):\n        return '<u>h</u>'\n"
                   "display(H())")
    assert [d.get("text/html") for d in shown[1:]] == ["<b>ipython</b>", "<u>h</u>"]


def test_a_widget_made_remotely_shows_as_text_and_says_why(ip, fresh, capsys, monkeypatch):
    # its model lives on the worker: the frontend showed "Error displaying widget:
    # model not found" where it was displayed, and as the cell's value
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display",
                        lambda data, **kwargs: shown.append(data))
    out = remote(ip, "", "import ipywidgets\nw = ipywidgets.IntSlider(value=3)\n"
                         "display(w)\nw")
    assert shown and all(_client.WIDGET_MIME not in d for d in shown), shown
    assert "IntSlider" in shown[0]["text/plain"]
    assert _client.WIDGET_MIME not in out.data and "IntSlider" in repr(out)
    err = capsys.readouterr().err
    assert "a widget made in a remote cell cannot show here" in err, err


@pytest.mark.parametrize("cell", [
    "import time\nprint('first', flush=True)\ntime.sleep(3)\nprint('second')",
    "!echo first; sleep 3; echo second",  # a shell command's output streams too
])
def test_output_streams_while_the_cell_runs(fresh, monkeypatch, cell):
    arrivals = record_remote_output(monkeypatch)
    fresh.run_cell(cell)
    ended = time.monotonic()
    # the line may come in pieces ('first', then its newline): when it was whole
    whole, text = when_whole(arrivals, "first\n")
    assert whole is not None and "second" not in text
    # the first line came well before the cell ended (half its sleep: room for a
    # loaded machine, while output held back to the end would arrive with it)
    assert ended - whole > 1.5


# ---------------------------------------------------------------- targets
def test_on_cpu_jax_runs_on_the_jax_worker(ip, fresh):
    r = fresh.run_cell(
        "import jax, jax.numpy as jnp\n(jax.default_backend(), float(jnp.ones(3).sum()))",
        on="cpu:jax", value=True,
    )
    assert (r.kind, r.backend) == ("cpu", "jax")
    assert r.value == ("cpu", 3.0)
    remote(ip, "--on cpu:jax -o backend_name", "import jax\njax.default_backend()")
    assert ip.user_ns["backend_name"] == "cpu"


def test_device_arrays_come_back_as_numpy_arrays(ip, fresh):
    # a JAX (or CuPy) array pulled or returned from a device worker arrives as a NumPy
    # array, inside containers too: the notebook's kernel may have no device library
    r = fresh.run_cell(
        "import jax.numpy as jnp\nx = jnp.arange(3.0)\nboth = {'x': [x, (x * 2,)]}\nx + 1",
        on="cpu:jax", value=True, pull="x,both")
    assert type(r.value) is np.ndarray and r.value.tolist() == [1.0, 2.0, 3.0]
    assert type(r.pulled["x"]) is np.ndarray
    inner = r.pulled["both"]["x"]
    assert type(inner[0]) is np.ndarray and type(inner[1][0]) is np.ndarray
    assert inner[1][0].tolist() == [0.0, 2.0, 4.0]


def test_on_cpu_numpy_and_site(fresh):
    r = fresh.run_cell("1", on="cpu:numpy", site="lab")
    assert (r.backend, r.site) == ("numpy", "lab")


def test_on_a_kind_alone_takes_its_own_backends_worker(fresh):
    # --on cpu went to the JAX CPU worker where it held the notebook's namespace (as in
    # the remote-cells example), which --on cpu:jax names
    assert fresh.run_cell("1", on="cpu:jax").backend == "jax"
    for _ in range(3):
        assert fresh.run_cell("1", on="cpu").backend == "numpy"


def test_all_runs_everywhere_with_labelled_output(ip, fresh, capsys):
    remote(ip, "--all -o where", "import os\nprint('pid', os.getpid())\nos.getpid()")
    out = capsys.readouterr().out
    assert "[cpu-0] pid " in out and "[jax-cpu-0] pid " in out
    assert "Out[cpu-0]:" in out and "Out[jax-cpu-0]:" in out
    where = ip.user_ns["where"]
    assert set(where) == {"cpu-0", "jax-cpu-0"} and len(set(where.values())) == 2
    results = fresh.run_cell("1", all=True)
    assert sorted(r.backend for r in results) == ["jax", "numpy"]


def test_all_with_pull_gives_one_value_per_worker(ip, fresh):
    remote(ip, "--all --pull k", "import jupyter_mesh\nk = 5")
    assert ip.user_ns["k"] == {"cpu-0": 5, "jax-cpu-0": 5}


def test_all_where_one_worker_fails_keeps_the_others_outputs(ip, fresh, capsys):
    # the cell fails (one worker raised), and the workers where it ran to its end are
    # shown and kept on the error, not hidden by the failure; no name is set
    cell = ("from jupyter_mesh.router._device import worker_backend\n"
            "k = worker_backend()\n"
            "assert k == 'numpy', 'not on ' + k\n"
            "k * 2")
    ip.user_ns["k"] = "before"
    ip.user_ns.pop("got", None)
    with pytest.raises(RemoteCellError) as info:
        remote(ip, "--all --pull k -o got", cell)
    out = capsys.readouterr().out
    assert "Out[cpu-0]:" in out and "numpynumpy" in out and "Out[jax-cpu-0]" not in out
    assert [f.name for f in info.value.failures] == ["jax-cpu-0"]
    assert "AssertionError: not on jax" in "\n".join(info.value._render_traceback_())
    assert ip.user_ns["k"] == "before" and "got" not in ip.user_ns
    # from Python: the error holds the results of those that ran to their end
    with pytest.raises(RemoteCellError) as info:
        fresh.run_cell(cell, all=True, pull="k", value=True)
    (ok,) = info.value.results
    assert (ok.name, ok.value, ok.pulled) == ("cpu-0", "numpynumpy", {"k": "numpy"})


def test_all_where_the_mesh_fails_one_worker_keeps_the_others_outputs(ip, fresh, capsys):
    # not the cell's error but the mesh's (a pull missing there, a worker that died):
    # the workers where it ran to its end were not shown, and the error held nothing
    cell = ("from jupyter_mesh.router._device import worker_backend\n"
            "if worker_backend() == 'numpy':\n"
            "    k = 1\n"
            "'done'")
    ip.user_ns["k"] = "before"
    with pytest.raises(UsageError, match="--pull: 'k' is not defined on jax-cpu-0"):
        remote(ip, "--all --pull k", cell)
    out = capsys.readouterr().out
    assert "Out[cpu-0]:\n'done'" in out and "Out[jax-cpu-0]" not in out, out
    assert ip.user_ns["k"] == "before"
    with pytest.raises(jm.MeshError) as info:
        fresh.run_cell(cell, all=True, pull="k", value=True)
    (ok,) = info.value.results
    assert (ok.name, ok.value, ok.pulled) == ("cpu-0", "done", {"k": 1})


# ---------------------------------------------------------------- errors
def test_remote_exception_shows_remote_traceback_worker_and_kind(fresh):
    with pytest.raises(RemoteCellError) as info:
        fresh.run_cell("def f():\n    return 1 / 0\nf()", on="cpu:numpy")
    err = info.value
    assert (err.ename, err.kind, err.backend) == ("ZeroDivisionError", "cpu", "numpy")
    text = "\n".join(err._render_traceback_())
    assert "Remote ZeroDivisionError" in text and "cpu-0 (cpu:numpy)" in text
    assert "return 1 / 0" in text and "in f" in text
    assert "distributed" not in text and "_runner" not in text


def test_remote_exception_fails_the_cell_in_ipython(ip, fresh, capsys):
    result = ip.run_cell("%%mesh --remote --on cpu:jax\nraise ValueError('nope')")
    assert isinstance(result.error_in_exec, RemoteCellError)
    out = capsys.readouterr()
    shown = out.out + out.err
    assert "Remote ValueError" in shown and "(cpu:jax)" in shown and "nope" in shown


def test_a_value_whose_repr_fails_fails_the_cell_as_in_a_kernel(ip, fresh, capsys):
    # a kernel's cell fails when its last value cannot be shown; so does a remote one
    # (it showed '<remote value>' and counted as a success)
    result = ip.run_cell("%%mesh --remote\nclass Bad:\n    def __repr__(self):\n"
                         "        raise ValueError('repr boom')\nBad()")
    assert isinstance(result.error_in_exec, RemoteCellError)
    assert result.error_in_exec.ename == "ValueError"
    shown = "".join(capsys.readouterr())
    assert "repr boom" in shown
    # the cell itself ran: what it defined is there
    assert fresh.run_cell("Bad.__name__", value=True).value == "Bad"


def test_input_in_a_remote_cell_says_there_is_no_notebook_to_type_into(fresh):
    for code in ("input('name? ')", "import getpass\ngetpass.getpass()"):
        with pytest.raises(RemoteCellError) as info:
            fresh.run_cell(code)
        assert info.value.ename == "StdinNotImplementedError"
        assert "a remote cell cannot read input from the notebook: ask for it in a " \
               "local cell and send it with --push NAME (push= from mesh.run_cell)" \
               in info.value.evalue
        # one line, as the README says: no remote traceback of the input() call
        shown = info.value._render_traceback_()
        assert len(shown) == 1 and shown[0].endswith(
            "(push= from mesh.run_cell) (on worker cpu-0 (cpu:numpy) at "
            f"{info.value.worker})")
    # a name of the cell's own stays the cell's
    assert fresh.run_cell("input = 3\ninput", value=True).value == 3


def test_push_of_a_dask_future_is_refused_in_one_line(ip, fresh):
    ip.user_ns["fut"] = fresh.client.submit(lambda: 41)
    try:
        with pytest.raises(UsageError, match=r"^--push: 'fut' is a Dask future, which works "
                                             r"only with its client: push its value "
                                             r"\(fut\.result\(\)\) instead$"):
            remote(ip, "--push fut", "fut")
    finally:
        ip.user_ns.pop("fut").release()


def test_a_dask_future_inside_a_value_is_refused_both_ways(ip, fresh):
    # one in a list or dict travels, but arrives unusable without its client ("object
    # not properly initialized" when used): refused in one line, on push and on pull
    fut = fresh.client.submit(lambda: 41, pure=False)
    ip.user_ns["futs"] = {"a": [1, fut]}
    try:
        with pytest.raises(UsageError, match=r"^--push: futs\['a'\]\[1\] \(in 'futs'\) is a "
                                             r"Dask future, which works only with its client: "
                                             r"push its value \(futs\['a'\]\[1\]\.result\(\)\) "
                                             r"instead$"):
            remote(ip, "--push futs", "futs")
    finally:
        ip.user_ns.pop("futs")
        fut.release()
    code = "from distributed import get_client\nf = get_client().submit(lambda: 41, pure=False)"
    ip.user_ns.pop("f", None)
    with pytest.raises(UsageError, match=r"cannot bring back 'f' from [\w-]+: .*a Dask future "
                                         r"works only with the client that made it: bring "
                                         r"back its value \(\.result\(\)\) instead"):
        remote(ip, "--pull f", code)
    assert "f" not in ip.user_ns
    with pytest.raises(UsageError, match=r"\(at \[0\]\) works only with the client"):
        remote(ip, "-o got", "[f]")
    assert "got" not in ip.user_ns
    # the future stays usable on the worker, where its client is
    assert remote(ip, "", "f.result()").data["text/plain"] == "41"


def test_a_cell_that_does_not_compile_is_not_sent(ip, fresh):
    fresh.run_cell("ok = 1")
    before = worker_sessions(fresh)
    with pytest.raises(CellSyntaxError, match="nothing was sent"):
        remote(ip, "", "x = (1,\n")
    result = ip.run_cell("%%mesh --remote\nok = 2\ndef broken(:\n    pass")
    err = result.error_in_exec
    assert isinstance(err, CellSyntaxError) and isinstance(err.error, SyntaxError)
    shown = err._render_traceback_()
    # numbered as the notebook numbers the cell's lines (the %%mesh line is line 1)
    assert 'File "<remote In[' in shown[0] and "line 3" in shown[0]
    assert "def broken(:" in shown[1] and shown[-2].startswith("SyntaxError")
    # mesh.run_cell: the same one line (it raised a bare SyntaxError, with a traceback
    # through jupyter_mesh's own frames)
    with pytest.raises(CellSyntaxError, match=r"^'\(' was never closed \(line 1\); nothing"):
        fresh.run_cell("x = (")
    # a NUL byte: no "(line None)"
    with pytest.raises(CellSyntaxError) as info:
        fresh.run_cell("a\x00b")
    assert "line None" not in str(info.value) and "null bytes" in str(info.value)
    result = ip.run_cell("%%mesh --remote\na\x00b")
    assert isinstance(result.error_in_exec, CellSyntaxError)
    assert "line None" not in str(result.error_in_exec)
    assert worker_sessions(fresh) == before


def test_a_remote_cells_traceback_numbers_its_lines_as_the_notebook_does(ip, fresh):
    # it gave 1/0 as line 2 where the notebook (and a routed %%mesh cell) says line 3
    result = ip.run_cell("%%mesh --remote\nx = 1\n1/0")
    shown = "\n".join(result.error_in_exec._render_traceback_())
    assert 'File "<remote In[' in shown and "line 3" in shown, shown
    assert "1/0" in shown
    # from Python, the code's first line is line 1, or first_line=
    with pytest.raises(RemoteCellError) as info:
        fresh.run_cell("x = 1\n1/0", first_line=10)
    assert "line 11" in "\n".join(info.value._render_traceback_())
    # blank lines first (IPython's transform drops them) still count
    result = ip.run_cell("%%mesh --remote\n\n\n1/0")
    assert "line 4" in "\n".join(result.error_in_exec._render_traceback_())
    with pytest.raises(RemoteCellError) as info:
        fresh.run_cell("\n  \n1/0")
    assert "line 3" in "\n".join(info.value._render_traceback_())


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, None, 10**9])
def test_first_line_bad_values(fresh, bad):
    with pytest.raises(jm.MeshError, match=r"^first_line must be a whole number from 1 to "
                                           r"100000 \(the number of the code's first line "
                                           rf"in tracebacks\), not {re.escape(repr(bad))}$"):
        fresh.run_cell("1", first_line=bad)


def test_get_worker_and_get_client_work_in_a_remote_cell(fresh):
    r = fresh.run_cell(
        "from distributed import get_worker, get_client\n"
        "w = get_worker()\n"
        "c = get_client()\n"
        "(w.address, c.submit(sum, [1, 2]).result())",
        on="cpu:numpy", value=True,
    )
    assert r.value == (r.worker, 3)


def test_remote_systemexit_is_an_error_not_a_dead_worker(fresh):
    with pytest.raises(RemoteCellError, match="SystemExit"):
        fresh.run_cell("raise SystemExit(3)")
    assert fresh.run_cell("2", value=True).value == 2


def test_a_worker_of_an_older_jupyter_mesh_says_so(fresh):
    # an older worker's handler takes fewer keywords than this notebook sends
    def older(dask_worker):
        ext = dask_worker.extensions["jupyter-mesh-remote"]
        current = dask_worker.handlers[_worker_plugin.RUN]

        async def run(comm, session, code, filename, push=None, pull=None,
                      want_value=False, show_value=True, timeout=None, client=None):
            return await ext.run(comm, session, code, filename, push, pull,
                                 want_value, show_value, timeout, client)

        dask_worker.handlers[_worker_plugin.RUN] = run
        dask_worker._kept_run = current

    address = fresh.run_cell("1", on="cpu").worker  # the plugin is there
    fresh.client.run(older, workers=[address])
    try:
        with pytest.raises(jm.MeshError) as err:
            fresh.run_cell("1", on="cpu")
        assert "runs an older jupyter_mesh than this notebook" in str(err.value)
        assert f"({jm.__version__})" in str(err.value)
        assert "install the same version" in str(err.value)
    finally:
        def back(dask_worker):
            dask_worker.handlers[_worker_plugin.RUN] = dask_worker._kept_run

        fresh.client.run(back, workers=[address])
    assert fresh.run_cell("6 * 7", on="cpu", value=True).value == 42


# ---------------------------------------------------------------- interrupt, timeout
def _interrupt_soon(delay):
    timer = threading.Timer(delay, _thread.interrupt_main)
    timer.start()
    return timer


def test_interrupt_while_data_is_on_its_way_says_so_and_sets_nothing(fresh, capsys):
    # no code of the cell ran then: it said "the cell is still running ... busy" and
    # waited out the grace (mesh.remote.interrupt-grace) for nothing
    fresh.run_cell("huge = b'x' * 800_000_000", on="cpu")
    timer = _interrupt_soon(0.5)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        fresh.run_cell("pass", on="cpu", pull="huge")
    timer.join()
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert "while data went between it and the notebook: the cell ran to its end there" \
        in err, err
    assert "still running" not in err and took < 2.5, took
    assert fresh.run_cell("del huge\n1", on="cpu", value=True).value == 1


def test_a_cell_stopped_before_it_begins_never_runs(fresh, capsys):
    # stopped while its push was still being rebuilt on the worker: the notebook
    # stopped waiting, and the cell then ran all the same, its names defined there
    class Slow:  # (defined here: it travels by value, rebuilt slowly)
        def __init__(self):
            self.pad = b"x" * (12 * 2**20)

        def __setstate__(self, state):
            import time

            time.sleep(2)
            self.__dict__.update(state)

    timer = _interrupt_soon(0.8)
    with pytest.raises(KeyboardInterrupt):
        fresh.run_cell("began = True", on="cpu", push={"slow": Slow()})
    timer.join()
    assert ("while data went between it and the notebook: its --push was on its way, and "
            "the cell will not begin") in capsys.readouterr().err
    time.sleep(3)  # (past the rebuild: the cell would have run by now)
    assert fresh.run_cell("'began' in dir() or 'slow' in dir()", on="cpu",
                          value=True).value is False


def test_interrupt_stops_the_remote_code_and_keeps_the_worker(fresh, capsys):
    fresh.run_cell("import time\nsteps = 0", on="cpu")
    timer = _interrupt_soon(0.6)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt) as info:
        fresh.run_cell("while True:\n    steps += 1\n    time.sleep(0.01)", on="cpu")
    timer.join()
    assert time.monotonic() - started < 10
    assert "interrupted the remote cell on cpu-0" in capsys.readouterr().err
    # IPython shows where the cell stopped on the worker (its own line), not the frames
    # of the magic that waited for it
    shown = "\n".join(info.value._render_traceback_())
    assert "Remote KeyboardInterrupt" in shown
    assert "steps += 1" in shown or "time.sleep(0.01)" in shown
    assert "_client.py" not in shown and "magic.py" not in shown
    steps = fresh.run_cell("steps", on="cpu", value=True).value
    assert steps > 0
    time.sleep(0.2)
    assert fresh.run_cell("steps", on="cpu", value=True).value == steps  # it stopped


def test_an_interrupted_cell_on_every_worker_says_what_the_others_did(fresh, capsys):
    # with --all, one worker's error before the Ctrl-C was dropped, and that worker
    # listed as "interrupted" with the one that was
    code = ("import time\nfrom distributed import get_worker\n"
            "if get_worker().name == 'jax-cpu-0':\n    raise ValueError('jax failed first')\n"
            "while True:\n    time.sleep(0.01)")
    timer = _interrupt_soon(2.0)
    with pytest.raises(KeyboardInterrupt):
        fresh.run_cell(code, all=True)
    timer.join()
    err = capsys.readouterr().err
    assert "ValueError: jax failed first" in err, err
    assert ("jupyter_mesh: interrupted the remote cell on cpu-0; the worker and its "
            "namespace stay usable.") in err, err


def test_interrupt_while_the_progress_bar_draws(fresh, capsys, monkeypatch):
    from jupyter_mesh import progress

    real_tick = progress.RemoteWatch.tick
    fired = []

    def tick(self, finished=None):
        if not fired and time.monotonic() - self.t0 > 0.5:
            fired.append(True)
            raise KeyboardInterrupt  # Ctrl-C while the bar is being drawn
        real_tick(self, finished)

    monkeypatch.setattr(progress.RemoteWatch, "tick", tick)
    fresh.run_cell("import time\nsteps = 0", on="cpu")
    with pytest.raises(KeyboardInterrupt):
        fresh.run_cell("while True:\n    steps += 1\n    time.sleep(0.01)", on="cpu")
    assert fired and "interrupted the remote cell on cpu-0" in capsys.readouterr().err
    steps = fresh.run_cell("steps", on="cpu", value=True).value
    time.sleep(0.2)
    assert fresh.run_cell("steps", on="cpu", value=True).value == steps  # it stopped


@pytest.mark.parametrize("key, bad", [("interrupt-grace", -1), ("connect-timeout", 0),
                                      ("worker-wait", "soon")])
def test_a_bad_remote_setting_refuses_the_cell_before_it_runs(fresh, key, bad):
    # (connect-timeout 0 failed on the way to the worker, as a MeshError of the cell)
    import dask

    from jupyter_mesh.errors import MeshConfigError

    fresh.run_cell("n = 0", on="cpu:numpy")
    with dask.config.set({f"mesh.remote.{key}": bad}), \
            pytest.raises(MeshConfigError, match=f"^config mesh.remote.{key} must be"):
        fresh.run_cell("n += 1", on="cpu:numpy")
    time.sleep(0.5)
    # refused means not run: the worker's namespace is as it was
    assert fresh.run_cell("n", on="cpu:numpy", value=True).value == 0


def test_interrupt_of_code_blocked_outside_python(fresh, capsys, monkeypatch):
    import dask

    with dask.config.set({"mesh.remote.interrupt-grace": 0.5}):
        timer = _interrupt_soon(0.3)
        with pytest.raises(KeyboardInterrupt):
            fresh.run_cell("import time\ntime.sleep(3)\nafter = 1", on="cpu:numpy")
        timer.join()
    assert "still running on cpu-0" in capsys.readouterr().err
    with pytest.raises(jm.MeshError, match="previous cell is still running on cpu-0"):
        fresh.run_cell("1", on="cpu:numpy")
    time.sleep(3)
    # it stopped when it came back to Python: `after` was never set
    with pytest.raises(RemoteCellError, match="NameError"):
        fresh.run_cell("after", on="cpu:numpy")


def test_a_second_interrupt_stops_waiting_in_one_line(fresh, capsys, monkeypatch):
    # the first Ctrl-C asks the worker to stop; the second, before the grace is over,
    # stops waiting: a KeyboardInterrupt without the magic's frames, and the busy
    # namespace is known, so the first %mesh reset-remote reaches it
    import dask

    fresh.run_cell("1", on="cpu:numpy")
    fresh.reset_remote()
    timers = []
    real_start, real_stop = _client.RemoteCells._start, _client.RemoteCells._send_stop

    def start(self, *args):  # the first once the cell is on its way
        real_start(self, *args)
        timers.append(_interrupt_soon(0.4))

    def send_stop(self, *args):  # the second once the first has asked it to stop
        real_stop(self, *args)
        timers.append(_interrupt_soon(0.3))

    monkeypatch.setattr(_client.RemoteCells, "_start", start)
    monkeypatch.setattr(_client.RemoteCells, "_send_stop", send_stop)
    with dask.config.set({"mesh.remote.interrupt-grace": 10}):
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt) as info:
            fresh.run_cell("import time\ntime.sleep(6)", on="cpu:numpy")
        for t in timers:
            t.join()
    monkeypatch.undo()
    assert len(timers) == 2
    assert time.monotonic() - started < 5  # not the grace of 10 s, nor the 6 s sleep
    shown = "\n".join(info.value._render_traceback_())
    assert "_client.py" not in shown and "magic.py" not in shown
    assert "still running on cpu-0" in capsys.readouterr().err
    assert fresh.reset_remote() == ["cpu-0"]
    assert fresh.run_cell("1 + 1", on="cpu:numpy").data["text/plain"] == "2"


def test_reset_remote_ends_the_tasks_cells_started(fresh, tmp_path):
    # %mesh reset-remote cancels a namespace's asyncio tasks, and their cleanup runs
    # (it ran on the worker's own event loop, where the cell's loop could not run)
    done = tmp_path / "cleaned"
    fresh.run_cell(
        "import asyncio\n"
        "async def bg():\n"
        "    try:\n"
        "        while True:\n"
        "            await asyncio.sleep(0.05)\n"
        "    finally:\n"
        # (written whole, then renamed: the file seen half-written read as '')
        f"        open({str(done)!r} + '.part', 'w').write('cleaned')\n"
        f"        __import__('os').replace({str(done)!r} + '.part', {str(done)!r})\n"
        "task = asyncio.get_event_loop().create_task(bg())\n"
        "await asyncio.sleep(0.1)", on="cpu:numpy")
    assert fresh.reset_remote() == ["cpu-0"]
    deadline = time.monotonic() + 5
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert done.exists() and done.read_text() == "cleaned"


def test_timeout_of_code_blocked_outside_python(fresh, capsys):
    import dask

    # given up once the grace after the timeout is over (the README's promise), not
    # after twice the grace (the stop sent again at the timeout's end + the grace, and
    # a grace more after that: 0.3 + 1.5 + 1.5 s here, before)
    started = time.monotonic()
    with dask.config.set({"mesh.remote.interrupt-grace": 1.5}):
        with pytest.raises(RemoteCellTimeout, match=r"did not stop \(blocked outside"):
            fresh.run_cell("import time\ntime.sleep(4)", on="cpu:jax", timeout=0.3)
    assert time.monotonic() - started < 3.2
    assert "still running on jax-cpu-0" in capsys.readouterr().err
    time.sleep(4)
    assert fresh.run_cell("1", on="cpu:jax").data["text/plain"] == "1"


def test_timeout_stops_the_cell(ip, fresh):
    started = time.monotonic()
    with pytest.raises(RemoteCellTimeout) as info:
        remote(ip, "--timeout 0.5", "import time\nwhile True:\n    time.sleep(0.01)")
    assert time.monotonic() - started < 10
    assert "longer than --timeout 0.5 s" in str(info.value)
    shown = info.value._render_traceback_()
    assert "time.sleep(0.01)" in "\n".join(shown)
    assert shown[-1].startswith("TimeoutError: the cell ran longer than --timeout 0.5 s")
    assert remote(ip, "--timeout 5", "1 + 1").data["text/plain"] == "2"


def test_a_cell_stopped_while_it_prints_ends_at_its_own_line(fresh, capsys):
    # stopped inside print, the traceback went on into the frames that send the text
    # to the notebook (jupyter_mesh's own, and threading's)
    with pytest.raises(RemoteCellTimeout) as info:
        fresh.run_cell("i = 0\nwhile True:\n    i += 1\n    print('line', i)",
                       on="cpu", timeout=0.5)
    capsys.readouterr()
    shown = "\n".join(info.value._render_traceback_())
    assert "print('line', i)" in shown or "i += 1" in shown, shown
    assert "jupyter_mesh" not in shown and "threading.py" not in shown, shown
    # an error of the cell's own code that its output called keeps its frames
    with pytest.raises(RemoteCellError) as info:
        fresh.run_cell("import sys\ndef gen():\n    yield 'a\\n'\n"
                       "    raise ValueError('boom in gen')\nsys.stdout.writelines(gen())",
                       on="cpu")
    shown = "\n".join(info.value._render_traceback_())
    assert "raise ValueError('boom in gen')" in shown, shown


@pytest.mark.parametrize("code, last", [
    ("raise ValueError('a\\nb')", ["ValueError: a", "b"]),
    ("e = ValueError('x')\ne.add_note('a note')\nraise e", ["ValueError: x", "a note"]),
    ("raise ExceptionGroup('eg', [ValueError(1)])", None),
    # a line of the message that begins as a frame's does
    ("raise ValueError('could not read\\nFile data.csv is empty')",
     ["ValueError: could not read", "File data.csv is empty"]),
    # and one in quotes, as a path is, like a frame's but for its line number
    ("raise RuntimeError('cannot read\\nFile \"data.csv\" is missing')",
     ["RuntimeError: cannot read", 'File "data.csv" is missing']),
    # and one that has a line number too, in the message or in a note
    ("raise ValueError('bad input\\nFile \"a.csv\", line 3: 2 fields')",
     ["ValueError: bad input", 'File "a.csv", line 3: 2 fields']),
    ("e = ValueError('x')\ne.add_note('File \"x\", line 9 note')\nraise e",
     ["ValueError: x", 'File "x", line 9 note']),
])
def test_an_errors_own_lines_are_shown_once(fresh, code, last):
    # a message of several lines, a note, an exception group: only the last line was
    # looked at, and "ValueError: a" said again after them
    with pytest.raises(RemoteCellError) as info:
        fresh.run_cell(code, on="cpu")
    shown = info.value._render_traceback_()
    ename = info.value.ename
    assert sum(1 for line in shown if line.lstrip(" |").startswith(f"{ename}:")) == 1, shown
    if last is not None:
        assert shown[-len(last):] == last, shown


# ---------------------------------------------------------------- reset
def test_reset_remote_forgets_the_namespaces(ip, fresh, capsys):
    remote(ip, "", "gone_soon = 1")
    ip.run_line_magic("mesh", "reset-remote")
    assert "Reset the remote namespaces on cpu-0" in capsys.readouterr().out
    with pytest.raises(RemoteCellError, match="NameError"):
        remote(ip, "", "gone_soon")


def test_reset_remote_does_not_wait_for_a_worker_that_is_gone(fresh):
    # a worker that died with a namespace of this notebook (no nanny to bring it back,
    # on a connected mesh): %mesh reset-remote and %mesh close froze 10 s trying it
    import dataclasses
    import socket

    fresh.run_cell("kept = 1", on="cpu:numpy")
    cells = fresh._remote_cells()
    (dev,) = cells.namespaces.values()
    with socket.socket() as s:  # an address where nothing listens any more
        s.bind(("127.0.0.1", 0))
        gone = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    cells.namespaces[gone] = dataclasses.replace(dev, worker=gone, name="gone-0")
    t0 = time.monotonic()
    assert fresh.reset_remote() == ["cpu-0"]
    assert time.monotonic() - t0 < 5
    assert cells.namespaces == {}


def test_reset_remote_clears_a_first_cell_still_blocked(fresh):
    # the first cell on a worker is given up on (blocked outside Python past --timeout):
    # %mesh reset-remote must still reach that worker, so the next cell can run
    import dask

    with dask.config.set({"mesh.remote.interrupt-grace": 0.3}):
        with pytest.raises(RemoteCellTimeout, match="blocked outside"):
            fresh.run_cell("import time\ntime.sleep(4)", on="cpu:jax", timeout=0.3)
    assert [d.name for d in fresh._remote_cells().namespaces.values()] == ["jax-cpu-0"]
    with pytest.raises(jm.MeshError, match="previous cell is still running"):
        fresh.run_cell("1 + 1", on="cpu:jax")
    assert fresh.reset_remote() == ["jax-cpu-0"]
    assert fresh.run_cell("1 + 1", on="cpu:jax").data["text/plain"] == "2"


def test_the_namespace_of_a_notebook_whose_kernel_died_is_dropped(mesh):
    # a kernel that is killed never says goodbye: its namespace (and the memory it
    # holds) would stay on the worker for good. The worker looks at the scheduler's
    # clients now and then, and drops a namespace whose client was missing twice
    # the workers' own look every 30 s stays out of the way of the looks by hand here
    def pause(dask_worker, on):
        check = dask_worker.periodic_callbacks[_worker_plugin.ORPHANS]
        check.start() if on else check.stop()

    mesh.run_cell("kept = 1", on="cpu:numpy")  # (the workers have remote cells now)
    mesh.client.run(pause, on=False)
    try:
        _orphaned_namespace_is_dropped(mesh)
    finally:
        mesh.client.run(pause, on=True)


def _orphaned_namespace_is_dropped(mesh):
    other = jm.Mesh.connect(mesh.address, set_current=False)  # the notebook that dies
    other.run_cell("big = bytearray(10_000_000)", on="cpu:numpy")
    cells = other._remote_cells()
    mine = mesh._remote_cells()

    def owners(dask_worker):
        ext = dask_worker.extensions["jupyter-mesh-remote"]
        return {s.id: s.client for s in ext.sessions.values()}

    async def look(dask_worker):
        return await dask_worker.extensions["jupyter-mesh-remote"].drop_orphans()

    seen = {k: v for d in mesh.client.run(owners).values() for k, v in d.items()}
    # (every ORPHAN_CHECK seconds; looked at by hand here)
    assert all(mesh.client.run(lambda dask_worker: _worker_plugin.ORPHANS in
                               dask_worker.periodic_callbacks).values())
    gone = other.client.id
    assert seen[cells.session] == gone and seen[mine.session] == mesh.client.id
    other.client.close()  # as a killed kernel's: it never reset its namespaces
    deadline = time.monotonic() + 10
    while gone in mesh.client.run_on_scheduler(lambda dask_scheduler: list(
            dask_scheduler.clients)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [d for d in mesh.client.run(look).values() if d] == []  # one miss: kept
    assert [d for d in mesh.client.run(look).values() if d] == [[cells.session]]
    left = {k for d in mesh.client.run(owners).values() for k in d}
    assert cells.session not in left and mine.session in left
    assert mesh.run_cell("kept", on="cpu:numpy", value=True).value == 1
    other.close()


def test_closing_a_connected_mesh_drops_its_namespaces(mesh):
    other = jm.Mesh.connect(mesh.address, set_current=False)
    other.run_cell("mine = 1", on="cpu:numpy")
    session = other._remote_cells().session
    assert any(session in s for s in worker_sessions(mesh).values())
    other.close()
    assert not any(session in s for s in worker_sessions(mesh).values())


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "line, message",
    [
        ("--on fpga", "unknown target 'fpga': use one of cpu, gpu, tpu"),
        ("--on gpu", "no worker matches --on gpu: the mesh has 1 x cpu:jax @ lab, "
                     "1 x cpu:numpy @ lab"),
        ("--on tpu:jax", "no worker matches --on tpu:jax"),
        ("--site mars", "no worker at site 'mars': the mesh's sites are lab"),
        ("--on cpu:jax --site nowhere", "no worker at site 'nowhere'"),
        ("--push undefined_name", "--push: 'undefined_name' is not defined in the notebook"),
        ("--push a-b", "--push: 'a-b' is not a valid Python name"),
        ("--push a,,b", "--push: empty name"),
        ("--pull 1x", "--pull: '1x' is not a valid Python name"),
        ("--all -o 1bad", "-o: '1bad' is not a valid Python name"),
        ("--all -o class", "-o: 'class' is not a valid Python name"),
        ("-o a.b", "-o: 'a.b' is not a valid Python name"),
        # IPython's own names: set from a worker, every later cell failed
        ("-o get_ipython", "-o: 'get_ipython' is one of IPython's own names in the "
                           "notebook: use a name of your own"),
        ("--all -o Out", "-o: 'Out' is one of IPython's own names"),
        ("--pull a,_oh", "--pull: '_oh' is one of IPython's own names"),
        ("--timeout -1", "--timeout must be a positive number of seconds, not '-1'"),
        ("--timeout 0", "--timeout must be a positive number of seconds"),
        ("--timeout soon", "--timeout must be a positive number of seconds, not 'soon'"),
        ("--timeout nan", "--timeout must be a positive number of seconds"),
        ("--timeout inf", "--timeout must be a positive number of seconds"),
        ("--on ''", "unknown target"),
        ("--site ''", "--site: no worker at site"),
        ("--pull ''", r"--pull: empty name in '': use a,b,c"),  # the quotes taken off
        ("--pull a,,b", "--pull: empty name"),
        # both set a; -o silently won
        ("--pull b,a -o a", "-o and --pull both name 'a': give -o a name of its own"),
    ],
)
def test_bad_input_is_a_one_line_usage_error(ip, fresh, line, message):
    ip.user_ns["a"] = 1
    before = worker_sessions(fresh)
    with pytest.raises(UsageError) as info:
        remote(ip, line, "1")
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert worker_sessions(fresh) == before


@pytest.mark.parametrize("kwargs, message", [
    ({"pull": 123}, "pull: give names as 'a,b' or a list of names, not int"),
    ({"pull": [1]}, "pull: names must be strings, not int"),
    ({"pull": "1x"}, "pull: '1x' is not a valid Python name"),
    ({"all": "no"}, "all= takes True (every matching worker) or False, not 'no'"),
    ({"value": "no"}, "value= takes True or False, not 'no'"),
    ({"filename": 3}, "filename must be a string, not int"),
    ({"site": 3}, "site must be a site name, not int"),
    ({"site": "mars"}, "site: no worker at site 'mars': the mesh's sites are lab"),
    ({"on": "fpga"}, "on: unknown target 'fpga'"),
    ({"on": "gpu"}, "no worker matches on='gpu': the mesh has"),
    ({"on": "cpu:jax", "site": "nowhere"}, "site: no worker at site 'nowhere'"),
    ({"timeout": -1}, "timeout must be a positive number of seconds, not -1"),
    ({"timeout": "soon"}, "timeout must be a positive number of seconds, not 'soon'"),
    ({"push": [1]}, "push must be a mapping of names to values"),
    ({"push": {"a-b": 1}}, "push: 'a-b' is not a valid Python name"),
])
def test_run_cell_bad_arguments(fresh, kwargs, message):
    # from Python, errors name run_cell's keywords (on=), not the magic's flags (--on)
    before = worker_sessions(fresh)
    with pytest.raises(jm.MeshError) as info:
        fresh.run_cell("1", **kwargs)
    assert str(info.value) == message or str(info.value).startswith(message)
    assert "--" not in str(info.value)
    assert worker_sessions(fresh) == before


def test_pull_of_a_name_the_worker_lacks(ip, fresh):
    remote(ip, "", "have = 1")
    with pytest.raises(UsageError, match=r"--pull: 'nothere' is not defined on cpu-0 after "
                                         r"the cell ran \(defined there: .*have"):
        remote(ip, "--pull nothere", "x = 2")
    # nor the remote cells' own helpers: they replaced the notebook's display (which
    # then printed "<IPython.core.display.HTML object>") and input
    notebooks = ip.user_ns.get("display")
    for helper in ("display", "clear_output", "input"):
        with pytest.raises(UsageError, match=rf"--pull: '{helper}' is not defined on cpu-0"):
            remote(ip, f"--pull {helper}", "1")
    assert ip.user_ns.get("display") is notebooks


def test_push_of_an_object_that_cannot_be_serialized(ip, fresh, caplog):
    ip.user_ns["lock"] = threading.Lock()
    with pytest.raises(UsageError, match=r"--push: cannot send 'lock' \(_thread.lock\): it "
                                         r"cannot be serialized"):
        remote(ip, "--push lock", "1")
    # the one-line error is all the user sees: no Dask traceback logged before it
    assert not [r for r in caplog.records if "Failed to serialize" in r.getMessage()]


class _RaisesWhenRebuilt:
    """Pickles here; rebuilding it raises (as a class of a module the worker lacks)."""

    def __reduce__(self):
        return (eval, ("1/0",))


def test_push_of_an_object_the_worker_cannot_rebuild(ip, fresh, capfd):
    # the worker read the whole message and failed in Dask's comm layer: ~60 lines of
    # Dask's logs ("Failed to deserialize", "Exception while reading") in the cell
    ip.user_ns.update(ok=1, bad=_RaisesWhenRebuilt())
    with pytest.raises(UsageError) as info:
        remote(ip, "--push ok,bad", "print('ran')\nran = True")
    assert str(info.value) == ("--push: 'bad' cannot be rebuilt on cpu-0 (division by "
                               "zero): install or import there what its class needs, or "
                               "push something plainer; the cell did not run")
    time.sleep(0.5)  # (a worker's log would reach this process's stderr by now)
    out, err = capfd.readouterr()
    assert "ran" not in out and "deserialize" not in err and "Traceback" not in err, err
    assert isinstance(ip.user_ns["bad"], _RaisesWhenRebuilt)  # the notebook's untouched
    with pytest.raises(RemoteCellError, match="NameError"):
        remote(ip, "", "ran")
    assert remote(ip, "--push ok", "ok + 1").data["text/plain"] == "2"


def test_push_error_says_what_dask_could_not_serialize(ip, fresh):
    # Dask's serialization error has two arguments: its text was a tuple's repr
    ip.user_ns["lock"] = threading.Lock()
    with pytest.raises(UsageError) as info:
        remote(ip, "--push lock", "1")
    assert str(info.value).endswith("cannot be serialized (Could not serialize object of "
                                    "type lock)")


def test_pull_that_the_notebook_cannot_deserialize(ip, fresh, caplog):
    # the worker pickled it, but it cannot be rebuilt here: one line saying so, at
    # once (it said "lost the connection" after the grace), the name kept on the worker
    # and the notebook's own variable untouched
    import dask

    ip.user_ns["evil"] = "mine"
    started = time.monotonic()
    with dask.config.set({"mesh.remote.interrupt-grace": 10}), \
            pytest.raises(UsageError) as info:
        remote(ip, "--pull evil", "class Evil:\n    def __reduce__(self):\n"
                                  "        return (eval, ('1/0',))\nevil = Evil()")
    assert time.monotonic() - started < 8  # not after the grace it waited through
    assert str(info.value) == (
        "the cell ran on cpu-0, but the notebook cannot deserialize what it sent back "
        "('evil': division by zero): import or install here what its class needs, or "
        "pull something plainer; the names stay on the worker")
    assert ip.user_ns["evil"] == "mine"
    assert not [r for r in caplog.records if "deserialize" in r.getMessage()]
    assert fresh.run_cell("type(evil).__name__", on="cpu", value=True).value == "Evil"
    with pytest.raises(UsageError, match="cannot deserialize what it sent back "
                                         r"\(the value of the last expression: "):
        remote(ip, "-o v", "evil")
    # an OSError of the unpickling (a file only the worker has) is no lost connection
    with pytest.raises(UsageError, match="cannot deserialize what it sent back "
                                         r"\('far': \[Errno 2\]"):
        remote(ip, "--pull far", "class Far:\n    def __reduce__(self):\n"
                                 "        return (open, ('/nonexistent/only-there',))\n"
                                 "far = Far()")


def test_pull_missing_lists_the_users_names_only(ip, fresh):
    with pytest.raises(UsageError) as info:
        remote(ip, "--pull nothere", "mine = 1")
    assert "(defined there: mine)" in str(info.value)


def test_pull_of_an_object_that_cannot_be_serialized(ip, fresh):
    with pytest.raises(UsageError, match=r"cannot bring back 'rlock' from cpu-0: a lock "
                                         r"cannot be serialized"):
        remote(ip, "--pull rlock", "import threading\nrlock = threading.Lock()")
    with pytest.raises(UsageError, match="cannot bring back the value of the last expression"):
        remote(ip, "-o v", "rlock")


def test_no_mesh(ip, mesh, monkeypatch):
    monkeypatch.setattr(_state, "_current", None)
    with pytest.raises(UsageError, match="no active mesh: run %mesh start"):
        remote(ip, "", "1")
    with pytest.raises(UsageError, match="no active mesh"):
        ip.run_line_magic("mesh", "reset-remote")


def test_api_validates_too(fresh):
    with pytest.raises(jm.MeshError, match="unknown target"):
        fresh.run_cell("1", on="quantum")
    with pytest.raises(jm.MeshError, match="^timeout must be a positive number"):
        fresh.run_cell("1", timeout=-2)
    with pytest.raises(jm.MeshError, match="push must be a mapping"):
        fresh.run_cell("1", push=["a"])
    with pytest.raises(jm.MeshError, match="code must be a string"):
        fresh.run_cell(b"1")
    with pytest.raises(jm.MeshError, match="is not defined on"):
        fresh.run_cell("1", pull="zzz")
    assert fresh.run_cell("q", push={"q": 3}, pull=["q"]).pulled == {"q": 3}


def test_output_of_threads_the_cell_starts(fresh, capsys):
    # a thread the remote code starts (and one that thread starts) prints into the
    # cell while the cell runs; a thread still printing after the cell ended goes to
    # the worker's own log, not into a later cell
    fresh.run_cell(
        "import threading, time\n"
        "def inner():\n    print('from a thread of a thread')\n"
        "def outer():\n    print('from a thread')\n"
        "    t = threading.Thread(target=inner); t.start(); t.join()\n"
        "t = threading.Thread(target=outer); t.start(); t.join()\n"
        "late = threading.Thread(target=lambda: (time.sleep(0.5), print('too late')))\n"
        "late.start()"
    )
    out = capsys.readouterr().out
    assert "from a thread\n" in out and "from a thread of a thread\n" in out
    time.sleep(1.0)
    fresh.run_cell("late.join()\nprint('next cell')")
    out = capsys.readouterr().out
    assert out == "next cell\n"


def test_the_text_bar_clears_its_line_before_the_cells_output(fresh, capsys, monkeypatch):
    # in a terminal (IPython, a script) the bar is a line on stderr: the cell's output
    # must not run on after it
    import sys

    import dask

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # (a terminal's stderr)
    with dask.config.set({"mesh.progress-after": 0}):
        fresh.run_cell("import time\ntime.sleep(0.6)\nprint('line 1')", on="cpu:numpy")
    out = capsys.readouterr()
    assert out.out == "line 1\n"
    assert "\r\x1b[Kremote cell: running on cpu-0 | " in out.err
    # taken off the screen (before the output), then drawn again under it
    assert "\r\x1b[K\r\x1b[Kremote cell: running on cpu-0" in out.err
    last = out.err.rsplit("\r\x1b[K", 1)[1]
    assert last.startswith("remote cell: finished |") and last.endswith("\n")  # it ends


def test_cells_run_from_several_threads_take_turns(fresh):
    # as in a kernel, one cell at a time: a second cell sent while the first runs used
    # to fail with "the previous cell is still running ... interrupt the kernel again"
    import threading

    fresh.run_cell("import time\nk = 0", on="cpu")
    results, errors = [], []

    def cell():
        try:
            results.append(fresh.run_cell("time.sleep(0.3)\nk += 1\nk", on="cpu",
                                          value=True).value)
        except Exception as exc:  # pragma: no cover - what the test is about
            errors.append(exc)

    threads = [threading.Thread(target=cell) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and sorted(results) == [1, 2, 3]
