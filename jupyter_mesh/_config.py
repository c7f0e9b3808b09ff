"""The ``mesh:`` section of Dask config: defaults from ``mesh.yaml``, validated reads."""

from __future__ import annotations

import math
import os
from typing import Any

import dask.config
import yaml

from .errors import MeshConfigError

_HERE = os.path.dirname(__file__)
DEFAULTS_PATH = os.path.join(_HERE, "mesh.yaml")
SCHEMA_PATH = os.path.join(_HERE, "mesh-schema.yaml")

with open(DEFAULTS_PATH) as f:
    DEFAULTS: dict[str, Any] = yaml.safe_load(f)

dask.config.update_defaults(DEFAULTS)


def get(key: str) -> Any:
    """Read ``mesh.<key>`` through ``dask.config.get``."""
    return dask.config.get(f"mesh.{key}")


def get_seconds(key: str, *, allow_zero: bool = True, unit: str = "seconds") -> float:
    """Read a non-negative number (of ``unit``), or raise a config error naming the key."""
    value = get(key)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MeshConfigError(
            f"config mesh.{key} must be a number of {unit}, not {value!r}"
        ) from None
    if math.isnan(number) or number < 0 or (number == 0 and not allow_zero):
        raise MeshConfigError(
            f"config mesh.{key} must be a {'non-negative' if allow_zero else 'positive'} "
            f"number of {unit}, not {value!r}"
        )
    return number
