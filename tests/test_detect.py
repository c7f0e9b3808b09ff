"""Device detection logic, with CuPy replaced by a stand-in (there is no GPU here).

The stand-in only answers the CuPy calls detection makes; the real thing runs in the
``gpu``-marked tests on a machine with a GPU.
"""

from __future__ import annotations

import sys
import types

import pytest

from jupyter_mesh.devices import _detect
from jupyter_mesh.devices._worker_plugin import describe_device


def _fake_cupy(available: bool, names=("NVIDIA H100 80GB HBM3",)):
    mod = types.ModuleType("cupy")
    mod.__spec__ = types.SimpleNamespace(name="cupy")  # find_spec sees it
    mod.is_available = lambda: available
    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: len(names),
        getDeviceProperties=lambda i: {
            "name": names[i].encode(), "totalGlobalMem": 80 << 30, "major": 9, "minor": 0,
        },
    )
    mod.cuda = types.SimpleNamespace(runtime=runtime)
    return mod


@pytest.fixture
def fake_cupy(monkeypatch):
    def install(available, names=("NVIDIA H100 80GB HBM3",)):
        monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(available, names))
        monkeypatch.setattr(_detect.importlib.util, "find_spec",
                            lambda name: object() if name == "cupy" else None)
    return install


def test_cupy_without_a_usable_gpu_means_no_gpu(fake_cupy):
    fake_cupy(False)
    assert not _detect.cuda_available()
    assert _detect.cuda_devices() == []


def test_gpus_are_read_from_cupy_when_available(fake_cupy):
    fake_cupy(True, ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"))
    gpus = _detect.cuda_devices()
    assert [(g.kind, g.backend, g.index) for g in gpus] == [("gpu", "cupy", 0), ("gpu", "cupy", 1)]
    assert gpus[1].model == "NVIDIA A100-SXM4-80GB"
    assert gpus[0].memory == 80 << 30
    assert gpus[0].extra["compute_capability"] == "9.0"


def test_a_known_gpu_gets_its_table_profile(fake_cupy):
    fake_cupy(True)
    info, profile = describe_device("gpu", "cupy", None)
    assert info.kind == "gpu"
    assert profile.method == "table" and "H100" in profile.source


def test_asking_for_a_gpu_without_one_fails_clearly(fake_cupy):
    fake_cupy(False)
    with pytest.raises(RuntimeError, match="CuPy sees no CUDA GPU"):
        describe_device("gpu", None, None)
    # CuPy drives a GPU: asked for without one, it fails as clearly
    with pytest.raises(RuntimeError, match="CuPy sees no CUDA GPU"):
        describe_device(None, "cupy", None)


def test_numpy_asked_for_drives_the_cpu_on_a_gpu_host(fake_cupy):
    fake_cupy(True)
    info, _ = describe_device(None, "numpy", None)
    assert (info.kind, info.backend) == ("cpu", "numpy")
    with pytest.raises(RuntimeError, match="backend 'numpy' drives a cpu, not a gpu"):
        describe_device("gpu", "numpy", None)


def test_no_libtpu_means_no_tpu_without_importing_jax(monkeypatch):
    monkeypatch.setattr(_detect.importlib.util, "find_spec", lambda name: None)
    assert not _detect.tpu_possible()
    assert _detect.tpu_devices() == []


def test_cpu_device():
    dev = _detect.cpu_device()
    assert dev.kind == "cpu" and dev.backend == "numpy"
    assert dev.memory > 0 and dev.extra["cores"] >= 1


@pytest.mark.parametrize("visible, index, want", [
    (None, 1, "1"),                      # every GPU visible: the index is the GPU
    ("2,3", 0, "2"), ("2,3", 1, "3"),    # a hub gave this process GPUs 2 and 3
    ("GPU-aa11, GPU-bb22", 1, "GPU-bb22"),
    ("", 0, "0"),
])
def test_a_gpu_worker_gets_the_gpu_this_process_sees(visible, index, want):
    from jupyter_mesh.mesh import visible_gpu

    assert visible_gpu(index, visible) == want


def test_why_no_gpu_names_what_to_install(monkeypatch):
    monkeypatch.setattr(_detect.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(_detect, "nvidia_driver_present", lambda: True)
    why = _detect.cuda_why_none()
    assert why.startswith("CuPy is not installed (this machine has an NVIDIA driver)")
    assert "pip install 'jupyter_mesh[gpu]'" in why


def test_why_no_gpu_when_cupy_finds_none(fake_cupy, monkeypatch):
    fake_cupy(False, names=())
    assert _detect.cuda_why_none() == "CuPy sees 0 CUDA devices"

    def broken():
        raise RuntimeError("cudaErrorInsufficientDriver: driver too old\nmore")

    sys.modules["cupy"].cuda.runtime.getDeviceCount = broken
    assert _detect.cuda_why_none() == (
        "CuPy finds no usable CUDA device (cudaErrorInsufficientDriver: driver too old)")


def test_a_gpu_host_without_cupy_is_told_why_it_gets_no_gpu_worker(monkeypatch):
    import jupyter_mesh as jm
    from jupyter_mesh.errors import MeshError

    monkeypatch.setattr(_detect.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(_detect, "nvidia_driver_present", lambda: True)
    with pytest.raises(MeshError, match=r"gpu=1 \(CuPy is not installed .*jupyter_mesh\[gpu\]"):
        jm.Mesh.local(cpu=1, gpu=1, tpu=0, set_current=False)


def test_gpu_auto_on_a_host_with_a_driver_but_no_cupy_warns(monkeypatch):
    import jupyter_mesh as jm

    real = _detect.importlib.util.find_spec
    monkeypatch.setattr(_detect.importlib.util, "find_spec",
                        lambda name: None if name == "cupy" else real(name))
    monkeypatch.setattr(_detect, "nvidia_driver_present", lambda: True)
    with pytest.warns(UserWarning, match="no GPU workers: CuPy is not installed"):
        mesh = jm.Mesh.local(cpu=1, gpu="auto", tpu=0, set_current=False)
    try:
        assert mesh.inventory().by_kind() == {"cpu": 1}
    finally:
        mesh.close()


def test_gpu_auto_starts_one_gpu_worker_per_cuda_device():
    # (none on a host without CUDA and CuPy; one per GPU CuPy sees where there are some)
    import jupyter_mesh as jm

    mesh = jm.Mesh.local(cpu=1, gpu="auto", tpu=0, set_current=False)
    try:
        gpus = len(_detect.cuda_devices())
        assert mesh.inventory().by_kind() == {"cpu": 1, **({"gpu": gpus} if gpus else {})}
    finally:
        mesh.close()


def test_pinning_to_cores_this_process_may_not_use_leaves_it_running_unpinned():
    import os

    import pytest

    from jupyter_mesh.devices import _detect

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("pinning a process to cores needs Linux")
    before = os.sched_getaffinity(0)
    _detect.pin_process([10_000])  # no such core: nothing changes, nothing raises
    assert os.sched_getaffinity(0) == before
    _detect.pin_process([])
    assert os.sched_getaffinity(0) == before


def test_cpu_set_names_the_cores_this_process_may_use(monkeypatch):
    import os

    if hasattr(os, "sched_getaffinity"):
        assert _detect.cpu_set() == sorted(os.sched_getaffinity(0))
        assert len(_detect.cpu_set()) >= _detect.cpu_cores()

    def refused(pid):
        raise OSError("not allowed")

    monkeypatch.setattr(os, "sched_getaffinity", refused, raising=False)
    assert _detect.cpu_set() is None  # it cannot say: the count alone is used
    monkeypatch.delattr(os, "sched_getaffinity")
    assert _detect.cpu_set() is None  # macOS, Windows


def _fake_jax(monkeypatch, platform, stats):
    # SIMULATED: a JAX whose first device is on `platform`, with these memory stats
    class Dev:
        device_kind = {"cpu": "cpu", "gpu": "NVIDIA H100 80GB HBM3", "tpu": "TPU v5 lite"}[
            platform]

        def __init__(self):
            self.platform = platform

        def memory_stats(self):
            if isinstance(stats, Exception):
                raise stats
            return stats

    mod = types.ModuleType("jax")
    mod.devices = lambda: [Dev()]
    monkeypatch.setitem(sys.modules, "jax", mod)


def test_a_gpu_or_tpu_asked_for_through_jax_that_jax_does_not_see_fails(monkeypatch):
    # a plain `pip install jax` on a GPU host: JAX runs on the CPU
    _fake_jax(monkeypatch, "cpu", None)
    monkeypatch.setattr(_detect, "cpu_model", lambda: "Some CPU")
    with pytest.raises(RuntimeError, match=r"asked for a gpu worker through JAX, but JAX "
                                           r"sees cpu only: install jax\[cuda12\] for it, "
                                           r"or leave out --jax"):
        describe_device("gpu", "jax", None)
    with pytest.raises(RuntimeError, match=r"asked for a tpu worker through JAX, but JAX "
                                           r"sees cpu only: install jax\[tpu\]"):
        describe_device("tpu", "jax", None)


@pytest.mark.parametrize("stats, want", [
    ({"bytes_limit": 16 << 30}, 16 << 30),
    (None, 0), ({}, 0), (RuntimeError("no stats"), 0),
])
def test_an_accelerator_jax_drives_never_gets_the_hosts_memory(monkeypatch, stats, want):
    # where JAX does not say how much memory the chip has, it is unknown (0), never the
    # host's memory (the router would take it for the chip's)
    _fake_jax(monkeypatch, "tpu", stats)
    info = _detect.jax_device(memory=12 << 30)
    assert (info.kind, info.memory) == ("tpu", want)
