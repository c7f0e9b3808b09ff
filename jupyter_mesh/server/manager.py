"""The state behind the Mesh sidebar, free of Tornado: meshes, their devices and history.

:class:`MeshManager` is an async context manager. It holds three sorts of mesh:

``sidebar``
    started by this server (``POST meshes``); it can scale and stop them.
``connected``
    connected to by this server (``POST meshes/connect``); stopping disconnects.
``kernel``
    found in the Jupyter runtime directory, registered there by a kernel (see
    :mod:`jupyter_mesh.discovery`); the server connects to read their devices and
    forgets them when the kernel's process is gone.

Blocking :class:`~jupyter_mesh.Mesh` calls run in threads (:func:`asyncio.to_thread`;
connects, which may wait on a scheduler up to their timeout, in threads of their own),
so the server's event loop never waits on a scheduler.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import logging
import math
import os
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .. import _config, discovery
from .._links import proxied
from ..errors import MeshError, listed, said, said_json
from ..mesh import (
    FAMILIES,
    Mesh,
    _family_of,
    _known_scheduler_id,
    check_address,
    check_cpu_total,
    check_site,
    found_accelerators,
    is_encrypted,
)

#: options ``POST meshes`` accepts, with the kinds of value allowed
START_OPTIONS = ("cpu", "gpu", "tpu", "jax_cpu", "site", "threads_per_worker")
#: samples of utilization kept per mesh and per device
HISTORY = 60
#: at most one sample per this many seconds
SAMPLE_EVERY = 0.9
#: seconds a kernel mesh's connection may take
KERNEL_CONNECT_TIMEOUT = 5.0
#: connects (to a remote scheduler, to a kernel's mesh) in flight at once; more wait
#: for one of these threads, and nothing else does
CONNECT_THREADS = 8


logger = logging.getLogger("jupyter_mesh")

#: seconds a mesh's inventory may take before the sidebar shows its last one instead
SAMPLE_TIMEOUT = 3.0


class ManagerError(Exception):
    """A request the manager refuses; ``status`` is the HTTP status that fits."""

    status = 400


class BadRequest(ManagerError):
    status = 400


class NotFound(ManagerError):
    status = 404


class Conflict(ManagerError):
    status = 409


class Unreachable(ManagerError):
    status = 502


class Failed(ManagerError):
    """Dask itself failed at what was asked (said in one line; the log has the rest)."""

    status = 500


@dataclass
class Entry:
    """One mesh the sidebar shows."""

    id: str
    origin: str  # "sidebar" | "connected" | "kernel"
    address: str
    name: str
    mesh: Mesh | None = None
    dashboard: str | None = None
    created: float = field(default_factory=time.time)
    error: str | None = None
    registration: dict[str, Any] | None = None
    kernels: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: worker processes a scale under way will leave this mesh with
    reserved: int = 0
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    device_history: dict[str, deque[list[float]]] = field(default_factory=dict)
    last_sample: float = 0.0
    last_devices: list[dict[str, Any]] = field(default_factory=list)
    plans: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=discovery.MAX_PLANS))
    plan_ids: tuple[int, int] = (builtins.id(None), builtins.id(None))  # `id` is a field
    connecting: asyncio.Task[Any] | None = None
    busy: bool = False
    #: a mesh this server is starting (no scheduler address yet)
    starting: bool = False

    @property
    def can_scale(self) -> bool:
        return self.origin == "sidebar" and self.mesh is not None and self.mesh.owns_cluster

    @property
    def can_stop(self) -> bool:
        return self.origin in ("sidebar", "connected") and not self.starting


def most_local() -> int:
    """The most workers of a family, or threads per worker, the sidebar starts on this
    machine: four per core, as ``Mesh.local`` allows (a typo must not fork thousands
    of processes)."""
    from ..mesh import most_local_workers

    return most_local_workers()


def _check_int(name: str, value: Any, *, allow_auto: bool = False, minimum: int = 0) -> Any:
    if allow_auto and isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"  # as Mesh.local and %mesh start take it: "AUTO" too
    top = most_local()
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
            or value > top):
        allowed = (f"a whole number from {minimum} to {top} (four per core here)"
                   + (' or "auto"' if allow_auto else ""))
        raise BadRequest(f"{name} must be {allowed}, not {said_json(value)}")
    return value


def validate_start(body: Any) -> dict[str, Any]:
    """The keyword arguments of :meth:`Mesh.local` from a ``POST meshes`` body."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object like {"cpu": 1}')
    unknown = sorted(set(body) - set(START_OPTIONS))
    if unknown:
        raise BadRequest(f"unknown option(s) {listed(unknown)}: use {', '.join(START_OPTIONS)}")
    kwargs: dict[str, Any] = {}
    for name in ("cpu", "jax_cpu"):
        if name in body:
            kwargs[name] = _check_int(name, body[name])
    for name in ("gpu", "tpu"):
        if name in body:
            kwargs[name] = _check_int(name, body[name], allow_auto=True)
    if "threads_per_worker" in body and body["threads_per_worker"] is not None:
        kwargs["threads_per_worker"] = _check_int(
            "threads_per_worker", body["threads_per_worker"], minimum=1
        )
    if "site" in body and not isinstance(body["site"], str):
        raise BadRequest(f'site must be a name in quotes, like "edge-lab", not '
                         f'{said_json(body["site"])}')
    if "site" in body:
        try:  # the rule of Mesh.local, before anything starts
            kwargs["site"] = check_site(body["site"], spell=said_json)
        except MeshError as exc:
            raise BadRequest(str(exc)) from None
    return kwargs


def validate_scale(body: Any) -> dict[str, int]:
    """The worker counts per family from a ``PATCH meshes/{id}`` body."""
    if not isinstance(body, dict) or not body:
        raise BadRequest(
            f'the body must be a JSON object of counts, like {{"cpu": 2}}; '
            f"families: {', '.join(FAMILIES)}"
        )
    unknown = sorted(set(body) - set(FAMILIES))
    if unknown:
        raise BadRequest(f"cannot scale {listed(unknown)}: use {', '.join(FAMILIES)}")
    return {name: _check_int(name, value) for name, value in body.items()}


def validate_connect(body: Any, tls: Callable[[str], Any] = lambda address: None
                     ) -> tuple[str, float | None]:
    """Address and timeout from a ``POST meshes/connect`` body; ``tls(address)``: the
    Security that reaches a ``tls://`` address, from more than Dask's own settings."""
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object like {"address": "tcp://host:8786"}')
    unknown = sorted(set(body) - {"address", "timeout"})
    if unknown:
        raise BadRequest(f"unknown option(s) {listed(unknown)}: use address, timeout")
    if "address" not in body:
        raise BadRequest("address is required, like tcp://host:8786")
    if not isinstance(body["address"], str):
        raise BadRequest(f'address must be text, like "tcp://host:8786", not '
                         f'{said_json(body["address"])}')
    try:
        address = check_address(body["address"], spell=said_json)
    except MeshError as exc:
        raise BadRequest(str(exc)) from None
    timeout = body.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 120
    ):
        raise BadRequest(f"timeout must be a number of seconds in (0, 120], not {said_json(timeout)}")
    if is_encrypted(address) and configured_security() is None and tls(address) is None:
        raise BadRequest(
            f"{address} uses TLS: give this Jupyter server Dask's TLS settings "
            f"(distributed.comm.tls.ca-file, .client.cert and .client.key), or connect "
            f"from a notebook with %mesh connect {address} --tls-ca-file ... (the sidebar "
            f"then finds it by itself)"
        )
    return address, (float(timeout) if timeout is not None else None)


def tls_security(address: str, runtime_dir: str | os.PathLike[str] | None = None) -> Any:
    """What reaches the ``tls://`` mesh at ``address``: the certificate a mesh of this
    user shared for it (the sidebar's own TLS meshes, a notebook's ``mesh.local.tls``
    mesh), else Dask's TLS settings of this server; None where neither has it."""
    # the certificate a mesh of this user shared for this very address first: the
    # server's Dask TLS settings may be for other schedulers (another CA), and the
    # handshake with this one failed
    return discovery.security_for(address, runtime_dir) or configured_security()


def configured_security() -> Any:
    """A ``Security`` from Dask's TLS settings of this server (``distributed.comm.tls``),
    or None where they do not name a CA and a client certificate."""
    from distributed.security import Security

    security = Security()
    if getattr(security, "tls_ca_file", None) and getattr(security, "tls_client_cert", None):
        return security
    return None


class MeshManager:
    """The meshes of one Jupyter server: started, connected, or found in kernels.

    Parameters
    ----------
    runtime_dir:
        The Jupyter runtime directory where kernels register their meshes; default
        :func:`jupyter_core.paths.jupyter_runtime_dir`.
    kernel_paths:
        Optional coroutine function returning ``{kernel_id: notebook path}``, used to
        name kernel meshes after their notebooks.
    """

    def __init__(
        self,
        runtime_dir: str | os.PathLike[str] | None = None,
        *,
        kernel_paths: Callable[[], Awaitable[dict[str, str]]] | None = None,
        dashboard_proxy: str | None = None,
    ) -> None:
        self.runtime_dir = runtime_dir
        self.kernel_paths = kernel_paths
        #: where this server proxies its loopback ports (``{base_url}proxy/``), when
        #: jupyter-server-proxy runs in it: a loopback dashboard is linked through it
        self.dashboard_proxy = dashboard_proxy
        self._entries: dict[str, Entry] = {}
        self._lock = asyncio.Lock()
        #: connects that finish together check for an entry of their scheduler and
        #: add theirs one at a time (see connect)
        self._joining = asyncio.Lock()
        self._counter = 0
        #: this server's run: the sidebar tells a restarted server (whose meshes
        #: stopped with the old one) from a mesh stopped elsewhere
        self.instance = uuid.uuid4().hex[:12]
        #: worker processes of meshes being started now (counted against the budget)
        self._starting = 0
        self.closed = False
        self._background: set[asyncio.Task[Any]] = set()
        #: connects wait on schedulers that may never answer (up to their timeout):
        #: they get threads of their own, so the default pool that lists, starts,
        #: scales and stops meshes is never used up by them
        self._connecting = concurrent.futures.ThreadPoolExecutor(
            CONNECT_THREADS, thread_name_prefix="jupyter-mesh-connect")

    # ------------------------------------------------------------------ lifetime
    async def __aenter__(self) -> MeshManager:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _connect_in_thread(self, *args: Any, **kwargs: Any) -> Any:
        """``Mesh.connect`` in one of the connect threads (see ``_connecting``)."""
        loop = asyncio.get_running_loop()
        asked = time.monotonic()

        def connect() -> Any:
            # the timeout counts from the request, not from when a thread was free
            # (with every thread waiting on a scheduler that does not answer, a connect
            # took twice its timeout and said it had waited it once)
            timeout = kwargs.get("timeout")
            waited = time.monotonic() - asked
            if timeout is None and waited > 0.5:  # (the sidebar's: mesh.connect-timeout)
                with contextlib.suppress(Exception):  # (a bad setting: connect says so)
                    timeout = _config.get_seconds("connect-timeout", allow_zero=False)
            if timeout is not None and waited > 0.5:  # (queued behind others)
                left = round(timeout - waited, 1)
                if left <= 0.5:
                    raise MeshError(
                        f"no connection was free for {timeout:g} s (every one of the "
                        f"{CONNECT_THREADS} waits on a scheduler that does not answer): "
                        f"try again once they give up")
                return Mesh.connect(*args, **{**kwargs, "timeout": left})
            return Mesh.connect(*args, **kwargs)

        return await loop.run_in_executor(self._connecting, connect)

    async def close(self) -> None:
        """Stop the meshes this server started and drop its connections."""
        self.closed = True
        self._connecting.shutdown(wait=False, cancel_futures=True)
        entries = list(self._entries.values())
        self._entries.clear()
        for entry in entries:
            if entry.connecting is not None:
                entry.connecting.cancel()
        await asyncio.gather(
            *(asyncio.to_thread(_close_quietly, e.mesh) for e in entries if e.mesh is not None)
        )

    def close_sync(self) -> None:
        """Close every mesh without an event loop (at interpreter exit)."""
        self.closed = True
        self._connecting.shutdown(wait=False, cancel_futures=True)
        for entry in list(self._entries.values()):
            _close_quietly(entry.mesh)
        self._entries.clear()

    # ------------------------------------------------------------------ queries
    async def list(self) -> list[dict[str, Any]]:
        """Summaries of every mesh, kernel meshes refreshed from the runtime directory."""
        await self.refresh_kernels()
        entries = sorted(self._entries.values(), key=lambda e: e.created)
        # device counts of every mesh stay current, not only the selected one's
        await asyncio.gather(*(self._sample(e, wait=False) for e in entries))
        return [self.summary(e) for e in entries]

    async def get(self, mesh_id: str) -> dict[str, Any]:
        """The full model of one mesh: devices grouped by kind and site, history, plans."""
        # (every mesh's: the kernels that use one this server started or connected to,
        # and their plans, come from the kernels' registrations too)
        await self.refresh_kernels()
        entry = self._entries.get(mesh_id)
        if entry is None:
            raise NotFound(f"no mesh with id {said(mesh_id)}: list them with GET meshes")
        await self._sample(entry)
        return self.detail(entry)

    # ------------------------------------------------------------------ actions
    def _local_workers(self) -> int:
        """Worker processes of the meshes this server started (and is starting)."""
        total = self._starting
        for entry in self._entries.values():
            if not entry.can_scale or entry.mesh is None:
                continue
            cluster = getattr(entry.mesh, "cluster", None)
            # (a mesh scaling up has its new workers in its spec at once, or not yet)
            total += max(len(getattr(cluster, "worker_spec", ()) or ()), entry.reserved)
        return total

    def _check_budget(self, adding: int, whole: int | None = None) -> None:
        """Conflict where the sidebar's meshes together would run more than four worker
        processes per core (one user must not exhaust a shared machine); a bad request
        where the mesh asked for (``whole`` worker processes, ``adding`` where not
        given) is that large by itself, as stopping other meshes would not help."""
        top = most_local()
        alone = adding if whole is None else whole
        if alone > top:
            raise BadRequest(f"a mesh of {alone} worker processes is more than {top} (four "
                             f"per core here): ask for fewer workers")
        running = self._local_workers()
        if running + adding > top:
            raise Conflict(f"the meshes started here would have {running + adding} worker "
                           f"processes, more than {top} (four per core): stop or scale "
                           f"down a mesh first")

    async def start(self, body: Any) -> dict[str, Any]:
        """Start a local mesh (``Mesh.local``) with the options in ``body``."""
        kwargs = validate_start(body)
        self._check_open()
        # "auto" GPUs and TPUs are at most the machine's devices: counted as they start
        adding = sum(v for k, v in kwargs.items()
                     if k in ("cpu", "jax_cpu", "gpu", "tpu") and isinstance(v, int))
        if "cpu" not in kwargs:
            adding += 2  # Mesh.local's default
        try:  # a request too big by itself says so, before the meshes already running
            check_cpu_total(kwargs.get("cpu", 2), kwargs.get("jax_cpu", 0))
        except MeshError as exc:
            raise BadRequest(str(exc)) from None
        if adding == 0 and kwargs.get("gpu") == 0 and kwargs.get("tpu") == 0:
            # (said before it is listed as starting; with "auto" GPUs or TPUs, Mesh.local
            # says it once it found none)
            raise BadRequest("a mesh needs at least one device: use cpu=1 or more")
        wanted = {k: kwargs.get(k) for k in ("gpu", "tpu")}
        if any(isinstance(n, int) and n > 0 for n in wanted.values()):
            # GPUs or TPUs this machine lacks: so said, not blamed on the other meshes
            # ("auto" finds what there is; Mesh.local looks for those)
            try:
                await asyncio.to_thread(
                    found_accelerators,
                    *(n if isinstance(n, int) else 0 for n in wanted.values()))
            except MeshError as exc:
                raise BadRequest(str(exc)) from None
        self._check_budget(adding)
        self._starting += adding
        self._counter += 1
        number = self._counter
        # listed at once, as starting (other sidebars see it; a stop or scale meanwhile
        # is told to wait), with no address until its scheduler has one
        entry = Entry(id=_new_id("local"), origin="sidebar", address="",
                      name=f"Local mesh {number}", busy=True, starting=True)
        self._entries[entry.id] = entry
        try:
            mesh = await asyncio.to_thread(Mesh.local, set_current=False, **kwargs)
        except BaseException as exc:
            self._entries.pop(entry.id, None)
            if self._counter == number:  # (the next mesh takes its number)
                self._counter -= 1
            if isinstance(exc, MeshError):
                raise BadRequest(str(exc)) from None
            if not isinstance(exc, Exception):
                raise
            # Dask's own failures (e.g. a worker that cannot start)
            logger.exception("jupyter_mesh: starting a mesh failed")
            raise Failed(f"could not start the mesh: {_one_line(exc)}; see the server's "
                         f"log, or start fewer workers") from None
        finally:
            self._starting -= adding
        if self.closed:
            await asyncio.to_thread(_close_quietly, mesh)
            raise Conflict("the server is shutting down")
        entry.mesh, entry.address, entry.dashboard = mesh, mesh.address, mesh.dashboard_link
        entry.busy = entry.starting = False
        try:
            # a mesh over TLS (mesh.local.tls): this user's notebooks can connect to it
            discovery.share_security(mesh, self.runtime_dir)
        except OSError:
            logger.warning("jupyter_mesh: %s cannot be connected to from notebooks: its "
                           "certificate could not be shared", entry.name, exc_info=True)
        await self._sample(entry, force=True)
        return self.detail(entry)

    async def connect(self, body: Any) -> dict[str, Any]:
        """Connect to a running Dask scheduler; a known address gives its existing mesh."""
        # (the shared certificates are files, read off the server's loop, once)
        security = None
        try:
            asked = check_address(body["address"]) if isinstance(body, dict) else None
        except (KeyError, MeshError):
            asked = None  # validate_connect says what is wrong with it
        if asked is not None and is_encrypted(asked):
            security = await asyncio.to_thread(tls_security, asked, self.runtime_dir)
        address, timeout = validate_connect(body, lambda _: security)
        self._check_open()
        await self.refresh_kernels()
        for entry in self._entries.values():
            if _same_place(entry.address) == _same_place(address):
                await self._sample(entry)
                return self.detail(entry)
        try:
            mesh = await self._connect_in_thread(
                address, security=security, timeout=timeout, set_current=False
            )
        except MeshError as exc:
            raise Unreachable(str(exc)) from None
        except Exception as exc:
            logger.exception("jupyter_mesh: connecting to %s failed", address)
            raise Unreachable(f"could not connect to {address}: {_one_line(exc)}") from None
        # a connect to the same scheduler that finished meanwhile (or the same scheduler
        # under another name, e.g. localhost and 127.0.0.1): one entry per scheduler;
        # connects that finish together look and add one at a time
        async with self._joining:
            same = await asyncio.to_thread(self._same_scheduler, mesh, address)
            if same is None:
                entry = Entry(
                    id=_new_id("connect"),
                    origin="connected",
                    address=mesh.address,
                    name=_host_of(address),
                    mesh=mesh,
                    dashboard=mesh.dashboard_link,
                )
                self._entries[entry.id] = entry
        if same is not None:
            await asyncio.to_thread(_close_quietly, mesh)
            await self._sample(same)
            return self.detail(same)
        await self._sample(entry, force=True)
        return self.detail(entry)

    def _same_scheduler(self, mesh: Any, address: str) -> Entry | None:
        """The entry of the scheduler ``mesh`` is connected to, if one has it: by
        address, or by the scheduler's id (the sidebar's own mesh at 127.0.0.1:P
        connected to as localhost:P)."""
        from ..mesh import _scheduler_id

        sid = _scheduler_id(mesh)
        for entry in list(self._entries.values()):
            if entry.mesh is mesh:
                continue
            if entry.address in (address, mesh.address):
                return entry
            if sid is not None and entry.mesh is not None and _scheduler_id(entry.mesh) == sid:
                return entry
        return None

    async def scale(self, mesh_id: str, body: Any) -> dict[str, Any]:
        """Set the number of workers per family of a mesh this server started."""
        entry = self._get(mesh_id)
        counts = validate_scale(body)
        _check_started(entry)
        if not entry.can_scale or entry.mesh is None:
            raise Conflict(
                f"{entry.name} was not started by this server: scale it where it was started"
            )
        if entry.busy:
            raise Conflict(f"{entry.name} is busy with another change: try again in a moment")
        spec = getattr(getattr(entry.mesh, "cluster", None), "worker_spec", {}) or {}
        now = {fam: sum(1 for name in spec if _family_of(name) == fam) for fam in FAMILIES}
        after = {**now, **counts}
        growth = max(0, sum(after.values()) - sum(now.values()))
        if growth:  # scaling down is always allowed
            self._check_budget(growth, whole=sum(after.values()))
        entry.busy = True
        entry.reserved = sum(after.values())  # while it scales (another start counts it)
        try:
            await asyncio.to_thread(entry.mesh.scale, **counts)
        except MeshError as exc:
            raise BadRequest(str(exc)) from None
        except Exception as exc:
            logger.exception("jupyter_mesh: scaling %s failed", entry.name)
            raise Failed(f"could not scale {entry.name}: {_one_line(exc)}; see the server's "
                         f"log") from None
        finally:
            entry.busy = False
            entry.reserved = 0
        await self._sample(entry, force=True)
        return self.detail(entry)

    async def stop(self, mesh_id: str, force: bool = False) -> dict[str, Any]:
        """Stop a mesh this server started, or disconnect from one it connected to.
        A mesh that kernels use is stopped only with ``force`` (they lose it)."""
        entry = self._get(mesh_id)
        _check_started(entry)
        if not entry.can_stop:
            raise Conflict(
                f"{entry.name} belongs to a kernel: close it there with %mesh close "
                f"(or shut the kernel down)"
            )
        if entry.busy:
            raise Conflict(f"{entry.name} is busy with another change: try again in a moment")
        entry.busy = True  # (before the wait below: a scale or a stop meanwhile waits)
        if not force and entry.origin == "sidebar":
            try:
                await self.refresh_kernels()  # (a kernel may have connected since)
            except BaseException:
                entry.busy = False
                raise
            users = sorted({str(k.get("path") or f"a kernel (process {k.get('pid')})")
                            for k in entry.kernels.values()})
            if users:
                entry.busy = False
                whose = "its kernel" if len(users) == 1 else "their kernels"
                raise Conflict(
                    f"{entry.name} is in use by {', '.join(users)}: {whose} would "
                    f"lose it; close it there first (%mesh close), or stop it anyway "
                    f"(the sidebar asks first; the API takes force=true)")
        self._entries.pop(mesh_id, None)
        await asyncio.to_thread(_close_quietly, entry.mesh)
        return {
            "id": mesh_id,
            "stopped": entry.origin == "sidebar",
            "disconnected": entry.origin == "connected",
        }

    # ------------------------------------------------------------------ kernels
    async def refresh_kernels(self) -> None:
        """Sync kernel meshes with the registrations in the runtime directory."""
        if self.closed:
            return
        regs = await asyncio.to_thread(discovery.read_registrations, self.runtime_dir)
        paths: dict[str, str] = {}
        if self.kernel_paths is not None and regs:
            try:
                paths = await self.kernel_paths()
            except Exception:
                paths = {}
        # a kernel that started its mesh first: it names the entry of its scheduler
        regs = sorted(regs, key=lambda r: (not r.get("owns_cluster"),
                                           float(r.get("created") or 0)))
        async with self._lock:
            live_ids = set()
            # one entry per scheduler: by its id where known, else by its address (with
            # localhost as 127.0.0.1), the sidebar's own and connected meshes first
            hosts: dict[str, Entry] = {}
            for e in self._entries.values():
                if e.origin != "kernel" and e.address:  # (a mesh starting has none yet)
                    for key in _scheduler_keys(e.address, _known_scheduler_id(e.mesh)):
                        hosts.setdefault(key, e)
            for known in self._entries.values():
                known.kernels = {}
            for reg in regs:
                kid = f"kernel-{reg.get('id') or reg.get('pid')}"
                info = {
                    "pid": reg.get("pid"),
                    "kernel_id": reg.get("kernel_id"),
                    "path": paths.get(reg.get("kernel_id") or ""),
                }
                keys = _scheduler_keys(reg["address"], reg.get("scheduler_id"))
                host = next((hosts[k] for k in keys if k in hosts), None)
                if host is not None:
                    # a kernel that connected to a mesh we already show (the sidebar's, or
                    # another kernel's): no duplicate, but it is listed as using it and the
                    # plans its router made on that mesh are shown with it
                    host.kernels[kid] = info
                    _merge_plans(host, reg)
                    for key in keys:  # (known by another of its names now, too)
                        hosts.setdefault(key, host)
                    continue
                live_ids.add(kid)
                entry = self._entries.get(kid)
                if entry is None:
                    entry = Entry(
                        id=kid,
                        origin="kernel",
                        address=reg["address"],
                        name="",
                        dashboard=reg.get("dashboard"),
                        created=float(reg.get("created") or time.time()),
                    )
                    self._entries[kid] = entry
                for key in keys:
                    hosts.setdefault(key, entry)
                entry.registration = reg
                entry.kernels = {kid: info}
                entry.name = _kernel_name(reg, info["path"])
                entry.dashboard = reg.get("dashboard") or entry.dashboard
                _merge_plans(entry, reg)
                if entry.mesh is None and entry.connecting is None:
                    entry.connecting = self._keep(self._connect_kernel(entry))
            gone = [
                e for e in self._entries.values() if e.origin == "kernel" and e.id not in live_ids
            ]
            for entry in gone:
                # a connect still under way is left to finish: its thread cannot be
                # stopped, and it closes the mesh it made once it sees the entry gone
                self._entries.pop(entry.id, None)
        for entry in gone:
            if entry.mesh is not None:
                self._keep(asyncio.to_thread(_close_quietly, entry.mesh))

    def _keep(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, held until it is done (the event loop keeps
        only a weak reference to a task)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _connect_kernel(self, entry: Entry) -> None:
        try:
            security = _security_from(entry.registration or {})
            mesh = await self._connect_in_thread(
                entry.address,
                security=security,
                timeout=KERNEL_CONNECT_TIMEOUT,
                set_current=False,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            gone = re.match(r"could not connect to \S+ \((.*)\): check that", why)
            if gone:
                # (Mesh.connect's own advice, to check the address, is no help here:
                # the notebook's mesh stopped, or its kernel is going)
                entry.error = (f"this notebook's mesh at {entry.address} does not answer "
                               f"({gone.group(1)}): if it was stopped, run %mesh close "
                               f"in the notebook")
            else:  # it answered, and something else is wrong (TLS...): as it is
                entry.error = f"cannot read this kernel's mesh: {why}"
            return
        finally:
            entry.connecting = None
        if self._entries.get(entry.id) is not entry or self.closed:
            await asyncio.to_thread(_close_quietly, mesh)
            return
        entry.mesh = mesh
        entry.error = None

    async def wait_connected(self, mesh_id: str, timeout: float = 30) -> None:
        """Wait until the server has connected to a kernel mesh (for tests and first reads)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self._entries.get(mesh_id)
            if entry is None:
                raise NotFound(f"no mesh with id {said(mesh_id)}")
            if entry.mesh is not None or entry.error:
                return
            task = entry.connecting
            if task is not None:
                await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
            else:
                await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ models
    def summary(self, entry: Entry) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for d in entry.last_devices:
            counts[d["kind"]] = counts.get(d["kind"], 0) + 1
        status = "running"
        if entry.error:
            status = "error"
        elif entry.starting:
            status = "starting"
        elif entry.mesh is None:
            status = "connecting"
        elif entry.busy:
            status = "scaling"
        return {
            "id": entry.id,
            "name": entry.name,
            "origin": entry.origin,
            "address": entry.address,
            # what the browser opens: through this server's proxy where it can
            "dashboard": proxied(entry.dashboard, self.dashboard_proxy),
            "status": status,
            "error": entry.error,
            "can_scale": entry.can_scale,
            "can_stop": entry.can_stop,
            "counts": counts,
            "devices": len(entry.last_devices),
            "kernels": list(entry.kernels.values()),
            "created": entry.created,
            # a kernel's mesh: whether that kernel started it (%mesh start; False: it
            # connected to one running elsewhere, which its %mesh close leaves running)
            "kernel_started": bool((entry.registration or {}).get("owns_cluster", True))
            if entry.origin == "kernel" else None,
        }

    def detail(self, entry: Entry) -> dict[str, Any]:
        groups: dict[tuple[str, str], dict[str, Any]] = {}
        for d in entry.last_devices:
            g = groups.setdefault(
                (d["kind"], d["site"]),
                {
                    "kind": d["kind"],
                    "site": d["site"],
                    "devices": [],
                    "memory": 0,
                    "memory_used": 0,
                    "tasks": 0,
                },
            )
            g["devices"].append(d)
            g["memory"] += d.get("memory") or 0
            g["memory_used"] += d.get("memory_used") or 0
            g["tasks"] += d.get("tasks") or 0
        options = {}
        if entry.mesh is not None and entry.can_scale:
            options = {k: v for k, v in entry.mesh.options.items() if k in FAMILIES}
            # a worker that died and is not restarted no longer counts: the Scale form
            # shows what runs, so that the same number again replaces it
            live = getattr(entry.mesh, "_live_counts", None)
            if live is not None:
                now = live()
                options = {k: now.get(k, v) for k, v in options.items()}
        return {
            **self.summary(entry),
            "groups": list(groups.values()),
            "history": list(entry.history),
            "device_history": {w: list(h) for w, h in entry.device_history.items()},
            "plans": sorted(entry.plans, key=lambda p: p.get("at") or 0, reverse=True),
            "scale": options,
        }

    # ------------------------------------------------------------------ internals
    def _get(self, mesh_id: str) -> Entry:
        entry = self._entries.get(mesh_id)
        if entry is None:
            raise NotFound(f"no mesh with id {said(mesh_id)}: list them with GET meshes")
        return entry

    def _check_open(self) -> None:
        if self.closed:
            raise Conflict("the server is shutting down")

    async def _sample(self, entry: Entry, *, force: bool = False, wait: bool = True) -> None:
        """Read the mesh's inventory (at most once per SAMPLE_EVERY) into its history."""
        mesh = entry.mesh
        if mesh is None:
            if wait and entry.origin == "kernel" and entry.connecting is not None:
                await self.wait_connected(entry.id, timeout=KERNEL_CONNECT_TIMEOUT + 1)
                mesh = entry.mesh
            if mesh is None:
                return
        now = time.time()
        if not force and now - entry.last_sample < SAMPLE_EVERY:
            return
        entry.last_sample = now
        try:
            # one slow scheduler must not hold up the list of every mesh
            inventory = await asyncio.wait_for(asyncio.to_thread(mesh.inventory),
                                               SAMPLE_TIMEOUT)
        except (TimeoutError, asyncio.TimeoutError):
            entry.error = (f"{entry.address} did not answer within {SAMPLE_TIMEOUT:g} s: "
                           f"it may be busy; showing what it said last")
            return
        except Exception as exc:
            # (a kernel's advice, "%mesh close, then ...", is not what the sidebar offers)
            why = str(exc).split(": run %mesh close", 1)[0]
            todo = {"sidebar": "press Stop, then Start a new one",
                    "connected": "press Disconnect, then connect again once it is back",
                    }.get(entry.origin, "close it in its notebook with %mesh close")
            entry.error = f"cannot read the inventory of {entry.address}: {why}: {todo}"
            # its devices are not known any more: none shown, no count
            entry.last_devices = []
            entry.device_history.clear()
            return
        entry.error = None
        devices = [discovery.jsonable(d.to_record()) for d in inventory]
        entry.last_devices = devices
        entry.dashboard = inventory.dashboard or entry.dashboard
        memory = sum(d.get("memory") or 0 for d in devices)
        used = sum(d.get("memory_used") or 0 for d in devices)
        cpu = [
            d.get("cpu_percent") for d in devices if isinstance(d.get("cpu_percent"), (int, float))
        ]
        entry.history.append(
            {
                "t": now,
                "tasks": sum(d.get("tasks") or 0 for d in devices),
                "memory": memory,
                "memory_used": used,
                "cpu": (sum(cpu) / len(cpu)) if cpu else None,
                "devices": len(devices),
            }
        )
        live = set()
        for d in devices:
            live.add(d["worker"])
            hist = entry.device_history.setdefault(d["worker"], deque(maxlen=HISTORY))
            hist.append(
                [
                    now,
                    d.get("cpu_percent") or 0.0,
                    d.get("memory_used") or 0,
                    d.get("tasks") or 0,
                ]
            )
        for worker in set(entry.device_history) - live:
            del entry.device_history[worker]
        self._record_plans(entry, mesh)

    def _record_plans(self, entry: Entry, mesh: Mesh) -> None:
        plan = getattr(mesh, "last_plan", None)
        report = getattr(mesh, "last_report", None)
        ids = (id(plan), id(report))
        if ids == entry.plan_ids:
            return
        if plan is not None and id(plan) != entry.plan_ids[0]:
            rec = discovery.plan_record(plan, "plan")
            if rec is not None:
                entry.plans.append(rec)
        if report is not None and id(report) != entry.plan_ids[1]:
            rec = discovery.plan_record(report, "report")
            if rec is not None:
                entry.plans.append(rec)
        entry.plan_ids = ids


def _check_started(entry: Entry) -> None:
    if entry.starting:
        raise Conflict(f"{entry.name} is still starting: try again once it runs")


def _same_place(address: str) -> str:
    return discovery._same_place(address)


def _scheduler_keys(address: str, scheduler_id: Any) -> list[str]:
    """What identifies a scheduler among the sidebar's entries: its id, where known,
    and its address with localhost as 127.0.0.1."""
    keys = [f"address:{_same_place(address)}"]
    if isinstance(scheduler_id, str) and scheduler_id:
        keys.insert(0, f"id:{scheduler_id}")
    return keys


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _host_of(address: str) -> str:
    return address.split("://", 1)[-1]


def _kernel_name(reg: dict[str, Any], path: str | None) -> str:
    if path:
        return os.path.basename(path)
    if reg.get("kernel_id"):
        return f"Kernel {str(reg['kernel_id'])[:8]}"
    return f"Process {reg.get('pid')}"


def _security_from(reg: dict[str, Any]) -> Any:
    return discovery.security_of(reg)


def _close_quietly(mesh: Mesh | None) -> None:
    if mesh is None:
        return
    try:
        mesh.close()
    except Exception:
        pass


def _merge_plans(entry: Entry, reg: dict[str, Any]) -> None:
    """Add the router plans a kernel's registration lists to ``entry`` (once each),
    keeping the newest of all. A mesh that several notebooks use gets each one's plans
    in turn: appended, the last notebook's pushed the others' newest out of the short
    list, whatever their times."""
    new: list[dict[str, Any]] = []
    for rec in reg.get("plans") or []:
        if isinstance(rec, dict) and rec not in entry.plans and rec not in new:
            new.append(rec)
    if not new:
        return

    def when(rec: dict[str, Any]) -> float:
        at = rec.get("at")
        try:
            t = float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) \
                else -math.inf
        except OverflowError:  # (an integer past float's range: a broken file)
            return -math.inf
        return t if math.isfinite(t) else -math.inf

    merged = sorted([*entry.plans, *new], key=when)  # (stable: equal times keep order)
    entry.plans.clear()
    entry.plans.extend(merged[-(entry.plans.maxlen or len(merged)):])


def _one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
