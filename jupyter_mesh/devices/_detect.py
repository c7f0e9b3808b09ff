"""Find out what devices this machine has, without guessing.

CuPy is consulted only when ``cupy.is_available()`` says a CUDA device is usable; JAX
is imported for TPUs only when libtpu is installed (importing JAX costs seconds).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import psutil


@dataclass
class DeviceInfo:
    """One device as this machine reports it."""

    kind: str
    backend: str
    model: str
    memory: int
    index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_cores() -> int:
    """Cores this process may use: Dask's count, which heeds CPU affinity and cgroup
    quotas (what a worker advertises, so a local mesh shares out the same number), or
    fewer where this process's affinity was narrowed since Dask counted (a local mesh's
    JAX CPU worker is pinned to its share of the cores)."""
    from dask.system import CPU_COUNT

    cores = int(CPU_COUNT) or 1
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        try:
            cores = min(cores, len(affinity(0)) or cores)
        except OSError:
            pass
    return cores


def cpu_set() -> list[int] | None:
    """The cores this process may use (Linux affinity), or None where it cannot say.
    CPU workers on one host that say which compute on the cores of all of them
    together: two pinned to a core each use two (see ``cost.host_cores``)."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is None:
        return None
    try:
        return sorted(affinity(0)) or None
    except OSError:
        return None


def pin_process(cpus: list[int]) -> None:
    """Pin every thread of this process, and the threads it starts later, to ``cpus``
    (Linux; elsewhere nothing changes). XLA sizes its CPU thread pool by this affinity,
    so a JAX CPU worker pinned to its share of the cores computes on that many."""
    setaffinity = getattr(os, "sched_setaffinity", None)
    if setaffinity is None or not cpus:
        return
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = []
    for tid in tids:
        try:
            setaffinity(tid, cpus)
        except OSError:  # a thread that ended meanwhile, or cores no longer allowed
            pass
    try:
        setaffinity(0, cpus)
    except OSError:  # the cores were taken away since they were counted: run unpinned
        pass


def host_memory() -> int:
    return int(psutil.virtual_memory().total)


def cpu_device(memory: int | None = None) -> DeviceInfo:
    return DeviceInfo(
        kind="cpu",
        backend="numpy",
        model=cpu_model(),
        memory=int(memory or psutil.virtual_memory().total),
        extra={"cores": cpu_cores()},
    )


def cuda_available() -> bool:
    """True only when CuPy is installed and a CUDA device is usable."""
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return bool(cupy.is_available())
    except Exception:
        return False


def cuda_why_none() -> str:
    """Why :func:`cuda_devices` finds no GPU, in words a user can act on."""
    if importlib.util.find_spec("cupy") is None:
        hint = " (this machine has an NVIDIA driver)" if nvidia_driver_present() else ""
        return (f"CuPy is not installed{hint}: pip install 'jupyter_mesh[gpu]' "
                f"(or the cupy package for your CUDA version)")
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"CuPy finds no usable CUDA device ({first})"
    return f"CuPy sees {count} CUDA device{'s' if count != 1 else ''}"


def nvidia_driver_present() -> bool:
    """An NVIDIA driver is loaded (its device file or nvidia-smi exists): a GPU that
    CuPy, when installed, could use."""
    import shutil

    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def cuda_devices() -> list[DeviceInfo]:
    """Every CUDA device CuPy can see (respecting ``CUDA_VISIBLE_DEVICES``)."""
    if not cuda_available():
        return []
    import cupy

    out = []
    for i in range(cupy.cuda.runtime.getDeviceCount()):
        props = cupy.cuda.runtime.getDeviceProperties(i)
        name = props["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        out.append(
            DeviceInfo(
                kind="gpu",
                backend="cupy",
                model=name,
                memory=int(props["totalGlobalMem"]),
                index=i,
                extra={"compute_capability": f"{props['major']}.{props['minor']}"},
            )
        )
    return out


#: JAX's CUDA plugins (``jax[cuda12]``, ``jax[cuda13]``): without one JAX drives no GPU
JAX_CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


def jax_gpu_count() -> int:
    """The CUDA GPUs JAX drives on this host, counted once per process in a child
    process (this one never opens them); 0 at once where no JAX CUDA plugin is
    installed (plain ``pip install jax`` runs on the CPU)."""
    if importlib.util.find_spec("jax") is None or not any(
            importlib.util.find_spec(m) is not None for m in JAX_CUDA_PLUGINS):
        return 0
    return _jax_gpus_probed()


@functools.lru_cache(maxsize=1)
def _jax_gpus_probed() -> int:
    code = ("import jax\ntry:\n    print(len(jax.devices('gpu')))\n"
            "except Exception:\n    print(0)\n")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120, env=dict(os.environ, JAX_PLATFORMS="cuda"))
        return int((done.stdout.strip().splitlines() or ["0"])[-1])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0


def tpu_possible() -> bool:
    """A cheap check that a TPU could be present (libtpu installed), before importing JAX."""
    return importlib.util.find_spec("libtpu") is not None and (
        importlib.util.find_spec("jax") is not None
    )


def tpu_devices() -> list[DeviceInfo]:
    if not tpu_possible():
        return []
    try:
        import jax

        devices = jax.devices("tpu")
    except Exception:
        return []
    out = []
    for i, dev in enumerate(devices):
        stats: dict[str, Any] = {}
        try:
            stats = dev.memory_stats() or {}
        except Exception:
            pass
        out.append(
            DeviceInfo(
                kind="tpu",
                backend="jax",
                model=str(getattr(dev, "device_kind", "TPU")),
                memory=int(stats.get("bytes_limit", 0)),
                index=i,
            )
        )
    return out


def jax_device(memory: int | None = None) -> DeviceInfo:
    """The first device JAX uses in this process (CPU when ``JAX_PLATFORMS=cpu``)."""
    import jax

    dev = jax.devices()[0]
    kind = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(dev.platform, "cpu")
    model = cpu_model() if kind == "cpu" else str(getattr(dev, "device_kind", dev.platform))
    mem = memory or psutil.virtual_memory().total
    if kind != "cpu":
        # the accelerator's own memory; 0 (unknown) where JAX does not say, never the
        # host's, which the router would take for the device's
        try:
            mem = int((dev.memory_stats() or {}).get("bytes_limit", 0) or 0)
        except Exception:
            mem = 0
    return DeviceInfo(kind=kind, backend="jax", model=model, memory=int(mem),
                      extra={"jax_platform": dev.platform})
