"""``JUPYTER_MESH_AUTOSTART``: the embedded local mesh that ``make lab`` starts."""

from __future__ import annotations

import pytest

from jupyter_mesh.server import parse_autostart


def test_parse_key_values_and_json():
    assert parse_autostart("cpu=2, jax_cpu=1,site=lab") == {"cpu": 2, "jax_cpu": 1, "site": "lab"}
    assert parse_autostart('{"cpu": 1}') == {"cpu": 1}
    assert parse_autostart("") == {}


def test_parse_rejects_junk():
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_autostart("cpu")
