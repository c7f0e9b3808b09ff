"""jupyter_mesh: a heterogeneous compute mesh (CPUs, GPUs, TPUs) for Jupyter, on Dask."""

from __future__ import annotations

from . import _config, discovery  # noqa: F401  (Dask config section; kernel mesh discovery)
from ._version import __version__
from .devices import Profile
from .errors import MeshConfigError, MeshError, MeshFallbackWarning
from .inventory import Device, Inventory
from .mesh import Mesh, MeshVersionWarning, current

__all__ = [
    "Device",
    "Inventory",
    "Mesh",
    "MeshConfigError",
    "MeshError",
    "MeshFallbackWarning",
    "MeshVersionWarning",
    "Profile",
    "__version__",
    "current",
    "load_ipython_extension",
]


def load_ipython_extension(ipython):  # pragma: no cover - exercised through IPython
    """``%load_ext jupyter_mesh``: register the ``%mesh`` magics."""
    from .errors import MeshError
    from .magics import MeshMagics, show_mesh_error

    ipython.register_magics(MeshMagics)
    if not ipython.custom_exceptions:  # another extension's handler stays
        # a MeshError in a cell shows its one line and where in the cell it came from
        ipython.set_custom_exc((MeshError,), show_mesh_error)


def unload_ipython_extension(ipython):
    """``%unload_ext jupyter_mesh``: the ``%mesh`` magics and the one-line MeshError go
    (a mesh that is running stays: ``%mesh close`` it first to stop it)."""
    from .errors import MeshError

    for kind in ("line", "cell"):
        ipython.magics_manager.magics[kind].pop("mesh", None)
    if tuple(ipython.custom_exceptions) == (MeshError,):
        ipython.set_custom_exc((), None)


def _jupyter_labextension_paths():
    return [{"src": "labextension", "dest": "jupyter-mesh"}]


def _jupyter_server_extension_points():
    return [{"module": "jupyter_mesh.server"}]
