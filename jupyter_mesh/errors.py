"""Errors raised by jupyter_mesh."""

from __future__ import annotations


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
