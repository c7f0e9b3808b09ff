"""What :class:`~jupyter_mesh.Mesh` calls: explain, compute, route and submit."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import pickle
import sys
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import dask
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph
from dask.utils import funcname

from .. import _config, _state, progress
from ..errors import (
    MeshError,
    MeshFallbackWarning,
    callers_level,
    check_flag,
    shorten_ours,
)
from ..inventory import Inventory, format_ms
from ..targets import Target, allowed_targets, site_resource
from ._device import ANY_BACKEND, SubmitCall
from ._scheduler import (
    EVENT_TOPIC,
    ROUTE_HANDLER,
    ROUTE_STREAM,
    SETTLE_HANDLER,
    STATUS_HANDLER,
)
from .calibrate import format_rate
from .classify import (
    CAPABILITIES,
    GraphModel,
    OpInfo,
    _collection_graph,
    model_graph,
    native_backends,
)
from .cost import (
    CostModel,
    Links,
    build_pools,
    configured_dependency_latency,
    configured_task_overhead,
    network_bandwidth_auto,
    network_latency_auto,
    reshared,
)
from .history import learn_weight
from .layers import (
    LayerPlan,
    model_layers,
    plan_layers,
    rewrite_layers,
    submission,
    use_layer_plan,
)
from .placement import PLAIN_SITE, allowed_pools, no_site, parse_route_or_error, plan_model
from .plan import Plan, PlanModel, Report
from .rewrite import refuse_p2p_at_a_site, rewrite
from .rewrite import submission as task_submission

if TYPE_CHECKING:
    from distributed.core import PooledRPCCall, rpc

    from ..mesh import Mesh


class FallbackNotices:
    """Fallbacks that no waiting compute reports, shown in the notebook as they happen.

    A routed ``compute`` warns when it ends. Data persisted by a routed ``persist()``
    and recomputed later (a worker holding it died), and tasks of ``mesh.submit``, have
    no compute waiting for them: the scheduler plugin publishes their fallbacks (and
    failures) as Dask events (:data:`EVENT_TOPIC`), and this mesh's client warns for
    those of its own plans (a shared scheduler has other notebooks' plans too).
    """

    #: plan ids remembered (the scheduler keeps about as many)
    KEEP = 1024

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.plans: dict[str, None] = {}
        #: plans a compute waits for now (it reports their fallbacks itself)
        self.waiting: set[str] = set()
        self.seen: set[tuple[str, str]] = set()
        self.received = 0
        #: what was announced: dicts with ``plan``, ``message``, ``failed``, ``time``
        self.events: list[dict[str, Any]] = []
        #: events of plans a compute waits for, until it says which it reported
        self.held: dict[str, list[tuple[Any, str, bool]]] = {}
        self._client: Any = None
        self._lock = threading.Lock()  # handle() runs on the client's event loop

    @classmethod
    def of(cls, mesh: Mesh) -> FallbackNotices:
        notices = mesh.__dict__.get("_fallback_notices")
        if notices is None:
            notices = mesh.__dict__["_fallback_notices"] = cls(mesh)
        return notices

    def track(self, plan_id: str) -> None:
        client = self.mesh.client
        if self._client is not client:  # once per client (a reconnect makes a new one)
            client.subscribe_topic(EVENT_TOPIC, self.handle)
            self._client = client
        self.plans[plan_id] = None
        while len(self.plans) > self.KEEP:
            del self.plans[next(iter(self.plans))]

    def reported(self, plan_id: str, messages: list[str]) -> list[str]:
        """A compute that waited for ``plan_id`` ended, having warned of ``messages``
        itself: their events (arriving now or later) are not shown again. Events of it
        that came while it waited and that it did not report (a fallback while its
        results were being fetched, after it asked for its status) are shown now; they
        are returned."""
        with self._lock:
            self.seen.update((plan_id, m) for m in messages)
            self.waiting.discard(plan_id)  # after: an event in between is seen already
            late = [e for e in self.held.pop(plan_id, []) if (plan_id, e[1]) not in self.seen]
            while len(self.seen) > self.KEEP:
                self.seen.pop()
        for stamp, message, failed in late:
            self._announce(plan_id, stamp, message, failed)
        return [message for _, message, _ in late]

    def forget(self, plan_id: str) -> None:
        """A compute of ``plan_id`` failed or was stopped, saying so itself: no event
        of it is shown (its plan's "cannot finish" may arrive after the error)."""
        with self._lock:
            self.plans.pop(plan_id, None)
            self.waiting.discard(plan_id)
            self.held.pop(plan_id, None)

    def handle(self, event: Any) -> None:
        """A Dask event handler (the client's event loop): ``(timestamp, msg)``."""
        try:
            stamp, msg = event
            plan, message = msg["plan"], str(msg["message"])
        except (TypeError, ValueError, KeyError):
            return
        if plan not in self.plans:
            return
        self.received += 1  # this mesh's, shown or not (tests wait for it)
        failed = bool(msg.get("failed"))
        with self._lock:
            if plan in self.waiting:  # its compute reports it, or hands it back
                self.held.setdefault(plan, []).append((stamp, message, failed))
                return
            if (plan, message) in self.seen:
                return
        self._announce(plan, stamp, message, failed)

    def _announce(self, plan: str, stamp: Any, message: str, failed: bool) -> None:
        self.events.append({"plan": plan, "message": message, "failed": failed,
                            "time": stamp})
        del self.events[:-100]
        if failed and plan.startswith(SUBMIT_PLAN):
            # a mesh.submit future fails with this very message where its result is
            # asked for: said there once, not twice
            return
        what = ("a routed computation cannot finish" if failed
                else "jupyter_mesh fallback")
        # in a context of its own: the client's event loop thread runs this handler in
        # a copy of the context of the cell that made the mesh, and ipykernel sends
        # output to the cell of that context (long over: JupyterLab shows nothing
        # there); in no cell's context it goes to the kernel's latest request, as a
        # thread's of the user's own does
        contextvars.Context().run(
            warnings.warn_explicit, f"{what}: {message}", MeshFallbackWarning,
            "<jupyter_mesh scheduler>", 0, module="jupyter_mesh",
            registry={})  # each event once, never deduplicated


#: the start of the plan id of a mesh.submit's task (see _register_submit)
SUBMIT_PLAN = "submit-"


def _check_site(site: Any) -> str | None:
    if site is None:
        return None
    if not isinstance(site, str) or not site:
        raise MeshError(f"site must be a site name such as 'local', not {site!r}")
    return site


def _check_off(route: Any, site: str | None, pin: Any) -> None:
    """MeshError for a constraint that route='off' could not keep."""
    for name, given in (("site=", site is not None), ("pin=", bool(pin))):
        if route == "off" and given:
            raise MeshError(f"{name} needs routing: with route='off' Dask places tasks "
                            f"anywhere; use route='auto' or a target with {name}")


def _pin_pairs(pin: Any) -> list[tuple[Any, Any]]:
    if isinstance(pin, dict):
        pairs = []
        for where, colls in pin.items():
            for c in colls if isinstance(colls, (list, tuple)) else [colls]:
                pairs.append((c, where))
        return pairs
    if isinstance(pin, (list, tuple)) and all(
            isinstance(p, tuple) and len(p) == 2 for p in pin):
        return list(pin)
    raise MeshError("pin takes {site: collection or list of collections} (e.g. "
                    "pin={'edge-lab': x}) or a list of (collection, site) pairs")


def apply_pins(model: Any, pin: Any, pools: list[Any]) -> None:
    """Pin the data of input collections to sites: ``{site: collection(s)}``.

    The tasks that produce a pinned collection run at its site, and so does every task
    that reads them (data pinned to a site never leaves it; only the results you ask
    for come back to you)."""
    if not pin:
        return
    sites = {p.site for p in pools}
    index = {k: i for i, k in enumerate(model.keys)}
    for coll, where in _pin_pairs(pin):
        if not dask.is_dask_collection(coll):
            raise MeshError(f"pin needs Dask collections, not {type(coll).__name__}")
        where = _check_site(where)
        if where not in sites:
            raise MeshError(f"no worker at site {where!r} to pin data to: the mesh has "
                            f"sites {', '.join(sorted(sites)) or 'none'}")
        keys = list(dask.core.flatten(coll.__dask_keys__()))
        idx = [index[k] for k in keys if k in index]
        if not idx:
            if _persisted(coll):
                raise MeshError(
                    "a pinned collection is persisted already: its data is where Dask "
                    "put it, which pin= cannot choose; pin the collection before persist, "
                    "or compute with site= to keep all of it at one site")
            raise MeshError("a pinned collection is not an input of this computation: "
                            "pin the collections it is computed from (pin={'edge': x} "
                            "where y is computed from x)")
        for i in idx:
            old = model.pins.get(i)
            if old is not None and old != where:
                raise MeshError(f"data pinned to two sites: {old!r} and {where!r}: pin each "
                                f"collection to one site (data lives at one place)")
            model.pins[i] = where


def explain(mesh: Mesh, collections: tuple[Any, ...], route: Any = "auto",
            site: str | None = None, pin: Any = None) -> Plan[PlanModel]:
    route = parse_route_or_error(route)
    site = _check_site(site)
    _check_off(route, site, pin)
    if not collections:
        raise MeshError("nothing to explain: pass one or more Dask collections")
    colls, _ = _unpacked(collections)
    if not colls:
        raise MeshError(f"nothing to explain: no Dask collection among the arguments "
                        f"({', '.join(type(c).__name__ for c in collections)})")
    plan = _plan_collections(mesh, _finalized(colls, pin), route, site, pin)
    mesh.last_plan = plan
    _state.notify("plan", mesh)  # (the sidebar lists it)
    return plan


def _unpacked(args: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any]:
    """The Dask collections among ``args`` (in lists, tuples, dicts and sets too, as
    ``dask.compute`` finds them; each once), and the function that puts their results
    back in the arguments' places."""
    from dask.base import unpack_collections

    colls, repack = unpack_collections(*args, traverse=True)
    return tuple(colls), repack


class _Finalized:
    """A collection built as a Dask expression (a DataFrame) as ``dask.compute`` runs
    it: Dask's expression optimization (column projection, predicate pushdown, fused
    partitions: unoptimized, a parquet column's sum read every column, in twice the
    tasks) and its finalize step, in one graph whose one output is the result. (A
    collection optimized on its own and computed again fails in Dask for some, e.g.
    ``df[df.v > df.v.mean()].k.sum()``.)"""

    def __init__(self, c: Any) -> None:
        from dask._expr import FinalizeCompute
        from dask.base import collections_to_expr

        expr = FinalizeCompute(collections_to_expr([c], True)).optimize()
        self._keys = list(dask.core.flatten(expr.__dask_keys__()))
        self._graph = expr.__dask_graph__()

    def __dask_graph__(self) -> Any:
        return self._graph

    def __dask_keys__(self) -> list[Any]:
        return self._keys

    def __dask_postcompute__(self) -> tuple[Any, tuple[()]]:
        return _first, ()


def _first(results: Any) -> Any:
    return results[0]


def _finalized(collections: tuple[Any, ...], pin: Any) -> tuple[Any, ...]:
    """Each DataFrame collection as :class:`_Finalized` (arrays, bags and delayed
    values as they are, a persisted delayed value read by a task: see :func:`_held`);
    with ``pin=`` no DataFrame finalized: pins name the collections' own keys."""
    if pin is not None:
        return tuple(_held(c) for c in collections)
    return tuple(_Finalized(c) if _is_frame(c) else _held(c) for c in collections)


def persisted(value: Any) -> Any:
    """A task that hands over a persisted delayed value (see :func:`_held`)."""
    return value


def _persisted(c: Any) -> bool:
    """Whether every node of ``c``'s graph is a future: results held on the workers."""
    from distributed import Future

    graph = dict(c.__dask_graph__() or {})
    return bool(graph) and all(isinstance(v, Future) for v in graph.values())


def _held(c: Any) -> Any:
    """A persisted delayed value or bag item (its graph: its key and the future that
    holds its result) as a task that reads it: Dask's graph of it has no task to plan
    or run (the router found "no task for key"); other collections as they are."""
    from dask.delayed import Delayed

    held: tuple[type, ...] = (Delayed,)
    if "dask.bag" in sys.modules:  # (a bag's reduction: b.sum(), b.count())
        from dask.bag import Item

        held = (Delayed, Item)
    if not isinstance(c, held) or not _persisted(c):
        return c
    from dask._task_spec import Task, TaskRef

    # (built here: dask.delayed of an Item finalizes it in a task of its own first)
    (key,) = cast(Any, c).__dask_keys__()
    name = f"persisted-{tokenize(key)}"
    task = Task(name, persisted, TaskRef(cast(Any, key)))
    graph = HighLevelGraph.from_collections(name, {name: task}, dependencies=[cast(Any, c)])
    return Delayed(name, graph)


def _is_frame(c: Any) -> bool:
    """A DataFrame, Series, Index or Scalar of ``dask.dataframe`` or a subclass of one
    (dask_cudf's, dask_geopandas'): built as an expression (a delayed value has an
    expression too, and stays as it is)."""
    if "dask.dataframe" not in sys.modules:  # (no frame without it)
        return False
    try:
        from dask.dataframe.dask_expr._collection import FrameBase
    except Exception:
        return False
    return isinstance(c, FrameBase)


def _plan_collections(mesh: Mesh, collections: tuple[Any, ...], route: Any,
                      site: str | None, pin: Any) -> Plan[PlanModel]:
    """Model and place: per layer above ``mesh.router.layer-plan-threshold`` tasks
    (unless data is pinned: pins are per task), else per task."""
    graph, keys = _collection_graph(collections)  # validates the inputs first
    return _plan_graph(mesh, graph, keys, route, site, pin)


def _no_live_workers(mesh: Mesh, what: str, again: str) -> MeshError:
    """The mesh has no live worker: how to get one."""
    add = ("mesh.scale(cpu=1)" if mesh.owns_cluster
           else f"jupyter-mesh worker {mesh.address} on a machine of the mesh")
    return MeshError(f"no live workers to {what}: add one ({add}), or wait for the "
                     f"mesh's to come back, then {again} again")


def _live_inventory(mesh: Mesh) -> Any:
    """The mesh's inventory; where it lists no worker now but had some (a worker killed
    for its memory, restarting under its nanny, as plain Dask waits for), up to
    ``mesh.fallback-timeout`` seconds for one to come back."""
    inv = mesh.inventory()
    if mesh.owns_cluster:  # a nanny that restarts a worker (none whose nanny stopped)
        spec = getattr(mesh.cluster, "worker_spec", None) or {}
        expected = len(spec) > len(mesh._dead_workers())
    else:
        expected = mesh.__dict__.get("_router_saw_workers", False)
    if len(inv):
        mesh.__dict__["_router_saw_workers"] = True
    elif expected:
        deadline = time.monotonic() + _config.get_seconds("fallback-timeout")
        while not len(inv) and time.monotonic() < deadline:
            time.sleep(0.2)
            inv = mesh.inventory()
    # plain Dask workers (joined without the mesh's worker plugin) advertise none of
    # the resources routed tasks are restricted by: routed work goes to the mesh's own
    # workers; a mesh of plain workers alone runs only what restricts nothing
    managed = [d for d in inv if d.managed]
    if managed and len(managed) < len(inv):
        inv = Inventory(managed, inv.address, inv.dashboard)
    return inv


def _refuse_plain(inv: Any, what: str) -> None:
    """A MeshError where every worker is a plain Dask worker and ``what`` (a forced
    target, a site, a capability) would restrict tasks: they waited for ever, or for the
    fallback's timeout with a false word of a lost worker."""
    if len(inv) and not any(d.managed for d in inv):
        raise MeshError(
            f"{what} needs the mesh's own workers, and these are plain Dask workers "
            f"(started without jupyter_mesh's worker plugin), to which routed tasks cannot "
            f"be kept: start them with jupyter-mesh worker ADDRESS (or dask worker ADDRESS "
            f"--preload jupyter_mesh.worker), or compute with route='off'")


#: annotations of the user's (``dask.annotate``) that place tasks: the router places
#: them itself
_PLACING = ("workers", "resources", "allow_other_workers")


def _warn_placing_annotations(graph: Any) -> None:
    """Say once per routed computation that the graph's own placement annotations are
    not followed (Dask's fusion drops them anyway, unless fusion is off)."""
    layers = getattr(graph, "layers", None) or {}
    found = sorted({k for layer in layers.values()
                    for k in (getattr(layer, "annotations", None) or {}) if k in _PLACING})
    if found:
        warnings.warn(
            f"jupyter_mesh: the router places the tasks: the graph's dask.annotate("
            f"{', '.join(f'{k}=' for k in found)}) is not followed (route='off' follows it)",
            UserWarning, stacklevel=callers_level())


def _plan_graph(mesh: Mesh, graph: Any, keys: list[Any], route: Any,
                site: str | None = None, pin: Any = None) -> Plan[PlanModel]:
    if route != "off":
        _warn_placing_annotations(graph)
    try:
        return _place_graph(mesh, graph, keys, route, site, pin)
    except BaseException as exc:
        # a mesh closed from another thread while it planned (the first plan measures
        # Dask's costs on the workers): one line, as once the tasks run
        _say_why(mesh, exc)
        raise


def _place_graph(mesh: Mesh, graph: Any, keys: list[Any], route: Any,
                 site: str | None = None, pin: Any = None) -> Plan[PlanModel]:
    inv = _live_inventory(mesh)
    if not len(inv):
        raise _no_live_workers(mesh, "route this computation to", "compute")
    if route not in ("auto", "off"):
        _refuse_plain(inv, f"route={route}")
    if site:
        _refuse_plain(inv, f"site={site!r}")
    if pin:
        _refuse_plain(inv, "pin=")
    devices = list(inv)
    pools = build_pools(devices)
    plan: Any
    if not pin and use_layer_plan(graph):
        layered = model_layers(graph, keys)
        cost = cost_model(mesh, pools, devices, route)
        plan = _noted(plan_layers(layered, pools, route, site=site, cost=cost), cost)
    else:
        model = model_graph(graph, keys)
        apply_pins(model, pin, pools)
        cost = cost_model(mesh, pools, devices, route)
        plan = _noted(plan_model(model, pools, route, site=site, cost=cost), cost)
    if site or pin:
        refuse_p2p_at_a_site(plan.model)
    # the workers' names for the report (run_plan asks again only for a worker that
    # joined since)
    plan.worker_names = {d.worker: d.name or d.worker for d in devices}
    plan.worker_threads = {d.name or d.worker: d.nthreads for d in devices if d.nthreads}
    return plan


def cost_model(mesh: Mesh, pools: list[Any], devices: list[Any], route: Any = "auto"
               ) -> CostModel:
    """The cost model for planning on this live mesh: where ``mesh.task-overhead``,
    ``mesh.dependency-latency``, ``mesh.links.network-latency`` or
    ``mesh.links.network-bandwidth`` is ``auto``, the figure measured on the mesh (at its first routed plan, and again when its workers change;
    see ``Mesh.calibrate``); with ``mesh.router.learn`` above 0, the task times its
    earlier computations measured (see history.RunHistory)."""
    cost = _measured_cost_model(mesh, pools, devices, route)
    if learn_weight() > 0:
        cost.history = getattr(mesh, "history", None)
    return cost


def _measured_cost_model(mesh: Mesh, pools: list[Any], devices: list[Any], route: Any
                         ) -> CostModel:
    auto_overhead = configured_task_overhead() is None
    auto_dependency = configured_dependency_latency() is None
    auto_latency = network_latency_auto()
    auto_bandwidth = network_bandwidth_auto()
    if (not (auto_overhead or auto_dependency or auto_latency or auto_bandwidth)
            or not devices or route == "off"):
        return CostModel(pools)
    try:
        cal = mesh._calibration_for(devices)
    except MeshError as exc:
        if mesh.closed:  # (from another thread, while it measured): nothing to plan for
            raise
        # planning must not fail for want of a measurement: the defaults, with a word
        warnings.warn(f"jupyter_mesh: {exc}; planning with the default costs",
                      RuntimeWarning, stacklevel=callers_level())
        cal = None
    if cal is None:  # failed now, or before on these workers (and not tried again)
        cost = CostModel(pools)
        cost.uncalibrated = True
        return cost
    links = Links.from_config()
    if auto_latency and cal.network_latency is not None:
        links = dataclasses.replace(links, network_latency=cal.network_latency)
    if auto_bandwidth and cal.network_bandwidth is not None:
        links = dataclasses.replace(links, network_bandwidth=cal.network_bandwidth)
    cost = CostModel(pools, links, task_overhead=cal.task_overhead if auto_overhead else None,
                     dependency_latency=cal.dependency_latency if auto_dependency else None)
    if auto_overhead:
        cost.task_interval = cal.task_interval
        cost.cpu_per_task = getattr(cal, "cpu_per_task", 0.0)
        cost.host_cores = getattr(cal, "host_cores", None)
    cost.calibration = cal
    return cost


XLA_NOTE = " (a JAX worker counts one per core it may use: XLA computes on all of them)"


def _noted(plan: Any, cost: CostModel) -> Any:
    if not plan.ntasks:
        # (a persisted collection: a plan of no tasks, an empty table, and word of
        # Dask's costs that nothing pays, said nothing of why)
        plan.notes.append("nothing to run: the results are held on the workers already "
                          "(persisted earlier), and Dask hands them over")
        return plan
    cal = cost.calibration
    # the workers the plan uses share their hosts' cores among themselves only (a
    # worker it leaves idle takes no share)
    used = set(plan.pool_of)
    pools = reshared(cost.pools, used) or cost.pools
    pools = [p for i, p in enumerate(pools) if i in used]
    shared = sorted({s for p in pools for s in p.shared})
    if shared and plan.routed:
        for host, cores, threads in shared:
            xla = any(p.backend == "jax" and (host, cores, threads) in p.shared
                      for p in pools)
            plan.notes.append(
                f"the CPU workers on {host} run {threads} threads on {cores} "
                f"core{'s' * (cores != 1)}"
                f"{XLA_NOTE * xla}"
                f": planned at {cores}/{threads} of the speed each measured alone")
    if cost.uncalibrated and plan.routed:
        plan.notes.append(
            f"Dask's own costs could not be measured on this mesh: planned with "
            f"{format_ms(cost.task_overhead)} per task and "
            f"{format_ms(cost.links.network_latency)} per transfer between workers "
            f"(mesh.calibrate() tries again)")
    history = cost.history
    if history is not None and len(history) and plan.routed:
        line = history.note(plan)
        if line:
            plan.notes.append(line)
    if cal is not None and plan.routed:
        what = []
        if configured_task_overhead() is None:
            what.append(f"{format_ms(cost.task_overhead)} of Dask dispatch per task")
        if configured_dependency_latency() is None:
            what.append(f"{format_ms(cost.dependency_latency)} from a task's end to the "
                        f"start of one waiting for it")
        if network_latency_auto() and cal.network_latency is not None:
            what.append(f"{format_ms(cal.network_latency)} more per transfer between "
                        f"workers")
        if network_bandwidth_auto() and cal.network_bandwidth is not None:
            what.append(f"{format_rate(cal.network_bandwidth)} between workers")
        if what:
            said = what[0] if len(what) == 1 else f"{', '.join(what[:-1])} and {what[-1]}"
            plan.notes.append(f"measured on this mesh: {said} "
                              f"(mesh.calibrate() measures again)")
    return plan


def check_fallback(fallback: Any) -> None:
    """MeshError unless ``fallback`` is True or False."""
    if not isinstance(fallback, bool):
        raise MeshError(f"fallback={fallback!r}: use True (re-route the tasks of a kind "
                        f"lost mid-computation, the default) or False (fail instead)")


def compute(mesh: Mesh, collections: tuple[Any, ...], route: Any = "auto",
            fallback: bool = True, site: str | None = None,
            pin: Any = None) -> tuple[Any, ...]:
    sink = cell_sink(mesh)
    route = parse_route_or_error(route)
    check_fallback(fallback)
    site = _check_site(site)
    # like dask.compute: collections in lists, tuples and dicts are computed in place,
    # and other values come back as they are
    args = collections
    collections, repack = _unpacked(args)
    _check_off(route, site, pin)
    _check_settings()  # a bad setting fails before anything runs or changes
    if not collections:
        # nothing for the mesh to do (as dask.compute, the values back); no earlier
        # plan or report may pass for this computation's
        mesh.last_plan = mesh.last_report = None
        return tuple(args)
    _collection_graph(collections)  # validates the inputs first
    if route == "off":
        # nothing is routed, so nothing is reported: an earlier report must not pass
        # for this computation's
        mesh.last_plan = mesh.last_report = None
        watch = progress.FuturesWatch(mesh, None, "route=off")
        # (in Dask's order, handed back in the caller's: see dask_order)
        order = dask_order(collections)
        try:
            futures = _unordered(mesh.client.compute([collections[i] for i in order]),
                                 order)
        except Exception as exc:
            _say_why(mesh, exc)
            raise
        try:
            # the bar's wait checks for a mesh left without workers too
            watch.started(futures, check=_no_worker_check(mesh))
            _wait_unrouted(mesh, futures)
            gathered = tuple(mesh.client.gather(futures))
        except BaseException as exc:
            # Ctrl-C or a failure: the scheduler drops the rest of the computation
            for future in futures:
                future.release()
            watch.stopped(aborted=True)
            _say_why(mesh, exc)
            raise
        # released now, as Dask's compute releases them: the wait's timeouts leave
        # cycles of frames that hold them, and the results stayed on the workers until
        # Python's cycle collector ran
        for future in futures:
            future.release()
        watch.stopped()
        return tuple(repack(gathered))
    collections = _finalized(collections, pin)
    plan = _plan_collections(mesh, collections, route, site, pin)
    model = plan.model
    values = run_plan(mesh, plan, fallback, sink=sink)
    out = []
    by_key = dict(zip(model.outputs, values, strict=False))
    for c in collections:
        finalize, extra = c.__dask_postcompute__()
        out.append(finalize(_nest(c.__dask_keys__(), by_key), *extra))
    return tuple(repack(out))


def _say_why(mesh: Mesh, exc: BaseException | None) -> None:
    """Where a computation failed for a reason Dask's error does not say: a mesh closed
    meanwhile (from another thread: Dask's client fails in its own ways) is a one-line
    MeshError; workers that died running a task get a note on Dask's KilledWorker."""
    from distributed.scheduler import KilledWorker

    if mesh.closed and isinstance(exc, Exception):  # (whatever the closing made fail)
        raise MeshError(f"the mesh at {mesh.address} was closed while this computation "
                        f"ran (mesh.close or %mesh close, in another thread or cell): "
                        f"start or connect a mesh, then compute again") from None
    from asyncio import CancelledError as AsyncCancelled
    from concurrent.futures import CancelledError

    from distributed.comm.core import CommClosedError

    if isinstance(exc, (CancelledError, AsyncCancelled, CommClosedError)):
        # its futures cancelled, "scheduler-connection-lost": the mesh was stopped from
        # outside this kernel (the Mesh sidebar, another notebook), or its scheduler
        # died; Dask's traceback says to re-run the work, on a mesh that is gone
        try:
            mesh._check_reachable()
        except MeshError as gone:
            raise MeshError(f"the mesh's scheduler went away while this computation ran "
                            f"(stopped from the Mesh sidebar or another notebook, or it "
                            f"died): {gone}") from None
    if (isinstance(exc, KilledWorker) and hasattr(exc, "add_note")  # (Python 3.11+)
            and not getattr(exc, "_jupyter_mesh_noted", False)):
        exc._jupyter_mesh_noted = True  # type: ignore[attr-defined]
        exc.add_note("jupyter_mesh: the workers that ran this task died while running it; "
                     "out of memory is the usual cause: use smaller chunks, or fewer "
                     "workers with more memory each (memory_limit=, or jupyter-mesh "
                     "worker --memory-limit)")


def dask_order(collections: Sequence[Any]) -> list[int]:
    """The order in which to hand ``collections`` to Dask together so that its results
    come back in that order: Dask (2026.8) puts the collections with one graph
    optimizer together (``_HLGExprSequence._tune_down``) and so returns the results of
    ``(array, bag, array)`` as ``(array, array, bag)``, paired with the wrong
    collections (``dask.compute`` gives the bag's sum for the second array). Grouped as
    Dask groups them, in the order each group first appears, nothing moves."""
    from dask._expr import Expr

    group: dict[Any, int] = {}
    rank = []
    for c in collections:
        key = (None if isinstance(getattr(c, "expr", None), Expr)
               else getattr(c, "__dask_optimize__", None))
        try:
            hash(key)
        except TypeError:
            key = id(key)
        rank.append(group.setdefault(key, len(group)))
    return sorted(range(len(rank)), key=rank.__getitem__)


def _unordered(items: Sequence[Any], order: list[int]) -> list[Any]:
    """``items``, given in ``order`` (see :func:`dask_order`), back in the caller's."""
    out: list[Any] = [None] * len(order)
    for item, i in zip(items, order, strict=True):
        out[i] = item
    return out


def _nest(keys: Any, values: dict[Any, Any]) -> Any:
    if isinstance(keys, list):
        return [_nest(k, values) for k in keys]
    return values[keys]


def _check_settings() -> float:
    """Read the settings a routed computation needs after it has started, so that a bad
    one fails before it plans, runs, or replaces the mesh's last plan and report (a
    ``MeshConfigError`` naming the key); returns ``mesh.router.learn``."""
    progress.progress_after()
    _config.get_seconds("fallback-timeout")  # read as the plan's rewrite reads it
    return learn_weight()


#: bytes a task of a graph materialized by the router takes when sent (a routed
#: graph of 10^5 tasks that restricts nothing sent 13.4 MB)
_MATERIALIZED_BYTES = 200
_THRESHOLD_LOCK = threading.Lock()


def cell_sink(mesh: Mesh) -> list[Any] | None:
    """The report list of the innermost ``%%mesh`` cell running now: the one that
    shows the report of a computation called now (a cell that starts while it runs, a
    thread's computation still going, does not: it is not that cell's work)."""
    sinks = getattr(mesh, "report_sinks", None)
    return sinks[-1] if sinks else None


def run_plan(mesh: Mesh, plan: Plan[PlanModel], fallback: bool = True, gather: bool = True,
             sink: list[Any] | None = None) -> list[Any]:
    """Submit a plan's rewritten graph and wait for its outputs (a list, by key): their
    values, or with ``gather=False`` their futures (the data stays on the workers).
    ``sink``: where its report goes (see :func:`cell_sink`)."""
    client = mesh.client
    weight = _check_settings()  # a bad setting fails before anything runs or changes
    # a computation that fails or is interrupted leaves no report: the previous
    # computation's must not pass for this one's, next to this one's plan
    mesh.last_plan, mesh.last_report = plan, None
    _state.notify("plan", mesh)
    graph: Any
    # kept results (a persist): every task hands over host arrays, see rewrite
    if isinstance(plan, LayerPlan):
        routed = rewrite_layers(plan, fallback=fallback, host_results=not gather)
        # (one that restricts nothing comes materialized and fused, as a plan per task)
        graph = (submission(routed) if isinstance(routed.graph, HighLevelGraph)
                 else task_submission(routed))
    else:  # every other plan is made per task
        routed = rewrite(cast("Plan[GraphModel]", plan), fallback=fallback,
                         host_results=not gather)
        graph = task_submission(routed)
    t0 = time.perf_counter()
    notices = FallbackNotices.of(mesh)
    try:
        notices.track(routed.plan_id)
        # this compute reports its fallbacks itself, from the moment its tasks can run
        # (submitting a large graph takes a while, and they run meanwhile)
        notices.waiting.add(routed.plan_id)
        # the plan's restrictions go ahead of the graph, on the same stream
        _register(mesh, routed.payload())
        groups = plan.assignment()
        if groups is not None:
            # a batch of tasks runs under a key of its own: its members' target
            for sk, members in routed.fused.items():
                if sk not in groups and members:
                    groups[sk] = groups.get(members[-1], "other")
        # (the scheduler plugin keeps the task stream's index for the report)
        title = f"route={plan.route}"
        if routed.fused or routed.fused_layers:
            # the bar counts Dask's tasks as submitted, the plan and its report the ops'
            title += (f": Dask's tasks as submitted (a fused chain or batch is one; "
                      f"the plan's {plan.ntasks} count each op)")
        watch = progress.FuturesWatch(mesh, groups, title, timeline=False)
        if isinstance(plan, LayerPlan) and not isinstance(routed.graph, HighLevelGraph):
            # materialized here (a plan that restricts nothing, fused as Dask would):
            # Dask's "Sending large graph ... embed the data" warning would blame the
            # user for the bytes of that, which the user's own compute does not send;
            # it still warns past them (data the graph carries)
            import dask.config
            from dask.utils import parse_bytes

            key = "distributed.admin.large-graph-warning-threshold"
            # (one at a time: dask.config.set puts back what it found, and two threads
            # interleaved would leave one's raised value for good)
            with _THRESHOLD_LOCK:
                limit = parse_bytes(dask.config.get(key)) + _MATERIALIZED_BYTES * plan.ntasks
                with dask.config.set({key: limit}), _Unsent("this computation"):
                    futures = client.get(graph, routed.keys, sync=False)
        else:
            with _Unsent("this computation"):
                futures = client.get(graph, routed.keys, sync=False)
    except BaseException:
        notices.forget(routed.plan_id)
        _say_why(mesh, sys.exc_info()[1])  # (a mesh closed meanwhile: one line)
        raise
    try:
        watch.started(futures)  # a bar per target once past mesh.progress-after
        _wait(mesh, routed.plan_id, futures, fallback)
        # a persist's results are on the workers now; a compute's once they arrive
        wall = time.perf_counter() - t0
        # the values and what the scheduler knows of the run, asked for together
        values, (status, records, timeline) = _finish(
            mesh, routed.plan_id, futures if gather else None)
        if gather:
            wall = time.perf_counter() - t0
        else:
            values = futures
            # a persist gathers nothing that would raise: a task that failed (a kind
            # lost with fallback=False, an error in it) fails the persist now, as it
            # fails a compute, not later where its data is used
            erred = next((f for f in futures if f.status == "error"), None)
            if erred is not None:
                exc = erred.exception()
                raise MeshError((str(exc).strip().splitlines() or [type(exc).__name__])[0]
                                ) if isinstance(exc, MeshError) else exc
    except BaseException:
        # Ctrl-C or a failure: the scheduler drops the rest of the computation, as
        # after dask's own client.get (the traceback would keep the futures alive)
        from distributed.client import futures_of

        for future in futures_of(futures):
            future.release()
        watch.stopped(aborted=True)
        # the error (or Ctrl-C) says it all: no later warning for this computation
        notices.forget(routed.plan_id)
        _say_why(mesh, sys.exc_info()[1])
        raise
    watch.stopped()
    names = getattr(plan, "worker_names", None) or {}
    kinds: dict[str, str] = {}
    if any(addr not in names for addr, _, _ in records.values()):
        # a worker that joined since (the plan's names keep those that left)
        devices = list(mesh.inventory())
        names = {**names, **{d.worker: d.name or d.worker for d in devices}}
        kinds = {d.worker: d.kind for d in devices}
    report = Report(plan, records, wall, fallbacks=status.get("events", []),
                    worker_names=names, worker_kinds=kinds)
    report.timeline = timeline
    report.fused = routed.fused
    report.fused_layers = routed.fused_layers
    mesh.last_report = report
    _state.notify("report", mesh)
    history = getattr(mesh, "history", None)
    if weight > 0 and history is not None and not status.get("events"):
        # (a computation that fell back ran on other workers than it planned for)
        try:
            history.learn(plan, records, weight)
        except Exception:  # what was learned is a hint; the result is what counts
            logging.getLogger("jupyter_mesh").debug(
                "jupyter_mesh: learning from a routed computation failed", exc_info=True)
    if sink is not None:  # (a nested cell's outer cell does not show it)
        sink.append(report)
    for event in report.fallbacks:
        warnings.warn(f"jupyter_mesh fallback: {event}", MeshFallbackWarning,
                      stacklevel=callers_level())
    if status.get("known") is False:
        # the plan never reached the scheduler plugin (its handler failed there, and
        # logged why): Dask placed the tasks, the answer is the same
        warnings.warn(
            f"jupyter_mesh: the scheduler at {mesh.address} did not take this "
            f"computation's plan (its log says why): it ran unrouted, as Dask placed "
            f"it, and the report has no record of where", MeshFallbackWarning,
            stacklevel=callers_level())
    # a fallback that came while the results were fetched is shown now, and reported
    report.fallbacks.extend(notices.reported(routed.plan_id, report.fallbacks))
    if gather:
        _settle(mesh, futures, routed.keys)
    return list(values)


def _settle(mesh: Mesh, futures: Any, keys: list[Any]) -> None:
    """Release a finished routed computation's outputs, and have the scheduler forget
    them (and the tasks behind them) before this returns, so that the next graph with
    those keys (``y.compute()`` right after ``mesh.compute(y)``, from any client) gets
    its own tasks, not the routed ones (see ``RouterState.settle``). Outputs this
    client still holds otherwise (its own earlier futures) stay."""
    from distributed.client import futures_of

    client = mesh.client
    for future in futures_of(futures):
        future.release()
    scheduler = client.scheduler
    if scheduler is None:
        return

    async def settle() -> None:
        # the releases above have run on the client's loop by now
        free = [k for k in keys if k not in client.refcount]
        if free:
            await getattr(scheduler, SETTLE_HANDLER)(keys=free, client=client.id)

    try:
        client.sync(settle)
    except Exception:  # only a later graph's tasks are at stake, not this result
        logging.getLogger("jupyter_mesh").debug(
            "jupyter_mesh: releasing a routed computation's outputs failed", exc_info=True)


#: client -> the id of the scheduler that said it takes plans on the client's stream
#: (see ``_scheduler.ROUTE_STREAM``)
_ROUTE_STREAMS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _register(mesh: Mesh, payload: bytes) -> None:
    """Give the scheduler plugin a plan's restrictions (a pickled ``Routed.payload``).

    The first time for a client it asks (a round trip): MeshError where the scheduler
    does not route. After that it sends them on the client's batched stream, where the
    scheduler handles them before the graph the client sends next."""
    client = mesh.client
    scheduler = _scheduler(mesh)
    # (a client that reconnected may have another scheduler at the same address)
    sid = (getattr(client, "_scheduler_identity", None) or {}).get("id")
    if sid is not None and _ROUTE_STREAMS.get(client) == sid and client.status == "running":
        client._send_to_scheduler({"op": ROUTE_STREAM, "payload": payload})
        return
    try:
        done = client.sync(getattr(scheduler, ROUTE_HANDLER), payload=payload)
    except (OSError, asyncio.TimeoutError):
        # the connection, not the scheduler's answer (Dask's CommClosedError and its
        # "Timed out trying to connect" are OSErrors): it went away meanwhile
        raise _unreachable(mesh) from None
    except Exception as exc:
        raise MeshError(
            f"the scheduler at {mesh.address} does not route (is jupyter_mesh "
            f"installed there?): {exc}"
        ) from None
    if sid is not None and isinstance(done, dict) and done.get("stream") == ROUTE_STREAM:
        _ROUTE_STREAMS[client] = sid


def _scheduler(mesh: Mesh) -> rpc | PooledRPCCall:
    """The mesh client's connection to its scheduler (MeshError once it lost it)."""
    mesh._check_open()  # (closed meanwhile, in another thread: said as such)
    scheduler = mesh.client.scheduler
    if scheduler is None:
        raise _unreachable(mesh)
    return scheduler


def _unreachable(mesh: Mesh) -> MeshError:
    return MeshError(
        f"the scheduler at {mesh.address} is not reachable: run %mesh close, then "
        f"%mesh start or %mesh connect ADDRESS"
    )


def _wait(mesh: Mesh, plan_id: str, futures: list[Any], fallback: bool) -> None:
    from distributed.client import _wait as wait_async

    client = mesh.client
    status = getattr(_scheduler(mesh), STATUS_HANDLER)
    # a plan that restricts nothing leaves its tasks to Dask, which queues them for ever
    # where no worker is left; the scheduler plugin watches restricted tasks only
    check = _no_worker_check(mesh)
    while True:
        try:
            # this mesh's client, which need not be the default one
            client.sync(wait_async, futures, timeout=0.5 if not fallback else 2.0)
            return
        except TimeoutError:
            pass
        st = client.sync(status, plan_id=plan_id)
        if st.get("failed"):
            client.cancel(futures)
            raise MeshError(st["failed"])
        try:
            check()
        except MeshError:
            client.cancel(futures)
            raise


def _wait_unrouted(mesh: Mesh, futures: list[Any]) -> None:
    """Wait for an unrouted computation, as Dask does, except when the mesh has no
    worker left for ``mesh.fallback-timeout`` seconds: then fail with one line rather
    than wait for ever (a routed one fails so through the scheduler plugin)."""
    from distributed.client import _wait as wait_async

    client = mesh.client
    check = _no_worker_check(mesh)
    while True:
        try:
            client.sync(wait_async, futures, timeout=1.0)
            return
        except TimeoutError:
            pass
        check()


def _no_worker_check(mesh: Mesh) -> Any:
    """A check to call every second or so while waiting for an unrouted computation:
    it raises a one-line MeshError once the mesh has had no worker for
    ``mesh.fallback-timeout`` seconds."""
    timeout = _config.get_seconds("fallback-timeout")
    empty_since: list[float | None] = [None]

    def check() -> None:
        if mesh.client.scheduler_info(n_workers=1).get("n_workers", 1):
            empty_since[0] = None
            return
        now = time.monotonic()
        since = empty_since[0] = empty_since[0] or now
        if now - since >= timeout:
            from ._scheduler import lost_hint, no_worker_left

            try:
                events = mesh.client.get_events("all")
            except Exception:
                events = ()
            raise MeshError(no_worker_left(timeout, lost_hint(events)))

    return check


#: seconds a finished computation waits for its plan to reach the scheduler plugin
#: before it says the plan was not taken (see _finish)
STATUS_GRACE = 2.0


def _finish(mesh: Mesh, plan_id: str, futures: Any = None
            ) -> tuple[Any, tuple[dict[str, Any], dict[Any, tuple[str, str, float]],
                                  list[dict[str, Any]] | None]]:
    """Once the outputs are ready: their values (with ``futures``; else None), the
    plan's status on the scheduler with the records of what ran each key (they came to
    the scheduler with the tasks' ends), and the scheduler's task stream, all asked for
    at once (one round trip's wait)."""
    client = mesh.client
    scheduler = _scheduler(mesh)

    async def ask() -> list[Any]:
        calls = [getattr(scheduler, STATUS_HANDLER)(plan_id=plan_id, records=True)]
        if futures is not None:
            calls.append(client.gather(futures, asynchronous=True))
        return await asyncio.gather(*calls, return_exceptions=True)

    answers = client.sync(ask)
    values = None
    if futures is not None:
        values = answers[1]
        if isinstance(values, BaseException):
            from dask.utils import shorten_traceback

            # a task's error: the computation's, as client.gather raises it (the
            # frames of the modules Dask's admin.traceback.shorten names left out)
            with shorten_traceback():
                raise values
    status = answers[0]
    if isinstance(status, BaseException):
        raise status
    # a plan sent on the client's stream may not be there yet where nothing had to run
    # (outputs this client holds already): that stream flushes every few milliseconds,
    # and this question came on another connection
    deadline = time.monotonic() + STATUS_GRACE
    while status.get("known") is False and time.monotonic() < deadline:
        time.sleep(0.02)
        status = client.sync(getattr(scheduler, STATUS_HANDLER), plan_id=plan_id,
                             records=True)
    out: dict[Any, tuple[str, str, float]] = {}
    for rec in status.pop("records", None) or ():
        key, addr, backend, secs = rec
        out[key] = (addr, backend, secs)
    timeline = status.pop("timeline", None)
    return values, (status, out, timeline)


# ---------------------------------------------------------------- plain .compute()
#: what dask.compute handles itself (so they work inside ``with mesh.route(...)``), and
#: what it hands the scheduler (which the router, placing the tasks, does not take)
DASK_OWN = ("optimize_graph", "traverse")
SCHEDULER_OPTIONS = ("scheduler", "get", "retries", "workers", "resources",
                     "allow_other_workers", "priority", "fifo_timeout", "actors", "sync",
                     "num_workers", "pool", "key", "pure", "asynchronous")


def dask_options_refused(where: str, given: dict[str, Any],
                         takes: tuple[str, ...] = ()) -> MeshError:
    """The one line for options ``where`` does not take: Dask's (said where they go) or
    a typo of its own (said which it meant)."""
    import difflib

    names = ", ".join(f"{k}=" for k in sorted(given))
    typos = [k for k in given if k not in DASK_OWN and k not in SCHEDULER_OPTIONS]
    if typos and takes:
        # (Dask's own, too: optimise_graph= meant optimize_graph=, said where it goes next)
        near = difflib.get_close_matches(typos[0], (*takes, *DASK_OWN, *SCHEDULER_OPTIONS),
                                         n=1, cutoff=0.6)
        return MeshError(f"{where} takes {', '.join(f'{t}=' for t in takes)}, not "
                         f"{typos[0]}=" + (f": did you mean {near[0]}=?" if near else ""))
    if takes and all(k in DASK_OWN for k in given):
        return MeshError(f"{where} takes {', '.join(f'{t}=' for t in takes)}, not {names}: "
                         f"call dask.compute(..., {sorted(given)[0]}=...) inside "
                         f"`with mesh.route(...):`")
    if takes:  # mesh.compute: it routes under every route="..."
        return MeshError(f"{where} takes no {names}: the router places the tasks itself; "
                         f"for Dask's scheduler options (retries=, workers=, resources=...), "
                         f"call dask.compute(...) or mesh.client.compute(...) instead, "
                         f"outside any routed block")
    return MeshError(f"{where} takes no {names}: the router places the tasks itself; for "
                     f"Dask's scheduler options (retries=, workers=, resources=...), compute "
                     f"outside routing (leave the block, or %mesh route off)")


class _RoutedScheduler:
    """The Dask ``scheduler=`` callable that routes what plain ``.compute()`` submits.

    One object for the process (``ROUTES.scheduler``): it routes by the route in force
    when it is called (see :class:`_Routes`), so a copy of it that Dask's config keeps
    and puts back later (a ``dask.config.set`` block of the user's, a client that
    closes) never routes by a route that has ended, nor to a closed mesh: with no route
    in force it runs the graph as plain Dask would (the default client, else threads).
    """

    def __reduce__(self) -> Any:
        # A Nanny started while routing is on (%mesh start --replace, mesh.scale)
        # pickles dask's config into its worker: the worker gets no scheduler, as Dask
        # gives it when it drops a default client's, instead of failing to start.
        return (_no_scheduler, ())

    @staticmethod
    def _now() -> _Route | None:
        now = ROUTES.current()
        if now is None or now.route == "off" or getattr(now.mesh, "closed", False):
            return None
        return now

    def __call__(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        now = self._now()
        if now is None:
            return _plain_get()(dsk, keys, **kwargs)
        if kwargs:  # the scheduler's options (dask.compute's own it keeps for itself)
            raise dask_options_refused("a routed compute", kwargs)
        sink = cell_sink(now.mesh)
        # a task's error shows the user's .compute() and function, not the router's
        # frames between them (Dask's it leaves out itself)
        with shorten_ours(drop_first=True):
            _check_settings()
            graph = _graph_with_layers(dsk)
            flat = list(dask.core.flatten(keys)) if isinstance(keys, list) else [keys]
            plan = _plan_graph(now.mesh, graph, flat, now.route)
            values = dict(zip(plan.model.outputs,
                              run_plan(now.mesh, plan, now.fallback, sink=sink),
                              strict=False))
        return _nest(keys, values)

    def persist(self, collections: Any, optimize_graph: bool = True, **kwargs: Any) -> Any:
        """``.persist()`` inside ``mesh.route``: the routed results stay on the workers,
        as with Dask's own persist on a cluster (Dask asks a scheduler with a persist
        method to persist for it); it returns once they are there, with a report."""
        from dask.base import collections_to_expr

        if kwargs:
            raise MeshError(
                f"persist under routing takes no {', '.join(sorted(kwargs))}: the router "
                f"places the tasks; leave the block (or %mesh route off) to pass them"
            )
        single = not isinstance(collections, (tuple, list, set, frozenset))
        colls = [collections] if single else list(collections)
        now = self._now()
        if now is None:  # no route in force: as plain Dask persists
            from distributed.client import _get_global_client

            client = _get_global_client()
            if client is not None:
                return client.persist(collections, optimize_graph=optimize_graph)
            done = dask.persist(*colls, optimize_graph=optimize_graph, scheduler="threads")
            return done[0] if single else list(done)
        # a task's error shows the user's .persist() and function, as a compute's does
        # (Dask's compute shortens its own frames and its workers'; its persist not)
        from dask.utils import shorten_traceback

        with shorten_ours(drop_first=True), shorten_traceback():
            _check_settings()
            # (in Dask's order, handed back in the caller's: see dask_order)
            order = dask_order(colls)
            colls = [colls[i] for i in order]
            expr = collections_to_expr(colls, optimize_graph).optimize()
            keys = expr.__dask_keys__()
            plan = _plan_graph(now.mesh, _graph_with_layers(expr),
                               list(dask.core.flatten(keys)), now.route)
            futures = dict(zip(plan.model.outputs,
                               run_plan(now.mesh, plan, now.fallback, gather=False,
                                        sink=cell_sink(now.mesh)),
                               strict=False))
        out = [post({k: futures[k] for k in dask.core.flatten(ks)}, *args)
               for (post, args), ks in zip((c.__dask_postpersist__() for c in colls), keys,
                                           strict=True)]
        out = _unordered(out, order)
        return out[0] if single else out


def _no_scheduler() -> None:
    return None


def _plain_get() -> Any:
    """What plain Dask runs a graph with when nothing routes: the default client's
    ``get``, or the threaded scheduler where there is no client."""
    from distributed.client import _get_global_client

    client = _get_global_client()
    if client is not None:
        return client.get
    import dask.threaded

    return dask.threaded.get


def _graph_with_layers(dsk: Any) -> Any:
    """The graph that plain ``.compute()`` hands a scheduler, keeping its layers.

    Dask passes an expression whose ``__dask_graph__()`` is a flat dict: the layers'
    chunk shapes and dtypes, which the cost model needs, are gone. They live on in the
    expression's high-level graphs; the flat dict adds what those lack (the finalize
    task)."""
    flat = dsk.__dask_graph__() if hasattr(dsk, "__dask_graph__") else dsk
    if not hasattr(dsk, "walk"):
        return flat
    try:
        from dask._expr import HLGExpr
        from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

        hlgs = [e.hlg for e in dsk.walk() if isinstance(e, HLGExpr)]
        if not hlgs:
            return flat
        merged = HighLevelGraph.merge(*hlgs)
        known = set().union(*(layer.keys() for layer in merged.layers.values()))
        rest = _needed_rest({k: v for k, v in dict(flat).items() if k not in known}, dsk)
        if not rest:
            return merged
        layers = dict(merged.layers)
        deps = dict(merged.dependencies)
        # one layer (its tasks may need each other), named after the op most of its
        # tasks belong to, as rows show it (not a name of the router's own)
        from collections import Counter

        from .rewrite import key_name

        name = str(Counter(str(key_name(k)) for k in rest).most_common(1)[0][0])
        while name in layers:
            name += "-rest"
        layers[name] = MaterializedLayer(rest)
        deps[name] = set(merged.layers)
        return HighLevelGraph(layers, deps)
    except Exception:  # an expression of another shape: the flat graph still runs
        return flat


def _needed_rest(rest: dict[Any, Any], dsk: Any) -> dict[Any, Any]:
    """Of the flat graph's tasks that the high-level graphs lack, those the outputs
    need: the finalize task and what it reads among them. Dask's optimization may also
    have fused the last op with it (``sum-aggregate-finalize-...``), a task that nothing
    of the high-level graphs' reads, and that the report showed as an op no worker ran."""
    try:
        outputs = set(dask.core.flatten(dsk.__dask_keys__()))
        from dask._task_spec import convert_legacy_graph

        specs = convert_legacy_graph(rest)
    except Exception:
        return rest
    needed: set[Any] = set()
    todo = [k for k in rest if k in outputs]
    while todo:
        key = todo.pop()
        if key in needed:
            continue
        needed.add(key)
        todo.extend(d for d in getattr(specs.get(key), "dependencies", ()) if d in rest)
    return {k: v for k, v in rest.items() if k in needed}


def _cull_only(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """Array optimization inside ``mesh.route``: cull, but never fuse (fusion would
    merge layers of different targets and rename the keys the plan names). With no
    route in force (a copy Dask's config put back), Dask's own optimization."""
    if _RoutedScheduler._now() is None:
        from dask.array.optimization import optimize

        return optimize(dsk, keys, **kwargs)
    keys = list(dask.core.flatten(keys if isinstance(keys, list) else [keys]))
    try:
        return dsk.cull(set(keys))
    except AttributeError:
        return dsk


def _checked_route(mesh: Mesh, mode: Any, fallback: bool) -> str | Target:
    """``mode`` parsed, ``fallback`` checked, and a forced target one the mesh has."""
    route = parse_route_or_error(mode)
    check_fallback(fallback)
    if isinstance(route, Target):
        inv = mesh.inventory()
        if not any(route.matches(d.kind, d.backend) for d in inv):
            have = ", ".join(f"{n} {t}" for t, n in sorted(inv.by_target().items()))
            if not have:
                add = ("scale it up (%mesh scale)" if mesh.owns_cluster else
                       f"add one (jupyter-mesh worker {mesh.address} on a machine of the "
                       f"mesh)")
                raise MeshError(f"no live {route} worker: the mesh has no workers now; "
                                f"{add} or use 'auto' to route to what joins later")
            raise MeshError(
                f"no live {route} worker: the mesh has {have}; use 'auto' "
                f"or one of {', '.join(sorted(inv.by_target()))}"
            )
    elif route != "off":
        # (a forced target's inventory() says the same; "off" ends routing whatever
        # state the mesh is in)
        mesh._check_reachable()
    return route


def route_context(mesh: Mesh, mode: Any, fallback: bool = True) -> Any:
    """A context manager that routes plain ``.compute()`` calls; checks ``mode`` now."""
    return _route_context(mesh, _checked_route(mesh, mode, fallback), fallback)


@dataclasses.dataclass(eq=False)
class _Route:
    """A route in force: set for the kernel (``%mesh route``) or for a block."""

    mesh: Mesh
    route: str | Target
    fallback: bool


class _Routes:
    """Every route in force in this process and the Dask config they set.

    The newest block (``with mesh.route(...)``, a ``%%mesh`` cell) decides; without one,
    the kernel's route (``%mesh route``, the newest set) does. Blocks may end in any
    order (a cell that sets ``%mesh route`` inside, a mesh closed inside a block): each
    takes only itself away, and Dask's config follows what is left. While something
    routes, Dask's ``scheduler`` and ``array_optimize`` settings are the router's (one
    scheduler object, which reads the route in force when called); the values they had
    come back when nothing routes any more.
    """

    KEYS = ("scheduler", "array_optimize")

    def __init__(self) -> None:
        import threading

        self.kernel: _Route | None = None
        self.blocks: list[_Route] = []
        self.scheduler = _RoutedScheduler()
        #: whether the router's settings are in Dask's config, and what they replaced
        self.installed = False
        self.saved: dict[str, Any] = {}
        self.meshes: list[Any] = []  # weak references to the meshes that routed
        self.lock = threading.RLock()

    def current(self) -> _Route | None:
        return self.blocks[-1] if self.blocks else self.kernel

    def _seen(self, mesh: Mesh) -> None:
        import weakref

        self.meshes = [r for r in self.meshes if r() is not None]
        if not any(r() is mesh for r in self.meshes):
            self.meshes.append(weakref.ref(mesh))

    def push(self, entry: _Route) -> None:
        with self.lock:
            self._seen(entry.mesh)
            self.blocks.append(entry)
            self.sync()

    def pop(self, entry: _Route) -> None:
        with self.lock:
            self.blocks = [b for b in self.blocks if b is not entry]
            self.sync()

    def set_kernel(self, entry: _Route | None, mesh: Mesh) -> None:
        """The kernel's route for ``mesh`` (None: off). Turning it off for one mesh
        leaves another mesh's route alone."""
        with self.lock:
            self._seen(mesh)
            if entry is not None or self.kernel is None or self.kernel.mesh is mesh:
                self.kernel = entry
            self.sync()

    def forget(self, mesh: Mesh) -> None:
        """A mesh closes: nothing routes to it any more."""
        with self.lock:
            if self.kernel is not None and self.kernel.mesh is mesh:
                self.kernel = None
            self.blocks = [b for b in self.blocks if b.mesh is not mesh]
            self.sync()

    def sync(self) -> None:
        with self.lock:
            cfg = dask.config.config
            now = self.current()
            if now is not None and now.route != "off":
                if not self.installed:
                    self.saved = {k: cfg[k] for k in self.KEYS if k in cfg}
                    self.installed = True
                cfg["scheduler"] = self.scheduler
                cfg["array_optimize"] = _cull_only
            else:
                # the router's own settings go, wherever they came back from; a value
                # set since by someone else (a new client, the user) stays
                if isinstance(cfg.get("scheduler"), _RoutedScheduler):
                    cfg.pop("scheduler")
                    if "scheduler" in self.saved:
                        cfg["scheduler"] = self.saved["scheduler"]
                if cfg.get("array_optimize") is _cull_only:
                    cfg.pop("array_optimize")
                    if "array_optimize" in self.saved:
                        cfg["array_optimize"] = self.saved["array_optimize"]
                if not self.blocks and self.kernel is None:
                    self.installed, self.saved = False, {}
            for ref in self.meshes:
                m = ref()
                if m is not None:
                    m._route_mode = (str(now.route) if now is not None and now.mesh is m
                                    else "off")


ROUTES = _Routes()


class _route_context:
    """What ``mesh.route(...)`` returns: a block that routes plain Dask calls while it
    is entered. The same object may be entered again (one block after another, or one
    inside another), as a lock may; each entry ends with its own exit."""

    def __init__(self, mesh: Mesh, route: Any, fallback: bool) -> None:
        self.mesh, self.route, self.fallback = mesh, route, fallback
        self._entries: list[_Route] = []

    def __enter__(self) -> Mesh:
        entry = _Route(self.mesh, self.route, self.fallback)
        ROUTES.push(entry)
        self._entries.append(entry)
        if self.route == "off":
            # what runs in the block is not routed, so not reported: an earlier
            # computation's plan and report must not pass for its (as with
            # mesh.compute(route="off"))
            self.mesh.last_plan = self.mesh.last_report = None
        return self.mesh

    def __exit__(self, *exc: Any) -> None:
        ROUTES.pop(self._entries.pop())

    def __repr__(self) -> str:
        return f"<mesh.route({str(self.route)!r})>"


def set_route(mesh: Mesh, mode: Any, fallback: bool = True) -> None:
    """Route plain Dask calls from now on (``%mesh route``), until set to ``off``; a
    block in force (``with mesh.route``, a ``%%mesh`` cell) keeps its own until it ends.
    A bad route changes nothing."""
    route = _checked_route(mesh, mode, fallback)
    ROUTES.set_kernel(None if route == "off" else _Route(mesh, route, fallback), mesh)


def forget_routes(mesh: Mesh) -> None:
    """Routes to ``mesh`` end (it closes): plain Dask calls go back to what they did."""
    ROUTES.forget(mesh)


# ---------------------------------------------------------------- submit
def _parse_on(on: Any) -> Target:
    """``on=`` of submit: a target (no route such as "auto" or "off")."""
    try:
        target = parse_route_or_error(on)
    except MeshError:
        target = None
    if not isinstance(target, Target):
        raise MeshError(f"on= takes a target: one of {', '.join(allowed_targets())} "
                        f"(or needs= to let the mesh pick), not {on!r}")
    return target


#: a representative task for each capability: float32 work on 4096-square blocks
_REPRESENTATIVE = {
    "matmul": dict(flops=2 * 4096.0**3, in_bytes=2 * 4096.0**2 * 4, out_bytes=4096.0**2 * 4),
    "linalg": dict(flops=4 * 4096.0**3, in_bytes=4096.0**2 * 4, out_bytes=4096.0**2 * 4),
    "fft": dict(flops=5 * 4096.0**2 * 12, in_bytes=4096.0**2 * 8, out_bytes=4096.0**2 * 8),
    "elementwise": dict(flops=4096.0**2, in_bytes=4096.0**2 * 4, out_bytes=4096.0**2 * 4),
    "reduction": dict(flops=4096.0**2, in_bytes=4096.0**2 * 4, out_bytes=4096.0 * 4),
}


def choose_for_needs(mesh: Mesh, needs: str, site: str | None = None
                     ) -> tuple[str, str, str]:
    """(resource, target label, backend) of the pool that runs ``needs`` fastest."""
    if isinstance(needs, str) and needs.strip().lower() in CAPABILITIES:
        needs = needs.strip().lower()  # as on= and the route names: " MatMul" is matmul
    if needs not in CAPABILITIES:
        raise MeshError(f"unknown capability needs={needs!r}: use one of {', '.join(CAPABILITIES)}")
    pools = build_pools(mesh.inventory())
    spec = _REPRESENTATIVE[needs]
    op = OpInfo(name=needs, label=needs, op_class=needs, tasks=1, flops=spec["flops"],
                in_bytes=spec["in_bytes"], out_bytes=spec["out_bytes"],
                mem_bytes=spec["in_bytes"] + spec["out_bytes"], itemsize=4,
                native=native_backends(needs))
    from .classify import GraphModel

    model = GraphModel(ops=[op], keys=[needs], layer=[0], deps=[[]])
    allowed, _ = allowed_pools(model, pools, "auto", site)
    cost = CostModel(pools)
    # on a tie, a pool of the backend that runs it (NumPy workers before a JAX CPU
    # worker that would run NumPy too)
    best = min(allowed[0], key=lambda p: (cost.exec_time(op, pools[p]),
                                          cost.runs_numpy(op, pools[p])
                                          and pools[p].backend != "numpy"))
    pool = pools[best]
    if pool.kind == "cpu" and pool.backend != "numpy" and cost.runs_numpy(op, pool):
        return pool.resource, f"{pool.label} (numpy)", "numpy"
    return pool.resource, pool.label, pool.backend


class GlobalRandom:
    """``numpy.random.NAME`` looked up where the task runs: NumPy's global functions
    are methods of one ``RandomState``, which pickles with its state, so each call
    would start from the notebook's state and ``pure=False`` calls repeat their numbers;
    the worker's own global generator gives new ones, as the notebook's does."""

    def __init__(self, name: str) -> None:
        self.name = self.__name__ = name

    def __reduce__(self) -> Any:
        return (GlobalRandom, (self.name,))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import numpy

        return getattr(numpy.random, self.name)(*args, **kwargs)


def _global_random(fn: Any) -> Any:
    """``fn``, or a :class:`GlobalRandom` where it is a function of ``numpy.random``'s
    global generator (``np.random.random``, ``np.random.normal``...)."""
    import numpy

    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__name__", None)
    if (owner is not None and owner is getattr(numpy.random.mtrand, "_rand", None)
            and isinstance(name, str) and getattr(numpy.random, name, None) == fn):
        return GlobalRandom(name)
    return fn


def submit(mesh: Mesh, fn: Any, args: tuple[Any, ...], on: Any, needs: Any,
           site: Any, kwargs: dict[str, Any], convert: Any = True,
           pure: Any = True) -> Any:
    if not callable(fn):
        raise MeshError(f"submit needs a function, not {type(fn).__name__}")
    check_flag("convert", convert)
    check_flag("pure", pure)
    if on is not None and needs is not None:
        raise MeshError("pass on= (a target) or needs= (a capability), not both")
    site = _check_site(site)
    timeout = _config.get_seconds("fallback-timeout")  # a bad one fails before it runs
    inv = _live_inventory(mesh)
    for given, what in ((on, f"on={on!r}"), (needs, f"needs={needs!r}"),
                        (site, f"site={site!r}")):
        if given is not None:
            _refuse_plain(inv, what)
    if not len(inv):
        raise _no_live_workers(mesh, f"run {funcname(fn)} on", "submit")
    if site is not None and (site == PLAIN_SITE or not any(d.site == site for d in inv)):
        raise no_site(site, {d.site for d in inv})
    resource: str | None = None
    label = "any worker"
    # the backend the arguments go to: the one asked for (on="cpu": NumPy, on a
    # JAX-driven CPU worker too), the one the mesh picked for needs=; none (host
    # NumPy) where no target was asked for
    backend: str | None = None
    kind: str | None = None
    if on is not None:
        target = _parse_on(on)
        match = [d for d in inv if target.matches(d.kind, d.backend)
                 and (site is None or d.site == site)]
        if not match:
            where = f" at site {site!r}" if site is not None else ""
            have = sorted({f"{d.kind}:{d.backend}" for d in inv
                           if site is None or d.site == site})
            raise MeshError(
                f"no live {target} worker{where}: the mesh has {inv.summary()}; use "
                f"on= one of {', '.join(have) or 'nothing'}, or needs= to let the mesh pick"
            )
        resource, label = target.resource, str(target)
        # a kind alone: its device's own backend (CuPy or JAX on a GPU), NumPy on a CPU
        backend = target.backend or ("numpy" if target.kind == "cpu" else ANY_BACKEND)
        kind = target.kind
    elif needs is not None:
        resource, label, backend = choose_for_needs(mesh, needs, site)
    # the target is part of the key: the same call on two targets is two tasks
    # pure (as Dask's client.submit): the same call gives the same key, and a result
    # still held is reused; pure=False: a call of its own (random numbers, the time)
    token = (tokenize(fn, args, kwargs, resource, site, convert) if pure
             else uuid.uuid4().hex)
    key = f"{funcname(fn)}-{token}"
    resources = {resource: 1} if resource else {}
    if site is not None:
        # by resource, not by address: a worker restarted by its nanny still counts
        resources[site_resource(site)] = 1
        label = f"{label} at site {site}"
    # under the fallback whatever it asks for: with no target, a mesh left without
    # workers fails it after mesh.fallback-timeout, as a routed task (never a wait for
    # ever); a scheduler without jupyter_mesh's plugin has no fallback to put it under
    # (not for a key this client holds already: Dask's submit sends the scheduler
    # nothing for it, so the registration would wait there for ever)
    if mesh._scheduler_plugin and key not in mesh.client.futures:
        _register_submit(mesh, key, resource, site, label, timeout)
    fn = _global_random(fn)
    call = SubmitCall(fn, backend, kind) if convert else fn
    # every keyword argument goes to fn, even one named like an option of Dask's
    # submit (key=, pure=, retries=, workers=...), which Dask would otherwise take
    with _Unsent("this call"):
        return mesh.client.submit(_apply, call, list(args), dict(kwargs), key=key,
                                  resources=resources or None)


class _Unsent:
    """Around handing a computation to Dask's client: a function or value in it that
    cannot be pickled is one line naming why, not Dask's ERROR log of three chained
    tracebacks and its ``TypeError('Could not serialize object of type HLGExpr', ...)``
    (which names the graph, not the value)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread  # (another thread's are not this one's)

    def __enter__(self) -> _Unsent:
        logging.getLogger("distributed.protocol.pickle").addFilter(self)
        return self

    def __exit__(self, etype: Any, exc: Any, tb: Any) -> None:
        logging.getLogger("distributed.protocol.pickle").removeFilter(self)
        if not isinstance(exc, TypeError) or not str(
                exc.args[0] if exc.args else "").startswith("Could not serialize object"):
            return
        cause = exc.__cause__ or exc.__context__
        why = (f"{type(cause).__name__}: {cause}" if cause is not None and str(cause)
               else type(cause).__name__ if cause is not None else "it could not be pickled")
        raise MeshError(
            f"{self.what} cannot be sent to the workers: a function or value in it cannot "
            f"be pickled ({why.splitlines()[0]}); pass one that pickles (no open file, lock, "
            f"connection or other object that refuses it), or create it inside the "
            f"task") from None


def _apply(fn: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
    return fn(*args, **kwargs)


def _register_submit(mesh: Mesh, key: str, resource: str | None, site: str | None,
                     label: str, timeout: float) -> None:
    """Put a submitted task under the scheduler plugin's fallback, as routed tasks
    are: when every worker it may run on is gone for ``mesh.fallback-timeout``, it
    runs on what is left (at its site, with site=), or fails with a one-line error;
    it never waits for ever. A scheduler without jupyter_mesh's plugin runs it with
    its plain resource restrictions."""
    plan_id = f"{SUBMIT_PLAN}{uuid.uuid4().hex}"
    FallbackNotices.of(mesh).track(plan_id)
    payload = pickle.dumps({
        "plan_id": plan_id, "restrictions": {key: 0},
        "pools": [(resource, site, label)], "fallback": True,
        "timeout": timeout, "site": site, "pins": {},
    }, protocol=pickle.HIGHEST_PROTOCOL)
    try:
        mesh.client.sync(getattr(_scheduler(mesh), ROUTE_HANDLER), payload=payload)
    except MeshError:
        raise
    except Exception:
        pass
