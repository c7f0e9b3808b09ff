"""Remote cells through a real Jupyter kernel, driven by nbclient.

One notebook runs top to bottom in a fresh kernel with a tiny mesh (a NumPy CPU worker
and a JAX CPU worker); every iopub message is recorded with its header timestamp, so
streaming is checked the way a frontend sees it. A kernel interrupt is sent while one
remote cell loops.
"""

from __future__ import annotations

import asyncio
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

pytest.importorskip("jax")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CELLS = {
    "load": "%load_ext jupyter_mesh",
    "start": "%mesh start --cpu 1 --jax-cpu 1 --gpu 0 --tpu 0 --site kernel-site",
    "define": "a = 21",
    "push": "%%mesh --remote --push a\nb = a * 2\nprint(b)",
    "pull": "%%mesh --remote --pull b\nb = b + 1",
    "local_b": "b",
    "stream": (
        "%%mesh --remote\nimport time\nprint('tick', flush=True)\ntime.sleep(1.5)\n"
        "print('tock')"
    ),
    "error": "%%mesh --remote\ndef f():\n    return 1 / 0\nf()",
    "routed_error": "%%mesh\nw = 2\n1 / 0",
    "after_routed_error": "w",
    "interrupt": (
        "%%mesh --remote\nimport time\ncount = 0\nprint('looping', flush=True)\n"
        "while True:\n    count += 1\n    time.sleep(0.01)"
    ),
    "after_interrupt": "%%mesh --remote\ncount > 0",
    "all": "%%mesh --remote --all -o pids\nimport os\nprint('pid', os.getpid())\nos.getpid()",
    "pids": "len(set(pids.values()))",
    "jax": (
        "%%mesh --remote --on cpu:jax\nimport jax, jax.numpy as jnp\n"
        "(jax.default_backend(), float(jnp.arange(4.0).sum()))"
    ),
    "display": "%%mesh --remote\nfrom IPython.display import HTML\ndisplay(HTML('<b>rich</b>'))",
    "update": (
        "%%mesh --remote\nh = display('first', display_id=True)\nh.update('second')\n"
        "update_display('third', display_id=h.display_id)\nprint('gone', flush=True)\n"
        "clear_output()\nprint('after clear')"
    ),
    "bars_now": "import dask\n_bars = dask.config.set({'mesh.progress-after': 0.1})",
    "clear_bars": (
        "%%mesh --remote\nimport time\nprint('before', flush=True)\ntime.sleep(0.8)\n"
        "clear_output(wait=True)\nprint('after', flush=True)\ntime.sleep(0.3)"
    ),
    "bars_back": "_bars.__exit__(None, None, None)",
    "bad_display_id": "%%mesh --remote\ndisplay('x', display_id=3)",
    "bad_target": "%%mesh --remote --on gpu\n1",
    "no_compile": "%%mesh --remote\nx = (",
    "reset": "%mesh reset-remote",
    "close": "%mesh close",
}


class RecordingClient(NotebookClient):
    """Records every iopub message and interrupts the kernel during one cell."""

    def __init__(self, *args, interrupt_cell: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.messages: list[tuple[int, dict]] = []
        self.interrupt_cell = interrupt_cell
        self.interrupted = False

    def process_message(self, msg, cell, cell_index):
        self.messages.append((cell_index, msg))
        if (cell_index == self.interrupt_cell and not self.interrupted
                and msg["msg_type"] == "stream" and "looping" in msg["content"]["text"]):
            self.interrupted = True
            loop = asyncio.get_running_loop()
            loop.call_later(0.5, lambda: asyncio.ensure_future(self.km.interrupt_kernel()))
        return super().process_message(msg, cell, cell_index)


@pytest.fixture(scope="module")
def run():
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = REPO + (os.pathsep + old if old else "")
    try:
        names = list(CELLS)
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(CELLS[n]) for n in names]
        client = RecordingClient(
            nb, kernel_name="python3", timeout=120, allow_errors=True,
            resources={"metadata": {"path": REPO}},
            interrupt_cell=names.index("interrupt"),
        )
        client.execute()
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    cells = {n: nb.cells[i] for i, n in enumerate(names)}
    messages = {n: [m for i, m in client.messages if i == names.index(n)] for n in names}
    return cells, messages


def text(cell, name="stdout"):
    return "".join(o.get("text", "") for o in cell.outputs
                   if o.output_type == "stream" and o.name == name)


def result(cell):
    out = [o for o in cell.outputs if o.output_type == "execute_result"]
    assert out, cell.outputs
    return out[0]["data"]["text/plain"]


def plain(text):
    """Text without the terminal colour codes of a kernel's traceback."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def error(cell):
    out = [o for o in cell.outputs if o.output_type == "error"]
    return out[0] if out else None


def test_mesh_started(run):
    cells, _ = run
    assert error(cells["start"]) is None


def test_state_push_and_pull(run):
    cells, _ = run
    assert text(cells["push"]) == "42\n"
    assert error(cells["pull"]) is None
    assert result(cells["local_b"]) == "43"


def test_output_streams_while_the_cell_runs(run):
    cells, messages = run
    assert text(cells["stream"]) == "tick\ntock\n"
    msgs = messages["stream"]
    tick = next(m for m in msgs if m["msg_type"] == "stream" and "tick" in m["content"]["text"])
    tock = next(m for m in msgs if m["msg_type"] == "stream" and "tock" in m["content"]["text"])
    idle = next(m for m in msgs
                if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle")
    # by the kernel's own message timestamps: 'tick' reached the frontend while the
    # remote cell was still sleeping (a generous bound for a 1.5 s sleep)
    assert (tock["header"]["date"] - tick["header"]["date"]).total_seconds() > 1.0
    assert (idle["header"]["date"] - tick["header"]["date"]).total_seconds() > 1.0


def test_remote_error_with_traceback_worker_and_kind(run):
    cells, _ = run
    err = error(cells["error"])
    assert err is not None and err["ename"] == "RemoteCellError"
    tb = "\n".join(err["traceback"])
    assert "Remote ZeroDivisionError" in tb and "(cpu:numpy)" in tb
    assert "return 1 / 0" in tb and "distributed" not in tb


def test_tracebacks_name_the_cell_that_ran(run):
    cells, _ = run
    for name, where in (("error", "<remote In[{}]>"), ("routed_error", "Cell In[{}]")):
        tb = plain("\n".join(error(cells[name])["traceback"]))
        assert where.format(cells[name].execution_count) in tb, (name, tb)


def test_a_failing_routed_cell_reports_its_own_error_once(run):
    # nbclient, nbconvert and papermill name the error of the kernel's reply: the
    # cell's own, with its traceback, and the cell shows it once
    cells, _ = run
    errors = [o for o in cells["routed_error"].outputs if o.output_type == "error"]
    assert len(errors) == 1, errors
    assert errors[0]["ename"] == "ZeroDivisionError" and errors[0]["evalue"]
    assert "1 / 0" in plain("\n".join(errors[0]["traceback"]))
    assert result(cells["after_routed_error"]) == "2"  # what ran before it is kept


def test_interrupt_stops_the_remote_cell_and_the_worker_stays_usable(run):
    cells, _ = run
    err = error(cells["interrupt"])
    # a KeyboardInterrupt (RemoteInterrupt), shown as where the cell stopped on the
    # worker, without the frames of the magic that waited for it
    assert err is not None and err["ename"] == "RemoteInterrupt"
    assert "interrupted" in err["evalue"]  # papermill and nbclient show it in one line
    tb = "\n".join(err["traceback"])
    assert "Remote KeyboardInterrupt" in tb and "<remote In[" in tb
    assert "_client.py" not in tb and "magics.py" not in tb
    assert "interrupted the remote cell on" in text(cells["interrupt"], "stderr")
    assert error(cells["after_interrupt"]) is None
    assert result(cells["after_interrupt"]) == "True"


def test_all_labels_output_per_worker(run):
    cells, _ = run
    out = text(cells["all"])
    assert "[cpu-0] pid " in out and "[jax-cpu-0] pid " in out
    assert result(cells["pids"]) == "2"


def test_on_cpu_jax(run):
    cells, _ = run
    assert result(cells["jax"]) == "('cpu', 6.0)"


def test_rich_display(run):
    cells, _ = run
    shown = [o for o in cells["display"].outputs if o.output_type == "display_data"]
    assert shown and shown[0]["data"]["text/html"] == "<b>rich</b>"


def test_display_update_and_clear_output(run):
    cells, messages = run
    msgs = messages["update"]
    shown = [m for m in msgs if m["msg_type"] == "display_data"]
    assert len(shown) == 1
    display_id = shown[0]["content"]["transient"]["display_id"]
    updates = [m["content"] for m in msgs if m["msg_type"] == "update_display_data"]
    assert [u["data"]["text/plain"] for u in updates] == ["'second'", "'third'"]
    assert all(u["transient"]["display_id"] == display_id for u in updates)
    kinds = [m["msg_type"] for m in msgs if m["msg_type"] in ("stream", "clear_output")]
    assert kinds[-2:] == ["clear_output", "stream"]  # cleared after 'gone', before the rest
    # what the notebook keeps: only what came after clear_output
    assert text(cells["update"]) == "after clear\n"
    assert not [o for o in cells["update"].outputs if o.output_type == "display_data"]
    err = error(cells["bad_display_id"])
    assert err is not None and "display_id must be a string or True" in err["evalue"]


def test_clear_output_keeps_the_progress_bar(run):
    # a remote cell that clears its output (a loop redrawing its own status) cleared
    # the bars too: they are shown again, above what the cell shows after the clear
    cells, _ = run
    assert error(cells["clear_bars"]) is None
    outs = cells["clear_bars"].outputs
    kinds = [(o.output_type, o.get("data", {}).get("text/plain", o.get("text")))
             for o in outs]
    # (the bar, once the cell ended, as its static copy: what a saved notebook keeps)
    assert kinds == [("display_data", "remote cell: finished"),
                     ("stream", "after\n")], kinds
    data = outs[0]["data"]
    assert "application/vnd.jupyter.widget-view+json" not in data
    assert "finished after" in data["text/html"]


def test_misuse_is_one_line(run):
    cells, _ = run
    # IPython prints a UsageError as one line, without a traceback
    shown = text(cells["bad_target"], "stderr")
    assert shown.startswith("UsageError: no worker matches --on gpu: the mesh has ")
    assert shown.count("\n") == 1
    err = error(cells["no_compile"])
    assert err["ename"] == "CellSyntaxError"
    tb = "\n".join(err["traceback"])
    assert "SyntaxError" in tb and "nothing was sent" in tb and "magic.py" not in tb


def test_reset_and_close(run):
    cells, _ = run
    assert "Reset the remote namespaces on" in text(cells["reset"])
    assert error(cells["close"]) is None
