"""Remote cells when their worker dies: the next cell says so and picks another."""

from __future__ import annotations

import os
import signal
import time

import pytest

import jupyter_mesh as jm
from jupyter_mesh import _state
from jupyter_mesh.remote import RemoteCellError


@pytest.fixture(scope="module")
def mesh():
    active = _state.active()
    if active is not None:
        active.close()
    m = jm.Mesh.local(cpu=1, gpu=0, tpu=0, set_current=False)
    yield m
    m.close()


def replaced(mesh, old: str, timeout: float = 60) -> str:
    """Wait until the nanny's new worker process has replaced ``old``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = [d.worker for d in mesh.inventory()]
        if workers and old not in workers:
            return workers[0]
        time.sleep(0.1)
    raise AssertionError("the nanny did not restart the worker")


def test_dead_sticky_worker_is_announced_and_replaced(mesh, capsys):
    first = mesh.run_cell("import os\nkept = 1\nos.getpid()", value=True)
    os.kill(first.value, signal.SIGKILL)
    new = replaced(mesh, first.worker)
    with pytest.raises(RemoteCellError, match="NameError"):
        mesh.run_cell("kept")
    err = capsys.readouterr().err
    assert f"worker cpu-0 (cpu:numpy, {first.worker}) is gone" in err
    assert "This cell and the next run on cpu-0" in err
    assert mesh.run_cell("1").worker == new


def test_worker_dying_during_a_cell(mesh, capsys):
    before = mesh.run_cell("2").worker
    with pytest.raises(jm.MeshError, match="died while running the cell; its remote "
                                           "namespace is lost"):
        mesh.run_cell("import os\nos._exit(1)")
    new = replaced(mesh, before)
    capsys.readouterr()
    assert mesh.run_cell("3").worker == new
    assert "is gone" in capsys.readouterr().err
