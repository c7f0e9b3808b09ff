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


def test_worker_dying_during_a_cell(mesh, capsys, monkeypatch):
    from jupyter_mesh.remote._client import RemoteCells

    # (a mesh this kernel owns is closed by no one else: its scheduler is not waited
    # on to see whether it goes away too, which took 2 s more per dead worker)
    asked = []
    monkeypatch.setattr(RemoteCells, "_scheduler_leaving", lambda self: asked.append(1))
    before = mesh.run_cell("2").worker
    with pytest.raises(jm.MeshError, match=r"died while running the cell \(out of memory is "
                                           r"the usual cause: its nanny, where it has one, restarts "
                                           r"it\); its "
                                           r"remote namespace is lost"):
        mesh.run_cell("import os\nos._exit(1)")
    assert asked == []
    new = replaced(mesh, before)
    capsys.readouterr()
    assert mesh.run_cell("3").worker == new
    assert "is gone" in capsys.readouterr().err


def test_a_worker_killed_just_before_a_cell_is_never_said_to_have_run_it(mesh, capsys,
                                                                         tmp_path):
    # a pooled connection to a worker killed a moment before looks alive: the cell was
    # written into it, and the notebook said the worker "died while running the cell
    # (out of memory is the usual cause...)", though the cell never began; the worker
    # now says it has a cell before running it, so which of the two it was is known
    for attempt in range(3):
        mark = tmp_path / f"ran-{attempt}"
        first = mesh.run_cell("import os\nos.getpid()", value=True)
        os.kill(first.value, signal.SIGKILL)
        try:
            mesh.run_cell(f"open({str(mark)!r}, 'w').write('x')")
        except jm.MeshError as exc:
            # (the worker died before the cell reached it)
            assert str(exc).startswith(
                "worker cpu-0 (cpu:numpy) died before the cell reached it, so the cell did "
                "not run (out of memory is the usual cause, a large --push for one: its "
                "nanny, where it has one, restarts it); its remote namespace is lost (the "
                "next cell picks another worker)"), exc
            assert not mark.exists()
        else:  # (the notebook saw the worker gone, and waited for the next one)
            assert mark.exists()
        replaced(mesh, first.worker)
        capsys.readouterr()


def test_the_end_of_a_cell_that_began_says_its_worker_died_while_running_it(mesh,
                                                                          monkeypatch):
    from types import SimpleNamespace

    from jupyter_mesh.inventory import Device
    from jupyter_mesh.remote import _client
    from jupyter_mesh.remote._client import RemoteCells, _Run

    monkeypatch.setattr(_client, "SCHEDULER_GRACE", 0.3)

    class Cells(RemoteCells):
        mesh = SimpleNamespace(closed=False, _check_reachable=lambda: None)
        # the worker is gone; the scheduler answers
        client = SimpleNamespace(sync=lambda f, *a, **k: False,
                                 scheduler=SimpleNamespace(identity=None))
        namespaces: dict = {}

    session = Cells.__new__(Cells)
    device = Device(worker="tcp://127.0.0.1:9", name="cpu-0", kind="cpu", backend="numpy",
                    model="cpu", memory=0, site="local", profile=None)
    run = _Run(device, {}, sent=time.time(), broke_at=time.time())
    run.failure = ConnectionError("closed")
    assert "died before the cell reached it, so the cell did not run" in session._lost(run)
    run.heard = True
    assert "died while running the cell (out of memory" in session._lost(run)
    # a worker gone, and then the scheduler too: the mesh was closed (by its owner, from
    # another notebook, which closes the workers first), no worker "died"

    def sync(f, *args, **kwargs):
        if getattr(f, "__name__", "") == "_alive":
            return False
        raise OSError("connection refused")  # the scheduler's identity

    Cells.client = SimpleNamespace(sync=sync, scheduler=SimpleNamespace(identity=None))
    session._leaving = (-1e9, False)  # (what the scheduler said last is kept a while)
    Cells.mesh = SimpleNamespace(closed=False, _check_reachable=lambda: None,
                                 address="tcp://127.0.0.1:8786")
    assert session._lost(run) == (
        "the mesh's scheduler at tcp://127.0.0.1:8786 went away while the cell ran on "
        "cpu-0 (its owner closed the mesh, or it stopped); the remote namespaces went "
        "with it: run %mesh close, then %mesh start or %mesh connect ADDRESS")
    # and where the scheduler no longer answers even whether the worker is alive (it
    # said "lost the connection to worker ... (Stream is closed)")
    def sync_gone(f, *args, **kwargs):
        raise OSError("connection refused")

    Cells.client = SimpleNamespace(sync=sync_gone, scheduler=SimpleNamespace(identity=None))
    session._leaving = (-1e9, False)
    assert session._lost(run).startswith("the mesh's scheduler at tcp://127.0.0.1:8786 "
                                         "went away while the cell ran on cpu-0")


def test_output_flushed_just_before_the_worker_dies_reaches_the_notebook(mesh, capsys):
    # as in a kernel, flush() returns once the output is sent: a cell that prints
    # its last words and then ends the process (a crash, os._exit) still shows them
    before = mesh.run_cell("6").worker
    capsys.readouterr()
    with pytest.raises(jm.MeshError, match="died while running the cell"):
        mesh.run_cell("import os, sys\nprint('last words', flush=True)\n"
                      "print('and to stderr', file=sys.stderr)\nsys.stderr.flush()\n"
                      "os._exit(1)")
    out = capsys.readouterr()
    assert "last words" in out.out and "and to stderr" in out.err
    replaced(mesh, before)


def test_next_cell_waits_for_the_restarting_worker(mesh, capsys, monkeypatch):
    # the only worker dies; the next cell, sent at once, waits for its nanny to bring a
    # new one (mesh.remote.worker-wait) instead of failing
    import dask

    from jupyter_mesh import progress

    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)  # (not a terminal: every line)
    before = mesh.run_cell("4").worker
    with pytest.raises(jm.MeshError, match="died while running the cell"):
        mesh.run_cell("import os\nos._exit(1)")
    capsys.readouterr()
    with dask.config.set({"mesh.progress-after": 0}):  # the bar at once
        r = mesh.run_cell("5", value=True)
    assert r.value == 5 and r.worker != before
    # while it waited, its bar said so: not that it ran on the worker that was gone
    err = capsys.readouterr().err
    if "waiting up to" in err:  # (the nanny may have been quicker than the cell)
        assert "gone; looking for another worker" in err, err


def test_worker_wait_config(mesh):
    # mesh.remote.worker-wait bounds the wait (0: none), a bad value names the key, and
    # a kind this notebook never had fails at once, without waiting
    import dask

    from jupyter_mesh.errors import MeshConfigError
    from jupyter_mesh.targets import parse_target

    cells = mesh._remote_cells()
    jax = parse_target("cpu:jax")  # this mesh has none
    with dask.config.set({"mesh.remote.worker-wait": 0}):
        t0 = time.monotonic()
        _, matching = cells._wait_for_match(jax, None)
        assert not len(matching) and time.monotonic() - t0 < 2
    with dask.config.set({"mesh.remote.worker-wait": 0.5}):
        t0 = time.monotonic()
        _, matching = cells._wait_for_match(jax, None)
        assert not len(matching) and 0.5 <= time.monotonic() - t0 < 5
    with dask.config.set({"mesh.remote.worker-wait": "soon"}):
        with pytest.raises(MeshConfigError, match="mesh.remote.worker-wait"):
            cells._wait_for_match(jax, None)
        t0 = time.monotonic()
        with pytest.raises(jm.MeshError, match="no worker matches on=.cpu:jax."):
            mesh.run_cell("1", on="cpu:jax")  # never seen: no wait, config not read
        assert time.monotonic() - t0 < 5


def test_a_cells_timeout_bounds_its_wait_for_a_worker(mesh, capsys, monkeypatch):
    # --timeout 2 waited the whole mesh.remote.worker-wait (20 s) for a worker that
    # was gone, then failed
    import dask

    from jupyter_mesh import Inventory

    mesh.run_cell("1", on="cpu")
    cells = mesh._remote_cells()
    cells.sticky.clear()  # (its worker is gone: the cell must find another)
    monkeypatch.setattr(mesh, "inventory", lambda: Inventory([], mesh.address))
    with dask.config.set({"mesh.remote.worker-wait": 30}):
        t0 = time.monotonic()
        with pytest.raises(jm.MeshError, match="no worker matches"):
            mesh.run_cell("1", on="cpu", timeout=1)
        assert time.monotonic() - t0 < 10
    assert "waiting up to 1 s for one (timeout)." in capsys.readouterr().err


def test_a_kind_that_does_not_come_back_is_waited_for_once(mesh, capsys):
    # after one wait in vain the kind is taken as gone (scaled away, a machine gone
    # for good): the next cell fails at once, instead of waiting again every time
    import dask

    from jupyter_mesh.remote._client import _request_key
    from jupyter_mesh.targets import parse_target

    cells = mesh._remote_cells()
    cells.seen.add(_request_key(parse_target("cpu:jax"), None))  # as if it had one
    with dask.config.set({"mesh.remote.worker-wait": 0.5}):
        with pytest.raises(jm.MeshError, match="no worker matches on=.cpu:jax."):
            mesh.run_cell("1", on="cpu:jax")
        assert "waiting up to 0.5 s" in capsys.readouterr().err
        with pytest.raises(jm.MeshError, match="no worker matches on=.cpu:jax."):
            mesh.run_cell("1", on="cpu:jax")
        assert "waiting" not in capsys.readouterr().err


def test_scaling_ends_waits_for_the_kinds_it_took_away(mesh, capsys):
    import dask

    from jupyter_mesh.remote._client import _request_key
    from jupyter_mesh.targets import parse_target

    cells = mesh._remote_cells()
    cells.seen.add(_request_key(parse_target("cpu:jax"), None))
    cells.seen.add(_request_key(parse_target("cpu"), None))
    mesh.scale(cpu=1)
    # a kind the mesh still has is waited for still (its worker may be restarting)
    assert _request_key(parse_target("cpu"), None) in cells.seen
    with dask.config.set({"mesh.remote.worker-wait": 30}):
        t0 = time.monotonic()
        with pytest.raises(jm.MeshError, match="no worker matches on=.cpu:jax."):
            mesh.run_cell("1", on="cpu:jax")
    assert time.monotonic() - t0 < 5 and "waiting" not in capsys.readouterr().err


def test_ctrl_c_while_waiting_for_a_worker_is_one_line(mesh, monkeypatch):
    import _thread
    import threading

    import dask

    from jupyter_mesh.remote import StoppedWaiting, _client
    from jupyter_mesh.remote._client import _request_key
    from jupyter_mesh.targets import parse_target

    real_wait = _client.RemoteCells._wait_for_match

    def wait(self, *args):  # Ctrl-C once the wait has begun
        threading.Timer(0.5, _thread.interrupt_main).start()
        return real_wait(self, *args)

    monkeypatch.setattr(_client.RemoteCells, "_wait_for_match", wait)
    mesh._remote_cells().seen.add(_request_key(parse_target("cpu:jax"), None))
    with dask.config.set({"mesh.remote.worker-wait": 30}):
        t0 = time.monotonic()
        # a KeyboardInterrupt still (a loop that catches errors stops), said in one line
        with pytest.raises(StoppedWaiting) as info:
            mesh.run_cell("1", on="cpu:jax")
    assert time.monotonic() - t0 < 10
    assert str(info.value) == ("stopped waiting for a worker matching on='cpu:jax' (interrupted): "
                               "the cell did not run")
    assert len(info.value._render_traceback_()) == 1
    assert mesh.run_cell("2").data["text/plain"] == "2"


def test_a_cell_whose_worker_scale_takes_away_says_so():
    # it said the worker "died while running the cell (out of memory is the usual
    # cause...)": the mesh closed it on purpose
    import threading

    with jm.Mesh.local(cpu=1, jax_cpu=1, gpu=0, tpu=0, threads_per_worker=1,
                       set_current=False) as m:
        m.run_cell("1", on="cpu:jax")
        threading.Timer(1.0, lambda: m.scale(jax_cpu=0)).start()
        with pytest.raises(jm.MeshError) as info:
            m.run_cell("import time\ntime.sleep(20)", on="cpu:jax")
        assert str(info.value).startswith(
            "worker jax-cpu-0 (cpu:jax) was closed by mesh.scale (or %mesh scale) while it "
            "ran the cell; its remote namespace is gone with it"), str(info.value)
        m.scale(jax_cpu=1)  # back: a later death of the new one is a death again
        assert "jax-cpu-0" not in m._scaled_away


def test_every_workers_failure_is_said_when_one_dies_and_one_raises(capsys):
    # with --all, the death of one worker was dropped when another raised
    with jm.Mesh.local(cpu=2, gpu=0, tpu=0, threads_per_worker=1, set_current=False) as m:
        code = ("import os, time\nfrom distributed import get_worker\n"
                "if get_worker().name == 'cpu-0':\n    os._exit(1)\n"
                "time.sleep(0.5)\nraise ValueError('cpu-1 error')")
        with pytest.raises(RemoteCellError, match="ValueError: cpu-1 error"):
            m.run_cell(code, all=True)
        err = capsys.readouterr().err
        assert "jupyter_mesh: worker cpu-0 (cpu:numpy) died while running the cell" in err
