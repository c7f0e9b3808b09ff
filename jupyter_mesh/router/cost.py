"""The cost model: seconds for an op on a device pool, and for moving bytes between pools.

Device figures come from the inventory's profiles (each says whether it was measured,
looked up or modelled); link figures come from ``mesh.links.*`` config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .. import _config
from ..devices._profile import Profile
from ..targets import backend_resource
from .calibrate import (
    DEFAULT_DEPENDENCY_LATENCY,
    DEFAULT_NETWORK_BANDWIDTH,
    DEFAULT_NETWORK_LATENCY,
    DEFAULT_TASK_OVERHEAD,
)
from .classify import OpInfo
from .history import scaled_work

#: fraction of peak FLOP/s an op class reaches (matmul near peak; FFTs and factorizations
#: are memory- and latency-bound well below it)
EFFICIENCY: dict[str, float] = {
    "matmul": 0.7, "linalg": 0.3, "fft": 0.15, "elementwise": 0.25, "reduction": 0.25,
    "creation": 0.05, "movement": 1.0, "other": 0.1,
}
#: a CPU of unknown profile (a plain Dask worker): conservative laptop-class figures
ASSUMED_CPU = Profile(flops32=5e10, flops64=2.5e10, mem_bandwidth=1e10, launch_latency=2e-6,
                      method="assumed", source="no profile advertised: assumed figures")


@dataclass
class Pool:
    """Devices that are interchangeable for the planner: one kind, backend and site."""

    kind: str
    backend: str
    site: str
    workers: list[str] = field(default_factory=list)
    slots: int = 0
    profile: Profile = field(default_factory=lambda: ASSUMED_CPU)
    label: str = ""
    #: threads of each worker (same order as ``workers``); empty: ``slots`` spread evenly
    threads: list[int] = field(default_factory=list)
    #: where CPU workers on one host have more threads than it has cores: (host, cores,
    #: threads), and the profile is scaled by cores / threads (see :func:`core_shares`)
    shared: list[tuple[str, int, int]] = field(default_factory=list)
    #: each CPU worker's (host, cores it may use, threads it counts on them, profile
    #: measured alone), for :func:`reshared`; empty where any worker does not say
    members: list[tuple[str, int, int, Profile]] = field(default_factory=list)
    #: a CPU pool driven by another backend (JAX on the CPU): the speed of NumPy on its
    #: workers, at their share of the cores; their tasks run on NumPy where that is
    #: faster (see :meth:`CostModel.runs_numpy`). None: only the pool's own backend
    numpy_profile: Profile | None = None
    #: each worker's NumPy profile measured alone (same order as ``members``)
    numpy_members: list[Profile] = field(default_factory=list)
    #: the cores each worker may use, where it says which (same order as ``members``)
    member_cpus: list[frozenset[int] | None] = field(default_factory=list)
    #: bytes of device memory each worker of an accelerator pool holds (the least of
    #: them): what one task's inputs and output must fit in, as Dask manages host memory
    #: only (spilling, pausing) and a GPU or TPU runs out of its own. 0: not known, or
    #: a CPU pool
    device_memory: int = 0

    def worker_threads(self) -> list[int]:
        """Task slots of each worker of the pool (at least one worker, one slot)."""
        if self.threads and len(self.threads) == len(self.workers):
            return [max(int(t), 1) for t in self.threads]
        n = max(len(self.workers), 1)
        total = max(self.slots, n)
        return [total // n + (1 if i < total % n else 0) for i in range(n)]

    @property
    def target(self) -> str:
        return f"{self.kind}:{self.backend}"

    @property
    def resource(self) -> str:
        return backend_resource(self.kind, self.backend)

    @property
    def accelerator(self) -> bool:
        return self.kind != "cpu"

    @property
    def runs_host_numpy(self) -> bool:
        """Whether its workers run NumPy tasks at a known speed: NumPy workers, and CPU
        workers of another backend that measured NumPy too."""
        return self.backend == "numpy" or self.numpy_profile is not None


def core_shares(devices: Iterable[Any]) -> dict[str, tuple[str, int, int]]:
    """CPU workers that share their host's cores: worker -> (host, cores, threads).

    A worker advertises the cores its process may use (Dask's ``CPU_COUNT``: affinity
    and cgroup quota). Where the CPU workers on one host run more threads than the most
    cores any of them may use (a local mesh on a laptop or a small hub), their tasks run
    side by side on fewer cores than threads, each at about cores / threads of the speed
    measured alone. A CPU worker driven by JAX counts every core it may use: XLA computes
    on a thread pool of its own, as wide as those cores (JAX 0.10's XLA_FLAGS thread
    settings do not narrow it; a local mesh pins the JAX worker to its share of the
    cores, which does), and its speed was measured with all of them."""
    by_host: dict[str, list[tuple[str, int, int, frozenset[int] | None]]] = {}
    for d in devices:
        m = _member(d, need_profile=False)
        if m is not None:
            by_host.setdefault(m[0], []).append((d.worker, m[1], m[2], _cpus(d)))
    out: dict[str, tuple[str, int, int]] = {}
    for host, devs in by_host.items():
        cores = host_cores([(c, s) for _, c, _, s in devs])
        threads = sum(t for _, _, t, _ in devs)
        if threads > cores:
            out.update({w: (host, cores, threads) for w, _, _, _ in devs})
    return out


def host_cores(workers: list[tuple[int, frozenset[int] | None]]) -> int:
    """The cores that CPU workers on one host compute on between them, from each one's
    (cores it may use, which cores where it says): the cores of all of them together
    where every one says which (two JAX workers pinned to a core each use two), capped
    by a quota a worker sees (fewer cores than its CPUs); else the most any may use."""
    most = max(c for c, _ in workers)
    sets = [s for _, s in workers]
    if any(not s for s in sets):
        return most
    union: frozenset[int] = frozenset().union(*(s for s in sets if s))
    quota = min((c for c, s in workers if s and c < len(s)), default=len(union))
    return max(most, min(len(union), quota))


def _cpus(d: Any) -> frozenset[int] | None:
    """The cores a worker says it may use (``cpus``: Linux affinity), or None."""
    cpus = (d.extra or {}).get("cpus")
    if not isinstance(cpus, (list, tuple)) or not cpus or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cpus):
        return None
    return frozenset(cpus)


def _scaled(p: Profile, factor: float) -> Profile:
    if factor >= 1.0:
        return p
    return dataclasses.replace(p, flops32=p.flops32 * factor, flops64=p.flops64 * factor,
                               mem_bandwidth=p.mem_bandwidth * factor)


def build_pools(devices: Iterable[Any]) -> list[Pool]:
    """Group inventory devices into pools by (kind, backend, site); CPU workers that
    share their host's cores get their share of its speed (:func:`core_shares`)."""
    devices = list(devices)
    shares = core_shares(devices)
    groups: dict[tuple[str, str, str], list[Any]] = {}
    for d in devices:
        groups.setdefault((d.kind, d.backend, d.site), []).append(d)
    sites = {site for (_, _, site) in groups}
    pools = []
    for (kind, backend, site), devs in sorted(groups.items()):
        profs = []
        for d in devs:
            if d.profile is not None:
                share = shares.get(d.worker)
                profs.append(_scaled(d.profile, share[1] / share[2]) if share else d.profile)
        prof = _mean_profile(profs) if profs else ASSUMED_CPU
        label = f"{kind}:{backend}" + (f"@{site}" if len(sites) > 1 else "")
        threads = [max(int(d.nthreads), 1) for d in devs]
        shared = sorted({shares[d.worker] for d in devs if d.worker in shares})
        members = [m for m in map(_member, devs) if m is not None]
        numpy_raw = [_numpy_profile(d) for d in devs]
        numpy_profile = None
        if kind == "cpu" and backend != "numpy" and devs and None not in numpy_raw:
            numpy_profile = _mean_profile([
                _scaled(p, shares[d.worker][1] / shares[d.worker][2])
                if d.worker in shares else p
                for d, p in zip(devs, numpy_raw, strict=True) if p is not None])
        complete = len(members) == len(devs)
        pools.append(Pool(kind, backend, site, [d.worker for d in devs], sum(threads), prof,
                          label, threads, shared, members if complete else [],
                          numpy_profile,
                          [p for p in numpy_raw if p is not None]
                          if complete and numpy_profile is not None else [],
                          [_cpus(d) for d in devs] if complete else [],
                          _device_memory(kind, devs)))
    return pools


def _device_memory(kind: str, devs: list[Any]) -> int:
    """The least device memory of an accelerator pool's workers; 0 for a CPU pool or
    where any worker does not say."""
    sizes = [int(getattr(d, "memory", 0) or 0) for d in devs]
    if kind == "cpu" or not sizes or min(sizes) <= 0:
        return 0
    return min(sizes)


def _numpy_profile(d: Any) -> Profile | None:
    """The NumPy profile a CPU worker of another backend advertises, or None."""
    rec = (d.extra or {}).get("numpy_profile")
    if not isinstance(rec, dict):
        return None
    try:
        return Profile.from_dict(rec)
    except (TypeError, ValueError, KeyError):
        return None


def _member(d: Any, need_profile: bool = True) -> tuple[str, int, int, Profile] | None:
    """A CPU worker's (host, cores it may use, threads it counts there, its profile), or
    None where it does not say (see :func:`core_shares`)."""
    cores = (d.extra or {}).get("cores")
    if d.kind != "cpu" or not d.host or not isinstance(cores, int) or cores < 1 \
            or (need_profile and d.profile is None):
        return None
    return d.host, cores, max(int(d.nthreads), cores if d.backend == "jax" else 1), d.profile


def reshared(pools: list[Pool], used: set[int]) -> list[Pool] | None:
    """The pools as a schedule that runs nothing on the pools outside ``used`` finds
    them: the CPU workers it leaves idle take no share of their host's cores, so those
    it uses run faster than :func:`core_shares` planned them (on 2 cores, two NumPy
    workers alone run at full speed, not at the 2/3 they get beside a JAX worker).
    None where that changes no pool's speed."""
    workers: dict[str, list[tuple[int, frozenset[int] | None]]] = {}
    threads_on: dict[str, int] = {}
    for p in used:
        pool = pools[p]
        cpus = pool.member_cpus if len(pool.member_cpus) == len(pool.members) else []
        for j, (host, cores, threads, _) in enumerate(pool.members):
            workers.setdefault(host, []).append((cores, cpus[j] if cpus else None))
            threads_on[host] = threads_on.get(host, 0) + threads
    demand = {host: (host_cores(w), threads_on[host]) for host, w in workers.items()}
    out = list(pools)
    changed = False
    for p in used:
        pool = pools[p]
        if not pool.shared or not pool.members:
            continue
        profs = []
        numpy_profs = []
        shared = set()
        for j, (host, _, _, prof) in enumerate(pool.members):
            cores, threads = demand[host]
            factor = cores / threads if threads > cores else 1.0
            if factor < 1.0:
                shared.add((host, cores, threads))
            profs.append(_scaled(prof, factor))
            if pool.numpy_members:
                numpy_profs.append(_scaled(pool.numpy_members[j], factor))
        profile = _mean_profile(profs)
        numpy_profile = _mean_profile(numpy_profs) if numpy_profs else pool.numpy_profile
        if profile != pool.profile or numpy_profile != pool.numpy_profile:
            out[p] = dataclasses.replace(pool, profile=profile, shared=sorted(shared),
                                         numpy_profile=numpy_profile)
            changed = True
    return out if changed else None


def _mean_profile(profs: list[Profile]) -> Profile:
    n = len(profs)
    if n == 1:
        return profs[0]
    return Profile(
        flops32=sum(p.flops32 for p in profs) / n,
        flops64=sum(p.flops64 for p in profs) / n,
        mem_bandwidth=sum(p.mem_bandwidth for p in profs) / n,
        host_link_bandwidth=sum(p.host_link_bandwidth for p in profs) / n,
        launch_latency=max(p.launch_latency for p in profs),
        method=profs[0].method, source=profs[0].source,
    )


@dataclass
class Links:
    """Bandwidths (bytes/s) and latencies (s) of the links data crosses."""

    pcie_bandwidth: float = 25e9
    pcie_latency: float = 1e-5
    network_bandwidth: float = 1.25e9
    network_latency: float = 2e-4
    wan_bandwidth: float = 6.25e8
    wan_latency: float = 0.03

    @classmethod
    def from_config(cls) -> Links:
        def num(key: str) -> float:
            if key == "network-latency" and _config.get(f"links.{key}") == "auto":
                # measured on a live mesh (see calibrate); this where nothing was
                return DEFAULT_NETWORK_LATENCY
            if key == "network-bandwidth" and _config.get(f"links.{key}") == "auto":
                return DEFAULT_NETWORK_BANDWIDTH
            unit = "bytes per second" if key.endswith("bandwidth") else "seconds"
            return float(_config.get_seconds(f"links.{key}", allow_zero=False, unit=unit))

        return cls(
            pcie_bandwidth=num("pcie-bandwidth"), pcie_latency=num("pcie-latency"),
            network_bandwidth=num("network-bandwidth"),
            network_latency=num("network-latency"),
            wan_bandwidth=num("wan-bandwidth"), wan_latency=num("wan-latency"),
        )


def configured_task_overhead() -> float | None:
    """``mesh.task-overhead`` in seconds, or None when it is ``auto`` (measured)."""
    if _config.get("task-overhead") == "auto":
        return None
    return _config.get_seconds("task-overhead")


def configured_dependency_latency() -> float | None:
    """``mesh.dependency-latency`` in seconds, or None when it is ``auto`` (measured)."""
    if _config.get("dependency-latency") == "auto":
        return None
    return _config.get_seconds("dependency-latency")


def network_latency_auto() -> bool:
    """Whether ``mesh.links.network-latency`` is ``auto`` (measured on the live mesh)."""
    return bool(_config.get("links.network-latency") == "auto")


def network_bandwidth_auto() -> bool:
    """Whether ``mesh.links.network-bandwidth`` is ``auto`` (measured on the live mesh)."""
    return bool(_config.get("links.network-bandwidth") == "auto")


class CostModel:
    """Seconds per task of an op on a pool, and seconds to move bytes between pools."""

    def __init__(self, pools: list[Pool], links: Links | None = None,
                 task_overhead: float | None = None,
                 dependency_latency: float | None = None) -> None:
        self.pools = pools
        self.links = links or Links.from_config()
        if task_overhead is None:
            task_overhead = configured_task_overhead()
            if task_overhead is None:  # "auto", and nothing measured: the default
                task_overhead = DEFAULT_TASK_OVERHEAD
        self.task_overhead = task_overhead
        if dependency_latency is None:
            dependency_latency = configured_dependency_latency()
            if dependency_latency is None:  # "auto", and nothing measured: none
                dependency_latency = DEFAULT_DEPENDENCY_LATENCY
        #: seconds from an input's end until a task waiting for it can start, on any
        #: worker (Dask's round trip through the scheduler), except a chain's next task
        #: on the same worker, which the rewrite fuses; it delays the task without
        #: occupying its worker (see :meth:`wait`)
        self.dependency_latency = dependency_latency
        #: seconds per task of the whole mesh (measured, see calibrate): a plan's
        #: estimate is never below its dispatched tasks at this pace; 0: no such floor
        self.task_interval = 0.0
        #: CPU seconds Dask spends per task on the one host of a local mesh, and that
        #: host's cores (measured, see calibrate): a plan's estimate is never below what
        #: its tasks and Dask need of those cores together; 0 / None: no such floor
        self.cpu_per_task = 0.0
        self.host_cores: int | None = None
        #: the measured figures this model uses, where it uses some (see calibrate)
        self.calibration: Any = None
        #: the figures are ``auto`` but could not be measured: the defaults stand in
        self.uncalibrated = False
        #: what earlier computations measured (see history.RunHistory): the work of
        #: each op class on each pool scaled by it; None: the profiles alone
        self.history: Any = None
        n = len(pools)
        self.latency = [[0.0] * n for _ in range(n)]
        self.inv_bw = [[0.0] * n for _ in range(n)]
        for a, pa in enumerate(pools):
            for b, pb in enumerate(pools):
                if a != b:
                    self.latency[a][b], self.inv_bw[a][b] = self._link(pa, pb)
        #: between two distinct workers of the same pool (same site: network, plus the
        #: host links of accelerators at both ends); 0 within one worker
        self.intra_latency = [0.0] * n
        self.intra_inv_bw = [0.0] * n
        for a, pa in enumerate(pools):
            self.intra_latency[a], self.intra_inv_bw[a] = self._link(pa, pa)
        # a transfer between workers waits for the scheduler's round trip too
        if dependency_latency:
            for a in range(n):
                self.intra_latency[a] += dependency_latency
                for b in range(n):
                    if a != b:
                        self.latency[a][b] += dependency_latency

    def _link(self, pa: Pool, pb: Pool) -> tuple[float, float]:
        ln = self.links
        if pa.site != pb.site:
            lat, inv = ln.wan_latency, 1.0 / ln.wan_bandwidth
        else:
            lat, inv = ln.network_latency, 1.0 / ln.network_bandwidth
        for p in (pa, pb):
            if p.accelerator:
                bw = p.profile.host_link_bandwidth or ln.pcie_bandwidth
                lat += ln.pcie_latency
                inv += 1.0 / bw
        return lat, inv

    def transfer(self, nbytes: float, a: int, b: int, same_worker: bool = True) -> float:
        """Seconds from the end of a task on pool ``a`` until a task on pool ``b`` has
        its ``nbytes`` of output: the scheduler's round trip (``dependency_latency``)
        within one worker, the intra-pool link on top between two workers of one pool
        (``same_worker=False``), the link between the pools otherwise."""
        if a == b:
            if same_worker:
                return self.dependency_latency
            return self.intra_latency[a] + nbytes * self.intra_inv_bw[a]
        return self.latency[a][b] + nbytes * self.inv_bw[a][b]

    def exec_time(self, op: OpInfo, pool: Pool) -> float:
        """Seconds one task of ``op`` takes on one device of ``pool``: with the pool's
        backend, or with NumPy where its workers run that faster (:meth:`runs_numpy`)."""
        own = self.seconds(op, pool, pool.backend in op.native)
        if pool.numpy_profile is None:
            return own
        return min(own, self.seconds(op, pool, False))

    def runs_numpy(self, op: OpInfo, pool: Pool) -> bool:
        """Whether a task of ``op`` planned on ``pool`` runs with NumPy on the host of
        its worker, not with the pool's own backend: NumPy pools; ops the backend does
        not run natively; and, on CPU workers of another backend that measured NumPy too
        (a JAX CPU worker), ops that NumPy runs faster there (JAX's float64 matmul on a
        CPU is about half as fast as NumPy's)."""
        if pool.backend == "numpy" or pool.backend not in op.native:
            return True
        if pool.numpy_profile is None:
            return False
        return self.seconds(op, pool, False) < self.seconds(op, pool, True)

    def seconds(self, op: OpInfo, pool: Pool, native: bool) -> float:
        """Seconds one task of ``op`` takes on ``pool`` with the pool's backend
        (``native``), or on its workers' host NumPy: Dask's dispatch and the work, the
        latter scaled by what earlier computations measured there (``history``)."""
        work = self.work_seconds(op, pool, native)
        if self.history is not None:
            work = scaled_work(self.history, op, pool, native, work)
        return self.task_overhead + work

    def work_seconds(self, op: OpInfo, pool: Pool, native: bool) -> float:
        """The seconds of work one task of ``op`` takes on ``pool`` by the profile
        (:meth:`seconds` less Dask's dispatch, and before what was learned)."""
        prof = pool.profile
        if not native:
            # runs on the host CPU of that worker (after a copy off an accelerator)
            if pool.numpy_profile is not None:
                prof = pool.numpy_profile
            elif pool.accelerator:
                prof = ASSUMED_CPU
        rate = prof.flops(op.itemsize)
        if rate <= 0:  # e.g. no float64 units on a TPU: emulated, slowly
            rate = prof.flops32 / 16.0
        compute = op.flops / (rate * EFFICIENCY.get(op.op_class, 0.1)) if op.flops else 0.0
        memory = op.mem_bytes / prof.mem_bandwidth if prof.mem_bandwidth else 0.0
        t = prof.launch_latency + max(compute, memory)
        if not native and pool.accelerator:
            t += 2 * (self.links.pcie_latency + op.in_bytes / self.links.pcie_bandwidth)
        return t
