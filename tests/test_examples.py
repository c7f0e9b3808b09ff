"""The example notebooks run top to bottom in a real kernel (nbclient), key outputs checked.

They are committed without outputs; each is executed once per test session here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"

pytestmark = pytest.mark.slow
_executed: dict[str, nbformat.NotebookNode] = {}


def executed(name: str) -> nbformat.NotebookNode:
    if name not in _executed:
        nb = nbformat.read(EXAMPLES / name, as_version=4)
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(EXAMPLES)}}).execute()
        _executed[name] = nb
    return _executed[name]


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def cell(nb, starts: str):
    return next(c for c in code_cells(nb) if c.source.startswith(starts))


def text(c) -> str:
    # consecutive messages of one stream are one text, as a frontend shows them (a line
    # printed on a worker may arrive in two messages)
    out: list[str] = []
    last = None
    for o in c.outputs:
        if o.output_type == "stream":
            if o.name == last:
                out[-1] += o.text
            else:
                out.append(o.text)
            last = o.name
        elif "data" in o:
            out.append(o.data.get("text/plain", ""))
            last = None
    return "\n".join(out)


def html(c) -> str:
    return "\n".join(o.data["text/html"] for o in c.outputs
                     if "data" in o and "text/html" in o.data)


def shows_widget(c) -> bool:
    return any("data" in o and WIDGET_VIEW in o.data for o in c.outputs)


def shows_ended_bar(c, says: str) -> bool:
    """Whether the cell keeps a progress bar that has ended, as its static copy (what
    a saved notebook opened again shows: no widget that needs the kernel)."""
    return any("data" in o and WIDGET_VIEW not in o.data and says in o.data.get(
        "text/html", "") and o.data.get("text/plain", "").endswith(": finished")
        for o in c.outputs)


def widget_text(nb) -> str:
    """Every string value of every widget, as the kernel last left it."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    return "\n".join(str(m["state"].get("value", "")) for m in state.values())


@pytest.mark.parametrize("name", ["quickstart.ipynb", "routing.ipynb",
                                  "remote-cells.ipynb", "resilience.ipynb"])
def test_notebook_is_committed_without_outputs(name):
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    for c in code_cells(nb):
        assert not c.outputs and c.execution_count is None, (name, c.source[:40])


@pytest.mark.parametrize("name", ["quickstart.ipynb", "routing.ipynb",
                                  "remote-cells.ipynb", "resilience.ipynb"])
def test_notebook_runs_without_errors(name):
    nb = executed(name)
    errors = [(c.source[:40], o.get("ename"), o.get("evalue"))
              for c in code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_quickstart_shows_the_panel():
    nb = executed("quickstart.ipynb")
    assert shows_widget(cell(nb, "panel = mesh.widget()"))
    state = widget_text(nb)
    assert "cpu @ local: 2" in state  # the device list, by kind and site
    refused = cell(nb, 'panel.set_route("tpu")')
    assert text(refused).strip().endswith("off")  # the route did not change
    assert "refused" in state and "no live tpu" in state


def test_routing_explains_computes_and_pictures():
    nb = executed("routing.ipynb")
    plan = html(cell(nb, "plan = mesh.explain"))
    assert "<table>" in plan and "jupyter-mesh-picture" in plan
    assert "Planned timeline" in plan and "coloured by planned target" in plan
    assert "measured on this mesh" in plan  # Dask's own costs, measured at the first plan
    assert "ms of Dask dispatch per task" in text(cell(nb, "mesh.calibration"))
    forced = cell(nb, "(forced,) = mesh.compute")
    assert "True\n" in text(forced)
    assert "Report (route=cpu:jax)" in text(forced) and "Ran (measured)" in html(forced)
    assert "['jax']" in text(cell(nb, 'print("matmul ran on:"')) or \
        "'jax'" in text(cell(nb, 'print("matmul ran on:"'))
    auto = cell(nb, "(auto,) = mesh.compute")
    assert "True\n" in text(auto) and "Report (route=auto)" in text(auto)
    # on this CPU-only mesh the JAX worker runs the ops with NumPy where NumPy is faster:
    # what ran is what the plan's targets say
    used = text(cell(nb, 'print("ops:"'))
    assert "backends used: [" in used and "'numpy'" in used
    targets = used.split("backends used:")[0]
    assert ("'jax'" in used) == bool(re.search(r"cpu:jax(?! \(numpy\))", targets)), used
    routed = cell(nb, "%%mesh --route cpu:jax")
    assert "Report (route=cpu:jax)" in text(routed) and "jupyter-mesh-picture" in html(routed)
    assert text(cell(nb, "print(round(float(z)")).strip()  # a number came back


def test_routing_shows_a_progress_bar_per_target():
    nb = executed("routing.ipynb")
    slow = cell(nb, 'dask.config.set({"mesh.progress-after": 0.3})')
    assert shows_ended_bar(slow, "Finished")
    state = widget_text(nb)
    assert "route=auto" in state and "Finished" in state
    # a bar per target the plan's tasks went to: the pools it restricts ops to (the JAX
    # worker running an op with NumPy shows as "cpu:jax (numpy)"), or one for the whole
    # computation where every worker runs every op equally fast (which depends on the
    # machine's relative JAX and NumPy speeds)
    (line,) = [x for x in text(slow).splitlines() if x.startswith("(2400,) targets: [")]
    targets = ast.literal_eval(line.split("targets: ", 1)[1])
    assert targets == ["any (pools equivalent)"] or (
        targets and set(targets) <= {"cpu:jax", "cpu:jax (numpy)", "cpu:numpy"}), targets
    for target in targets:
        assert f">{target}</div>" in state, target


def test_remote_cells_keep_state_and_stream_output():
    nb = executed("remote-cells.ipynb")
    first = cell(nb, "%%mesh --remote --on cpu:jax\nimport jax")
    assert "JAX devices on the worker: [CpuDevice" in text(first)
    assert "45.0" in text(first)
    assert "90.0" in text(cell(nb, "%%mesh --remote --on cpu:jax\nfloat((a * 2)"))
    assert "4950 [0, 1, 4, 9, 16]" in text(cell(nb, "print(total, squares)"))
    every = text(cell(nb, "%%mesh --remote --all"))
    assert "[cpu-0]" in every and "[jax-cpu-0]" in every
    assert "caught on the worker: ZeroDivisionError" in text(
        cell(nb, "%%mesh --remote --on cpu\ntry:"))
    slow = cell(nb, "%%mesh --remote --on cpu\nimport time")
    assert "'slept'" in text(slow) and shows_ended_bar(slow, "finished after")
    assert "finished after" in widget_text(nb)


def test_resilience_survives_a_killed_worker_and_a_lost_kind():
    nb = executed("resilience.ipynb")
    killed = text(cell(nb, "pid_before ="))
    assert "killed cpu-0 (cpu:numpy)" in killed and "correct: True" in killed
    assert "restarted: True" in text(cell(nb, "mesh._wait_for(2)"))
    lost = text(cell(nb, 'killer = threading.Thread(target=kill_when_busy, args=("jax"'))
    assert "killed jax-cpu-0 (cpu:jax)" in lost and "correct: True" in lost
    assert "MeshFallbackWarning" in lost and "cpu:jax" in lost
    # the kill lands in the routed computation (it hit the calibration probe that a
    # mesh whose workers changed runs first, and the report showed no JAX at all)
    assert "calibration probe" not in lost
    assert re.search(r"lost every cpu:jax worker: [1-9]\d* routed tasks re-routed", lost)
    report = cell(nb, "report = mesh.last_report")
    assert "numpy" in text(report) and "lost every cpu:jax worker" in html(report)
    after = text(cell(nb, "print(mesh.inventory().by_target())"))
    assert "{'cpu:numpy': 1}" in after and "refused: no live cpu:jax worker" in after
    assert "correct: True" in text(cell(nb, "(again,) = mesh.compute"))


DASK_LOG = re.compile(r" - distributed\.[\w.]+ - (DEBUG|INFO|WARNING|ERROR|CRITICAL) - ")


@pytest.mark.parametrize("name", ["quickstart.ipynb", "routing.ipynb",
                                  "remote-cells.ipynb", "resilience.ipynb"])
def test_no_cell_shows_dasks_log(name):
    # a notebook's reader sees Dask's log lines as noise (resilience's deliberate kills
    # showed the nanny's "Restarting worker" warning)
    nb = executed(name)
    logged = [(c.source[:40], o.text) for c in code_cells(nb) for o in c.outputs
              if o.output_type == "stream" and DASK_LOG.search(o.text)]
    assert not logged


def test_routing_shows_the_notes_of_a_forced_route():
    # the markdown says the plan notes each op kept off JAX
    nb = executed("routing.ipynb")
    notes = text(cell(nb, 'print("matmul ran on:"'))
    assert re.search(r"note: random_sample\S*: cpu:jax does not run creation ops", notes), notes


@pytest.mark.parametrize("name", ["quickstart.ipynb", "remote-cells.ipynb"])
def test_run_all_again_after_a_partial_run(name):
    # Run All in a kernel whose earlier run stopped before the mesh was closed: the
    # start cell said a mesh is already active, and Run All stopped there
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    closing = next(i for i, c in enumerate(nb.cells)
                   if c.cell_type == "code" and "close" in c.source)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(EXAMPLES)}})
    with client.setup_kernel():
        for i in range(closing):  # raises on a cell that fails
            client.execute_cell(nb.cells[i], i)
        for i, c in enumerate(nb.cells):
            client.execute_cell(c, i)
