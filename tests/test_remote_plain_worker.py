"""Remote cells on a plain Dask cluster whose processes cannot import jupyter_mesh.

A preload makes ``import jupyter_mesh`` fail in the scheduler and the worker, as on a
cluster where it is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest

import jupyter_mesh as jm


@pytest.fixture(scope="module")
def plain_cluster():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cwd = tempfile.mkdtemp(prefix="plain-dask-")
    block = os.path.join(cwd, "no_jupyter_mesh.py")
    with open(block, "w") as f:
        f.write("import sys\nsys.modules['jupyter_mesh'] = None\n")
    port_file = os.path.join(cwd, "scheduler.json")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", "0", "--no-dashboard", "--scheduler-file", port_file, "--preload", block],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )]
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(port_file) and time.monotonic() < deadline:
            time.sleep(0.1)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
             port_file, "--nthreads", "1", "--no-nanny", "--no-dashboard", "--preload", block],
            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
        import json

        with open(port_file) as f:
            address = json.load(f)["address"]
        mesh = jm.Mesh.connect(address, set_current=False)
        mesh.client.wait_for_workers(1, timeout=60)
        yield mesh
        mesh.close()
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def test_a_worker_without_jupyter_mesh_says_so(plain_cluster, capsys):
    with pytest.raises(jm.MeshError, match="cannot run remote cells: install jupyter_mesh"):
        plain_cluster.run_cell("1")
    assert "could not be installed on every worker" in capsys.readouterr().err
