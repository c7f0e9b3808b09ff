"""Local meshes for test modules."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

from distributed.core import Status

import jupyter_mesh as jm
from jupyter_mesh import _state


@contextlib.contextmanager
def fresh_local_mesh(**kwargs) -> Iterator[jm.Mesh]:
    """Close whatever mesh is active, start ``Mesh.local(**kwargs)``, close it after."""
    active = _state.active()
    if active is not None:
        active.close()
    kwargs.setdefault("gpu", 0)
    kwargs.setdefault("tpu", 0)
    mesh = jm.Mesh.local(**kwargs)
    try:
        yield mesh
    finally:
        mesh.close()


def kill_jax_worker_when_busy(mesh: jm.Mesh) -> None:
    """Wait (30 s at most) until the JAX worker runs a task, then SIGKILL it; its nanny
    (in this process) is made to stand down first, as if it had been killed too, so
    nothing restarts the worker."""
    deadline = time.time() + 30
    while time.time() < deadline:
        if any(d.backend == "jax" and d.tasks for d in mesh.inventory()):
            break
        time.sleep(0.05)
    jax_dev = next(d for d in mesh.inventory() if d.backend == "jax")
    for name, nanny in mesh.cluster.workers.items():
        if name.startswith("jax-cpu"):
            nanny.status = Status.closing_gracefully
    os.kill(jax_dev.extra["pid"], signal.SIGKILL)


def kill_worker(mesh: jm.Mesh, dev: Any, stand_down: bool = False) -> None:
    """SIGKILL the worker of device ``dev`` and return once the mesh lists it no more
    (30 s at most); with ``stand_down`` its nanny (in this process) is made to stand
    down first, as if its machine were gone, so nothing restarts it."""
    if stand_down:
        for nanny in mesh.cluster.workers.values():
            if nanny.worker_address == dev.worker:
                nanny.status = Status.closing_gracefully
    os.kill(dev.extra["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(d.worker == dev.worker for d in mesh.inventory()) and \
            time.monotonic() < deadline:
        time.sleep(0.05)


def record_remote_output(monkeypatch) -> list[tuple[float, str]]:
    """Record when each piece of a remote cell's stream output reaches the notebook:
    ``(time.monotonic(), text)`` pairs, appended as they arrive."""
    from jupyter_mesh.remote import _client

    arrivals: list[tuple[float, str]] = []
    show = _client.RemoteCells._show

    def record(self, run, payload, labelled, **kwargs):
        text = "".join(item[2] for item in payload[0] if item[0] == "stream")
        arrivals.append((time.monotonic(), text))
        show(self, run, payload, labelled, **kwargs)

    monkeypatch.setattr(_client.RemoteCells, "_show", record)
    return arrivals


def when_whole(arrivals: list[tuple[float, str]], line: str) -> tuple[float | None, str]:
    """When ``line`` (which may come in pieces) had fully arrived, and all the text
    that had arrived by then."""
    text = ""
    for at, piece in arrivals:
        text += piece
        if line in text:
            return at, text
    return None, text


def remote(ip, line: str, cell: str):
    """``%%mesh --remote LINE`` with ``cell`` as its body, in the shell ``ip``."""
    return ip.run_cell_magic("mesh", "--remote " + line, cell)


def _n_tasks(dask_scheduler) -> int:
    return len(dask_scheduler.tasks)


def tasks_of_left(mesh: jm.Mesh, collection: Any, timeout: float = 5.0) -> int:
    """The tasks of ``collection``'s computation (its layers' keys, and the batches the
    router made of them) that the scheduler still holds once they are gone, or after
    ``timeout`` seconds; what else it holds is printed, for the failure's report."""
    import gc

    gc.collect()
    names = sorted(str(n) for n in collection.__dask_graph__().layers)
    deadline = time.monotonic() + timeout
    while (n := mesh.client.run_on_scheduler(_n_tasks_of, names=names)) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    held = mesh.client.run_on_scheduler(_tasks_held)
    if held:
        print("tasks on the scheduler:", held)
    return n


def _n_tasks_of(dask_scheduler, names) -> int:
    def ours(key: Any) -> bool:
        name = key[0] if isinstance(key, tuple) else str(key)
        return name.startswith("jupyter-mesh-batch-") or any(
            name == n or name.startswith(n + "-") for n in names)

    return sum(1 for k in list(dask_scheduler.tasks) if ours(k))


def tasks_left(mesh: jm.Mesh, timeout: float = 5.0) -> int:
    """The tasks the mesh's scheduler still holds once they are gone, or after
    ``timeout`` seconds (releases reach the scheduler a little after the client's).
    Garbage of earlier tests goes first: a collection they persisted, caught in a
    reference cycle, holds its tasks until Python's cyclic collector runs (a full
    suite on a loaded machine once found 22 such tasks here)."""
    import gc

    gc.collect()
    deadline = time.monotonic() + timeout
    while (n := mesh.client.run_on_scheduler(_n_tasks)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if n:  # what is left, for the failure's report
        print("tasks left on the scheduler:", mesh.client.run_on_scheduler(_tasks_held))
    return n


def _tasks_held(dask_scheduler) -> list[tuple[str, str, list[str], int]]:
    """(key, state, the clients that want it, how many tasks wait for it), a few."""
    return [(str(ts.key), ts.state, sorted(cs.client_key for cs in ts.who_wants or ()),
             len(ts.waiters or ())) for ts in list(dask_scheduler.tasks.values())[:12]]


def line_queue(stream: Any) -> Any:
    """A queue of ``stream``'s lines, read by a thread of their own: a test reads them
    with a time limit (``.get(timeout=...)``), where ``readline`` could wait for ever."""
    import queue
    import threading

    lines: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def widget_tree(w: Any) -> Iterator[Any]:
    """An ipywidget, its layout and style, and the same of its children, all of them."""
    from ipywidgets import Widget

    yield w
    for part in ("layout", "style"):
        if isinstance(getattr(w, part, None), Widget):
            yield getattr(w, part)
    for child in getattr(w, "children", ()):
        yield from widget_tree(child)
