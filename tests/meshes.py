"""Local meshes for test modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
