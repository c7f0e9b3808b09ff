"""The router's half of the mesh scheduler plugin: per-key restrictions and fallback.

The client registers a routed computation (key → pool) through the
``jupyter_mesh_route`` handler just before submitting its graph; ``update_graph`` then
sets each task's restrictions before the scheduler transitions it, where fusion cannot
undo them. When every worker of a pool is gone for ``mesh.fallback-timeout`` seconds,
the restrictions of that pool's tasks are relaxed (to the data's site, if pinned) and
tasks waiting in ``no-worker`` are sent to what is left, so nothing waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import pickle
import time
from dataclasses import dataclass, field
from typing import Any

from dask._task_spec import Alias, Dict, List, Set, Task, TaskRef, Tuple

from ..targets import site_resource
from ._device import (
    METADATA_KEY,
    DeviceCall,
    SubmitCall,
    on_host,
    quiet_shared_keys,
    routed_batch,
    routed_chain,
)

logger = logging.getLogger("jupyter_mesh")

ROUTE_HANDLER = "jupyter_mesh_route"
STATUS_HANDLER = "jupyter_mesh_route_status"
#: Dask event topic of fallbacks and failures, for the clients whose plans they hit
#: (a persisted result recomputed later, a submitted task: no compute is waiting)
EVENT_TOPIC = "jupyter-mesh-fallback"
FORGET_HANDLER = "jupyter_mesh_route_forget"
#: releases a finished routed computation's outputs at once (see RouterState.settle)
SETTLE_HANDLER = "jupyter_mesh_route_settle"
#: ROUTE_HANDLER as a message on a client's batched stream: no round trip to wait
#: for, and the scheduler handles it before the graph the client sends after it. Used
#: once a client knows the scheduler has it (ROUTE_HANDLER's answer says so): an op
#: the scheduler does not know would close the client's stream. (A routed compute's
#: settle stays a round trip: another client's graph must not overtake it.)
ROUTE_STREAM = "jupyter-mesh-route"
#: states in which a task's restrictions may change: not yet given to a worker. A task
#: the scheduler holds already from another graph (plain Dask's, with the same keys)
#: may be queued or processing: it acquired no pool's resource there, and the scheduler
#: releases on its end what its restrictions then say (a KeyError that removed the
#: workers, before), so it runs where it is
_RESTRICTABLE = ("released", "waiting", "no-worker")
#: the kinds of plain task made to read routed results on the host (see _read_on_host)
_PLAIN_SPECS = (Task, Alias, List, Tuple, Set, Dict)


@dataclass
class PlanState:
    plan_id: str
    #: per pool: (resource or None for any kind, site it is kept to or None, label)
    pools: list[tuple[str | None, str | None, str]]
    fallback: bool
    timeout: float
    site: str | None
    pins: dict[Any, str] = field(default_factory=dict)
    keys: dict[Any, int] = field(default_factory=dict)
    used: set[int] = field(default_factory=set)
    relaxed: set[int] = field(default_factory=set)
    timers: dict[int, Any] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    failed: str | None = None
    created: float = field(default_factory=time.time)
    #: pool -> the workers of it the plan uses (see Routed.narrow); dropped for a pool
    #: once none of them is left, so its tasks may use the whole pool again
    narrow: dict[int, list[str]] = field(default_factory=dict)
    #: key -> the one worker it runs on (see Routed.workers); dropped for a worker
    #: that leaves, so its tasks may use their pool again
    workers: dict[Any, str] = field(default_factory=dict)
    #: key -> (worker, backend, seconds) of each device call that ran, from the tasks'
    #: metadata, until the client asks for them (status with records=True)
    records: dict[Any, tuple[str, str, float]] = field(default_factory=dict)
    #: the scheduler's task-stream index when the plan arrived (None: no task stream)
    cursor: int | None = None
    #: the id of the Dask client that submitted it (None: not known)
    client: str | None = None


def _read_on_host(ts: Any, routed: dict[Any, str]) -> None:
    """A task of a graph that is not routed, which reads a routed task's result (a
    shared key: the same computation from another thread or notebook): made to read it
    as a host array (see ``_device.on_host``). Not a routed task (``routed``: their
    keys; it takes device results itself), not one of Dask's own kinds (P2P's barrier,
    a Task subclass the shuffle looks for), and not one made so already (a task the
    scheduler holds is touched again by every graph that shares it)."""
    if ts is None or ts.key in routed or ts.state not in _RESTRICTABLE:
        return
    spec = ts.run_spec
    if type(spec) not in _PLAIN_SPECS:
        return
    func = getattr(spec, "func", None)
    if isinstance(func, (DeviceCall, SubmitCall)) or func in (routed_chain, routed_batch) \
            or (type(func) is functools.partial and func.func is on_host):
        return
    keys = tuple(d.key for d in ts.dependencies)
    if not any(k in routed for k in keys):
        return
    ts.run_spec = Task(ts.key, functools.partial(on_host, spec, keys),
                       *(TaskRef(k) for k in keys))


class RouterState:
    """Routed computations known to one scheduler."""

    def __init__(self) -> None:
        self.scheduler: Any = None
        self.pending: dict[Any, tuple[str, int, float | None]] = {}
        #: layer name -> (plan id, pool) of plans made per layer: every key of the
        #: layer (``(name, i, j)`` or ``name``) gets that pool
        self.pending_layers: dict[Any, tuple[str, int]] = {}
        self.plans: dict[str, PlanState] = {}
        self.owner: dict[Any, str] = {}

    def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        scheduler.handlers[ROUTE_HANDLER] = self.register
        scheduler.handlers[STATUS_HANDLER] = self.status
        scheduler.handlers[FORGET_HANDLER] = self.forget
        scheduler.handlers[SETTLE_HANDLER] = self.settle
        scheduler.stream_handlers[ROUTE_STREAM] = self._streamed(self.register)
        # Dask's warnings about keys shared with routed tasks: see SharedKeyFilter
        quiet_shared_keys()

    # ------------------------------------------------------------ handlers
    def register(self, comm: Any = None, payload: bytes = b"", **_: Any
                 ) -> dict[str, Any]:
        data = pickle.loads(payload)
        ps = PlanState(data["plan_id"], data["pools"], bool(data["fallback"]),
                       float(data["timeout"]), data.get("site"), data.get("pins") or {})
        ps.narrow = dict(data.get("narrow") or {})
        ps.workers = dict(data.get("workers") or {})
        ps.cursor = self._stream_index()
        self.plans[ps.plan_id] = ps
        prio = data.get("priorities") or {}
        for key, p in data["restrictions"].items():
            self.pending[key] = (ps.plan_id, p, prio.get(key))
        for name, p in (data.get("layers") or {}).items():
            self.pending_layers[name] = (ps.plan_id, p)
        self._prune()
        return {"status": "OK", "plan_id": ps.plan_id, "stream": ROUTE_STREAM}

    @staticmethod
    def _streamed(handler: Any) -> Any:
        """``handler`` as a stream handler: an exception in a stream handler would
        close the client's stream, so it is logged instead (the plan then runs
        unrouted, which placement never decides the correctness of, and its status
        says the plan is not known)."""
        def handle(**msg: Any) -> None:
            try:
                handler(**msg)
            except Exception:
                logger.exception("jupyter_mesh: a routed computation's message failed")
        return handle

    def _stream_index(self) -> int | None:
        try:  # (the scheduler starts its task stream the first time it is asked)
            return int(self.scheduler.get_task_stream_index())
        except Exception:
            return None

    def status(self, comm: Any = None, plan_id: str = "", records: bool = False
               ) -> dict[str, Any]:
        """A plan's fallbacks and failure; with ``records``, also (and then forgotten)
        what ran each key: a list of (key, worker, backend, seconds), and the
        scheduler's task stream since the plan arrived (``timeline``; None without
        one)."""
        ps = self.plans.get(plan_id)
        if ps is None:
            out: dict[str, Any] = {"known": False, "events": [], "failed": None}
            if records:
                out["records"] = []
            return out
        out = {"known": True, "events": list(ps.events), "failed": ps.failed}
        if records:
            out["records"] = [(k, *rec) for k, rec in ps.records.items()]
            ps.records = {}
            out["timeline"] = None
            if ps.cursor is not None:
                with contextlib.suppress(Exception):
                    out["timeline"] = list(
                        self.scheduler.get_task_stream(start_index=ps.cursor))
        return out

    def settle(self, comm: Any = None, keys: Any = (), client: str = ""
               ) -> dict[str, Any]:
        """``client`` finished a routed computation and holds its outputs ``keys`` no
        more: release them now, and with them the tasks behind them, as the client's
        own message would a little later on another connection. Until then a graph
        that brings the same keys, plain Dask's own for the same collection, from this
        client or another, would get the routed tasks in place of its own: Dask keeps
        the task of a key it still knows (dask/dask#9888), and a routed task's result
        may be kept on its device."""
        sched = self.scheduler
        cs = sched.clients.get(client) if sched is not None else None
        if cs is None:
            return {"released": 0, "left": 0}
        tasks = sched.tasks
        mine = [k for k in map(_as_key, keys)
                if (ts := tasks.get(k)) is not None and cs in ts.who_wants]
        if mine:
            sched.client_releases_keys(keys=mine, client=client,
                                       stimulus_id=f"jupyter-mesh-settle-{time.time()}")
        # a key another graph still needs stays (released), with its own waiters
        return {"released": len(mine), "left": sum(1 for k in mine if k in tasks)}

    def forget(self, comm: Any = None) -> dict[str, Any]:
        """Drop every routed computation (a local mesh about to close: its workers
        leave, and no fallback should be announced or run for them)."""
        for ps in self.plans.values():
            for timer in ps.timers.values():
                timer.cancel()
        n = len(self.plans)
        self.plans.clear()
        self.pending.clear()
        self.pending_layers.clear()
        self.owner.clear()
        return {"status": "OK", "forgotten": n}

    # ------------------------------------------------------------ plugin hooks
    def update_graph(self, scheduler: Any, tasks: Any, client: str | None = None) -> None:
        """Restrict and order a routed graph's tasks as planned.

        It also forgets the routed tasks that nothing reads. A routed graph can bring
        tasks whose keys the scheduler holds already (persisted results of the same
        collection, dask/dask#9888), and the scheduler keeps its own tasks for them. A
        plan of its own is another split of the same work: a batch (see
        ``rewrite.worker_batches``), or a task that ran inside one before, that only
        those would read is read by nothing, and would keep what it reads on the
        scheduler for as long as it lives."""
        touched: set[str] = set()
        by_layer = self.pending_layers
        owner = self.owner
        for key in tasks:
            entry = self.pending.pop(key, None)
            if entry is None:
                lentry = by_layer.get(key[0] if type(key) is tuple and key else key) \
                    if by_layer else None
                if lentry is None:
                    if owner:
                        _read_on_host(scheduler.tasks.get(key), owner)
                    continue
                entry = (lentry[0], lentry[1], None)
            pid, p, start = entry
            ps = self.plans.get(pid)
            ts = scheduler.tasks.get(key)
            if ps is None or ts is None:
                continue
            if ps.client is None:
                ps.client = client
            ps.keys[key] = p
            ps.used.add(p)
            self.owner[key] = pid
            touched.add(pid)
            if ts.state in _RESTRICTABLE:
                self._restrict(ts, ps, p)
                if start is not None and ts.priority:
                    # run ready tasks in the plan's order (its start times) rather
                    # than in dask.order's, keeping the user's and the generation's
                    ts.priority = (ts.priority[0], ts.priority[1], float(start))
        if by_layer and touched:
            # one submission per plan: its layer entries are used up
            for name in [n for n, (pid, _) in by_layer.items() if pid in touched]:
                del by_layer[name]
        for pid in touched:
            self._check(self.plans[pid])
        # tasks that nothing will read: forgotten now, and with them what only they read.
        # A plain graph's too: two graphs of the same outputs split differently (a
        # plain compute beside a routed one, two routes at once, from two threads or
        # two notebooks) share the outputs, whose task the scheduler keeps, and the
        # other graph's own tasks under them would stay on the scheduler for ever
        all_tasks = scheduler.tasks
        unread = {key: "forgotten" for key in tasks
                  if (ts := all_tasks.get(key)) is not None and ts.state == "released"
                  and not ts.dependents and not ts.who_wants}
        if unread:
            scheduler.transitions(unread, f"jupyter-mesh-unread-{time.time()}")

    def transition(self, key: Any, finish: str, kwargs: dict[str, Any] | None = None
                   ) -> None:
        if finish == "memory":
            meta = (kwargs or {}).get("metadata")
            recs = meta.get(METADATA_KEY) if isinstance(meta, dict) else None
            if recs:
                self._collect(kwargs.get("worker", "") if kwargs else "", recs)
                # filed: the scheduler's copy of the task's metadata need not keep them
                ts = (self.scheduler.tasks.get(key) if self.scheduler is not None
                      else None)
                if ts is not None and isinstance(ts.metadata, dict):
                    ts.metadata.pop(METADATA_KEY, None)
            return
        if finish == "no-worker":
            pid = self.owner.get(key)
            if pid is not None and pid in self.plans:
                # after the transition, not inside it
                asyncio.get_running_loop().call_soon(self._revisit, pid, key)
            return
        if finish != "forgotten":
            return
        pid = self.owner.pop(key, None)
        if pid is None:
            return
        ps = self.plans.get(pid)
        if ps is not None:
            ps.keys.pop(key, None)
            if not ps.keys:
                # nothing of it is left (a routed compute collects its records while
                # it holds its outputs): a failed or interrupted one's go too, and so
                # do its fallback timers (they said "0 routed tasks re-routed" after it)
                ps.records = {}
                for timer in ps.timers.values():
                    timer.cancel()
                ps.timers.clear()

    def _collect(self, worker: str, recs: Any) -> None:
        """The device calls' records that came with a finished task (see
        ``_device._record``), filed under their plans."""
        plans = self.plans
        for rec in recs:
            try:
                pid, key, backend, secs = rec
            except (TypeError, ValueError):
                continue
            ps = plans.get(pid)
            if ps is not None:
                ps.records[_as_key(key)] = (worker, backend, secs)

    def workers_changed(self) -> None:
        for ps in list(self.plans.values()):
            if ps.keys:
                self._widen(ps)
                self._check(ps)

    def _widen(self, ps: PlanState) -> None:
        """Pools whose planned workers are all gone: their tasks may use the whole
        pool again, at once (the pool's own fallback timer covers a pool left empty);
        tasks kept on a worker that is gone may use their pool (or its planned
        workers) again."""
        live = self.scheduler.workers
        gone = [p for p, some in ps.narrow.items() if not any(a in live for a in some)]
        left = {k for k, a in ps.workers.items() if a not in live}
        if not gone and not left:
            return
        recs: dict[Any, str] = {}
        for k in left:
            del ps.workers[k]
        for p in gone:
            del ps.narrow[p]
        for key, q in ps.keys.items():
            if q not in gone and key not in left:
                continue
            ts = self.scheduler.tasks.get(key)
            if ts is None or ts.state not in _RESTRICTABLE:
                continue
            self._restrict(ts, ps, q)
            if ts.state == "no-worker":
                recs[key] = "processing"
        if recs:
            self.scheduler.transitions(recs, stimulus_id=f"jupyter-mesh-widen-{time.time()}")

    # ------------------------------------------------------------ internals
    def _restrict(self, ts: Any, ps: PlanState, p: int) -> None:
        if p in ps.relaxed:
            self._relax_one(ts, ps)
            return
        resource, site, _ = ps.pools[p]
        # by resource, kind and site alike: a worker that rejoins under a new address
        # (restarted by its nanny) still qualifies
        wanted = {resource: 1} if resource else {}
        if site:
            wanted[site_resource(site)] = 1
        ts.resource_restrictions = wanted or None
        some = ps.narrow.get(p)
        one = ps.workers.get(ts.key)
        live = self.scheduler.workers if self.scheduler is not None else {}
        if one is not None and one in live:
            ts.worker_restrictions = {one}
        elif some and any(a in live for a in some):
            ts.worker_restrictions = set(some)
        else:
            ts.worker_restrictions = None
        ts.host_restrictions = None
        ts.loose_restrictions = False

    def _site_workers(self, site: str | None) -> set[str] | None:
        """The live workers at ``site`` (an empty set where none is left), or None
        for no site: any worker."""
        if not site:
            return None
        from .._scheduler_plugin import worker_record

        return {
            addr for addr, ws in self.scheduler.workers.items()
            if worker_record(ws).get("site") == site
        }

    def _relax_one(self, ts: Any, ps: PlanState) -> None:
        site = ps.pins.get(ts.key) or ps.site
        ts.resource_restrictions = {site_resource(site): 1} if site else None
        ts.worker_restrictions = None
        ts.host_restrictions = None
        ts.loose_restrictions = False
        if site and not self._site_workers(site):
            # a task kept at a site where no worker is left would wait for ever
            self._fail(ps, _no_site_left(site, ts.key in ps.pins))

    def _alive(self, ps: PlanState, p: int) -> bool:
        resource, site, _ = ps.pools[p]
        site_res = site_resource(site) if site else None
        for ws in self.scheduler.workers.values():
            if ((not resource or ws.resources.get(resource, 0) >= 1)
                    and (not site_res or ws.resources.get(site_res, 0) >= 1)):
                return True
        return False

    def _fail(self, ps: PlanState, why: str) -> None:
        """The computation cannot finish as routed: say why (a routed compute polls
        for it) and fail its tasks that wait for a worker, so that whatever waits on
        them (a future of mesh.submit, data persisted earlier) gets this error rather
        than waiting for ever."""
        if ps.failed is None:
            ps.failed = why
            self._publish(ps, why, failed=True)
        try:
            # not in the middle of update_graph or a transition: just after
            asyncio.get_running_loop().call_soon(self._err_waiting, ps.plan_id)
        except RuntimeError:  # no loop running (called directly)
            self._err_waiting(ps.plan_id)

    def _revisit(self, pid: str, key: Any) -> None:
        """A routed task waits for a worker: one whose data was lost and is computed
        again, say, after its pool was re-routed or the computation failed."""
        ps = self.plans.get(pid)
        ts = self.scheduler.tasks.get(key) if self.scheduler is not None else None
        if ps is None or ts is None or ts.state != "no-worker":
            return
        if ps.failed is not None:
            self._err_waiting(pid)
            return
        p = ps.keys.get(key)
        if p is not None and p in ps.relaxed:
            # it still had the restrictions of a pool that is gone
            self._relax_one(ts, ps)
            if ps.failed is None:
                self.scheduler.transitions(
                    {key: "processing"}, stimulus_id=f"jupyter-mesh-revisit-{time.time()}")
            return
        self._check(ps)

    def _err_waiting(self, pid: str) -> None:
        ps = self.plans.get(pid)
        sched = self.scheduler
        if ps is None or ps.failed is None or sched is None:
            return
        from ..errors import MeshError

        exc = pickle.dumps(MeshError(ps.failed))
        stimulus = f"jupyter-mesh-failed-{time.time()}"
        recs: dict[Any, str] = {}
        freed: dict[Any, str] = {}
        others = _needed_by_others(sched, ps.client)
        for key in list(ps.keys):
            ts = sched.tasks.get(key)
            if ts is None or ts.state not in ("no-worker", "queued"):
                continue
            if key in others:
                # a key that another client's computation needs too (the same graph
                # from another notebook, routed otherwise or not at all): this plan's
                # failure is not theirs. The task may run on any worker, kept to the
                # site another routed computation of it keeps it to (site=, pin=)
                kept = next((s for q in self.plans.values() if q is not ps and key in q.keys
                             for s in [q.pins.get(key) or q.site] if s), None)
                ts.resource_restrictions = {site_resource(kept): 1} if kept else None
                ts.worker_restrictions = None
                ts.host_restrictions = None
                ts.loose_restrictions = False
                if ts.state == "no-worker":
                    freed[key] = "processing"
                continue
            recs.update(sched.transition(key, "erred", exception=exc, cause=key,
                                         stimulus_id=stimulus))
        if recs:
            sched.transitions(recs, stimulus_id=stimulus)
        if freed:
            sched.transitions(freed, stimulus_id=stimulus)

    def _check(self, ps: PlanState) -> None:
        for p in ps.used:
            if p in ps.relaxed or p in ps.timers:
                continue
            if not self._alive(ps, p):
                try:
                    loop = asyncio.get_running_loop()  # the scheduler's
                except RuntimeError:
                    return  # called outside any event loop: no timer could ever fire
                ps.timers[p] = loop.call_later(ps.timeout, self._expire, ps.plan_id, p)
                kept = ps.pools[p][1] is not None or bool(ps.pins)
                # in a context of its own: a local mesh's scheduler runs in the
                # kernel, in a copy of the context of the cell that made the mesh, and
                # ipykernel sends its output there (long over); so it goes to the cell
                # that runs now
                if not _said_here(ps):
                    continue
                contextvars.Context().run(
                    logger.warning,
                    "jupyter_mesh: no live %s for routed tasks; waiting %.3g s before %s",
                    _workers_of(ps.pools[p][2]), ps.timeout,
                    "failing them (fallback=False)" if not ps.fallback else
                    "re-routing them (or failing those kept to a site)" if kept else
                    "re-routing them",
                )

    def _expire(self, pid: str, p: int) -> None:
        ps = self.plans.get(pid)
        if ps is None:
            return
        ps.timers.pop(p, None)
        if self._alive(ps, p):
            return
        label = ps.pools[p][2]
        lost = sorted({(s, k in ps.pins) for k, q in ps.keys.items() if q == p
                       for s in [ps.pins.get(k) or ps.site] if s and not self._site_workers(s)})
        if lost:
            # data pinned to a site, or a computation kept at one (site=), never leaves
            # it: fail rather than move it, whether fallback is on or not (fallback=True
            # would not help, as the advice of fallback=False said)
            self._fail(ps, _no_site_left(*lost[0]))
            return
        if not ps.fallback:
            self._fail(ps, f"no live {_workers_of(label)} for {ps.timeout:g} s and "
                           f"fallback=False: the computation cannot finish as routed; "
                           f"bring such workers back (mesh.scale on a mesh started here, "
                           f"jupyter-mesh worker elsewhere) and compute again, or "
                           f"compute with fallback=True or another route")
            return
        sched = self.scheduler
        if not sched.workers:
            self._fail(ps, no_worker_left(ps.timeout, _last_lost(sched)))
            return
        ps.relaxed.add(p)
        recs: dict[Any, str] = {}
        n = 0
        for key, q in ps.keys.items():
            if q != p:
                continue
            ts = sched.tasks.get(key)
            if ts is None or ts.state not in _RESTRICTABLE:
                continue
            self._relax_one(ts, ps)
            n += 1
            if ts.state == "no-worker":
                recs[key] = "processing"
        left = sorted({
            (ws.extra.get("jupyter-mesh") or {}).get("kind", "cpu") + ":"
            + (ws.extra.get("jupyter-mesh") or {}).get("backend", "numpy")
            for ws in sched.workers.values()
        })
        if not n:
            # nothing of it waited for that pool (it finished, or failed, before the
            # timer ran out): nothing to say
            return
        msg = (
            f"lost every {_workers_of(label)}: {n} routed tasks re-routed after "
            f"{ps.timeout:g} s to what is left ({', '.join(left) or 'nothing'})"
        )
        ps.events.append(msg)
        if _said_here(ps):
            logger.warning("jupyter_mesh: %s", msg)
        self._publish(ps, msg, failed=False)
        if recs:
            sched.transitions(recs, stimulus_id=f"jupyter-mesh-fallback-{time.time()}")

    def _publish(self, ps: PlanState, message: str, failed: bool) -> None:
        if self.scheduler is None:
            return
        try:
            self.scheduler.log_event(EVENT_TOPIC, {"plan": ps.plan_id, "message": message,
                                                   "failed": failed})
        except Exception:  # an event log that refuses it: the scheduler log has it
            logger.debug("jupyter_mesh: could not publish %r", message, exc_info=True)

    def _prune(self) -> None:
        if len(self.plans) <= 256:
            return
        stale = [pid for pid, ps in self.plans.items() if not ps.keys]
        for pid in stale[: len(self.plans) - 256]:
            self.plans.pop(pid, None)


def _as_key(key: Any) -> Any:
    """A Dask key as it was before it crossed a comm (a tuple key may arrive as a
    list)."""
    if isinstance(key, list):
        return tuple(_as_key(k) for k in key)
    return key


def no_worker_left(timeout: float, hint: str = "") -> str:
    """What a computation that no worker is left for says (``hint``: see
    :func:`_last_lost`)."""
    return (f"no live worker left for {timeout:g} s: the computation cannot finish"
            f"{hint}; " + ("once the cause is fixed, start workers again (e.g. "
                           "mesh.scale(cpu=2)) and compute again" if hint else
                           "add workers (e.g. mesh.scale(cpu=2)) and compute again"))


def _last_lost(sched: Any) -> str:
    """Why the last worker may have gone, where the scheduler saw it leave unexpectedly
    with tasks running: Dask's worker closes for good when it cannot unpickle a task it
    is sent (a function from a module only the notebook can import), and then every
    worker it is sent to does; adding workers would not help."""
    try:
        events = sched.get_events("all")
    except Exception:  # (Dask's event log is its own business: no hint without it)
        return ""
    return lost_hint(events)


def lost_hint(events: Any) -> str:
    """:func:`_last_lost` from the scheduler's events ("all"), as a client gets them
    too."""
    for _, msg in reversed(tuple(events or ())):
        if not isinstance(msg, dict) or msg.get("action") != "remove-worker":
            continue
        running = msg.get("processing-tasks") or ()
        if msg.get("expected") or not running:
            return ""
        key = str(min(map(str, running)))
        key = key if len(key) <= 60 else key[:57] + "..."
        return (f" (the last worker left unexpectedly while running {key}: killed, or "
                f"it could not unpickle the task, e.g. a function from a module the "
                f"workers cannot import; the worker's log says which)")
    return ""


def _said_here(ps: PlanState) -> bool:
    """Whether this process logs what happens to a plan's computation: not where the
    scheduler runs in a notebook's kernel (a local mesh) and the plan came from another
    notebook's client (its own gets the warning; the owner's cell showed other users'
    fallbacks); a scheduler of its own process logs every plan's."""
    if ps.client is None:
        return True
    from distributed import Client

    here = {getattr(c, "id", None) for c in list(Client._instances)}
    return not here or ps.client in here


def _needed_by_others(sched: Any, client: str | None) -> set[Any]:
    """The keys that a client other than ``client`` wants, or that what it wants reads
    (directly or not); empty where ``client`` is not known or no other client wants
    anything. Linear in the other clients' graphs."""
    if client is None:
        return set()
    seen: set[Any] = set()
    work = [ts for key, cs in (getattr(sched, "clients", None) or {}).items()
            if getattr(cs, "client_key", key) != client for ts in (cs.wants_what or ())]
    while work:
        ts = work.pop()
        if ts.key in seen:
            continue
        seen.add(ts.key)
        work.extend(d for d in (ts.dependencies or ()) if d.key not in seen)
    return seen


def _no_site_left(site: str, pinned: bool) -> str:
    what = ("the data of routed tasks is pinned" if pinned
            else "the computation was kept (site=)")
    undo = "pin=" if pinned else "site="
    return (f"no live worker at site {site!r}, where {what}: the computation cannot finish "
            f"there; start a worker at {site!r} (jupyter-mesh worker ADDRESS --site {site}) "
            f"and run it again, or run it without {undo}")


def _workers_of(label: str) -> str:
    """The workers of a pool's label, in words: ``cpu:jax`` -> "cpu:jax worker",
    ``any at lab`` -> "worker at lab", ``any worker at site lab`` -> "worker at site
    lab" (the label of a task kept to a site, or of a submit with no target)."""
    if label.startswith("any worker"):
        return "worker" + label[len("any worker"):]
    if label.startswith("any "):
        rest = label[len("any "):]
        if rest.startswith("at ") and not rest.startswith("at site "):
            rest = "at site " + rest[len("at "):]  # ("worker at site edge")
        return "worker " + rest
    kind, at, where = label.partition(" at ")
    return f"{kind} worker" + (f" at {where}" if at else "")
