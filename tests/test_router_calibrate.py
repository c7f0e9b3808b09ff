"""Dask's own costs measured on the live mesh, and the router's cost model using them."""

from __future__ import annotations

import dataclasses
import warnings

import dask
import dask.array as da
import pytest
from IPython.core.error import UsageError

from jupyter_mesh import MeshError
from jupyter_mesh.errors import MeshConfigError
from jupyter_mesh.inventory import Device
from jupyter_mesh.router import calibrate
from jupyter_mesh.router.calibrate import Calibration

from .meshes import fresh_local_mesh


@pytest.fixture(scope="module")
def mesh():
    with fresh_local_mesh(cpu=2, threads_per_worker=1) as m:
        yield m


@pytest.fixture
def measured_afresh(mesh):
    """The mesh as if no routed plan had measured it yet."""
    mesh._calibration = None
    yield mesh
    mesh._calibration = None


def small():
    x = da.random.random((200, 200), chunks=100)
    return (x + x.T).sum()


def test_calibrate_measures_dispatch_and_transfer_on_the_live_mesh(measured_afresh):
    cal = measured_afresh.calibrate()
    assert isinstance(cal, Calibration)
    assert 1e-4 <= cal.task_overhead < 1.0
    # a chain on one worker: each step waits for the scheduler's round trip
    assert 0.0 <= cal.dependency_latency < 1.0
    # chains on both workers at once: the mesh's pace of dispatch
    assert 0.0 < cal.task_interval < 1.0
    # two workers at one site: the transfer between them was timed
    assert cal.network_latency is not None and 1e-4 <= cal.network_latency < 1.0
    # and the bytes a result of a typical block's size takes between them
    assert cal.network_bandwidth is not None and 1e6 < cal.network_bandwidth <= 1e11
    assert cal.workers == 2 and cal.tasks > 0 and cal.seconds > 0
    assert measured_afresh.calibration is cal
    text = repr(cal)
    assert "ms of Dask dispatch per task" in text and "per transfer between workers" in text
    assert "B/s between them" in text
    assert "from a task's end to the start of one waiting for it" in text
    assert "<code>" in cal._repr_html_()
    # and the mesh shows it
    assert "ms of Dask dispatch per task" in measured_afresh._repr_html_()


def test_calibrate_measures_what_dask_spends_of_the_local_hosts_cpu(measured_afresh):
    from jupyter_mesh.devices import _detect

    cal = measured_afresh.calibrate()
    # a local mesh: the scheduler and both workers run on this host, and each task the
    # probe dispatched cost them some CPU between them
    assert cal.host_cores == _detect.cpu_cores()
    assert 1e-5 < cal.cpu_per_task < 0.5
    assert f"ms of CPU per task on the {cal.host_cores} core" in repr(cal)
    # a routed plan on it counts that CPU beside its tasks' own work
    plan = measured_afresh.explain(small())
    assert plan.cost.cpu_per_task == cal.cpu_per_task
    assert plan.cost.host_cores == cal.host_cores


def test_cpu_is_measured_only_where_every_process_says_and_shares_one_host():
    before = {"w1": ("a", 1.0, 4), "scheduler": ("a", 2.0, 4)}
    after = {"w1": ("a", 1.5, 4), "scheduler": ("a", 2.5, 4)}
    assert calibrate._cpu_per_task(before, after, 10) == (0.1, 4)
    # workers on two hosts: the CPU per task, but no one host's cores to share
    two = {**after, "w2": ("b", 0.0, 8)}
    assert calibrate._cpu_per_task({**before, "w2": ("b", 0.0, 8)}, two, 10) == (0.1, None)
    # a reading that failed (None) or left out the scheduler: nothing measured
    assert calibrate._cpu_per_task(None, after, 10) == (0.0, None)
    assert calibrate._cpu_per_task({"w1": before["w1"]}, {"w1": after["w1"]}, 10) == (
        0.0, None)
    # a clock that went back for one process never counts as negative work
    assert calibrate._cpu_per_task(before, {**after, "w1": ("a", 0.5, 4)}, 10)[0] == (
        pytest.approx(0.05))


def test_one_host_is_one_machines_address_for_the_scheduler_and_every_worker():
    from types import SimpleNamespace

    def client(address):
        return SimpleNamespace(scheduler=SimpleNamespace(address=address))

    local = [_dev("127.0.0.1", "lab"), _dev("127.0.0.1", "lab")]
    for d in local:
        d.host = "127.0.0.1"
    assert calibrate._one_host(client("tcp://127.0.0.1:8786"), local)
    far = _dev("10.0.0.2", "lab")
    far.host = "10.0.0.2"
    assert not calibrate._one_host(client("tcp://127.0.0.1:8786"), [*local, far])
    assert not calibrate._one_host(client("tcp://10.0.0.1:8786"), [far])
    assert calibrate._one_host(client("tcp://10.0.0.2:8786"), [far])
    assert not calibrate._one_host(SimpleNamespace(scheduler=None), local)


def test_a_cpu_reading_that_fails_keeps_the_other_figures(mesh, monkeypatch):
    monkeypatch.setattr(calibrate, "_mesh_cpu", lambda client, workers, timeout: None)
    cal = calibrate.measure(mesh.client, list(mesh.inventory()), repeats=1,
                            bandwidth=False)
    assert cal.task_overhead >= 1e-4 and cal.network_latency is not None
    assert cal.cpu_per_task == 0.0 and cal.host_cores is None
    assert "ms of CPU per task" not in repr(cal)


def test_the_first_routed_plan_measures_and_later_plans_reuse_it(measured_afresh):
    plan = measured_afresh.explain(small())
    cal = measured_afresh.calibration
    assert cal is not None
    assert plan.cost.task_overhead == cal.task_overhead
    assert plan.cost.links.network_latency == cal.network_latency
    assert plan.cost.links.network_bandwidth == cal.network_bandwidth
    assert plan.cost.dependency_latency == cal.dependency_latency
    assert plan.cost.task_interval == cal.task_interval
    assert any("measured on this mesh" in n and "per task" in n and "transfer" in n
               and "waiting for it" in n and "B/s between workers" in n
               for n in plan.notes)
    assert "measured on this mesh" in repr(plan)
    again = measured_afresh.explain(small())
    assert measured_afresh.calibration is cal and again.cost.task_overhead == cal.task_overhead
    # and a computation gives the same answer with them
    y = small()
    (got,) = measured_afresh.compute(y)
    assert got == pytest.approx(y.compute(scheduler="sync"))


def test_the_mesh_is_measured_again_when_its_workers_change(measured_afresh):
    devices = list(measured_afresh.inventory())
    first = measured_afresh._calibration_for(devices)
    assert measured_afresh._calibration_for(devices) is first
    grown = devices[:1] + [dataclasses.replace(devices[1], nthreads=4)]
    assert measured_afresh._calibration_for(grown) is not first


def test_numbers_in_config_are_used_as_they_are_and_nothing_is_measured(measured_afresh):
    with dask.config.set({"mesh.task-overhead": 0.004, "mesh.links.network-latency": 0.002,
                          "mesh.dependency-latency": 0.003,
                          "mesh.links.network-bandwidth": 5e8}):
        plan = measured_afresh.explain(small())
    assert measured_afresh.calibration is None
    assert plan.cost.task_overhead == 0.004 and plan.cost.links.network_latency == 0.002
    assert plan.cost.links.network_bandwidth == 5e8
    assert plan.cost.dependency_latency == 0.003
    assert plan.cost.task_interval == 0.0  # no measured pace: no floor
    assert not any("measured" in n for n in plan.notes)


def test_one_figure_set_and_the_other_measured(measured_afresh):
    with dask.config.set({"mesh.task-overhead": 0.004}):
        plan = measured_afresh.explain(small())
    cal = measured_afresh.calibration
    assert plan.cost.task_overhead == 0.004
    assert plan.cost.links.network_latency == cal.network_latency
    assert plan.cost.dependency_latency == cal.dependency_latency
    note = next(n for n in plan.notes if "measured on this mesh" in n)
    assert "transfer" in note and "waiting for it" in note and "per task" not in note


def test_route_off_measures_nothing(measured_afresh):
    measured_afresh.explain(small(), route="off")
    assert measured_afresh.calibration is None


@pytest.mark.parametrize("key, value", [("mesh.task-overhead", "fast"),
                                        ("mesh.task-overhead", -1),
                                        ("mesh.links.network-latency", "soon"),
                                        ("mesh.dependency-latency", "later"),
                                        ("mesh.dependency-latency", -0.5),
                                        ("mesh.links.network-latency", 0),
                                        ("mesh.links.network-bandwidth", "fast"),
                                        ("mesh.links.network-bandwidth", 0)])
def test_bad_config_is_one_line_naming_the_key(measured_afresh, key, value):
    with dask.config.set({key: value}), pytest.raises(MeshConfigError) as err:
        measured_afresh.explain(small())
    msg = str(err.value)
    assert "\n" not in msg and key in msg and repr(value) in msg
    assert measured_afresh.explain(small()).ntasks > 0  # and the mesh works on


def test_a_probe_that_does_not_finish_in_time_is_a_clear_error(mesh):
    with pytest.raises(MeshError, match="did not run the calibration probe within") as err:
        calibrate.measure(mesh.client, list(mesh.inventory()), timeout=1e-6)
    assert "\n" not in str(err.value) and "mesh.task-overhead" in str(err.value)


def test_planning_goes_on_with_the_default_costs_when_measuring_fails(measured_afresh,
                                                                      monkeypatch):
    def fail(client, devices, **kw):
        raise MeshError("the mesh did not run the calibration probe within 10 s")

    monkeypatch.setattr(calibrate, "measure", fail)
    with pytest.warns(RuntimeWarning, match="planning with the default costs"):
        plan = measured_afresh.explain(small())
    assert plan.cost.task_overhead == calibrate.DEFAULT_TASK_OVERHEAD
    assert plan.cost.links.network_latency == calibrate.DEFAULT_NETWORK_LATENCY
    assert any("could not be measured" in n for n in plan.notes)
    # the probe is not tried again before every plan on the same workers (on a busy
    # mesh each try would wait for its timeout): no second warning, the same note
    y = small()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (got,) = measured_afresh.compute(y)
    assert got == pytest.approx(y.compute(scheduler="sync"))
    assert any("could not be measured" in n for n in measured_afresh.last_plan.notes)
    # calibrate() tries again, on demand
    monkeypatch.undo()
    assert measured_afresh.calibrate().task_overhead >= 1e-4
    assert not any("could not" in n for n in measured_afresh.explain(y).notes)


def test_calibrating_a_closed_mesh_says_what_to_do(mesh):
    mesh.closed = True
    try:
        with pytest.raises(MeshError, match="closed: start a new one"):
            mesh.calibrate()
    finally:
        mesh.closed = False


def _dev(name, site, target="cpu:numpy"):
    kind, backend = target.split(":")
    return Device(f"tcp://{name}:1", kind, backend, "model", 1 << 30, site, None, name=name)


def test_the_transfer_is_timed_between_two_workers_of_one_site():
    assert calibrate._pair([_dev("a", "lab"), _dev("b", "cloud")]) is None
    assert calibrate._pair([_dev("a", "lab")]) is None
    # two of one kind where there are, else any two of one site
    assert calibrate._pair([_dev("a", "lab", "cpu:jax"), _dev("b", "lab"),
                            _dev("c", "lab")]) == ["tcp://b:1", "tcp://c:1"]
    assert calibrate._pair([_dev("a", "lab", "cpu:jax"), _dev("b", "lab")]) == [
        "tcp://a:1", "tcp://b:1"]


def test_a_bandwidth_probe_that_fails_keeps_what_was_measured(mesh, monkeypatch):
    plain_chain = calibrate._chain

    def chain(client, workers, length, timeout, nbytes=0):
        if nbytes:
            raise MeshError("did not run the calibration probe within 5 s")
        return plain_chain(client, workers, length, timeout)

    monkeypatch.setattr(calibrate, "_chain", chain)
    cal = calibrate.measure(mesh.client, list(mesh.inventory()), repeats=1)
    assert cal.network_latency is not None and cal.task_overhead >= 1e-4
    assert cal.network_bandwidth is None and "B/s" not in repr(cal)


def test_a_configured_bandwidth_is_not_probed(measured_afresh):
    with dask.config.set({"mesh.links.network-bandwidth": 4e8}):
        cal = measured_afresh.calibrate()
        plan = measured_afresh.explain(small())
    assert cal.network_bandwidth is None and cal.network_latency is not None
    assert plan.cost.links.network_bandwidth == 4e8
    assert not any("B/s" in n for n in plan.notes)


def test_a_mesh_without_two_workers_at_one_site_measures_dispatch_only(mesh):
    one = list(mesh.inventory())[:1]
    cal = calibrate.measure(mesh.client, one, repeats=1)
    assert cal.network_latency is None and cal.task_overhead >= 1e-4
    assert cal.network_bandwidth is None
    assert "no two workers at one site" in repr(cal) and "B/s" not in repr(cal)
    assert "measured on 1 worker with" in repr(cal)


def test_calibrate_magic(ip, measured_afresh):
    cal = ip.run_line_magic("mesh", "calibrate")
    assert isinstance(cal, Calibration) and measured_afresh.calibration is cal
    with pytest.raises(UsageError, match="unrecognized arguments"):
        ip.run_line_magic("mesh", "calibrate --fast")
    assert measured_afresh.calibration is cal  # nothing was lost


def test_the_dispatch_probe_runs_on_a_few_workers_one_of_each_kind_first():
    # on a large mesh, thousands of no-op tasks would time the scheduler's throughput
    # over every worker (and take long), not what a task costs a worker
    devices = ([_dev(f"c{i}", "lab") for i in range(6)]
               + [_dev(f"j{i}", "lab", "cpu:jax") for i in range(3)]
               + [_dev(f"e{i}", "edge") for i in range(2)])
    picked = calibrate._probe_workers(devices)
    assert len(picked) == calibrate.PROBE_WORKERS
    kinds = {(d.site, d.target) for d in picked}
    assert kinds == {("lab", "cpu:numpy"), ("lab", "cpu:jax"), ("edge", "cpu:numpy")}
    assert len({d.worker for d in picked}) == len(picked)
    assert calibrate._probe_workers(devices[:2]) == devices[:2]


def _broken(*_):
    raise ValueError("no probe here")


def test_a_probe_that_fails_on_the_workers_is_a_clear_error_not_a_figure(mesh, monkeypatch):
    # e.g. workers without jupyter_mesh installed: no figure may come from failed tasks
    monkeypatch.setattr(calibrate, "_noop", _broken)
    with pytest.raises(MeshError, match="probe failed on a worker .ValueError: no probe "
                                        "here.: set mesh.task-overhead") as err:
        calibrate.measure(mesh.client, list(mesh.inventory()))
    assert "\n" not in str(err.value)


def test_large_figures_are_written_as_numbers_not_in_scientific_notation():
    # a busy host's or a remote mesh's figures of 100 ms or more read "1.2e+02 ms"
    from jupyter_mesh.inventory import format_ms
    from jupyter_mesh.router.calibrate import Calibration, format_rate

    assert [format_ms(s) for s in (0.0012, 0.016, 0.0995, 0.123, 2.5)] == [
        "1.2 ms", "16 ms", "100 ms", "123 ms", "2500 ms"]
    assert format_rate(150e9) == "150 GB/s" and format_rate(2.5e9) == "2.5 GB/s"
    # where rounding reaches the next unit ("1e+03 MB/s"), and slow links
    assert [format_rate(r) for r in (999.6e6, 999.4e6, 350e6, 0.5e6, 1.2e3)] == [
        "1 GB/s", "999 MB/s", "350 MB/s", "0.5 MB/s", "1.2 kB/s"]
    text = repr(Calibration(task_overhead=0.123, network_latency=0.25, tasks=100, workers=2,
                            seconds=3.0, dependency_latency=0.31, task_interval=0.0021,
                            network_bandwidth=5e8, cpu_per_task=0.105, host_cores=2))
    assert "e+" not in text
    assert text.startswith("Calibration: 123 ms of Dask dispatch per task (one task every "
                           "2.1 ms on the whole mesh), 310 ms from a task's end"), text
