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


def unknown_keys() -> list[tuple[str, str | None]]:
    """``mesh.*`` settings that no setting has (a typo: ``mesh.fallback-timout``), each
    with the setting it most likely meant (None where none is near)."""
    return _unknown(dask.config.get("mesh", {}), DEFAULTS.get("mesh", {}), "mesh.")


def _unknown(config: Any, defaults: Any, prefix: str) -> list[tuple[str, str | None]]:
    import difflib

    if not isinstance(config, dict) or not isinstance(defaults, dict):
        return []
    known = {k.replace("_", "-"): k for k in defaults}
    out: list[tuple[str, str | None]] = []
    for key, value in config.items():
        name = str(key).replace("_", "-")
        if name in known:
            out.extend(_unknown(value, defaults[known[name]], f"{prefix}{name}."))
            continue
        near = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
        out.append((f"{prefix}{key}", f"{prefix}{near[0]}" if near else None))
    return out


def check_sections() -> None:
    """A :class:`MeshConfigError` for a ``mesh`` section that a Dask YAML file or a
    ``DASK_MESH...`` variable gives a single value (``local: 5``): Dask merges this
    package's defaults over it, and it vanished without a word."""
    try:
        given = dask.config.collect(paths=dask.config.paths)
    except Exception:  # (a file Dask cannot read: Dask itself says so as it loads)
        return
    bad = _scalar_section(given.get("mesh"), DEFAULTS, "mesh")
    if bad is not None:
        key, value = bad
        raise MeshConfigError(
            f"config {key} is a section of settings ({', '.join(_section_keys(key))}), "
            f"not {value!r} (in a Dask YAML file or a DASK_ variable): give it one "
            f"setting per line under it (see the defaults in jupyter_mesh/mesh.yaml)"
        )


def _scalar_section(value: Any, defaults: Any, key: str) -> tuple[str, Any] | None:
    node = defaults.get(key.rsplit(".", 1)[-1]) if isinstance(defaults, dict) else None
    if not isinstance(node, dict) or value is None:
        return None
    if not isinstance(value, dict):
        return key, value
    known = {k.replace("_", "-"): k for k in node}
    for name, sub in value.items():
        k = known.get(str(name).replace("_", "-"))
        if k is not None:
            found = _scalar_section(sub, node, f"{key}.{k}")
            if found is not None:
                return found
    return None


def _section_keys(key: str) -> list[str]:
    node: Any = DEFAULTS
    for part in key.split("."):
        node = node[part]
    return sorted(node)


_warned: set[str] = set()


def unknown_key_messages() -> list[str]:
    """What :func:`warn_unknown_keys` says, once per process per key."""
    out = []
    for key, near in unknown_keys():
        if key in _warned:
            continue
        _warned.add(key)
        out.append(f"config {key} is no setting, and changes nothing"
                   + (f": did you mean {near}?" if near else
                      " (the settings are in the README's table)"))
    return out


def warn_unknown_keys() -> None:
    """Warn once per process about each ``mesh.*`` setting that no setting has: it
    changes nothing, and a typo in a key was ignored without a word."""
    import warnings

    from .errors import callers_level

    for message in unknown_key_messages():
        # at the user's call (Mesh.local, or the %mesh start line of a cell)
        warnings.warn(f"jupyter_mesh: {message}", UserWarning, stacklevel=callers_level())


def get(key: str) -> Any:
    """Read ``mesh.<key>`` through ``dask.config.get``; a key that is not there (a
    section set as a whole, which replaces the others' defaults) is a
    :class:`MeshConfigError` that names that section and says how to set one key."""
    try:
        return dask.config.get(f"mesh.{key}")
    except (KeyError, TypeError, IndexError):
        pass
    parts = key.split(".")
    node: Any = DEFAULTS.get("mesh", {})
    for part in parts:  # a key no setting has is this code's mistake, not the user's
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"mesh.{key}")
        node = node[part]
    # the first level that is gone (or is no section): what the user set as a whole
    at, node = "mesh", dask.config.get("mesh", None)
    for part in parts:
        if not isinstance(node, dict):
            break
        if part not in node and part.replace("-", "_") not in node:
            break
        at, node = f"{at}.{part}", node.get(part, node.get(part.replace("-", "_")))
    raise MeshConfigError(
        f"config mesh.{key} is missing: setting {at} as a whole replaces its other "
        f"keys; set the keys one by one instead, like "
        f"dask.config.set({{'mesh.{key}': ...}})")


def get_number(key: str) -> float:
    """Read ``mesh.<key>`` as a float; NaN for anything that is not a number (YAML's
    yes/no too), for the caller's range check to refuse with its own message."""
    value = get(key)
    try:
        if isinstance(value, bool):
            raise TypeError(value)
        return float(value)
    except (TypeError, ValueError):
        return math.nan


#: the longest wait a setting may ask for: longer ones overflow event loops' clocks,
#: or amount to waiting for ever, which a mesh never does (a day)
MOST_SECONDS = 86400.0

#: settings that are waits, held to MOST_SECONDS (mesh.progress-after is not: ".inf"
#: there means no progress bar)
WAITS = frozenset({"connect-timeout", "fallback-timeout", "remote.worker-wait",
                   "remote.interrupt-grace", "remote.connect-timeout"})

#: every setting of seconds held to MOST_SECONDS: the waits, and the times the cost
#: model adds up (a latency of 1e300 s made every estimate infinite, and the plans
#: arbitrary) and the time a worker's profile may take
DAY_AT_MOST = WAITS | {"profile.measure-seconds", "task-overhead", "dependency-latency",
                       "links.pcie-latency", "links.network-latency", "links.wan-latency"}

#: the most bytes per second a link setting may say (a petabyte per second; more, or
#: infinity, is no link this model can add up)
MOST_BANDWIDTH = 1e15


def get_seconds(key: str, *, allow_zero: bool = True, unit: str = "seconds") -> float:
    """Read a non-negative number (of ``unit``), or raise a config error naming the key
    (a setting among :data:`DAY_AT_MOST` is at most a day, a bandwidth at most
    :data:`MOST_BANDWIDTH`)."""
    value = get(key)
    try:
        if isinstance(value, bool):  # YAML's yes/no: no number of seconds
            raise TypeError(value)
        # YAML's infinity, as a string where it came from elsewhere (a variable
        # DASK_MESH__PROGRESS_AFTER=.inf, dask.config.set)
        number = float(value.strip().lower().replace(".inf", "inf")
                       if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise MeshConfigError(
            f"config mesh.{key} must be a number of {unit}, not {value!r}"
        ) from None
    if math.isnan(number) or number < 0 or (number == 0 and not allow_zero):
        raise MeshConfigError(
            f"config mesh.{key} must be a {'non-negative' if allow_zero else 'positive'} "
            f"number of {unit}, not {value!r}"
        )
    if key in DAY_AT_MOST and number > MOST_SECONDS:
        raise MeshConfigError(
            f"config mesh.{key} must be at most {MOST_SECONDS:g} s (a day), not {value!r}")
    if key.endswith("-bandwidth") and number > MOST_BANDWIDTH:
        raise MeshConfigError(f"config mesh.{key} must be at most {MOST_BANDWIDTH:g} "
                              f"{unit} (a petabyte per second), not {value!r}")
    return number


def get_count(key: str, *, unit: str = "tasks", default: int | None = None) -> int:
    """Read a whole number (of ``unit``) >= 0, or raise a config error naming the key.

    ``default`` is returned where the key is unset or null (when given)."""
    try:
        value = get(key)
    except KeyError:
        if default is None:
            raise
        return default
    if value is None and default is not None:
        return default
    number: Any = value
    if isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    elif isinstance(value, float) and value.is_integer():
        number = int(value)  # 2.0e+4 in YAML
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise MeshConfigError(
            f"config mesh.{key} must be a whole number of {unit} >= 0, not {value!r}"
        )
    return number


def is_host(value: Any) -> bool:
    """An interface address to listen on (``127.0.0.1``, ``::1``, ``0.0.0.0``, a name):
    never empty, which Dask would take for every interface."""
    return (isinstance(value, str) and bool(value.strip())
            and not any(c.isspace() for c in value) and "/" not in value)


def get_host() -> str:
    """``mesh.local.host``, the interface a local mesh listens on."""
    value = get("local.host")
    if not is_host(value):
        raise MeshConfigError(
            f"config mesh.local.host must be an interface address like '127.0.0.1' (this "
            f"machine only), not {value!r}"
        )
    return str(value)


def _flag(value: Any) -> Any:
    """"true" and "false" (any case) as the booleans, as Dask reads them from its
    environment variables; anything else as it is."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


def local_tls() -> bool:
    """``mesh.local.tls``: whether a local mesh runs over TLS (``auto``: under
    JupyterHub, where users share machines)."""
    value = get("local.tls")
    if isinstance(value, str) and value.strip().lower() == "auto":
        return bool(os.environ.get("JUPYTERHUB_USER"))
    value = _flag(value)
    if isinstance(value, bool):
        return value
    raise MeshConfigError(f"config mesh.local.tls must be true, false or auto, not {value!r}")


def pin_jax() -> bool | str:
    """``mesh.local.pin-jax``: True, False or ``"auto"``."""
    value = get("local.pin-jax")
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    value = _flag(value)
    if isinstance(value, bool):
        return value
    raise MeshConfigError(f"config mesh.local.pin-jax must be true, false or auto, not "
                          f"{value!r}")


def dashboard_options(host: str) -> dict[str, Any]:
    """The Dask ``Scheduler`` options for ``mesh.local.dashboard-address``.

    ``HOST:PORT`` as given; ``:PORT`` (or a bare port) on ``host``, the interface the
    mesh listens on (Dask would take all interfaces); null or false: no dashboard (Dask's
    HTTP server, for its health checks, stays on ``host``)."""
    from distributed.comm.addressing import parse_host_port, unparse_host_port

    value = get("local.dashboard-address")
    if value is None or value is False:
        bare = host.strip("[]")
        return {"dashboard": False,
                "dashboard_address": (bare, 0) if ":" in bare else unparse_host_port(bare, 0)}
    bad = MeshConfigError(
        f"config mesh.local.dashboard-address must be HOST:PORT like '127.0.0.1:8787', "
        f"':0' (a free port on mesh.local.host), or null to turn the dashboard off, "
        f"not {value!r}"
    )
    if isinstance(value, int) and not isinstance(value, bool):
        text = f":{value}"
    elif isinstance(value, str) and value.strip() and not any(c.isspace() for c in value):
        text = f":{value}" if value.isdigit() else value
    else:
        raise bad
    if "://" in text or ":" not in text:
        raise bad
    try:
        dash_host, port = parse_host_port(text)
    except Exception:
        raise bad from None
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise bad
    dash_host = (dash_host or host).strip("[]")
    if ":" in dash_host:
        # IPv6: Dask splits a text address at every ":", so it takes the pair instead
        return {"dashboard_address": (dash_host, port)}
    return {"dashboard_address": unparse_host_port(dash_host, port)}
