from __future__ import annotations

import dask.config
import pytest
import yaml

import jupyter_mesh  # noqa: F401
from jupyter_mesh import _config
from jupyter_mesh.errors import MeshConfigError


def _walk(defaults, schema, path=""):
    """Every key of the defaults has a schema entry with a description, and back."""
    props = schema.get("properties", {})
    assert set(defaults) == set(props), f"{path}: yaml {set(defaults)} vs schema {set(props)}"
    for key, value in defaults.items():
        entry = props[key]
        assert entry.get("description"), f"{path}{key} has no description"
        if isinstance(value, dict):
            _walk(value, entry, f"{path}{key}.")


def test_defaults_and_schema_agree():
    with open(_config.SCHEMA_PATH) as f:
        schema = yaml.safe_load(f)
    _walk(_config.DEFAULTS, schema)


def test_config_is_read_through_dask_config():
    assert dask.config.get("mesh.fallback-timeout") == 5
    with dask.config.set({"mesh.fallback-timeout": 7}):
        assert _config.get_seconds("fallback-timeout") == 7


@pytest.mark.parametrize("bad", [-1, "soon", float("nan")])
def test_bad_seconds_name_the_key(bad):
    with dask.config.set({"mesh.progress-after": bad}):
        with pytest.raises(MeshConfigError, match="mesh.progress-after"):
            _config.get_seconds("progress-after")


def test_env_var_overrides(monkeypatch):
    monkeypatch.setenv("DASK_MESH__CONNECT_TIMEOUT", "3")
    dask.config.refresh()
    try:
        assert _config.get_seconds("connect-timeout") == 3
    finally:
        monkeypatch.delenv("DASK_MESH__CONNECT_TIMEOUT")
        dask.config.refresh()


@pytest.mark.parametrize("key, unit", [
    ("pcie-bandwidth", "bytes per second"), ("pcie-latency", "seconds"),
    ("network-bandwidth", "bytes per second"), ("wan-bandwidth", "bytes per second"),
    ("wan-latency", "seconds"),
])
@pytest.mark.parametrize("bad", ["fast", 0, -2])
def test_bad_link_figures_name_the_key_and_its_unit(key, unit, bad):
    from jupyter_mesh.router.cost import Links

    with dask.config.set({f"mesh.links.{key}": bad}):
        with pytest.raises(MeshConfigError, match=rf"mesh\.links\.{key} must be a .*{unit}"):
            Links.from_config()
    assert Links.from_config().network_bandwidth > 0  # the defaults again
