"""Kernel meshes register themselves so that the Jupyter server can find them.

When a process makes a mesh its current one (``%mesh start``, ``%mesh connect``,
``jm.Mesh.local()``), it writes one small JSON file into
``<jupyter runtime dir>/jupyter-mesh/``: its pid, the scheduler address, the dashboard
link and, while the mesh lives, the rows of its recent router plans and reports. Closing
the mesh removes the file. The server's sidebar reads these files, drops the ones whose
process is gone, and connects to the schedulers to show their devices.

Set ``JUPYTER_MESH_DISCOVERY=0`` in a kernel's environment to keep its meshes private.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
import uuid
import weakref
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _state

if TYPE_CHECKING:
    from .mesh import Mesh

#: version of the registration file format
FORMAT = 1
#: how many recent plans/reports a registration carries
MAX_PLANS = 8
#: how many rows of one plan a registration carries
MAX_ROWS = 200
#: how many notes of one plan a registration carries
MAX_NOTES = 20
#: seconds between checks of the mesh's last plan and report
WATCH_INTERVAL = 1.0

_registrations: dict[int, _Registration] = {}
_lock = threading.Lock()


def registry_dir(runtime_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding registrations: ``<jupyter runtime dir>/jupyter-mesh``."""
    if runtime_dir is None:
        from jupyter_core.paths import jupyter_runtime_dir

        runtime_dir = jupyter_runtime_dir()
    return Path(runtime_dir) / "jupyter-mesh"


def enabled() -> bool:
    return os.environ.get("JUPYTER_MESH_DISCOVERY", "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (to tell a live process from a reused pid), or None."""
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:
        return None


def pid_alive(pid: object, started: float | None = None) -> bool:
    """Whether process ``pid`` runs, and is the one that started at ``started`` (False
    for anything but a positive int, e.g. a registration file's broken ``pid``)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    except OSError:
        return False
    if started is not None:
        now = process_start_time(pid)
        if now is not None and abs(now - started) > 1.0:
            return False  # the pid was reused by another process
    return True


def jsonable(value: Any) -> Any:
    """``value`` made JSON-safe: numbers stay numbers (non-finite become None)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    try:  # numpy scalars
        item = value.item()
        if isinstance(item, (bool, int, float, str)):
            return jsonable(item)
    except Exception:
        pass
    return str(value)


def plan_record(obj: Any, kind: str) -> dict[str, Any] | None:
    """A JSON record of a router :class:`Plan` or :class:`Report` (anything with ``rows``)."""
    try:
        rows = list(obj.rows)
    except Exception:
        return None
    plan = getattr(obj, "plan", None)
    route = getattr(obj, "route", None) or getattr(plan, "route", None)
    record: dict[str, Any] = {
        "kind": kind,
        "route": jsonable(route),
        "at": time.time(),
        "rows": [jsonable(dict(r)) for r in rows[:MAX_ROWS] if isinstance(r, dict)],
        "truncated": len(rows) > MAX_ROWS,
    }
    for attr in ("makespan", "wall_seconds", "bytes_moved"):
        try:
            value = getattr(obj, attr, None)
        except Exception:
            value = None
        if isinstance(value, (int, float)):
            record[attr] = jsonable(float(value))
    # the plan's notes (Dask's costs measured on the mesh, ops placed off their
    # target, ...); a report's are its plan's, and its own (ops it did not run)
    notes = list(getattr(plan, "notes", None) or [])
    if obj is not plan:
        try:
            notes += list(getattr(obj, "notes", None) or [])
        except Exception:
            pass
    if notes:
        record["notes"] = [str(n) for n in notes[:MAX_NOTES]]
    header = getattr(obj, "_header", None)
    if callable(header):
        try:
            record["title"] = str(header())
        except Exception:
            pass
    return record


def _kernel_id() -> str | None:
    """The id of the Jupyter kernel this process is, or None outside a kernel."""
    try:
        from ipykernel.kernelapp import IPKernelApp

        if not IPKernelApp.initialized():
            return None
        name = Path(IPKernelApp.instance().connection_file).name
    except Exception:
        return None
    if name.startswith("kernel-") and name.endswith(".json"):
        return name[len("kernel-") : -len(".json")]
    return None


def _security_files(mesh: Mesh) -> dict[str, str] | None:
    """The TLS files a client of this mesh uses (paths), or the certificates themselves
    where it holds them in memory (a local mesh's own, ``mesh.local.tls``), so the
    server can connect too; the registration file is this user's alone (mode 600)."""
    try:
        sec = mesh.client.security
    except Exception:
        return None
    # certificates in memory are written only where they are the mesh's own (made for
    # a local mesh, mesh.local.tls), never a user's own given to Mesh.connect
    own = getattr(mesh, "options", {}).get("security") is sec and sec is not None
    files = {}
    for attr in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        value = getattr(sec, attr, None)
        if isinstance(value, str) and "-----BEGIN" in value:
            if own:
                files[attr] = value
        elif isinstance(value, str) and os.path.isfile(value):
            files[attr] = os.path.abspath(value)
    return files or None


def private(path: Path) -> bool:
    """Whether ``path`` belongs to this user and nobody else may write it: a registry
    directory or file someone else made (a shared runtime dir) could point the server
    at their scheduler."""
    try:
        st = path.stat()
    except OSError:
        return False
    if not hasattr(os, "getuid"):  # pragma: no cover - Windows
        return True
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


class UnsafeRegistry(OSError):
    """The registry directory is someone else's, or others may write it."""


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.chmod(path.parent, 0o700)
    except OSError:
        pass
    if not private(path.parent):
        raise UnsafeRegistry(f"{path.parent} is not this user's alone: no registration "
                             f"written there")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class _Registration:
    """The registration file of one mesh, kept up to date by a small watcher thread."""

    def __init__(self, mesh: Mesh, directory: Path) -> None:
        from .mesh import _known_scheduler_id

        self.mesh = mesh
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = directory / f"mesh-{self.id}.json"
        self.plans: deque[dict[str, Any]] = deque(maxlen=MAX_PLANS)
        #: the plans and reports recorded (the router announces each one, and the
        #: watcher looks at the mesh's last ones too: each is recorded once)
        self._recorded: weakref.WeakSet[Any] = weakref.WeakSet()
        self._record_lock = threading.Lock()
        #: plans recorded since the last write (see record)
        self._pushed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.data: dict[str, Any] = {
            "format": FORMAT,
            "id": self.id,
            "pid": os.getpid(),
            "pid_started": process_start_time(os.getpid()),
            "kernel_id": _kernel_id(),
            "address": mesh.address,
            # the scheduler's own id: the sidebar knows it under any name of its host
            "scheduler_id": _known_scheduler_id(mesh),
            "dashboard": mesh.dashboard_link,
            "owns_cluster": bool(mesh.owns_cluster),
            "site": getattr(mesh, "site", None),
            "security": _security_files(mesh),
            "created": time.time(),
            "plans": [],
        }

    def write(self) -> None:
        self.data["updated"] = time.time()
        self.data["plans"] = list(self.plans)
        _write_atomic(self.path, self.data)

    def start(self) -> None:
        self.write()
        self._thread = threading.Thread(
            target=self._watch, name="jupyter-mesh-discovery", daemon=True
        )
        self._thread.start()

    def record(self, obj: Any, kind: str) -> None:
        """A plan or report as the router makes it: each one reaches the sidebar (a
        look every second saw only the last of a loop's computations)."""
        if self._add(obj, kind):
            self._pushed = True

    def check_plans(self) -> bool:
        """Record the mesh's last plan and report if they are new; True when one was."""
        plan = self._add(getattr(self.mesh, "last_plan", None), "plan")
        report = self._add(getattr(self.mesh, "last_report", None), "report")
        return plan or report

    def _add(self, obj: Any, kind: str) -> bool:
        """Record ``obj`` unless it was (by the router's announcement or the watcher,
        in two threads at once); whether it was added."""
        if obj is None:
            return False
        with self._record_lock:
            if obj in self._recorded:
                return False
            self._recorded.add(obj)
        rec = plan_record(obj, kind)
        if rec is None:
            return False
        self.plans.append(rec)
        return True

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL):
            if self.mesh.closed:
                break
            try:
                pushed, self._pushed = self._pushed, False
                changed = self.check_plans() or pushed
                link = self.mesh.dashboard_link  # (known later on a connected mesh)
                if link != self.data["dashboard"]:
                    self.data["dashboard"] = link
                    changed = True
                if changed:
                    self.write()
            except Exception:
                pass  # a discovery problem must never reach the user's work

    def stop(self) -> None:
        self._stop.set()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def register(mesh: Mesh, runtime_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write the registration file of ``mesh``; returns its path."""
    with _lock:
        old = _registrations.pop(id(mesh), None)
        if old is not None:
            old.stop()
        reg = _Registration(mesh, registry_dir(runtime_dir))
        _registrations[id(mesh)] = reg
    try:
        reg.start()
    except BaseException:
        with _lock:
            _registrations.pop(id(mesh), None)
        raise
    return reg.path


def unregister(mesh: Mesh) -> None:
    """Remove the registration file of ``mesh`` (no error when there is none), and the
    certificate it shared (:func:`share_security`)."""
    with _lock:
        reg = _registrations.pop(id(mesh), None)
        shared = _shared.pop(id(mesh), None)
    if reg is not None:
        reg.stop()
    if shared is not None:
        _unlink(shared)


#: id(mesh) -> the file sharing a mesh's own certificate (see share_security)
_shared: dict[int, Path] = {}


def share_security(mesh: Mesh, runtime_dir: str | os.PathLike[str] | None = None
                   ) -> Path | None:
    """Let this user's notebooks ``%mesh connect`` to a mesh that runs over TLS with a
    certificate made for it (``mesh.local.tls``, a mesh the sidebar started): the
    certificate goes into a file of this user's alone (``tls-*.json``, mode 600), which
    :func:`security_for` finds by address. Removed when the mesh closes."""
    files = _security_files(mesh)
    if not files or not str(mesh.address).startswith("tls://"):
        return None
    path = registry_dir(runtime_dir) / f"tls-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
    _write_atomic(path, {"format": FORMAT, "address": mesh.address, "pid": os.getpid(),
                         "pid_started": process_start_time(os.getpid()),
                         "security": files})
    with _lock:
        _shared[id(mesh)] = path
    return path


def security_for(address: str, runtime_dir: str | os.PathLike[str] | None = None) -> Any:
    """The ``Security`` to reach the ``tls://`` mesh at ``address`` with, from this
    user's registrations and shared certificates of live processes; None if none has
    it."""
    directory = registry_dir(runtime_dir)
    if not private(directory):
        return None
    try:
        paths = sorted([*directory.glob("mesh-*.json"), *directory.glob("tls-*.json")])
    except OSError:
        return None
    for path in paths:
        if not private(path):
            continue
        try:
            data = _checked(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
        if not pid_alive(data.get("pid"), data.get("pid_started")):
            if path.name.startswith("tls-"):
                _unlink(path)  # a certificate left by a process that died: gone with it
            continue
        if _same_place(data["address"]) != _same_place(address):
            continue
        security = security_of(data)
        if security is not None:
            return security
    return None


def _same_place(address: str) -> str:
    """An address with ``localhost`` written as 127.0.0.1 (both name this machine)."""
    return address.replace("://localhost:", "://127.0.0.1:")


def security_of(reg: dict[str, Any]) -> Any:
    """The ``Security`` a registration's TLS files (or certificates) give, or None (no
    files, or not a ``tls://`` address)."""
    files = reg.get("security")
    if not files or not str(reg.get("address", "")).startswith("tls://"):
        return None
    from distributed.security import Security

    return Security(
        tls_ca_file=files.get("tls_ca_file"),
        tls_client_cert=files.get("tls_client_cert"),
        tls_client_key=files.get("tls_client_key"),
        require_encryption=True,
    )


def registration_of(mesh: Mesh) -> Path | None:
    reg = _registrations.get(id(mesh))
    return reg.path if reg is not None else None


def read_registrations(
    runtime_dir: str | os.PathLike[str] | None = None, *, prune: bool = True
) -> list[dict[str, Any]]:
    """The registrations of live processes; files of dead ones are removed when ``prune``."""
    directory = registry_dir(runtime_dir)
    out = []
    if not private(directory):
        return []  # missing, or not this user's alone: nothing in it is trusted
    try:
        paths = sorted(directory.glob("mesh-*.json"))
    except OSError:
        return []
    for path in paths:
        if not private(path):
            continue  # another user's file: neither read nor removed
        try:
            data = _checked(json.loads(path.read_text()))
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            if prune and time.time() - _mtime(path) > 10:
                _unlink(path)  # unreadable for a while: not a half-written file
            continue
        pid = data.get("pid")
        if not pid_alive(pid, data.get("pid_started")):
            if prune:
                _unlink(path)
            continue
        data["file"] = str(path)
        out.append(data)
    return out


#: fields of a registration and the types they must have (others are dropped)
_FIELDS: dict[str, tuple[type, ...]] = {
    "format": (int,), "id": (str,), "pid": (int,), "pid_started": (int, float),
    "kernel_id": (str,), "scheduler_id": (str,), "dashboard": (str,), "owns_cluster": (bool,), "site": (str,),
    "security": (dict,), "created": (int, float), "updated": (int, float), "plans": (list,),
}


def _checked(data: Any) -> dict[str, Any]:
    """A registration with its fields of the right types (a wrong one is dropped, as
    if absent); ValueError if it is none (no address)."""
    if not isinstance(data, dict) or not isinstance(data.get("address"), str):
        raise ValueError("not a registration")
    out: dict[str, Any] = {"address": data["address"]}
    for name, types in _FIELDS.items():
        value = data.get(name)
        if isinstance(value, bool) and bool not in types:
            continue
        if isinstance(value, types):
            out[name] = value
    security = out.get("security")
    if security is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in security.items()):
        del out["security"]
    if "plans" in out:
        # a plan's time orders the sidebar's list: a plan without a number there is
        # dropped, as a field of the wrong type is
        out["plans"] = [p for p in out["plans"] if isinstance(p, dict) and (
            p.get("at") is None or (isinstance(p["at"], (int, float))
                                    and not isinstance(p["at"], bool)))]
    return out


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _on_mesh_event(event: str, mesh: Mesh) -> None:
    # Only the process's current mesh is the "kernel's mesh"; servers (like the
    # sidebar's) hold meshes with set_current=False and must not register them.
    if event == "open" and _state._current is mesh and enabled():
        try:
            register(mesh)
        except UnsafeRegistry as exc:
            import warnings

            from .errors import callers_level

            warnings.warn(f"jupyter_mesh: the Mesh sidebar will not list this mesh: {exc} "
                          f"(make it yours with mode 700, or set JUPYTER_RUNTIME_DIR)",
                          stacklevel=callers_level())
    elif event == "close":
        unregister(mesh)
    elif event in ("plan", "report"):
        reg = _registrations.get(id(mesh))
        if reg is not None and reg.mesh is mesh:
            reg.record(getattr(mesh, f"last_{event}", None), event)


if _on_mesh_event not in _state.listeners:
    _state.listeners.append(_on_mesh_event)
