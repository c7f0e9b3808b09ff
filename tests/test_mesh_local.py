"""A real embedded mesh: scheduler and worker processes on 127.0.0.1."""

from __future__ import annotations

import time

import dask
import dask.array as da
import psutil
import pytest
from distributed import Client, SpecCluster, get_client

import jupyter_mesh as jm
from jupyter_mesh import MeshError
from jupyter_mesh.mesh import most_local_workers as _most


@pytest.fixture(scope="module")
def mesh():
    from jupyter_mesh import _state

    if _state.active() is not None:
        _state.active().close()
    # the CPU mesh whatever the host has (a GPU host's gpu="auto" adds a GPU worker:
    # tests/test_detect.py checks that, tests/test_router_gpu.py uses it)
    m = jm.Mesh.local(cpu=2, gpu=0, tpu="auto", site="lab-a")
    yield m
    m.close()


def test_inventory_has_one_cpu_device_per_worker_process(mesh):
    inv = mesh.inventory()
    assert inv.by_kind() == {"cpu": 2}
    for dev in inv:
        assert dev.kind == "cpu" and dev.backend == "numpy"
        assert dev.site == "lab-a"
        assert dev.memory > 0 and dev.model
        assert dev.profile is not None and dev.profile.method == "measured"
        assert dev.profile.flops64 > 0
    # each device is its own worker process
    assert len({d.extra["pid"] for d in inv}) == 2
    # and says how many cores it may use: the cost model gives CPU workers that share
    # their host's cores their share of its speed
    from dask.system import CPU_COUNT

    from jupyter_mesh.router.cost import build_pools, core_shares

    assert {d.extra["cores"] for d in inv} == {CPU_COUNT}
    threads = sum(d.nthreads for d in inv)
    shares = core_shares(list(inv))
    if threads > CPU_COUNT:
        assert set(shares.values()) == {(inv.devices[0].host, CPU_COUNT, threads)}
        assert build_pools(inv)[0].profile.flops64 < inv.devices[0].profile.flops64
    else:
        assert shares == {}


def test_workers_advertise_resources_per_kind_and_backend(mesh):
    resources = mesh.client.run(lambda dask_worker: dict(dask_worker.state.total_resources))
    assert len(resources) == 2
    for res in resources.values():
        assert res["mesh-cpu"] >= 1 and res["mesh-cpu-numpy"] >= 1


def test_listens_on_loopback_only(mesh):
    assert mesh.address.startswith("tcp://127.0.0.1:")
    assert mesh.dashboard_link.startswith("http://127.0.0.1:")
    for addr in mesh.client.scheduler_info()["workers"]:
        assert addr.startswith("tcp://127.0.0.1:")


def test_on_a_hub_the_dashboard_link_goes_through_the_servers_proxy(mesh, monkeypatch):
    # a JupyterHub single-user server sets JUPYTERHUB_SERVICE_PREFIX in its kernels; the
    # browser cannot reach the scheduler's 127.0.0.1, the server's proxy path it can
    from urllib.parse import urlsplit

    port = urlsplit(mesh.client.dashboard_link).port
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ada/")
    assert mesh.dashboard_link == f"/user/ada/proxy/{port}/status"
    assert f"/user/ada/proxy/{port}/status" in mesh._repr_html_()
    monkeypatch.delenv("JUPYTERHUB_SERVICE_PREFIX")
    assert mesh.dashboard_link == mesh.client.dashboard_link


def test_the_kernel_keeps_no_garbage_collector_hook_that_swallows_ctrl_c(mesh):
    # Dask's scheduler, running in the kernel's process, hooked the collector to log
    # long collections; a KeyboardInterrupt raised in that hook was swallowed and the
    # interrupted cell ran on to its end
    import gc

    from distributed.gc import GCDiagnosis

    assert not [cb for cb in gc.callbacks
                if isinstance(getattr(cb, "__self__", None), GCDiagnosis)]


def test_plain_dask_runs_on_the_mesh(mesh):
    assert jm.current() is mesh
    assert get_client() is mesh.client
    x = da.random.random((2000, 2000), chunks=500)
    before = sum(mesh.client.run(lambda dask_worker: len(dask_worker.state.log)).values())
    value = x.mean().compute()
    after = sum(mesh.client.run(lambda dask_worker: len(dask_worker.state.log)).values())
    assert abs(value - 0.5) < 0.01
    assert after > before  # the tasks ran on the mesh's workers
    assert dask.compute(da.ones(10, chunks=5).sum())[0] == 10


def test_second_mesh_is_refused_and_first_untouched(mesh):
    with pytest.raises(MeshError, match="already active"):
        jm.Mesh.local(cpu=1)
    assert jm.current() is mesh
    assert mesh.inventory().by_kind() == {"cpu": 2}


def test_reprs(mesh):
    assert "2 devices" in repr(mesh)
    html = mesh._repr_html_()
    assert "cpu" in html and "lab-a" in html and "dashboard" in html


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cpu": -1}, "cpu must be a whole number"),
        ({"cpu": 1.5}, "cpu must be"),
        ({"gpu": "abc"}, "gpu must be"),
        ({"gpu": 2}, "no CUDA GPU found"),
        ({"tpu": 1}, "no TPU found"),
        ({"jax_cpu": -2}, "jax_cpu must be"),
        ({"site": ""}, "site must be"),
        ({"site": "has space"}, "site must be"),
        ({"site": "unknown"}, "site .unknown. is where the mesh shows plain Dask workers"),
        ({"cpu": 0, "gpu": 0, "tpu": 0}, "at least one device"),
        ({"threads_per_worker": 0}, "threads_per_worker must be"),
        ({"threads_per_worker": "many"}, "threads_per_worker must be"),
        ({"threads_per_worker": -1}, r"^threads_per_worker must be a whole number from 1 to "
                                     r"\d+ \(four per core here\), not -1$"),
        ({"threads_per_worker": 100000}, r"threads_per_worker must be a whole number from 1 "
                                         r"to \d+ \(four per core here\), not 100000"),
        ({"memory_limit": "lots"}, "memory_limit must be"),
        ({"memory_limit": -5}, "memory_limit must be"),
        ({"host": ""}, "host must be"),
        # another machine's address, a name nothing resolves: said before Dask fails
        ({"host": "192.0.2.7"}, r"^host 192\.0\.2\.7 is not an address of this machine "
                                r"\(.*\): give one of its interface addresses"),
        ({"host": "nonexistent.invalid"}, r"^host nonexistent\.invalid is not an address "),
        ({"host": "bad..host"}, r"^host bad\.\.host is not an address of this machine "
                                r"\(not a valid host name\): give one"),
        ({"memory_limit": 4}, r"memory_limit 4 is 4 B, less than a worker process needs"),
        # up to 1, a share of the host's memory, as Dask reads it: a tiny share too
        ({"memory_limit": 0.00001}, r"^memory_limit 1e-05 is [\d.]+ [kKMG]i?B of this "
                                   r"host's [\d.]+ [kMGT]iB, less than a worker process needs"),
        ({"memory_limit": "-5"}, "memory_limit must be"),
        # Dask reads '' and '1B' as a byte, not as a share of the host's memory
        ({"memory_limit": ""}, "memory_limit must be 'auto', a number of bytes or a size"),
        ({"memory_limit": "1B"}, r"memory_limit '1B' is 1 B, less than a worker process"),
        ({"cpu": 10_000}, r"cpu must be a whole number from 0 to \d+ \(four workers per "
                          r"core here\), not 10000"),
        ({"jax_cpu": 10_000}, r"jax_cpu must be a whole number from 0 to \d+ \(four "
                              r"workers per core here\)"),
        # each within the limit, together over it
        ({"cpu": _most(), "jax_cpu": 1}, rf"cpu and jax_cpu together must be at most "
                                         rf"{_most()} workers \(four CPU workers per core "
                                         rf"here\), not {_most()} \+ 1: use fewer$"),
    ],
)
def test_bad_arguments_leave_the_mesh_alone(mesh, kwargs, match):
    with pytest.raises(MeshError, match=match):
        jm.Mesh.local(replace=True, **kwargs)
    assert jm.current() is mesh and not mesh.closed


@pytest.mark.parametrize("flag", ["replace", "set_current"])
@pytest.mark.parametrize("value", ["no", "False", 0, 1, None])
def test_flags_must_be_bools_and_nothing_is_closed(mesh, flag, value):
    # "no" is truthy: it closed the mesh in use (replace), or made the new mesh the
    # current one (set_current)
    for start in (lambda: jm.Mesh.local(cpu=1, gpu=0, tpu=0, **{flag: value}),
                  lambda: jm.Mesh.connect(mesh.address, **{flag: value})):
        with pytest.raises(MeshError, match=rf"^{flag}= takes True or False, not "
                                            rf"{value!r}$"):
            start()
    assert jm.current() is mesh and not mesh.closed
    assert mesh.inventory().by_kind() == {"cpu": 2}


def test_the_current_mesh_under_another_host_name_is_not_replaced(mesh):
    # localhost and 127.0.0.1 name the same scheduler: replacing would close it
    other = mesh.address.replace("tcp://127.0.0.1:", "tcp://localhost:")
    assert other != mesh.address
    clients = set(Client._instances)
    with pytest.raises(MeshError, match=rf"^{other} is the current mesh already \(as "
                                        rf"{mesh.address}\): keep using it"):
        jm.Mesh.connect(other, replace=True, timeout=10)
    assert jm.current() is mesh and not mesh.closed
    assert get_client() is mesh.client
    assert mesh.inventory().by_kind() == {"cpu": 2}
    assert not [c for c in set(Client._instances) - clients if c.status != "closed"]


def test_scale_bad_input(mesh):
    with pytest.raises(MeshError, match="cannot scale fpga"):
        mesh.scale(fpga=1)
    # it did nothing, without a word (%mesh scale alone says what to give)
    with pytest.raises(MeshError, match=r"^say how many workers of which kind: "
                                        r"mesh.scale\(cpu=2\), with any of cpu, "):
        mesh.scale()
    with pytest.raises(MeshError, match="cpu must be"):
        mesh.scale(cpu=-1)
    from jupyter_mesh.devices import _detect

    with pytest.raises(MeshError, match="no CUDA GPU"):
        mesh.scale(gpu=len(_detect.cuda_devices()) + 1)  # (one more than the host has)
    with pytest.raises(MeshError, match="at least one device"):
        mesh.scale(cpu=0)
    with pytest.raises(MeshError, match=r"cpu must be a whole number from 0 to \d+ \(four "
                                        r"workers per core here\), not 10000"):
        mesh.scale(cpu=10_000)
    with pytest.raises(MeshError, match=r"jax_cpu must be a whole number from 0 to \d+"):
        mesh.scale(jax_cpu=10_000)
    assert mesh.inventory().by_kind() == {"cpu": 2}


def test_scaling_jax_workers_without_jax_says_what_to_install(mesh, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "jax" else real(name, *a))
    with pytest.raises(MeshError, match=r"jax_cpu needs JAX: pip install 'jupyter_mesh\[tpu\]'"):
        mesh.scale(jax_cpu=1)
    assert mesh.inventory().by_kind() == {"cpu": 2}


def test_scale_per_kind(mesh):
    from jupyter_mesh.mesh import worker_memory

    inv = mesh.scale(cpu=1)
    assert inv.by_kind() == {"cpu": 1}
    assert [d.memory for d in inv] == [worker_memory("auto", 1)]  # the host's memory
    inv = mesh.scale(cpu=2)
    assert inv.by_kind() == {"cpu": 2}
    # the worker it had shares the host's memory with the new one: each has half, in
    # the inventory, the worker, its nanny and the scheduler (it kept all of it, and
    # together they had more than the host)
    half = worker_memory("auto", 2)
    assert [d.memory for d in inv] == [half, half]
    assert set(mesh.client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit
                               ).values()) == {half}
    assert set(mesh.client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit,
                               nanny=True).values()) == {half}
    # and each spills past its target share of it
    assert set(mesh.client.run(lambda dask_worker: (
        dask_worker.data.n == int(dask_worker.memory_manager.memory_limit *
                                  dask_worker.memory_manager.memory_target_fraction))
    ).values()) == {True}
    assert mesh.client.run_on_scheduler(lambda dask_scheduler: (
        {ws.memory_limit for ws in dask_scheduler.workers.values()},
        dask_scheduler.total_memory)) == ({half}, 2 * half)


def test_new_workers_that_fail_to_start_are_one_line_and_the_mesh_keeps_its_own(ip, mesh):
    import dask
    from IPython.core.error import UsageError

    had = mesh.inventory().by_kind()
    with dask.config.set({"distributed.worker.preload": ["no_such_module_jupyter_mesh"]}):
        with pytest.raises(UsageError, match=rf"^the new workers did not start \(RuntimeError"
                                             rf": .*\); the mesh keeps its {had['cpu']} "
                                             rf"workers"):
            ip.run_line_magic("mesh", f"scale --cpu {had['cpu'] + 1}")
    assert mesh.inventory().by_kind() == had and mesh.options["cpu"] == had["cpu"]
    assert len(mesh.cluster.worker_spec) == had["cpu"]  # nothing left to retry
    assert mesh.scale(cpu=had["cpu"]).by_kind() == had


def test_ctrl_c_while_a_scale_runs_stops_once_the_change_is_whole(mesh, monkeypatch, capsys):
    # stopped half-way, the spec and options said 3 workers where 2 ran (or a new one
    # went on starting outside the spec), and no share of memory was given
    import signal

    had = mesh.inventory().by_kind()
    real_sync = mesh.cluster.sync

    def sync(func, *args, **kwargs):
        if func == mesh.cluster._correct_state:
            # Ctrl-C as the new workers start: what SIGINT's handler gets
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        return real_sync(func, *args, **kwargs)

    monkeypatch.setattr(mesh.cluster, "sync", sync)
    with pytest.raises(KeyboardInterrupt):
        mesh.scale(cpu=had["cpu"] + 1)
    monkeypatch.undo()
    assert "jupyter_mesh: scaling the mesh; it stops once that is done" in \
        capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    n = had["cpu"] + 1
    assert mesh.options["cpu"] == n and len(mesh.cluster.worker_spec) == n
    assert mesh.inventory().by_kind() == {"cpu": n}
    assert mesh.scale(cpu=had["cpu"]).by_kind() == had


def test_scaling_to_more_tpu_workers_than_chips_is_one_line(mesh, monkeypatch):
    from jupyter_mesh.devices import _tpu

    monkeypatch.setattr(_tpu, "chips", lambda: ([], "no /dev/accel* device"))
    with pytest.raises(MeshError, match=r"^no TPU found for that many tpu workers \(this host "
                                        r"has 0 TPU chips: no /dev/accel\* device\): use "
                                        r"tpu=0$"):
        mesh.scale(tpu=1)
    monkeypatch.setattr(_tpu, "chips", lambda: (["chip-0"], None))
    with pytest.raises(MeshError, match=r"^no TPU found for that many tpu workers \(this host "
                                        r"has 1 TPU chips\): use tpu=1 or fewer$"):
        mesh.scale(tpu=2)
    assert mesh.inventory().by_kind() == {"cpu": 2}


A_FILE = object()  # stands for the path of a file


@pytest.mark.parametrize("key, value, match", [
    ("local.host", None, r"config mesh\.local\.host must be an interface address like "
                         r"'127\.0\.0\.1' \(this machine only\), not None"),
    ("local.host", "", r"config mesh\.local\.host must be an interface address"),
    ("local.host", "192.0.2.7", r"config mesh\.local\.host 192\.0\.2\.7 is not an address "
                                r"of this machine"),
    ("local.host", "  ", r"config mesh\.local\.host must be an interface address"),
    ("local.dashboard-address", "dashboard", r"config mesh\.local\.dashboard-address must "
                                             r"be HOST:PORT like '127\.0\.0\.1:8787'.*, "
                                             r"not 'dashboard'"),
    ("local.dashboard-address", True, r"config mesh\.local\.dashboard-address must be"),
    # a host that is not this machine's: Dask said "Cluster failed to start: [Errno 99]"
    ("local.dashboard-address", "192.0.2.7:0", r"config mesh\.local\.dashboard-address: "
                                               r"its host 192\.0\.2\.7 is not an address of "
                                               r"this machine"),
    ("profile.cache-dir", 123, r"config mesh\.profile\.cache-dir must be a folder path, or "
                               r"null for ~/\.cache/jupyter-mesh, not 123"),
    ("profile.cache-dir", A_FILE, r"config mesh\.profile\.cache-dir must be a folder, but "
                                  r".*afile is a file: name a folder, or null for"),
    ("profile.measure-seconds", -1, r"config mesh\.profile\.measure-seconds must be a "
                                    r"non-negative number of seconds, not -1"),
    ("profile.measure-seconds", "soon", r"config mesh\.profile\.measure-seconds must be a "
                                        r"number of seconds, not 'soon'"),
])
def test_bad_local_config_is_one_line_before_anything_starts(mesh, tmp_path, key, value,
                                                             match):
    from distributed import SpecCluster

    if value is A_FILE:
        value = tmp_path / "afile"
        value.write_text("not a folder")
        value = str(value)
    clusters = set(SpecCluster._instances)
    with dask.config.set({f"mesh.{key}": value}):
        with pytest.raises(jm.MeshConfigError, match=rf"^{match}") as info:
            jm.Mesh.local(cpu=1, gpu=0, tpu=0, replace=True)
        assert "\n" not in str(info.value)
        if key.startswith("profile."):  # what a new worker reads: scale checks it too
            with pytest.raises(jm.MeshConfigError, match=rf"^{match}"):
                mesh.scale(cpu=3)
    assert set(SpecCluster._instances) == clusters  # nothing started
    assert jm.current() is mesh and not mesh.closed
    assert mesh.inventory().by_kind() == {"cpu": 2}


def test_workers_that_do_not_all_start_are_said_in_one_line(mesh):
    with pytest.raises(MeshError, match=r"only 2 of 5 workers started within 0.5 s: .*ask "
                                        r"for fewer workers"):
        mesh._wait_for(5, timeout=0.5)
    assert len(mesh.inventory()) == 2  # nothing was lost


def test_context_manager_close_and_no_orphans(no_mesh):
    me = psutil.Process()
    with jm.Mesh.local(cpu=1, jax_cpu=1, gpu=0, site="ctx") as m:  # (any host)
        inv = m.inventory()
        assert inv.by_target() == {"cpu:numpy": 1, "cpu:jax": 1}
        jax_dev = inv.select("cpu:jax")[0]
        assert "JAX" in jax_dev.profile.source
        pids = {d.extra["pid"] for d in inv}
        assert pids <= {p.pid for p in me.children(recursive=True)}
    assert m.closed
    with pytest.raises(MeshError, match="%mesh start"):
        jm.current()
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)],
                                    timeout=10)
    assert not alive


def _cpu_seconds_of_jax_matmuls(seconds):
    """Run JAX matmuls for about ``seconds`` in this worker: (CPU seconds of the whole
    process, wall seconds)."""
    import os
    import time

    import jax
    import jax.numpy as jnp

    a = jnp.ones((700, 700))
    square = jax.jit(lambda a: a @ a)
    square(a).block_until_ready()
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        square(a).block_until_ready()
    return time.process_time() - c0, time.perf_counter() - t0, sorted(os.sched_getaffinity(0))


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"),
                    reason="pinning a process to cores needs Linux")
def test_a_jax_cpu_worker_computes_on_its_share_of_the_cores(no_mesh):
    # XLA computes on a thread pool as wide as the cores its process may use: unpinned,
    # a JAX CPU worker beside NumPy workers would take every core and slow them all
    from jupyter_mesh.mesh import jax_cpu_sets
    from jupyter_mesh.router.cost import core_shares

    # (pinned whatever this machine's size: auto leaves a JAX worker alone on a machine
    # of one core, where there is nothing to pin)
    want = jax_cpu_sets(1, 1, 1, pin=True)[0]  # one JAX worker beside one NumPy thread
    with dask.config.set({"mesh.local.pin-jax": True}), \
            jm.Mesh.local(cpu=1, jax_cpu=1, threads_per_worker=1, set_current=False) as m:
        inv = m.inventory()
        jax_dev = inv.select("cpu:jax")[0]
        numpy_dev = inv.select("cpu:numpy")[0]
        assert jax_dev.extra["cores"] == len(want)
        assert "JAX" in jax_dev.profile.source
        cpu, wall, affinity = m.client.submit(_cpu_seconds_of_jax_matmuls, 1.0,
                                              workers=[jax_dev.worker], pure=False).result()
        assert affinity == want
        # the process cannot compute on more cores than it is pinned to (XLA's pool
        # heeds the affinity of the threads it starts from, all of them pinned)
        assert cpu <= wall * len(want) * 1.25 + 0.05
        # the NumPy worker is left alone, and the cost model counts the JAX worker's
        # cores as its threads
        numpy_affinity = m.client.submit(lambda: sorted(__import__("os").sched_getaffinity(0)),
                                         workers=[numpy_dev.worker], pure=False).result()
        assert len(numpy_affinity) == numpy_dev.extra["cores"] >= len(want)
        # each says which cores it may use
        assert list(jax_dev.extra["cpus"]) == want
        assert list(numpy_dev.extra["cpus"]) == numpy_affinity
        threads = 1 + len(want)
        shares = core_shares(list(inv))
        if threads > numpy_dev.extra["cores"]:
            assert set(shares.values()) == {(numpy_dev.host, numpy_dev.extra["cores"], threads)}
        else:
            assert shares == {}


def test_jax_cpu_workers_get_the_cores_the_other_workers_leave(monkeypatch):
    import os

    from jupyter_mesh.devices import _detect
    from jupyter_mesh.mesh import jax_cpu_sets

    def machine(cores, quota=None):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)),
                            raising=False)
        monkeypatch.setattr(_detect, "cpu_cores", lambda: quota or cores)

    machine(16)  # two five-thread NumPy workers leave six cores
    assert jax_cpu_sets(1, 10, 5) == [list(range(10, 16))]
    # two JAX workers share what is left, side by side
    assert jax_cpu_sets(2, 2, 1) == [list(range(9, 16)), list(range(2, 9))]
    # never fewer cores than the worker's own threads
    assert jax_cpu_sets(1, 14, 4) == [[12, 13, 14, 15]]
    # alone on the machine it may use every core: nothing to pin
    assert jax_cpu_sets(1, 0, 16) == [[]]
    # a cgroup quota of four cores on 16 visible ones
    machine(16, quota=4)
    assert jax_cpu_sets(1, 2, 1) == [[14, 15]]
    # 2 cores beside one one-thread NumPy worker: a core of its own
    machine(2)
    assert jax_cpu_sets(1, 1, 1) == [[1]]
    # beside two, the NumPy threads leave no core: pinning would free none and only
    # confine the worker to a core they use too, so auto does not pin; True does
    assert jax_cpu_sets(1, 2, 1) == [[]]
    assert jax_cpu_sets(1, 2, 1, pin=True) == [[1]]
    # more JAX workers than cores: they share, wrapping round
    assert jax_cpu_sets(3, 0, 1, pin=True) == [[1], [0], [1]]
    assert jax_cpu_sets(0, 2, 1) == []
    # False never pins
    machine(16)
    assert jax_cpu_sets(1, 10, 5, pin=False) == [[]]
    # where a process cannot be pinned (macOS), nothing is
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert jax_cpu_sets(2, 2, 1, pin=True) == [[], []]


def _fails(block):
    raise ValueError("a bad value in this block")


def test_a_failing_task_is_reported_once_not_also_in_dasks_worker_log(no_mesh, capfd):
    # a local mesh's workers write to the kernel's output, which the notebook shows:
    # the failure is the exception in the cell, not also Dask's "Compute Failed" log
    import traceback

    with jm.Mesh.local(cpu=1, gpu=0, tpu=0, set_current=False) as m:
        x = da.ones(10, chunks=5).map_blocks(_fails, dtype=float)
        with pytest.raises(ValueError, match="a bad value in this block") as info:
            m.client.compute(x).result()
        # the exception keeps what the log said: the message and where it was raised
        assert "_fails" in "".join(traceback.format_tb(info.tb))
        # and the workers still log what else goes wrong
        m.client.run(lambda: __import__("logging").getLogger("distributed.worker").error(
            "another worker error"))
        time.sleep(0.5)
    out, err = capfd.readouterr()
    assert "Compute Failed" not in out + err
    assert "another worker error" in out + err


def test_workers_started_elsewhere_keep_dasks_compute_failed_log():
    import logging

    from jupyter_mesh.devices._worker_plugin import MeshWorkerPlugin, _NoComputeFailed

    assert MeshWorkerPlugin().quiet_failures is False  # jupyter-mesh worker, dask preload
    keep = _NoComputeFailed()

    def record(msg):
        return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, msg,
                                 None, None)

    assert not keep.filter(record("Compute Failed\nKey:       %s\n"))
    assert keep.filter(record("Failed to communicate with scheduler"))


def test_a_local_meshs_workers_do_not_log_a_peer_that_died_while_they_sent_it_data():
    # a worker killed while another sent it data: the sender logged an ERROR with two
    # tracebacks into the notebook's cell, before the routed computation's one warning
    import logging
    import sys

    from distributed.comm.core import CommClosedError

    from jupyter_mesh.devices._worker_plugin import _NoComputeFailed

    quiet = _NoComputeFailed()

    def record(exc):
        try:
            raise exc
        except Exception:
            info = sys.exc_info()
        return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1,
                                 "failed during get data with %s -> %s", ("a", "b"), info)

    assert not quiet.filter(record(CommClosedError("in <TCP (closed)>")))
    assert not quiet.filter(record(ConnectionResetError(104, "Connection reset by peer")))
    # anything else it fails with is still said
    assert quiet.filter(record(ValueError("a bug")))


def test_current_without_mesh(no_mesh):
    with pytest.raises(MeshError, match="no active mesh"):
        jm.current()


def test_a_local_mesh_that_does_not_come_up_leaves_nothing_running(no_mesh, monkeypatch):
    made = []

    def never(self, n, timeout=60):
        made.append(self)
        raise MeshError(f"only 0 of {n} workers started within {timeout:g} s")

    monkeypatch.setattr(jm.Mesh, "_wait_for", never)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    with pytest.raises(MeshError, match="only 0 of 1 workers"):
        jm.Mesh.local(cpu=1, gpu=0, tpu=0, jax_cpu=0, set_current=False)
    (m,) = made
    assert m.closed and m.cluster.status.name == "closed"
    extra = [p for p in me.children(recursive=True) if p.pid not in before
             and "resource_tracker" not in " ".join(p.cmdline())]
    gone, alive = psutil.wait_procs(extra, timeout=10)
    assert not alive


def test_a_replacement_that_does_not_come_up_keeps_the_mesh_in_use(no_mesh, monkeypatch):
    with jm.Mesh.local(cpu=1, gpu=0, tpu=0, jax_cpu=0) as old:
        def never(self, n, timeout=60):
            raise MeshError(f"only 0 of {n} workers started within {timeout:g} s")

        monkeypatch.setattr(jm.Mesh, "_wait_for", never)
        with pytest.raises(MeshError, match="only 0 of 1 workers"):
            jm.Mesh.local(cpu=1, gpu=0, tpu=0, jax_cpu=0, replace=True)
        monkeypatch.undo()
        assert jm.current() is old and not old.closed
        assert da.ones(10, chunks=5).sum().compute() == 10  # and it still computes
        # connecting to it "again" with replace would close the mesh it connects to
        with pytest.raises(MeshError, match="is the current mesh already"):
            jm.Mesh.connect(old.address, replace=True)
        assert jm.current() is old and not old.closed


def test_ctrl_c_while_the_replaced_mesh_closes_leaves_the_new_one_current(no_mesh,
                                                                          monkeypatch):
    # nothing may keep running that %mesh and jm.current() cannot reach
    old = jm.Mesh.local(cpu=1, gpu=0, tpu=0, jax_cpu=0)
    real_close = jm.Mesh.close

    def interrupted(self):
        real_close(self)
        if self is old:
            raise KeyboardInterrupt

    monkeypatch.setattr(jm.Mesh, "close", interrupted)
    before = set(SpecCluster._instances)
    with pytest.raises(KeyboardInterrupt):
        jm.Mesh.local(cpu=1, gpu=0, tpu=0, jax_cpu=0, replace=True)
    monkeypatch.undo()
    (cluster,) = set(SpecCluster._instances) - before
    new = jm.current()
    try:
        assert new is not old and new.cluster is cluster and old.closed
        assert da.ones(10, chunks=5).sum().compute() == 10
    finally:
        new.close()


def test_a_replaced_mesh_that_fails_to_close_is_a_warning_and_the_new_one_runs(
        no_mesh, monkeypatch):
    old = jm.Mesh.local(cpu=1, gpu=0, tpu=0, jax_cpu=0)
    real_close = jm.Mesh.close

    def broken(self):
        real_close(self)
        if self is old:
            raise RuntimeError("scheduler gone")

    monkeypatch.setattr(jm.Mesh, "close", broken)
    with pytest.warns(UserWarning, match=r"did not close cleanly \(RuntimeError: "
                                         r"scheduler gone\)"):
        new = jm.Mesh.local(cpu=1, gpu=0, tpu=0, jax_cpu=0, replace=True)
    monkeypatch.undo()
    try:
        assert jm.current() is new and not new.closed
    finally:
        new.close()


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0, -1, "soon", True])
def test_connect_timeout_must_be_a_positive_number(no_mesh, timeout):
    with pytest.raises(MeshError, match="timeout must be a positive number of seconds"):
        jm.Mesh.connect("tcp://127.0.0.1:9", timeout=timeout)


def test_a_scheduler_that_stops_answering_is_said_not_waited_for(no_mesh):
    import asyncio

    with jm.Mesh.local(cpu=1, gpu=0, tpu=0, jax_cpu=0, set_current=False) as m:
        handlers = m.cluster.scheduler.handlers
        answer = handlers["jupyter_mesh_inventory"]

        async def stalled(*args, **kwargs):
            await asyncio.sleep(30)

        handlers["jupyter_mesh_inventory"] = stalled
        try:
            with dask.config.set({"mesh.connect-timeout": 0.5}):
                with pytest.raises(MeshError, match=r"did not answer within 0.5 s .*try again"):
                    m.inventory()
        finally:
            handlers["jupyter_mesh_inventory"] = answer
        assert len(m.inventory()) == 1  # and the next question is answered


def test_a_start_interrupted_while_workers_start_leaves_nothing_running(no_mesh, monkeypatch):
    # Ctrl-C (in the kernel's main thread) while the cluster comes up: the scheduler
    # and the workers it started go too
    import _thread
    import asyncio
    import threading

    from distributed.deploy.spec import SpecCluster

    started = SpecCluster._correct_state_internal

    async def slowly(self):
        await started(self)  # the workers are up
        await asyncio.sleep(3)

    monkeypatch.setattr(SpecCluster, "_correct_state_internal", slowly)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    clusters = set(SpecCluster._instances)

    def interrupt_once_up():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if set(SpecCluster._instances) - clusters and \
                    {p.pid for p in me.children(recursive=True)} - before:
                time.sleep(1.0)
                _thread.interrupt_main()
                return
            time.sleep(0.05)

    threading.Thread(target=interrupt_once_up, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        jm.Mesh.local(cpu=1, gpu=0, tpu=0, jax_cpu=0)
    monkeypatch.undo()
    # the mesh's processes (not multiprocessing's resource tracker, which stays)
    extra = [p for p in me.children(recursive=True) if p.pid not in before
             and "resource_tracker" not in " ".join(p.cmdline())]
    gone, alive = psutil.wait_procs(extra, timeout=15)
    assert not alive
    assert all(c.status.name == "closed" for c in set(SpecCluster._instances) - clusters)


def test_replacing_a_mesh_keeps_dasks_logs_quiet(no_mesh):
    import logging

    handler = logging.StreamHandler()
    handler.setLevel(logging.INFO)
    logging.getLogger("distributed").addHandler(handler)
    try:
        with jm.Mesh.local(cpu=1, gpu=0, tpu=0, jax_cpu=0):
            assert handler.level == logging.WARNING
            with jm.Mesh.local(cpu=1, gpu=0, tpu=0, jax_cpu=0, replace=True):
                # closing the replaced mesh restored what it silenced; the new one
                # keeps it quiet
                assert handler.level == logging.WARNING
        assert handler.level == logging.INFO  # as it was, once no mesh is left
    finally:
        logging.getLogger("distributed").removeHandler(handler)


def _listening_hosts(mesh):
    """The interfaces the scheduler's HTTP server (the dashboard's) listens on."""
    server = mesh.cluster.scheduler.http_server
    return {sock.getsockname()[0] for sock in server._sockets.values()}


def test_dashboard_without_a_host_listens_on_the_meshs_host(no_mesh):
    # Dask takes ":0" for every interface; the mesh keeps it on mesh.local.host
    with dask.config.set({"mesh.local.dashboard-address": ":0"}):
        with jm.Mesh.local(cpu=1, gpu=0, tpu=0, jax_cpu=0, threads_per_worker=1) as m:
            assert _listening_hosts(m) == {"127.0.0.1"}
            assert m.dashboard_link.startswith("http://127.0.0.1:")


def test_a_mesh_on_every_interface_links_the_dashboard_where_it_listens(no_mesh):
    # host="0.0.0.0" (for workers of other machines): the dashboard stays on 127.0.0.1
    # (mesh.local.dashboard-address), and the link named the scheduler's outside
    # address, where nothing listens
    import urllib.request

    # plain tcp on every interface: said (a worker runs whatever code it is sent)
    with pytest.warns(UserWarning, match=r"^jupyter_mesh: this mesh will listen on 0.0.0.0 "
                                         r"over plain tcp: anyone who reaches its ports can "
                                         r"run code on its workers as you; set "
                                         r"mesh.local.tls: true") as said:
        m = jm.Mesh.local(cpu=1, gpu=0, tpu=0, jax_cpu=0, threads_per_worker=1,
                          host="0.0.0.0")
    assert [w.filename for w in said if "plain tcp" in str(w.message)] == [__file__]
    with m:
        assert _listening_hosts(m) == {"127.0.0.1"}
        assert m.dashboard_link.startswith("http://127.0.0.1:"), m.dashboard_link
        with urllib.request.urlopen(m.dashboard_link, timeout=10) as answer:
            assert answer.status == 200
    # in Dask's own template of the link, which a proxy's users set
    with dask.config.set({"distributed.dashboard.link": "https://proxy.test/d/{port}/status"}):
        with pytest.warns(UserWarning, match="over plain tcp"), jm.Mesh.local(
                cpu=1, gpu=0, tpu=0, jax_cpu=0, threads_per_worker=1, host="0.0.0.0") as m:
            port = m.cluster.scheduler.http_server.port
            assert m.dashboard_link == f"https://proxy.test/d/{port}/status"


def test_a_mesh_on_loopback_or_over_tls_gives_no_word_of_plain_tcp(no_mesh):
    import warnings

    from jupyter_mesh.mesh import _loopback

    assert _loopback("127.0.0.1") and _loopback("localhost") and _loopback("[::1]")
    assert not _loopback("0.0.0.0") and not _loopback("10.1.2.3") and not _loopback("::")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with jm.Mesh.local(cpu=1, gpu=0, tpu=0, jax_cpu=0, threads_per_worker=1,
                           set_current=False):
            pass
    assert not [w for w in seen if "plain tcp" in str(w.message)]


def test_dashboard_turned_off(no_mesh):
    with dask.config.set({"mesh.local.dashboard-address": None}):
        with jm.Mesh.local(cpu=1, gpu=0, tpu=0, jax_cpu=0, threads_per_worker=1) as m:
            assert m.dashboard_link is None and m.inventory().dashboard is None
            assert "dashboard" not in m._repr_html_()
            assert _listening_hosts(m) == {"127.0.0.1"}  # Dask's health checks, loopback
            assert da.ones(10, chunks=5).sum().compute() == 10
            # and nothing else over HTTP, where any local user could read (no login) the
            # running tasks, their call stacks, the logs and the metrics: the
            # scheduler's and each worker's, one added by scale too
            m.scale(cpu=2)
            ports = [m.cluster.scheduler.http_server.port, *m.client.run(
                lambda dask_worker: dask_worker.http_server.port).values()]
            assert len(ports) == 3
            for port in ports:
                assert _http_status(port, "/health") == 200
                for path in ("/info/main/workers.html", "/metrics", "/json/counts.json"):
                    assert _http_status(port, path) == 404, (port, path)


def _http_status(port, path):
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_auto_memory_is_the_hosts_shared_evenly_among_the_workers():
    # as Dask's LocalCluster shares it: each worker's own "auto" would be its threads'
    # share of the cores, which on two 2-thread workers of a 2-core host is all of it
    # for each, and for a one-thread GPU worker of a 16-core host a sixteenth
    from distributed.system import MEMORY_LIMIT

    from jupyter_mesh.mesh import worker_memory

    from .meshes import fresh_local_mesh

    assert worker_memory("auto", 4) == MEMORY_LIMIT // 4
    assert worker_memory("2 GiB", 4) == "2 GiB" and worker_memory(10**9, 1) == 10**9

    def limits(m):
        return sorted(m.client.run(lambda dask_worker: dask_worker.memory_manager
                                   .memory_limit).values())

    with fresh_local_mesh(cpu=2, threads_per_worker=2) as m:
        assert limits(m) == [MEMORY_LIMIT // 2] * 2
        # a scale shares the memory among the new make-up, the workers it had too
        m.scale(cpu=3)
        assert limits(m) == [worker_memory("auto", 3)] * 3
    with fresh_local_mesh(cpu=1, threads_per_worker=1, memory_limit="1 GiB") as m:
        assert limits(m) == [1 << 30]


def test_a_start_waits_for_a_close_under_way_in_another_thread(monkeypatch):
    # Dask's cluster and the mesh's quieting restore the log levels they found as they
    # close: a mesh started while another still closed (closed from another thread,
    # during a remote cell) had Dask's INFO logs of its start in the cell
    import threading

    from jupyter_mesh import mesh as mesh_module

    from .meshes import fresh_local_mesh

    started: list[float] = []
    real = SpecCluster.__init__

    def spy(self, *args, **kwargs):
        started.append(time.monotonic())
        real(self, *args, **kwargs)

    monkeypatch.setattr(SpecCluster, "__init__", spy)
    holding, released = threading.Event(), []

    def closing():  # as Mesh.close holds it while its cluster closes
        with mesh_module._CLOSING:
            holding.set()
            time.sleep(1.0)
            released.append(time.monotonic())

    closer = threading.Thread(target=closing)
    closer.start()
    holding.wait(5)
    with fresh_local_mesh(cpu=1, threads_per_worker=1) as m:
        assert m.compute(da.ones(4, chunks=2).sum(), route="off")[0] == 4
    closer.join()
    assert started and released and started[0] >= released[0]


def test_a_mesh_on_the_default_settings_starts_and_says_a_typod_key(tmp_path, monkeypatch):
    # the tests' own settings (a private profile cache) hid a default path where every
    # Mesh.local failed (RecursionError looking for unknown keys past a null setting)
    from jupyter_mesh import _config

    from .meshes import fresh_local_mesh

    monkeypatch.setenv("HOME", str(tmp_path))  # (the default cache: ~/.cache/jupyter-mesh)
    monkeypatch.delenv("DASK_MESH__PROFILE__CACHE_DIR", raising=False)
    monkeypatch.setattr(_config, "_warned", set())
    with dask.config.set({"mesh.profile.cache-dir": None, "mesh.fallback-timout": 4}), \
            pytest.warns(UserWarning, match=r"config mesh.fallback-timout is no setting, and "
                                            r"changes nothing: did you mean "
                                            r"mesh.fallback-timeout\?"):
        with fresh_local_mesh(cpu=1, threads_per_worker=1) as m:
            assert m.compute(da.ones(4, chunks=2).sum(), route="off")[0] == 4
    assert (tmp_path / ".cache" / "jupyter-mesh" / "profiles.json").exists()


def test_a_failed_start_leaves_dasks_log_levels_as_they_were(no_mesh, monkeypatch,
                                                            request):
    # after a start that failed (or was stopped), Dask's INFO logs were off for good
    # (a user's own LocalCluster(silence_logs=False) said nothing); before that, its
    # levels came back late, under the next mesh (INFO logs in every cell)
    import io
    import logging

    import dask

    from jupyter_mesh import mesh as mesh_mod

    monkeypatch.setattr(mesh_mod, "QUIET_AFTER_FAILED_START", 0.5)
    mine = logging.StreamHandler(io.StringIO())  # (under pytest, Dask's may be gone)
    logging.getLogger("distributed").addHandler(mine)
    request.addfinalizer(lambda: logging.getLogger("distributed").removeHandler(mine))
    handlers = [h for h in logging.getLogger("distributed").handlers
                if isinstance(h, logging.StreamHandler)]
    assert mine in handlers
    before = [h.level for h in handlers]
    with dask.config.set({"distributed.worker.preload": ["no_such_module_for_a_test"]}):
        with pytest.raises(Exception, match="failed to start"):
            jm.Mesh.local(cpu=1, gpu=0, tpu=0, threads_per_worker=1, set_current=False)
    assert [h.level for h in handlers] == before
    time.sleep(0.6)  # (its pieces' INFO logs are dropped a moment, then no longer)
    info = logging.LogRecord("distributed.user", logging.INFO, __file__, 1, "hi", (), None)
    assert all(h.filter(info) for h in handlers)


def test_dasks_logs_stay_quiet_while_any_local_mesh_lives(no_mesh, request):
    # closing one of two local meshes of a process (the server's several) turned
    # Dask's INFO logs back on under the other; the last to close puts them back
    import io
    import logging

    # (a handler of its own: under pytest, Dask's may be gone)
    mine = logging.StreamHandler(io.StringIO())
    logging.getLogger("distributed").addHandler(mine)
    request.addfinalizer(lambda: logging.getLogger("distributed").removeHandler(mine))
    handlers = [h for h in logging.getLogger("distributed").handlers
                if isinstance(h, logging.StreamHandler)]
    before = [h.level for h in handlers]
    assert mine in handlers and mine.level == logging.NOTSET
    a = jm.Mesh.local(cpu=1, gpu=0, tpu=0, threads_per_worker=1, set_current=False)
    b = jm.Mesh.local(cpu=1, gpu=0, tpu=0, threads_per_worker=1, set_current=False)
    try:
        assert all(h.level >= logging.WARNING for h in handlers)
        a.close()
        assert all(h.level >= logging.WARNING for h in handlers), [h.level for h in handlers]
    finally:
        a.close()
        b.close()
    assert [h.level for h in handlers] == before


def test_a_script_that_starts_a_mesh_unguarded_is_told_what_to_do(tmp_path):
    # each worker process re-runs the script's top level as it starts (Python's
    # "spawn"), and the start there failed in 200 lines of multiprocessing's
    # "bootstrapping phase" and Dask's tracebacks
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text("import jupyter_mesh as jm\n"
                      "m = jm.Mesh.local(cpu=1, gpu=0, tpu=0, threads_per_worker=1)\n"
                      "m.close()\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=180, cwd=tmp_path)
    assert out.returncode != 0
    assert ("jupyter_mesh: Mesh.local ran again in a worker process as it started: in a "
            "script, start the mesh under `if __name__ == \"__main__\":`") in out.stderr
    assert "bootstrapping phase" not in out.stderr, out.stderr


def test_a_second_ctrl_c_as_the_process_ends_shows_no_traceback():
    # make lab under a supervisor, a second SIGINT during its shutdown: the exit hook
    # that closes the mesh printed a 25-line KeyboardInterrupt traceback
    import weakref

    from jupyter_mesh.mesh import _close_at_exit

    class Closing:
        closed = False

        def close(self):
            raise KeyboardInterrupt

    mesh = Closing()
    _close_at_exit(weakref.ref(mesh))  # nothing raised


def test_counts_given_as_text_or_numpy_integers_start_the_mesh_they_say(no_mesh):
    # threads_per_worker="1" passed the check, then reached Dask's nanny as text: pages
    # of tracebacks and "MeshNanny failed to start"; np.int64(1) was refused as "must
    # be a whole number >= 0, not np.int64(1)"
    import numpy as np

    with jm.Mesh.local(cpu=np.int64(1), gpu=0, tpu=0, threads_per_worker="1",
                       set_current=False) as m:
        inv = m.inventory()
        assert len(inv) == 1 and inv.devices[0].nthreads == 1
        assert m.options["threads_per_worker"] == 1
