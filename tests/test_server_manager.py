"""The sidebar's state, tested alone: MeshManager without Tornado."""

from __future__ import annotations

import asyncio

import pytest

from jupyter_mesh.server.manager import (
    BadRequest,
    Conflict,
    MeshManager,
    NotFound,
    Unreachable,
    validate_connect,
    validate_scale,
    validate_start,
)


class FakePlan:
    route = "auto"
    makespan = 0.5

    def __init__(self, op):
        self.rows = [
            {"op": op, "target": "cpu", "tasks": 4, "est_seconds": 0.25, "bytes_moved": 0.0}
        ]


@pytest.mark.parametrize(
    "body, message",
    [
        ([1], "JSON object"),
        ({"cpu": -1}, "cpu must be a whole number >= 0"),
        ({"cpu": "two"}, "cpu must be"),
        ({"cpu": True}, "cpu must be"),
        ({"gpu": "many"}, "or 'auto'"),
        ({"site": ""}, "site must be"),
        ({"workers": 3}, "unknown option(s) workers"),
        ({"threads_per_worker": 0}, "threads_per_worker must be a whole number >= 1"),
    ],
)
def test_start_options_are_validated(body, message):
    with pytest.raises(BadRequest, match=None) as info:
        validate_start(body)
    assert message in str(info.value)


def test_start_options_pass_through():
    assert validate_start({"cpu": 1, "gpu": "auto", "tpu": 0, "jax_cpu": 0, "site": "lab"}) == {
        "cpu": 1,
        "gpu": "auto",
        "tpu": 0,
        "jax_cpu": 0,
        "site": "lab",
    }
    assert validate_start(None) == {}


@pytest.mark.parametrize(
    "body, message",
    [
        ({}, "JSON object of counts"),
        ({"fpga": 1}, "cannot scale fpga"),
        ({"cpu": -2}, "cpu must be a whole number >= 0"),
    ],
)
def test_scale_counts_are_validated(body, message):
    with pytest.raises(BadRequest) as info:
        validate_scale(body)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "body, message",
    [
        ({}, "address is required"),
        ({"address": "not an address at all"}, "malformed address"),
        ({"address": "tcp://127.0.0.1:1", "timeout": -1}, "timeout must be"),
        ({"address": "tls://127.0.0.1:8786"}, "uses TLS"),
        ({"address": "tcp://127.0.0.1:1", "user": "x"}, "unknown option(s) user"),
    ],
)
def test_connect_body_is_validated(body, message):
    with pytest.raises(BadRequest) as info:
        validate_connect(body)
    assert message in str(info.value)


def test_empty_manager(tmp_path):
    asyncio.run(_empty_manager(tmp_path))


async def _empty_manager(tmp_path):
    async with MeshManager(tmp_path) as manager:
        assert await manager.list() == []
        with pytest.raises(NotFound):
            await manager.get("local-nope")
        with pytest.raises(NotFound):
            await manager.stop("local-nope")
        with pytest.raises(NotFound):
            await manager.scale("local-nope", {"cpu": 1})
        with pytest.raises(Unreachable, match="127.0.0.1:9"):
            await manager.connect({"address": "tcp://127.0.0.1:9", "timeout": 1})
    assert manager.closed
    with pytest.raises(Conflict):
        await manager.start({"cpu": 1})


@pytest.mark.slow
def test_start_scale_connect_stop(tmp_path):
    asyncio.run(_start_scale_connect_stop(tmp_path))


async def _start_scale_connect_stop(tmp_path):
    async with MeshManager(tmp_path) as manager:
        mesh = await manager.start({"cpu": 1, "gpu": 0, "tpu": 0, "site": "lab"})
        assert mesh["origin"] == "sidebar" and mesh["can_scale"] and mesh["can_stop"]
        assert mesh["counts"] == {"cpu": 1}
        (group,) = mesh["groups"]
        assert (group["kind"], group["site"], len(group["devices"])) == ("cpu", "lab", 1)
        assert group["devices"][0]["memory"] > 0
        assert mesh["scale"]["cpu"] == 1
        assert mesh["dashboard"].startswith("http://127.0.0.1:")

        listed = await manager.list()
        assert [m["id"] for m in listed] == [mesh["id"]]
        assert listed[0]["address"] == mesh["address"]

        # a mesh keeps a small utilization history, one sample per read
        await asyncio.sleep(1.0)
        detail = await manager.get(mesh["id"])
        assert len(detail["history"]) >= 2
        assert list(detail["device_history"]) == [group["devices"][0]["worker"]]

        # router plans and reports appear once the mesh has them
        assert detail["plans"] == []
        manager._entries[mesh["id"]].mesh.last_plan = FakePlan("matmul-abc")
        await asyncio.sleep(1.0)
        detail = await manager.get(mesh["id"])
        assert [p["kind"] for p in detail["plans"]] == ["plan"]
        assert detail["plans"][0]["rows"][0]["op"] == "matmul-abc"

        with pytest.raises(BadRequest, match="gpu"):
            await manager.scale(mesh["id"], {"gpu": 1})
        scaled = await manager.scale(mesh["id"], {"cpu": 2})
        assert scaled["counts"] == {"cpu": 2}

        # connecting to an address the server knows gives that mesh, no duplicate
        again = await manager.connect({"address": mesh["address"]})
        assert again["id"] == mesh["id"]

        stopped = await manager.stop(mesh["id"])
        assert stopped == {"id": mesh["id"], "stopped": True, "disconnected": False}
        assert await manager.list() == []
        with pytest.raises(NotFound):
            await manager.get(mesh["id"])
