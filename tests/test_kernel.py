"""Through a real kernel: the quickstart notebook, and no process left behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import nbformat
import psutil
import pytest
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _outputs(cell):
    text = []
    for out in cell.get("outputs", []):
        text.append(out.get("text") or out.get("data", {}).get("text/plain", ""))
    return "\n".join(text)


def test_quickstart_notebook_runs_and_shows_the_mesh():
    nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    by_source = {c.source.strip(): c for c in code}
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
    started = _outputs(by_source["%mesh start --cpu 2 --replace"])
    assert "2 devices" in started
    assert "cpu @ local: 2" in _outputs(by_source["%mesh"])
    mean_cell = next(c for c in code if "x.mean().compute()" in c.source)
    assert abs(float(_outputs(mean_cell)) - 0.5) < 0.01
    assert _outputs(next(c for c in code if c.source.endswith("inv.by_kind()"))) == "{'cpu': 2}"
    assert "measured" in _outputs(next(c for c in code if "profile.method" in c.source))
    assert "Closed the mesh" in _outputs(by_source["%mesh close"])


def _run(kc, code, timeout=120):
    """Execute code in the kernel; return its stdout, raising on an error."""
    out = []
    reply = kc.execute_interactive(
        code, timeout=timeout,
        output_hook=lambda msg: out.append(msg["content"].get("text", ""))
        if msg["msg_type"] == "stream" else (
            out.append(msg["content"]["data"].get("text/plain", ""))
            if msg["msg_type"] in ("execute_result", "display_data") else None),
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(out)


def _mesh_pids(kc):
    out = _run(kc, "import jupyter_mesh as jm\n"
                   "print(sorted(d.extra['pid'] for d in jm.current().inventory()))")
    return eval(out.strip().splitlines()[-1])  # a list of ints printed by our own code


def _wait_gone(pids, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                   for p in pids):
            return True
        time.sleep(0.3)
    return False


def test_magics_in_a_real_kernel_and_no_orphans_after_shutdown():
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        _run(kc, "%load_ext jupyter_mesh")
        out = _run(kc, "%mesh start --cpu 1 --jax-cpu 1")
        assert "2 devices" in out
        pids = _mesh_pids(kc)
        assert len(pids) == 2
        # a failed command leaves the mesh working
        reply = kc.execute_interactive("%mesh start --cpu -1", timeout=30)
        assert reply["content"]["status"] == "error"
        # a MeshError in a cell: the notebook gets one error line saying where
        errors = []
        reply = kc.execute_interactive(
            "jm.current().compute(1, route='warp')", timeout=30,
            output_hook=lambda msg: errors.append(msg["content"])
            if msg["msg_type"] == "error" else None)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "MeshError"
        assert len(errors) == 1 and len(errors[0]["traceback"]) == 1
        assert "unknown route 'warp'" in errors[0]["traceback"][0]
        assert "line 1: jm.current().compute(1, route='warp')" in errors[0]["traceback"][0]
        assert "1" == _run(kc, "print(len(jm.current().inventory().select('cpu:jax')))").strip()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    assert _wait_gone(pids), "worker processes outlived the kernel"


def _workers_of(pid):
    """The worker processes a kernel has spawned (not multiprocessing's tracker)."""
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return []
    out = []
    for child in children:
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "spawn_main" in cmd and "resource_tracker" not in cmd:
            out.append(child)
    return out


def _outputs_of(kc, msg_id):
    """The stream and error outputs of the cell ``msg_id``, once it is over."""
    outputs = []
    while True:
        msg = kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] in ("stream", "error"):
            outputs.append(msg["content"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return outputs


def test_ctrl_c_while_workers_start_is_one_line_and_leaves_no_process(tmp_path):
    # Jupyter sends a kernel's interrupt to its whole process group, which holds the
    # worker processes of a local mesh: those still starting died of it, each printing
    # a traceback of its imports (into the cell, or the terminal that runs Jupyter)
    log = open(tmp_path / "kernel-stderr.txt", "w")  # noqa: SIM115
    km, kc = start_new_kernel(kernel_name="python3", stderr=log)
    try:
        _run(kc, "%load_ext jupyter_mesh")
        kernel = km.provisioner.process.pid
        msg_id = kc.execute("%mesh start --cpu 2 --gpu 0 --tpu 0 --threads 1")
        deadline = time.monotonic() + 60
        while not _workers_of(kernel) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _workers_of(kernel), "no worker process started"
        time.sleep(0.4)  # (they import Dask for a second or more)
        km.interrupt_kernel()  # as JupyterLab's stop button: SIGINT to the group
        outputs = _outputs_of(kc, msg_id)
        text = "\n".join(o.get("text") or "\n".join(o.get("traceback", [])) for o in outputs)
        assert "interrupted: no mesh started" in text, text
        assert "Traceback" not in text and "spawn_main" not in text, text
        # nothing it started is left, and the kernel starts a mesh again
        deadline = time.monotonic() + 20
        while _workers_of(kernel) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _workers_of(kernel), "worker processes outlived the interrupted start"
        started = _run(kc, "%mesh start --cpu 1 --gpu 0 --tpu 0 --threads 1")
        assert "1 device" in started
        # what the stopped start left logged into the next cells: asyncio's "Task
        # exception was never retrieved" of its workers' starts, and Dask's INFO logs
        # under the next mesh (its log levels put back late)
        assert "never retrieved" not in started and " - INFO - " not in started, started
        pids = _mesh_pids(kc)
        # Ctrl-C in a plain (unrouted) computation: the cell says KeyboardInterrupt,
        # without asyncio's "Task exception was never retrieved" of Dask's gather under
        # it, and the mesh's workers live on
        msg_id = kc.execute("import dask.array as da, time\n"
                            "x = da.ones(40, chunks=1).map_blocks(lambda b: (time.sleep(0.3), "
                            "b)[1], dtype=float)\nx.sum().compute()")
        time.sleep(2.0)
        km.interrupt_kernel()
        outputs = _outputs_of(kc, msg_id)
        assert [o.get("ename") for o in outputs if "ename" in o] == ["KeyboardInterrupt"]
        text = "\n".join(o.get("text") or "" for o in outputs)
        assert "never retrieved" not in text and "AllExit" not in text, text
        time.sleep(1.0)
        assert _mesh_pids(kc) == pids
        closed = _run(kc, "%mesh close")
        assert "Closed the mesh" in closed and " - INFO - " not in closed, closed
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
        log.close()
    terminal = (tmp_path / "kernel-stderr.txt").read_text()
    assert "Traceback" not in terminal and "KeyboardInterrupt" not in terminal, terminal


def test_no_orphans_after_kernel_is_killed():
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        _run(kc, "%load_ext jupyter_mesh\n%mesh start --cpu 1")
        pids = _mesh_pids(kc)
        kernel_pid = km.provisioner.process.pid
        os.kill(kernel_pid, signal.SIGKILL)  # what a hard restart does in the end
    finally:
        kc.stop_channels()
        km.cleanup_resources()
    assert _wait_gone(pids), "worker processes outlived a killed kernel"


def test_demo_prints_the_inventory():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "jupyter_mesh.demo", str(EXAMPLES / "quickstart.ipynb")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Mesh inventory at tcp://127.0.0.1:" in out.stdout
    assert "cpu @ local: 2" in out.stdout
    assert out.stdout.count("Mesh inventory") == 1  # the notebook shows it three times
    # the inventory itself, not the panel's stand-in text (the last one it showed)
    assert "(live panel: a widget" not in out.stdout
    assert out.stdout.rstrip().endswith("(measured)")  # a device's line ends it
    # the mesh ended with the demo's kernel: no dashboard link that answers nothing
    assert "(a mesh the notebook started ended with its kernel)" in out.stdout
    assert "dashboard:" not in out.stdout
    # nothing on stderr: not ipykernel's warning about plain TCP, nor Dask's log
    assert out.stderr == "", out.stderr[-2000:]


@pytest.mark.parametrize("args", [[], ["a", "b"]])
def test_demo_usage(args):
    from jupyter_mesh.demo import main

    assert main(args) == 2


def test_demo_help(capsys):
    from jupyter_mesh.demo import main

    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m jupyter_mesh.demo")


def test_demo_bad_notebooks_are_one_line(tmp_path, capsys):
    from jupyter_mesh.demo import main

    assert main([str(tmp_path / "nope.ipynb")]) == 1
    assert "no notebook at" in capsys.readouterr().err
    bad = tmp_path / "empty.ipynb"
    bad.write_text("{}")
    assert main([str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"jupyter_mesh.demo: {bad} is not a notebook (") and err.count("\n") == 1


def test_demo_a_failing_cell_is_one_line(tmp_path, capsys):
    import nbformat

    from jupyter_mesh.demo import main

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise ValueError('no')")])
    path = tmp_path / "fails.ipynb"
    nbformat.write(nb, str(path))
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"jupyter_mesh.demo: a cell of {path} failed: ValueError: no")
    assert err.count("\n") == 1
    # Ctrl-C in the terminal reaches the kernel too: said as a stop, not as a failed cell
    # ("a cell of ... failed: KeyboardInterrupt: ", exit 1)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise KeyboardInterrupt")])
    nbformat.write(nb, str(path))
    assert main([str(path)]) == 130
    assert capsys.readouterr().err == f"jupyter_mesh.demo: stopped (Ctrl-C) while running {path}\n"


def test_demo_ctrl_c_in_the_terminal_stops_it_in_one_line(tmp_path):
    # the terminal sends Ctrl-C to the demo's process group; the kernel runs in a
    # session of its own and did not get it, and nbclient's handler shut it down: the
    # demo said "the kernel died ... out of memory" under a 20-line traceback, exit 1
    import subprocess
    import sys

    began, after = tmp_path / "began", tmp_path / "after"
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(
            "import pathlib, time\n"
            f"pathlib.Path({str(began)!r}).write_text('x')\n"
            "try:\n    time.sleep(120)\nexcept KeyboardInterrupt:\n    pass"),
        nbformat.v4.new_code_cell(f"import pathlib; pathlib.Path({str(after)!r}).write_text('x')"),
    ])
    path = tmp_path / "sleeps.ipynb"
    nbformat.write(nb, str(path))
    proc = subprocess.Popen([sys.executable, "-m", "jupyter_mesh.demo", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not began.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert began.exists(), proc.communicate(timeout=30)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert err == f"jupyter_mesh.demo: stopped (Ctrl-C) while running {path}\n", err[-2000:]
    assert proc.returncode == 130
    # the cell that caught the interrupt ended, and no cell ran after it
    assert not after.exists()


def test_a_fallback_warning_shows_in_the_cell_that_is_running():
    # the warning of a mesh.submit (or a routed persist) that fell back was written by
    # the client's event loop thread, as the cell that started it: the one that made
    # the mesh, long over, where JupyterLab shows nothing
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        _run(kc, "import dask, time\nimport jupyter_mesh as jm\n"
                 "dask.config.set({'mesh.fallback-timeout': 1})\n"
                 "mesh = jm.Mesh.local(cpu=1, jax_cpu=1, gpu=0, tpu=0, "
                 "threads_per_worker=1)", timeout=180)
        _run(kc, "def slow(x):\n    time.sleep(4)\n    return x * 2\n"
                 "fut = mesh.submit(slow, 21, on='cpu:jax', pure=False)\n"
                 "time.sleep(1)")
        out = _run(kc, "mesh.scale(jax_cpu=0)\nprint('result', fut.result(timeout=120))",
                   timeout=180)
        assert "result 42" in out
        assert "MeshFallbackWarning: jupyter_mesh fallback: " in out, out
        # and the in-process scheduler's line that it waits (a local mesh's scheduler
        # runs in the kernel, in the context of the cell that made the mesh)
        assert "jupyter_mesh: no live cpu:jax" in out, out
        _run(kc, "mesh.close()")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
