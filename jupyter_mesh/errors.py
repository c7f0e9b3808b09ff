"""Errors raised by jupyter_mesh."""

from __future__ import annotations

import os
import sys


class MeshError(RuntimeError):
    """A mesh cannot do what was asked; the message says what to do instead."""


class MeshConfigError(MeshError, ValueError):
    """A ``mesh.*`` Dask config value is invalid; the message names the key."""


class MeshFallbackWarning(RuntimeWarning):
    """A routed computation lost a device kind and finished on what was left."""


def check_flag(name: str, value: object) -> bool:
    """``value`` of the keyword ``name`` is True or False: a truthy ``"no"`` must not
    pass for True."""
    if not isinstance(value, bool):
        raise MeshError(f"{name}= takes True or False, not {value!r}")
    return value


#: the packages whose frames stand between a user's code and a warning of jupyter_mesh
#: (Dask's, for a plain ``.compute()`` inside ``mesh.route``; IPython's, for a magic)
_BETWEEN = ("dask", "distributed", "IPython")


def callers_level() -> int:
    """The ``stacklevel`` that points a warning from the function calling this at the
    user's own code: the first frame outside jupyter_mesh, Dask, distributed and
    IPython (a ``%mesh`` magic's line in a cell, a ``.compute()`` in a script)."""
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    dirs = [here]
    for name in _BETWEEN:
        path = getattr(sys.modules.get(name), "__file__", None)
        if path:
            dirs.append(os.path.dirname(path) + os.sep)
    skip = tuple(dirs)
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level
