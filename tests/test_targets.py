from __future__ import annotations

import pytest

from jupyter_mesh.targets import Target, parse_route, parse_target


def test_parse_kind_and_backend():
    assert parse_target("gpu") == Target("gpu", None)
    assert parse_target("cpu:jax") == Target("cpu", "jax")
    assert parse_target(" Cpu : JAX ") == Target("cpu", "jax")  # spaced as people type
    assert str(parse_target("TPU")) == "tpu"
    assert parse_target("cpu:jax").matches("cpu", "jax")
    assert not parse_target("cpu:jax").matches("cpu", "numpy")
    assert parse_target("cpu").matches("cpu", "jax")


@pytest.mark.parametrize("bad", ["fpga", "gpu:numpy", "tpu:cupy", "", "cpu:"])
def test_unknown_targets_say_what_is_allowed(bad):
    with pytest.raises(ValueError, match="cpu:jax"):
        parse_target(bad)


def test_routes():
    assert parse_route("auto") == "auto"
    assert parse_route("off") == "off"
    assert parse_route("gpu") == Target("gpu")
    with pytest.raises(ValueError, match="auto, off"):
        parse_route("fastest")
