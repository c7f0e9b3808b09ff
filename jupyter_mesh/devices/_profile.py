"""Device profiles: what a device can do, and where each number came from.

A profile is measured at worker start (bounded by ``mesh.profile.measure-seconds`` and
cached per host and device) or looked up in :data:`KNOWN_ACCELERATORS`, whose entries
name their source. The profile records which of the two it is.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import _config


@dataclass
class Profile:
    """Peak throughput of one device.

    Attributes
    ----------
    flops32, flops64:
        Peak floating-point operations per second for float32 and float64 matmul.
    mem_bandwidth:
        Bytes per second the device streams through its own memory.
    host_link_bandwidth:
        Bytes per second between host memory and the device (0 for a CPU: same memory).
    launch_latency:
        Seconds of fixed cost to launch one operation on the device.
    method:
        ``"measured"``, ``"table"`` or ``"model"`` (a modelled device in a simulation).
    source:
        Where the numbers came from, in words.
    """

    flops32: float
    flops64: float
    mem_bandwidth: float
    host_link_bandwidth: float = 0.0
    launch_latency: float = 5e-6
    method: str = "measured"
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    def flops(self, dtype_size: int) -> float:
        """Peak FLOP/s for elements of ``dtype_size`` bytes (8 → float64, else float32)."""
        return self.flops64 if dtype_size >= 8 else self.flops32

    def summary(self) -> str:
        return (
            f"{self.flops32 / 1e9:,.0f} GFLOP/s fp32, {self.flops64 / 1e9:,.0f} GFLOP/s fp64, "
            f"{self.mem_bandwidth / 1e9:,.1f} GB/s ({self.method})"
        )


# Dense matmul peaks without sparsity, from the vendors' public datasheets.
KNOWN_ACCELERATORS: dict[str, dict[str, Any]] = {
    "H200": dict(flops32=67e12, flops64=67e12, mem_bandwidth=4.8e12, host_link_bandwidth=64e9,
                 launch_latency=5e-6, source="NVIDIA H200 Tensor Core GPU datasheet (SXM)"),
    "H100": dict(flops32=67e12, flops64=67e12, mem_bandwidth=3.35e12, host_link_bandwidth=64e9,
                 launch_latency=5e-6, source="NVIDIA H100 Tensor Core GPU datasheet (SXM)"),
    "A100": dict(flops32=19.5e12, flops64=19.5e12, mem_bandwidth=2.0e12, host_link_bandwidth=32e9,
                 launch_latency=5e-6, source="NVIDIA A100 Tensor Core GPU datasheet (80GB SXM)"),
    "L4": dict(flops32=30.3e12, flops64=0.47e12, mem_bandwidth=0.3e12, host_link_bandwidth=32e9,
               launch_latency=5e-6, source="NVIDIA L4 Tensor Core GPU datasheet"),
    "T4": dict(flops32=8.1e12, flops64=0.25e12, mem_bandwidth=0.32e12, host_link_bandwidth=16e9,
               launch_latency=5e-6, source="NVIDIA T4 Tensor Core GPU datasheet"),
    "V100": dict(flops32=15.7e12, flops64=7.8e12, mem_bandwidth=0.9e12, host_link_bandwidth=16e9,
                 launch_latency=5e-6, source="NVIDIA V100 Tensor Core GPU datasheet (SXM2)"),
    "TPU v5e": dict(flops32=197e12, flops64=0.0, mem_bandwidth=0.819e12, host_link_bandwidth=16e9,
                    launch_latency=2e-5, source="Google Cloud TPU v5e documentation (bf16 peak)"),
    "TPU v5p": dict(flops32=459e12, flops64=0.0, mem_bandwidth=2.765e12, host_link_bandwidth=32e9,
                    launch_latency=2e-5, source="Google Cloud TPU v5p documentation (bf16 peak)"),
    "TPU v4": dict(flops32=275e12, flops64=0.0, mem_bandwidth=1.2e12, host_link_bandwidth=16e9,
                   launch_latency=2e-5, source="Google Cloud TPU v4 documentation (bf16 peak)"),
    "TPU v6e": dict(flops32=918e12, flops64=0.0, mem_bandwidth=1.64e12, host_link_bandwidth=32e9,
                    launch_latency=2e-5, source="Google Cloud TPU v6e documentation (bf16 peak)"),
}

#: cards sold under a table name with other figures (PCIe and NVL boards run at lower
#: clocks and power, some with other memory): (pattern in the upper-case model name, with
#: "-" and "_" as spaces; the table name; its figures that differ; the source)
KNOWN_VARIANTS: list[tuple[str, str, dict[str, float], str]] = [
    (r"\bH100\b.*\bPCIE\b", "H100", dict(flops32=51e12, flops64=51e12, mem_bandwidth=2.0e12),
     "NVIDIA H100 Tensor Core GPU datasheet (PCIe)"),
    (r"\bH100\b.*\bNVL\b", "H100", dict(flops32=60e12, flops64=60e12, mem_bandwidth=3.9e12),
     "NVIDIA H100 Tensor Core GPU datasheet (NVL, per GPU)"),
    (r"\bH200\b.*\bNVL\b", "H200", dict(flops32=60e12, flops64=60e12),
     "NVIDIA H200 Tensor Core GPU datasheet (NVL)"),
    (r"\bA100\b.*\bPCIE\b.*\b40GB\b|\bA100\b.*\b40GB\b.*\bPCIE\b", "A100",
     dict(mem_bandwidth=1.555e12), "NVIDIA A100 Tensor Core GPU datasheet (40GB PCIe)"),
    (r"\bA100\b.*\bPCIE\b", "A100", dict(mem_bandwidth=1.935e12),
     "NVIDIA A100 Tensor Core GPU datasheet (80GB PCIe)"),
    (r"\bV100\b.*\bPCIE\b", "V100", dict(flops32=14e12, flops64=7e12),
     "NVIDIA V100 Tensor Core GPU datasheet (PCIe)"),
]

#: what JAX calls some TPUs (``device.device_kind``), where it is not the product name;
#: None: a chip of its own that the table does not know (v4i), measured instead
JAX_DEVICE_KINDS: dict[str, str | None] = {
    "TPU v5 lite": "TPU v5e",
    "TPU v5": "TPU v5p",
    "TPU v6 lite": "TPU v6e",
    "TPU v4 lite": None,
}


def lookup_known(model: str) -> Profile | None:
    """The table profile of an accelerator whose model name contains a known name."""
    kinds = {k.upper(): v for k, v in JAX_DEVICE_KINDS.items()}
    if model.strip().upper() in kinds:
        alias = kinds[model.strip().upper()]
        if alias is None:
            return None
        model = alias
    upper = model.upper()
    spaced = re.sub(r"[-_]", " ", upper)
    for pattern, name, figures, source in KNOWN_VARIANTS:
        if re.search(pattern, spaced):
            entry = dict(KNOWN_ACCELERATORS[name])
            entry.pop("source")
            entry.update(figures)
            return Profile(**entry, method="table", source=source)
    # a name as a whole word of the model's ("L4" is not "NVIDIA L40S"), longest first
    for name in sorted(KNOWN_ACCELERATORS, key=len, reverse=True):
        if re.search(rf"(?<![A-Z0-9]){re.escape(name.upper())}(?![A-Z0-9])", upper):
            entry = dict(KNOWN_ACCELERATORS[name])
            source = entry.pop("source")
            return Profile(**entry, method="table", source=source)
    return None


DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "jupyter-mesh")


def _cache_dir() -> str:
    """``mesh.profile.cache-dir``, made if missing, or a config error that says what to do."""
    from ..errors import MeshConfigError

    value = _config.get("profile.cache-dir")
    if value is not None and (not isinstance(value, (str, os.PathLike))
                              or isinstance(value, bytes)):
        raise MeshConfigError(
            f"config mesh.profile.cache-dir must be a folder path, or null for "
            f"{DEFAULT_CACHE_DIR}, not {value!r}"
        )
    folder = os.path.expanduser(os.fspath(value) if value else DEFAULT_CACHE_DIR)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise MeshConfigError(
            f"config mesh.profile.cache-dir must be a folder, but {folder} is a file: "
            f"name a folder, or null for {DEFAULT_CACHE_DIR}"
        )
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise MeshConfigError(
            f"config mesh.profile.cache-dir: cannot make {folder} "
            f"({exc.strerror or type(exc).__name__}): name a folder you can write, or null "
            f"for {DEFAULT_CACHE_DIR}"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MeshConfigError(
            f"config mesh.profile.cache-dir: cannot write in {folder}: name a folder you "
            f"can write, or null for {DEFAULT_CACHE_DIR}"
        )
    return folder


def check_config() -> None:
    """Check ``mesh.profile.*`` where a mesh starts, before its workers read them (a
    worker that fails on them fails to start, with Dask's traceback)."""
    _cache_dir()
    _config.get_seconds("profile.measure-seconds")


def _cache_path() -> str:
    return os.path.join(_cache_dir(), "profiles.json")


#: what a measured profile times changed (2: matmuls of MATMUL_SIDE, not 384): profiles
#: cached before are measured again
PROFILE_VERSION = 2
#: the side of the square matmul a CPU profile times: a block as large as a Dask array's
#: chunks usually are. Per flop, a matmul of 384 and one of 1000 differ: on one core here
#: NumPy (OpenBLAS) did 32 and 41 GFLOP/s in float64, JAX (XLA) 29 and 22: timed at 384,
#: JAX looked nearly as fast as NumPy where it is half as fast on real blocks
MATMUL_SIDE = 1024


def cache_key(kind: str, backend: str, model: str, cores: int | None = None) -> str:
    """The profile cache's key of a device; ``cores`` for a device whose speed depends
    on how many cores its process may use (JAX on the CPU)."""
    key = f"v{PROFILE_VERSION}|{socket.gethostname()}|{kind}|{backend}|{model}"
    return key if cores is None else f"{key}|{cores} cores"


#: how long a worker waits for another process's measurement (the cache's lock) before
#: it measures without the cache: a process stuck holding it must not stop every worker
LOCK_WAIT = 30.0


@contextlib.contextmanager
def _locked(path: str, wait: float | None = None) -> Iterator[bool]:
    """An exclusive lock beside ``path``, so workers starting together measure once;
    yields whether it is held (False: the lock file cannot be opened, or another process
    held it past ``wait`` seconds, by default LOCK_WAIT or twenty measurements'
    time; said in a warning)."""
    try:
        lock = open(path + ".lock", "a+")
    except OSError as exc:
        _warn(f"cannot open the profile cache's lock {path}.lock ({exc}): measuring without "
              f"the cache")
        lock = None
    held = False
    try:
        if lock is not None:
            held = _lock(lock, path, wait)
        yield held
    finally:
        if lock is not None:
            lock.close()


def _lock(lock: Any, path: str, wait: float | None) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return True
    if wait is None:
        wait = max(LOCK_WAIT, 20 * _config.get_seconds("profile.measure-seconds"))
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                _warn(f"another process has held the profile cache's lock {path}.lock for "
                      f"{wait:g} s: measuring without the cache")
                return False
            time.sleep(0.1)
        except OSError as exc:  # (a file system without locks)
            _warn(f"cannot lock the profile cache {path} ({exc}): measuring without it")
            return False


def _warn(message: str) -> None:
    import warnings

    warnings.warn(f"jupyter_mesh: {message}", RuntimeWarning, stacklevel=3)


def _read_cache(path: str) -> dict[str, Any]:
    """The cache's entries ({} where the file is missing, not JSON, or not an object)."""
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def profile_problem(entry: Any) -> str | None:
    """What makes an entry of the cache (or a plugin's measurement) no profile, in
    words (``mem_bandwidth=-1.0``), or None where it is one: peak float32 FLOP/s and
    memory bandwidth above 0, the other figures finite and not negative (float64 may
    be 0: a TPU has no float64 units)."""
    if isinstance(entry, Profile):
        entry = entry.to_dict()
    if not isinstance(entry, dict):
        return f"a {type(entry).__name__}, not a profile"
    try:
        profile = Profile.from_dict(entry)
    except TypeError as exc:
        return f"not a profile ({exc})"
    for name in ("flops32", "flops64", "mem_bandwidth", "host_link_bandwidth",
                 "launch_latency"):
        value = getattr(profile, name)
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or value < 0
                or (value == 0 and name in ("flops32", "mem_bandwidth"))):
            return f"{name}={value!r}"
    if not isinstance(profile.method, str) or not isinstance(profile.source, str) \
            or not isinstance(profile.extra, dict):
        return "method, source or extra of the wrong type"
    return None


def valid_profile(entry: Any) -> Profile | None:
    """The profile an entry of the cache holds, or None where it is not one (see
    :func:`profile_problem`)."""
    if profile_problem(entry) is not None:
        return None
    return entry if isinstance(entry, Profile) else Profile.from_dict(entry)


def cached_or_measure(key: str, measure: Callable[[float], Profile]) -> Profile:
    """Return the cached profile for ``key`` or run ``measure`` and cache its result.
    A cached profile is read without the lock; an entry that is no profile (a file
    edited by hand, another version's) is measured again, and a cache that cannot be
    written is said in a warning: it only saves the next worker a measurement."""
    path = _cache_path()
    found = valid_profile(_read_cache(path).get(key))
    if found is not None:
        return found
    with _locked(path) as held:
        cache = _read_cache(path)
        entry = cache.get(key)
        found = valid_profile(entry)
        if found is not None:  # measured meanwhile by the process that held the lock
            return found
        if entry is not None:
            _warn(f"the cached profile {key!r} in {path} is not a profile "
                  f"({profile_problem(entry)}): measuring it again")
        budget = _config.get_seconds("profile.measure-seconds")
        profile = measure(budget)
        if not held:
            return profile
        cache[key] = profile.to_dict()
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(cache, f, indent=1)
            os.replace(tmp, path)
        except OSError as exc:
            _warn(f"cannot write the profile cache {path} ({exc}): the profile measured "
                  f"now is not kept for the next worker")
            with contextlib.suppress(OSError):
                os.remove(tmp)
        return profile


def _best_rate(run: Callable[[], object], work: float, deadline: float) -> float:
    """Best observed ``work`` per second of ``run`` until ``deadline`` (at least 2 runs)."""
    best = 0.0
    runs = 0
    while runs < 2 or time.perf_counter() < deadline:
        start = time.perf_counter()
        run()
        elapsed = max(time.perf_counter() - start, 1e-9)
        best = max(best, work / elapsed)
        runs += 1
        if runs >= 20:
            break
    return best


def measure_numpy(budget: float) -> Profile:
    """Measure a CPU through NumPy within about ``budget`` seconds."""
    import numpy as np

    t0 = time.perf_counter()
    n = MATMUL_SIDE
    rates: dict[str, float] = {}
    for name, dtype in (("flops32", np.float32), ("flops64", np.float64)):
        a = np.ones((n, n), dtype=dtype)

        def square(a: Any = a) -> object:
            return a @ a

        rates[name] = _best_rate(square, 2.0 * n**3, time.perf_counter() + budget * 0.3)
    buf = np.ones(4_000_000, dtype=np.float64)  # 32 MB
    out = np.empty_like(buf)
    bandwidth = _best_rate(
        lambda: np.copyto(out, buf), 2.0 * buf.nbytes, time.perf_counter() + budget * 0.3
    )
    took = time.perf_counter() - t0
    return Profile(
        flops32=rates["flops32"], flops64=rates["flops64"], mem_bandwidth=bandwidth,
        host_link_bandwidth=0.0, launch_latency=2e-6, method="measured",
        source=f"measured with NumPy on {socket.gethostname()} in {took:.2f} s",
    )


def measure_namespace(xp: Any, sync: Callable[[], object], budget: float,
                      name: str) -> Profile:
    """Measure a device through an array namespace ``xp`` (a backend from the
    ``jupyter_mesh.backends`` entry-point group) within about ``budget`` seconds: a
    square matmul per float width, and a copy of 32 MB; ``sync`` waits for the device."""
    t0 = time.perf_counter()
    n = 512
    rates: dict[str, float] = {}
    for key, dtype in (("flops32", xp.float32), ("flops64", xp.float64)):
        a = xp.ones((n, n), dtype=dtype)
        a @ a
        sync()

        def square(a: Any = a) -> object:
            return (a @ a, sync())

        rates[key] = _best_rate(square, 2.0 * n**3, time.perf_counter() + budget * 0.3)
    buf = xp.ones(4_000_000, dtype=xp.float64)  # 32 MB
    bandwidth = _best_rate(lambda: (buf * 1.0, sync()), 2.0 * 32e6,
                           time.perf_counter() + budget * 0.3)
    took = time.perf_counter() - t0
    return Profile(
        flops32=rates["flops32"], flops64=rates["flops64"], mem_bandwidth=bandwidth,
        host_link_bandwidth=0.0, launch_latency=1e-5, method="measured",
        source=f"measured with backend {name!r} on {socket.gethostname()} in {took:.2f} s",
    )


def measure_jax(budget: float) -> Profile:
    """Measure the first JAX device within about ``budget`` seconds.

    On the CPU it times a matmul as a routed task runs one: op by op (a task calls
    ``jax.numpy``, not a compiled whole) on host arrays it converts first, as its
    inputs come from NumPy workers. Here that took 150 ms for a float64 matmul of 1000
    where a compiled square of a JAX array took 90: the compiled figure made JAX on the
    CPU look nearly as fast as NumPy (60 ms). An accelerator is timed on arrays already
    on it: the cost model charges its host link apart."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    t0 = time.perf_counter()
    device = jax.devices()[0]
    on_host = device.platform == "cpu"
    n = MATMUL_SIDE
    rates: dict[str, float] = {}
    for name, dtype in (("flops32", np.float32), ("flops64", np.float64)):
        try:
            host = np.ones((n, n), dtype=dtype)
            a = jnp.asarray(host)
            if a.dtype != dtype:
                raise TypeError("float64 disabled")
            jnp.matmul(a, a).block_until_ready()
        except Exception:  # float64 disabled: JAX keeps float32
            rates[name] = rates.get("flops32", 0.0)
            continue

        def square_jax(a: Any = a, host: Any = host) -> object:
            if on_host:
                return jnp.matmul(jnp.asarray(host), jnp.asarray(host)).block_until_ready()
            return jnp.matmul(a, a).block_until_ready()

        rates[name] = _best_rate(square_jax, 2.0 * n**3, time.perf_counter() + budget * 0.3)
    buf = jnp.ones(4_000_000, dtype=jnp.float32)
    (buf + 0).block_until_ready()
    bandwidth = _best_rate(
        lambda: (buf + 0).block_until_ready(), 2.0 * buf.nbytes * 1.0,
        time.perf_counter() + budget * 0.3,
    )
    took = time.perf_counter() - t0
    how = "op by op from host arrays" if on_host else "op by op"
    return Profile(
        flops32=rates["flops32"], flops64=rates["flops64"], mem_bandwidth=bandwidth,
        host_link_bandwidth=0.0 if on_host else 16e9,
        launch_latency=2e-5, method="measured",
        source=f"measured with JAX ({device.platform}, {how}) on {socket.gethostname()} "
               f"in {took:.2f} s",
    )


def measure_cupy(budget: float) -> Profile:
    """Measure the current CUDA device through CuPy within about ``budget`` seconds."""
    import cupy

    t0 = time.perf_counter()
    n = 2048
    rates: dict[str, float] = {}
    sync = cupy.cuda.Device().synchronize
    for name, dtype in (("flops32", cupy.float32), ("flops64", cupy.float64)):
        a = cupy.ones((n, n), dtype=dtype)
        (a @ a)
        sync()

        def square_cupy(a: Any = a) -> object:
            return ((a @ a), sync())

        rates[name] = _best_rate(square_cupy, 2.0 * n**3, time.perf_counter() + budget * 0.25)
    buf = cupy.ones(32_000_000, dtype=cupy.float32)
    out = cupy.empty_like(buf)
    bandwidth = _best_rate(
        lambda: (cupy.copyto(out, buf), sync()), 2.0 * buf.nbytes,
        time.perf_counter() + budget * 0.2,
    )
    host = cupy.cuda.alloc_pinned_memory(64_000_000)
    import numpy as np

    host_arr = np.frombuffer(host, dtype=np.uint8, count=64_000_000)
    dev = cupy.empty(64_000_000, dtype=cupy.uint8)
    link = _best_rate(
        lambda: (dev.set(host_arr), sync()), float(host_arr.nbytes),
        time.perf_counter() + budget * 0.15,
    )
    took = time.perf_counter() - t0
    return Profile(
        flops32=rates["flops32"], flops64=rates["flops64"], mem_bandwidth=bandwidth,
        host_link_bandwidth=link, launch_latency=1e-5, method="measured",
        source=f"measured with CuPy on {socket.gethostname()} in {took:.2f} s",
    )
