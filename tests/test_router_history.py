"""The router learns from what its computations measured (mesh.router.learn)."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

from jupyter_mesh import MeshError
from jupyter_mesh.devices._profile import Profile
from jupyter_mesh.errors import MeshConfigError
from jupyter_mesh.inventory import Device
from jupyter_mesh.router import CostModel, build_pools, plan_model
from jupyter_mesh.router import history as hist
from jupyter_mesh.router.classify import synthetic_model
from jupyter_mesh.router.history import RunHistory

CPU = Profile(flops32=2e11, flops64=1e11, mem_bandwidth=2e10, launch_latency=2e-6,
              method="model", source="test")


def dev(name, site="local", backend="numpy"):
    return Device(f"tcp://{name}:1", "cpu", backend, "model cpu", 1 << 34, site, CPU,
                  name=name, nthreads=1)


def matmuls(n=8, flops=2e9):
    return synthetic_model([
        {"name": "mm", "op_class": "matmul", "tasks": n, "flops": flops, "out_bytes": 8.0},
        {"name": "add", "op_class": "elementwise", "tasks": n, "flops": 1e6,
         "out_bytes": 8.0, "deps": [(0, "map")]},
    ])


def records_for(plan, seconds_of):
    """What a report would hold: key -> (worker, backend, seconds) for every task."""
    out = {}
    workers = [(w, p.backend) for p in plan.pools for w in p.workers]
    for i, key in enumerate(plan.model.keys):
        w, backend = workers[plan.worker_of[i]]
        out[key] = (w, backend, seconds_of(i, plan.model.ops[plan.model.layer[i]], w))
    return out


def planned(devices, model=None, history=None, route="auto"):
    pools = build_pools(devices)
    cost = CostModel(pools)
    cost.history = history
    return plan_model(model or matmuls(), pools, route, cost=cost)


def test_a_measured_ratio_scales_later_estimates_of_that_op_on_that_pool():
    devices = [dev("a"), dev("b", backend="jax")]
    plan = planned(devices, matmuls(n=6))
    h = RunHistory()
    cost = plan.cost
    a = next(p for p in plan.pools if "tcp://a:1" in p.workers)
    b = next(p for p in plan.pools if "tcp://b:1" in p.workers)

    def slow_on_a(i, op, w):  # the work on a takes 8 times what the profile says
        pool = a if w == "tcp://a:1" else b
        return cost.work_seconds(op, pool, True) * (8.0 if pool is a else 1.0)

    # both ran matmuls (a two-worker mesh, equally fast by the profiles)
    assert {plan.pool_of[i] for i in range(6)} == {0, 1}
    assert h.learn(plan, records_for(plan, slow_on_a), 1.0) >= 1
    assert h.ratio(a, "matmul", "numpy") == pytest.approx(8.0)
    assert h.ratio(b, "matmul", "jax") == pytest.approx(1.0)
    assert h.ratio(a, "fft", "numpy") == 1.0  # nothing measured: the profile alone
    # a backend not measured on this hardware takes what the others measured there
    # (a loaded host slows them all), so it never looks faster for want of a figure
    assert h.ratio(a, "matmul", "other") == pytest.approx(8.0 ** 0.5)
    mm = plan.model.ops[0]
    learned = CostModel(plan.pools)
    learned.history = h
    base = CostModel(plan.pools)
    assert learned.exec_time(mm, a) - learned.task_overhead == pytest.approx(
        8 * (base.exec_time(mm, a) - base.task_overhead))
    assert learned.exec_time(mm, b) == pytest.approx(base.exec_time(mm, b))
    # the planner now keeps the matmuls off the pool that ran them slowly, and says why
    again = planned(devices, matmuls(n=6), history=h)
    assert all(again.pools[again.pool_of[i]].workers == b.workers for i in range(6))
    line = h.note(again)
    assert line and "matmul with numpy on cpu@local 8x" in line and "forget_history" in line


def test_a_slow_first_call_does_not_teach_it_the_median_does():
    # a JAX compilation or CuPy's first call makes one task slow, not the op
    devices = [dev("a")]
    plan = planned(devices)
    cost = plan.cost
    slow_first = {plan.model.keys[0]}

    def seconds(i, op, w):
        base = cost.work_seconds(op, plan.pools[0], True)
        return base * (100.0 if plan.model.keys[i] in slow_first else 1.0)

    h = RunHistory()
    h.learn(plan, records_for(plan, seconds), 1.0)
    assert h.ratio(plan.pools[0], "matmul", "numpy") == pytest.approx(1.0)


def test_too_few_tasks_tiny_work_and_weight_zero_teach_nothing():
    devices = [dev("a")]
    plan = planned(devices, matmuls(n=hist.MIN_TASKS - 1))
    h = RunHistory()
    assert h.learn(plan, records_for(plan, lambda i, op, w: 1.0), 1.0) == 0
    plan = planned(devices, matmuls(flops=1.0))  # work far below MIN_WORK per task
    h.learn(plan, records_for(plan, lambda i, op, w: 1.0), 1.0)
    assert h.ratio(plan.pools[0], "matmul", "numpy") == 1.0
    assert h.ratio(plan.pools[0], "elementwise", "numpy") == hist.LIMIT  # 1 s: learned
    h.forget()
    plan = planned(devices)
    assert h.learn(plan, records_for(plan, lambda i, op, w: 1.0), 0.0) == 0
    assert len(h) == 0 and h.note(plan) is None


def test_ops_of_no_known_array_type_teach_nothing():
    # a DataFrame's ops (no dtype: block sizes the model guesses, 8 bytes) measured
    # slow scaled later array estimates of their op class by 6x for 10 minutes
    devices = [dev("a")]
    model = matmuls()
    for op in model.ops:
        op.dtype_kind = None
    plan = planned(devices, model)
    h = RunHistory()
    assert h.learn(plan, records_for(plan, lambda i, op, w: 1.0), 1.0) == 0
    assert len(h) == 0
    # an op with no dtype of its own that reads arrays (Dask's tsqr builds its qr and
    # getitem layers so) is array work: it teaches (it was skipped, and a qr's linalg
    # ratio was never learned)
    for op in model.ops:
        op.array_data = True
    plan = planned(devices, model)
    assert h.learn(plan, records_for(plan, lambda i, op, w: 1.0), 1.0) > 0
    assert h.ratio(plan.pools[0], "matmul", "numpy") != 1.0


def test_ratios_blend_in_log_space_are_capped_and_expire(monkeypatch):
    devices = [dev("a")]
    plan = planned(devices)
    cost, pool = plan.cost, plan.pools[0]

    def times(k):
        return lambda i, op, w: cost.work_seconds(op, pool, True) * k

    h = RunHistory()
    h.learn(plan, records_for(plan, times(2.0)), 0.5)
    h.learn(plan, records_for(plan, times(8.0)), 0.5)
    assert h.ratio(pool, "matmul", "numpy") == pytest.approx(4.0)  # sqrt(2 * 8)
    h.learn(plan, records_for(plan, times(1000.0)), 1.0)
    assert h.ratio(pool, "matmul", "numpy") == pytest.approx(hist.LIMIT)
    h.learn(plan, records_for(plan, times(1e-6)), 1.0)
    assert h.ratio(pool, "matmul", "numpy") == pytest.approx(1 / hist.LIMIT)
    now = hist.time.monotonic()
    assert h.ratio(pool, "matmul", "numpy", now=now + hist.MAX_AGE + 1) == 1.0
    monkeypatch.setattr(hist.time, "monotonic", lambda: now + hist.MAX_AGE + 1)
    assert h.learned() == []
    # a measurement after that starts afresh rather than blending with the old one
    h.learn(plan, records_for(plan, times(2.0)), 0.5)
    assert h.ratio(pool, "matmul", "numpy") == pytest.approx(2.0)
    h.forget()
    assert len(h) == 0 and h.ratio(pool, "matmul", "numpy") == 1.0


def test_an_accelerators_own_backend_never_takes_its_hosts_ratio():
    # a GPU worker runs CuPy on the device and NumPy on its host: different hardware
    gpu_profile = Profile(flops32=2e12, flops64=1e12, mem_bandwidth=2e11,
                          host_link_bandwidth=16e9, launch_latency=5e-3, method="model",
                          source="test")
    devices = [Device("tcp://g:1", "gpu", "cupy", "model gpu", 1 << 34, "local",
                      gpu_profile, name="g", nthreads=1)]
    plan = planned(devices, matmuls(n=4), route="gpu")
    pool = plan.pools[0]
    cost = plan.cost
    records = {k: ("tcp://g:1", "numpy", 4 * cost.work_seconds(
        plan.model.ops[plan.model.layer[i]], pool, False))
        for i, k in enumerate(plan.model.keys)}
    h = RunHistory()
    h.learn(plan, records, 1.0)
    assert h.ratio(pool, "matmul", "numpy") == pytest.approx(4.0)
    assert h.ratio(pool, "matmul", "cupy") == 1.0


@pytest.mark.parametrize("value", [0, 0.25, 1, "0.5"])
def test_learn_setting_values(value):
    with dask.config.set({"mesh.router.learn": value}):
        assert hist.learn_weight() == float(value)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "lots", True, None, float("nan")])
def test_a_bad_learn_setting_is_one_line(bad):
    with dask.config.set({"mesh.router.learn": bad}):
        with pytest.raises(MeshConfigError, match=r"mesh.router.learn must be a number "
                                                  r"from 0 .* to 1") as info:
            hist.learn_weight()
    assert "\n" not in str(info.value) and isinstance(info.value, MeshError)


# ---------------------------------------------------------------- on a live mesh
@pytest.fixture(scope="module")
def mesh():
    from .meshes import fresh_local_mesh

    with fresh_local_mesh(cpu=1, jax_cpu=1, site="lab") as m:
        yield m


def pipeline():
    x = da.random.random((600, 600), chunks=150)
    return ((x @ x.T) + 1).sum(axis=0)


def test_a_routed_computation_teaches_the_next_plan(mesh):
    mesh.forget_history()
    y = pipeline()
    expected = y.compute(scheduler="sync")
    with dask.config.set({"mesh.router.learn": 0}):
        np.testing.assert_allclose(mesh.compute(y)[0], expected, rtol=1e-10)
    assert len(mesh.history) == 0  # learning off: nothing kept
    assert not any("earlier computations" in n for n in mesh.explain(y).notes)
    np.testing.assert_allclose(mesh.compute(y)[0], expected, rtol=1e-10)
    learned = mesh.history.learned()
    assert ("cpu", "lab", "matmul", "numpy") in [r[:4] for r in learned]
    assert all(1 / hist.LIMIT <= r[4] <= hist.LIMIT for r in learned)
    plan = mesh.explain(y)
    assert any("earlier computations" in n for n in plan.notes) or all(
        abs(np.log(r[4])) <= 0.05 for r in learned)
    mesh.forget_history()
    assert len(mesh.history) == 0
    assert not any("earlier computations" in n for n in mesh.explain(y).notes)


def test_a_bad_learn_setting_fails_before_anything_runs(mesh):
    y = pipeline()
    before = mesh.last_report
    with dask.config.set({"mesh.router.learn": "lots"}):
        with pytest.raises(MeshConfigError, match="mesh.router.learn"):
            mesh.compute(y)
    assert mesh.last_report is before  # nothing ran
    np.testing.assert_allclose(mesh.compute(y)[0], y.compute(scheduler="sync"),
                               rtol=1e-10)


@pytest.mark.parametrize("route", ["auto", "off"])
def test_a_bad_fallback_timeout_fails_before_anything_runs(mesh, route):
    # it was read while the plan was rewritten, after the last plan and report had
    # been replaced (and, with route="off", after the work was submitted)
    y = pipeline()
    mesh.compute(y)
    plan, report = mesh.last_plan, mesh.last_report
    with dask.config.set({"mesh.fallback-timeout": "abc"}):
        with pytest.raises(MeshConfigError, match="mesh.fallback-timeout"):
            mesh.compute(y, route=route)
        with pytest.raises(MeshConfigError, match="mesh.fallback-timeout"):
            mesh.submit(np.add, 1, 2)  # with no target too
    assert mesh.last_plan is plan and mesh.last_report is report


def test_learning_that_fails_never_costs_the_result(mesh, monkeypatch):
    # what is learned is a hint: an error there is logged, the values come back
    class Broken(RunHistory):
        def learn(self, *args, **kwargs):
            raise RuntimeError("broken history")

    monkeypatch.setattr(mesh, "history", Broken())
    y = pipeline()
    np.testing.assert_allclose(mesh.compute(y)[0], y.compute(scheduler="sync"),
                               rtol=1e-10)
    assert mesh.last_report is not None
