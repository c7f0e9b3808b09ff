"""Two sites, live: a whole site dropping out, and a worker restarted under a new
address, during routed computations.

The "cloud" site is one JAX worker (on this machine's CPU) started with the
``jupyter-mesh worker`` CLI in a process of its own, as a remote site's worker would
be; the "lab" site is the local mesh's NumPy worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import dask
import dask.array as da
import numpy as np
import pytest

from jupyter_mesh.router.api import MeshFallbackWarning

from .meshes import fresh_local_mesh

BIN = os.path.dirname(sys.executable)


def _jax_devices(mesh):
    return [d for d in mesh.inventory() if d.backend == "jax"]


def _join_cloud(mesh):
    proc = subprocess.Popen(
        [os.path.join(BIN, "jupyter-mesh"), "worker", mesh.address, "--site", "cloud",
         "--jax", "--nthreads", "1", "--name", "cloud-jax"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 90
    while not _jax_devices(mesh):
        assert time.monotonic() < deadline, "the cloud worker did not join"
        assert proc.poll() is None, "the cloud worker exited"
        time.sleep(0.3)
    return proc


@pytest.fixture(scope="module")
def mesh():
    with fresh_local_mesh(cpu=1, site="lab") as m:
        yield m


@pytest.fixture
def cloud(mesh):
    proc = _join_cloud(mesh)
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    deadline = time.monotonic() + 30
    while _jax_devices(mesh) and time.monotonic() < deadline:
        time.sleep(0.2)


def pipeline():
    x = da.random.random((1200, 1200), chunks=150)
    return ((x @ x.T) + 1).sum(axis=0)


def _when_jax_busy(mesh, then):
    deadline = time.time() + 30
    while time.time() < deadline:
        if any(d.tasks for d in _jax_devices(mesh)):
            break
        time.sleep(0.05)
    then()


def compute_on_jax_while(mesh, y, event, fallback_timeout, *, falls_back):
    """``mesh.compute(y, route="cpu:jax")`` while ``event()`` happens as soon as the
    cloud's JAX worker runs a task; with ``falls_back``, the fallback warning must come."""
    killer = threading.Thread(target=_when_jax_busy, args=(mesh, event))
    with dask.config.set({"mesh.fallback-timeout": fallback_timeout}):
        with (pytest.warns(MeshFallbackWarning, match="lost every cpu:jax@cloud worker")
              if falls_back else contextlib.nullcontext()):
            killer.start()
            (got,) = mesh.compute(y, route="cpu:jax")
    killer.join()
    return got


def test_a_whole_site_dropping_out_mid_computation(mesh, cloud):
    y = pipeline()
    expected = y.compute(scheduler="sync")
    pid = _jax_devices(mesh)[0].extra["pid"]

    def drop_the_site():
        # the site's worker and the process that would restart it, at once
        os.killpg(cloud.pid, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)

    got = compute_on_jax_while(mesh, y, drop_the_site, 1.0, falls_back=True)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert "numpy" in mesh.last_report.ran_on("matmul")


def test_a_worker_restarted_under_a_new_address_keeps_its_sites_work(mesh, cloud):
    y = pipeline()
    expected = y.compute(scheduler="sync")
    before = _jax_devices(mesh)[0]

    def restart_the_worker():
        # the worker process alone: its nanny starts a new one, on a new port
        os.kill(before.extra["pid"], signal.SIGKILL)

    got = compute_on_jax_while(mesh, y, restart_the_worker, 60.0, falls_back=False)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    after = _jax_devices(mesh)
    assert after and after[0].worker != before.worker and after[0].site == "cloud"
    report = mesh.last_report
    # the restarted worker took the site's tasks: nothing fell back to the lab's NumPy
    assert not report.fallbacks
    assert report.ran_on("matmul") == ["jax"]


def test_a_fallback_that_overlaps_the_restart_gives_the_same_numbers(mesh, cloud):
    # the worker restarts after the fallback relaxed its tasks: they then run on both
    # the lab's NumPy worker and the restarted JAX one, and intermediate results kept
    # on the JAX device travel to NumPy (they arrived as float32, off by ~1e-8, before)
    x = da.random.random((2100, 2100), chunks=150)
    y = ((x @ x.T) + 1).sum(axis=0)
    expected = y.compute(scheduler="sync")
    before = _jax_devices(mesh)[0]
    got = compute_on_jax_while(
        mesh, y, lambda: os.kill(before.extra["pid"], signal.SIGKILL), 0.3, falls_back=True)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert "numpy" in mesh.last_report.ran_on("matmul")
