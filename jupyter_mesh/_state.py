"""The active mesh of this process."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import MeshError

if TYPE_CHECKING:
    from .mesh import Mesh

_current: Mesh | None = None
#: callables run with (event, mesh) on "open" and "close", e.g. kernel discovery
listeners: list[Callable[[str, Mesh], None]] = []


def current() -> Mesh:
    """The active mesh of this process.

    Raises
    ------
    MeshError
        When no mesh is active; the message says how to start one.
    """
    if _current is None or _current.closed:
        raise MeshError(
            "no active mesh: run %mesh start (or jm.Mesh.local()) or "
            "%mesh connect ADDRESS (or jm.Mesh.connect(address)) first"
        )
    return _current


def active() -> Mesh | None:
    """The active mesh, or None."""
    if _current is None or _current.closed:
        return None
    return _current


def set_current(mesh: Mesh | None) -> None:
    global _current
    _current = mesh


def notify(event: str, mesh: Mesh) -> None:
    for fn in list(listeners):
        try:
            fn(event, mesh)
        except Exception:  # a listener must never break the mesh
            pass
