"""The server extension loads and answers its health route."""

from __future__ import annotations

import json

import pytest

from jupyter_mesh import __version__

pytest_plugins = ("pytest_jupyter.jupyter_server",)


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"jupyter_mesh": True}}}


async def test_health(jp_fetch):
    response = await jp_fetch("jupyter-mesh", "api", "health")
    assert response.code == 200
    assert json.loads(response.body) == {"status": "ok", "version": __version__}
