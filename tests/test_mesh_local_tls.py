"""A local mesh over TLS (``mesh.local.tls``): on a shared machine, other users reach
its 127.0.0.1 ports too; with a certificate made for the mesh, only its own kernel (and
the sidebar, through the private registration) can connect."""

from __future__ import annotations

import dask
import dask.array as da
import pytest
from distributed import Client
from distributed.security import Security

import jupyter_mesh as jm
from jupyter_mesh import MeshError, _config, discovery
from jupyter_mesh.server.manager import _security_from

from .meshes import fresh_local_mesh


@pytest.fixture(scope="module")
def mesh():
    with dask.config.set({"mesh.local.tls": True}):
        with fresh_local_mesh(cpu=1) as m:
            yield m


def test_the_mesh_runs_over_tls_and_works(mesh):
    assert mesh.address.startswith("tls://127.0.0.1:")
    assert all(d.worker.startswith("tls://127.0.0.1:") for d in mesh.inventory())
    assert (da.arange(100, chunks=10) * 2).sum().compute() == 9900
    assert mesh.run_cell("6 * 7", value=True).value == 42
    # a worker started later gets the mesh's certificate too
    mesh.scale(cpu=2)
    assert len(mesh.inventory()) == 2
    mesh.scale(cpu=1)


def test_nobody_else_can_connect(mesh, tmp_path, monkeypatch):
    # another user: not this user's registrations (those hold the certificate)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    hostport = mesh.address.split("://")[1]
    with pytest.raises(MeshError, match="uses TLS: give its certificates"):
        jm.Mesh.connect(mesh.address, set_current=False, timeout=3)
    with pytest.raises(OSError):
        Client("tcp://" + hostport, timeout=3)
    # a certificate of another authority is refused as well
    with pytest.raises(OSError):
        Client(mesh.address, security=Security.temporary(), timeout=3)


def test_the_sidebar_connects_with_the_registration(mesh, tmp_path):
    path = discovery.register(mesh, tmp_path)
    try:
        (reg,) = discovery.read_registrations(tmp_path)
        assert oct(path.stat().st_mode & 0o777) == "0o600"  # it holds the key
        security = _security_from(reg)
        with jm.Mesh.connect(reg["address"], security=security, set_current=False,
                             timeout=10) as other:
            assert len(other.inventory()) == 1
    finally:
        discovery.unregister(mesh)


def test_tls_config(monkeypatch):
    with dask.config.set({"mesh.local.tls": "auto"}):
        monkeypatch.delenv("JUPYTERHUB_USER", raising=False)
        assert _config.local_tls() is False
        monkeypatch.setenv("JUPYTERHUB_USER", "ada")
        assert _config.local_tls() is True
    # the words the message names, as text too (Dask reads its environment so)
    for text, flag in (("false", False), ("True", True), (" FALSE ", False)):
        with dask.config.set({"mesh.local.tls": text, "mesh.local.pin-jax": text}):
            assert _config.local_tls() is flag and _config.pin_jax() is flag
    with dask.config.set({"mesh.local.tls": "yes"}):
        with pytest.raises(MeshError, match="mesh.local.tls must be true, false or auto"):
            jm.Mesh.local(cpu=1, gpu=0, tpu=0, set_current=False)


def test_a_notebook_connects_by_address_to_its_users_tls_mesh(mesh, tmp_path, monkeypatch,
                                                              caplog):
    # as %mesh connect ADDRESS does (the sidebar's snippet): the certificate comes from
    # this user's private registrations, found by address
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(MeshError, match="uses TLS: give its certificates"):
        jm.Mesh.connect(mesh.address, set_current=False, timeout=3)
    path = discovery.share_security(mesh)
    assert path is not None and oct(path.stat().st_mode & 0o777) == "0o600"
    try:
        with caplog.at_level("WARNING", logger="distributed.comm.tcp"), \
                jm.Mesh.connect(mesh.address, set_current=False, timeout=10) as other:
            assert len(other.inventory()) == 1
        # its look whether anything listens is no failed handshake to the scheduler (it
        # warned of one, in the first notebook's cell, at every connect)
        assert "TLS handshake failed" not in caplog.text
        # localhost is this machine too
        by_name = mesh.address.replace("127.0.0.1", "localhost")
        assert discovery.security_for(by_name) is not None
    finally:
        discovery.unregister(mesh)
    assert not path.exists()


def test_the_sidebar_shares_the_certificate_of_a_tls_mesh_it_starts(tmp_path):
    import asyncio

    from jupyter_mesh.server.manager import MeshManager

    async def go():
        with dask.config.set({"mesh.local.tls": True}):
            async with MeshManager(tmp_path) as manager:
                started = await manager.start({"cpu": 1, "gpu": 0, "tpu": 0})
                assert started["address"].startswith("tls://")
                security = discovery.security_for(started["address"], tmp_path)
                assert security is not None
                await manager.stop(started["id"])
                # stopped: its certificate is gone with it
                assert discovery.security_for(started["address"], tmp_path) is None

    asyncio.run(go())
