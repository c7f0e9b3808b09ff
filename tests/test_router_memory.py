"""Device memory in placement: a task goes to a GPU or TPU only where its inputs and its
output fit in the device's memory (Dask manages host memory, never a device's)."""

from __future__ import annotations

import dask
import dask.array as da
import pytest

from jupyter_mesh import MeshError
from jupyter_mesh.devices._profile import Profile
from jupyter_mesh.errors import MeshConfigError
from jupyter_mesh.inventory import Device
from jupyter_mesh.router import build_pools, plan_collections
from jupyter_mesh.router.placement import device_memory_fraction

CPU = Profile(flops32=2e11, flops64=1e11, mem_bandwidth=2e10, launch_latency=2e-6,
              method="model", source="test")
GPU = Profile(flops32=2e12, flops64=1e12, mem_bandwidth=2e11, host_link_bandwidth=16e9,
              launch_latency=5e-3, method="model", source="test")
TPU = Profile(flops32=4e12, flops64=1e11, mem_bandwidth=8e11, host_link_bandwidth=16e9,
              launch_latency=5e-3, method="model", source="test")
MIB = 1 << 20


def devices(gpu_memory: int, tpu_memory: int | None = None, cpus: int = 2):
    devs = [Device(f"tcp://c{i}:1", "cpu", "numpy", "model cpu", 1 << 34, "lab", CPU,
                   name=f"c{i}") for i in range(cpus)]
    devs.append(Device("tcp://g0:1", "gpu", "cupy", "model gpu", gpu_memory, "lab", GPU,
                       name="g0"))
    if tpu_memory is not None:
        devs.append(Device("tcp://t0:1", "tpu", "jax", "model tpu", tpu_memory, "lab", TPU,
                           name="t0"))
    return devs


def matmul_pipeline():
    # 1000 x 1000 float64 blocks (7.6 MiB): a matmul task reads two (15 MiB) and writes
    # one, 22.9 MiB in all (a transpose reads and writes one, 15.3 MiB)
    x = da.random.random((4000, 4000), chunks=1000)
    return ((x @ x.T) + 1).sum(axis=0)


def targets(plan, op):
    return {plan.pools[plan.pool_of[i]].label for i in range(len(plan.model.keys))
            if plan.model.ops[plan.model.layer[i]].label == op}


def test_pools_know_each_accelerators_memory():
    devs = devices(64 * MIB) + [Device("tcp://g1:1", "gpu", "cupy", "model gpu", 48 * MIB,
                                       "lab", GPU, name="g1")]
    by = {p.label: p for p in build_pools(devs)}
    assert by["gpu:cupy"].device_memory == 48 * MIB  # the least of its workers
    assert by["cpu:numpy"].device_memory == 0  # Dask manages host memory itself


def test_a_matmul_that_fits_goes_to_the_gpu_one_that_does_not_stays_on_the_cpus():
    plan = plan_collections([matmul_pipeline()], devices(1 << 34))
    assert "gpu:cupy" in targets(plan, "matmul")
    assert not any("device memory" in n for n in plan.notes)
    small = plan_collections([matmul_pipeline()], devices(20 * MIB))
    assert targets(small, "matmul") == {"cpu:numpy"}
    note = [n for n in small.notes if n.startswith("matmul:")]
    assert note and "22.9 MiB of device memory" in note[0] and "gpu:cupy" in note[0]
    assert "kept off them" in note[0]
    # the elementwise add (7.6 MiB in, 7.6 out) still fits on the small GPU
    assert not any(n.startswith("add:") for n in small.notes)


def test_a_forced_route_to_a_device_too_small_says_what_to_do():
    with pytest.raises(MeshError) as err:
        plan_collections([matmul_pipeline()], devices(20 * MIB), route="gpu")
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("matmul: each task needs 22.9 MiB of device memory")
    assert "90% of 20.0 MiB each" in text and "rechunk" in text and "route='auto'" in text
    # smaller chunks fit: the same computation with 500 x 500 blocks runs there
    x = da.random.random((4000, 4000), chunks=500)
    plan = plan_collections([((x @ x.T) + 1).sum(axis=0)], devices(20 * MIB), route="gpu")
    assert targets(plan, "matmul") == {"gpu:cupy"}


def test_a_tpu_too_small_is_skipped_but_a_gpu_that_fits_is_used():
    plan = plan_collections([matmul_pipeline()], devices(1 << 34, tpu_memory=20 * MIB))
    assert "tpu:jax" not in targets(plan, "matmul")
    assert "gpu:cupy" in targets(plan, "matmul")
    assert any(n.startswith("matmul:") and "tpu:jax" in n and "gpu:cupy" not in n
               for n in plan.notes)


def test_with_no_cpu_and_no_device_large_enough_the_plan_says_so():
    with pytest.raises(MeshError, match=r"no CPU workers to run it: use smaller chunks"):
        plan_collections([matmul_pipeline()], devices(4 * MIB, cpus=0))


def test_the_per_layer_plan_keeps_to_device_memory_too():
    with dask.config.set({"mesh.router.layer-plan-threshold": 5}):
        small = plan_collections([matmul_pipeline()], devices(20 * MIB))
        assert small.__class__.__name__ == "LayerPlan"
        assert {r["target"] for r in small.rows if r["op"] == "matmul"} == {"cpu:numpy"}
        with pytest.raises(MeshError, match="device memory"):
            plan_collections([matmul_pipeline()], devices(20 * MIB), route="gpu")


def test_the_fraction_of_device_memory_a_task_may_use_is_a_setting():
    assert device_memory_fraction() == 0.9
    # 22.9 MiB fits in 90% of 26 MiB (23.4), not in half of it
    assert "gpu:cupy" in targets(plan_collections([matmul_pipeline()], devices(26 * MIB)),
                                 "matmul")
    with dask.config.set({"mesh.router.device-memory-fraction": 0.5}):
        assert targets(plan_collections([matmul_pipeline()], devices(26 * MIB)),
                       "matmul") == {"cpu:numpy"}


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, "lots", True, None, float("nan")])
def test_a_bad_fraction_is_one_line_naming_the_setting(bad):
    with dask.config.set({"mesh.router.device-memory-fraction": bad}):
        with pytest.raises(MeshConfigError) as err:
            plan_collections([matmul_pipeline()], devices(1 << 34))
    text = str(err.value)
    assert "\n" not in text and "mesh.router.device-memory-fraction" in text
    assert "above 0 and at most 1" in text


def test_meshes_without_accelerators_refuse_a_bad_setting_too():
    # as every other mesh.* setting: a bad value is said where it is read, on any mesh
    cpus = [d for d in devices(1 << 34) if d.kind == "cpu"]
    with dask.config.set({"mesh.router.device-memory-fraction": "lots"}):
        with pytest.raises(MeshConfigError, match="mesh.router.device-memory-fraction"):
            plan_collections([matmul_pipeline()], cpus)
    assert targets(plan_collections([matmul_pipeline()], cpus), "matmul") == {"cpu:numpy"}


def test_the_largest_block_decides_not_the_mean_one():
    # one 3700 x 4000 float64 block (113 MiB) among three small ones: the mean block
    # (29 MiB) would fit in 90% of a 128 MiB GPU, the largest exp task (226 MiB) does not
    x = da.ones((4000, 4000), chunks=((100, 100, 100, 3700), (4000,)))
    for threshold in (20_000, 1):  # the per-task and the per-layer plan
        with dask.config.set({"mesh.router.layer-plan-threshold": threshold}):
            with pytest.raises(MeshError, match=r"^exp: each task needs 225\.8 MiB"):
                plan_collections([da.exp(x)], devices(128 * MIB), route="gpu")
            plan = plan_collections([da.exp(x)], devices(128 * MIB))
            assert "gpu:cupy" not in {r["target"] for r in plan.rows if r["op"] == "exp"}
    # regular blocks of the same mean size fit
    y = da.ones((4000, 4000), chunks=(1000, 4000))
    assert targets(plan_collections([da.exp(y)], devices(128 * MIB), route="gpu"),
                   "exp") == {"gpu:cupy"}


def test_an_op_no_device_runs_is_never_kept_off_for_its_size():
    # random creation runs NumPy in the worker's host memory wherever it goes: on a
    # mesh of GPUs alone it is placed on them whatever the size of its blocks
    x = da.random.random((4000, 4000), chunks=2000)  # 30.5 MiB blocks
    plan = plan_collections([x], devices(20 * MIB, cpus=0))
    assert targets(plan, "random_sample") == {"gpu:cupy"}


def test_tasks_a_gpu_worker_runs_at_once_share_its_memory():
    # a worker of two threads runs two tasks at once: each gets half (of 90%) of 48 MiB
    # (21.6 MiB), which the 22.9 MiB matmul task does not fit in; one thread: it fits
    one = devices(48 * MIB)
    assert "gpu:cupy" in targets(plan_collections([matmul_pipeline()], one), "matmul")
    two = [Device(d.worker, d.kind, d.backend, d.model, d.memory, d.site, d.profile,
                  name=d.name, nthreads=2 if d.kind == "gpu" else 1) for d in one]
    with pytest.raises(MeshError, match=r"\(90% of 48\.0 MiB each, shared by the 2 tasks "
                                        r"a worker runs at once, mesh\.router"):
        plan_collections([matmul_pipeline()], two, route="gpu")
    assert targets(plan_collections([matmul_pipeline()], two), "matmul") == {"cpu:numpy"}
