"""``JUPYTER_MESH_AUTOSTART``: the embedded local mesh that ``make lab`` starts."""

from __future__ import annotations

import pytest

from jupyter_mesh.server import parse_autostart


def test_parse_key_values_and_json():
    assert parse_autostart("cpu=2, jax_cpu=1,site=lab") == {"cpu": 2, "jax_cpu": 1, "site": "lab"}
    assert parse_autostart('{"cpu": 1}') == {"cpu": 1}
    assert parse_autostart("") == {}
    # a site is a name, even one of digits (it was made a number, and refused)
    assert parse_autostart("cpu=1,site=2024") == {"cpu": 1, "site": "2024"}


def test_parse_rejects_junk():
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_autostart("cpu")


class FakeApp:
    """The part of a Jupyter ServerApp that autostart uses: its log."""

    def __init__(self):
        import logging

        self.log = logging.getLogger("test-jupyter-mesh-autostart")


class FakeManager:
    def __init__(self, fails=None):
        self.bodies = []
        self.fails = fails

    async def start(self, body):
        self.bodies.append(body)
        if self.fails is not None:
            raise self.fails
        return {"address": "tcp://127.0.0.1:1234"}


def _autostart(text, manager):
    """Run the server's autostart on an event loop, as the server does, and let its
    start (if any) run."""
    import asyncio

    from jupyter_mesh.server import _autostart as autostart

    async def run():
        autostart(FakeApp(), manager, text)
        for _ in range(5):
            await asyncio.sleep(0)

    asyncio.run(run())


@pytest.mark.parametrize("text, message", [
    ('{"cpu": 1', "not valid JSON (Expecting ',' delimiter: line 1 column 10 (char 9)): "
                 'give a JSON object like {"cpu": 2}, or KEY=VALUE pairs like cpu=2,jax_cpu=1'),
    ("cpu=two", "cpu must be a whole number from 0 to"),
    ("cpu=\u00b2", "cpu must be a whole number from 0 to"),  # (int() failed on it)
    ("cpu", "expected KEY=VALUE pairs like cpu=2,jax_cpu=1 (or a JSON object), got 'cpu'"),
    ("workers=3", "unknown option(s) workers"),
    ("cpu=1,site=a b", "site must be a name of letters"),
    ("[1]", "expected KEY=VALUE pairs like cpu=2,jax_cpu=1 (or a JSON object), got '[1]'"),
    ('{"cpu": "two"}', "cpu must be a whole number from 0 to"),
])
def test_bad_autostart_is_logged_in_one_line_and_the_server_goes_on(text, message, caplog):
    manager = FakeManager()
    with caplog.at_level("ERROR", logger="test-jupyter-mesh-autostart"):
        _autostart(text, manager)
    (record,) = caplog.records
    said = record.getMessage()
    assert said.startswith(f"jupyter_mesh: ignoring JUPYTER_MESH_AUTOSTART={text!r}: ")
    assert message in said and "\n" not in said
    assert manager.bodies == []  # nothing started


def test_autostart_takes_auto_in_any_case(caplog):
    manager = FakeManager()
    with caplog.at_level("INFO", logger="test-jupyter-mesh-autostart"):
        _autostart("cpu=1,gpu=AUTO", manager)
    assert manager.bodies == [{"cpu": 1, "gpu": "AUTO"}]
    assert "started a local mesh at tcp://127.0.0.1:1234" in caplog.text


def test_an_autostart_that_fails_to_start_is_logged_and_the_server_goes_on(caplog):
    from jupyter_mesh.server.manager import Failed

    manager = FakeManager(fails=Failed("could not start the mesh: no memory; see the log"))
    with caplog.at_level("ERROR", logger="test-jupyter-mesh-autostart"):
        _autostart("cpu=1", manager)
    (record,) = caplog.records
    assert record.getMessage() == ("jupyter_mesh: could not start the local mesh: could not "
                                   "start the mesh: no memory; see the log")
