"""Remote cells: run a notebook cell on a mesh worker of the kind you ask for.

``%%mesh --remote`` and :meth:`jupyter_mesh.Mesh.run_cell` send a cell straight to one
worker (or every matching worker) over Dask's comms, keep a per-notebook namespace
there, stream its output back while it runs, and bring values back by name.
"""

from __future__ import annotations

from ._client import CellResult, RemoteCells, RemoteOutput
from ._errors import (
    CellSyntaxError,
    RemoteCellError,
    RemoteCellLost,
    RemoteCellTimeout,
    RemoteFailure,
    StoppedWaiting,
)
from ._worker_plugin import RemoteCellsPlugin

__all__ = [
    "CellResult",
    "CellSyntaxError",
    "RemoteCellError",
    "RemoteCellLost",
    "RemoteCellTimeout",
    "RemoteCells",
    "RemoteCellsPlugin",
    "RemoteFailure",
    "RemoteOutput",
    "StoppedWaiting",
]
