"""Mesh.connect and %mesh connect against real schedulers, plain and mutual TLS."""

from __future__ import annotations

import os
import re
import socket
import threading
import time

import dask.array as da
import pytest
from distributed import LocalCluster
from distributed.security import Security
from IPython.core.error import UsageError

import jupyter_mesh as jm
from jupyter_mesh import MeshError

from .certs import make_certs
from .meshes import line_queue


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def _security(certs, role_cert=True):
    kw = dict(tls_ca_file=certs["ca"], require_encryption=True)
    if role_cert:
        for role in ("scheduler", "worker", "client"):
            kw[f"tls_{role}_cert"] = certs["cert"]
            kw[f"tls_{role}_key"] = certs["key"]
    return Security(**kw)


@pytest.fixture(scope="module")
def tls_cluster(certs):
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, protocol="tls://",
        host="127.0.0.1", dashboard_address=None, security=_security(certs),
    ) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def tcp_cluster():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://",
                      host="127.0.0.1", dashboard_address=None) as cluster:
        yield cluster


def test_connect_plain_tcp_and_see_plain_workers(no_mesh, tcp_cluster):
    with jm.Mesh.connect(tcp_cluster.scheduler_address, timeout=5) as mesh:
        assert not mesh.owns_cluster
        assert jm.current() is mesh
        inv = mesh.inventory()
        assert len(inv) == 1
        assert inv[0].model.startswith("unknown (plain Dask worker)")
        assert da.ones(10, chunks=5).sum().compute() == 10
        with pytest.raises(MeshError, match="not started here"):
            mesh.scale(cpu=2)
        # the scheduler runs no dashboard (only Dask's HTTP server, which Dask reports
        # as one): no link to a page that is not there
        assert mesh.dashboard_link is None
    # host:port without a scheme means tcp://
    hostport = tcp_cluster.scheduler_address.split("://")[1]
    with jm.Mesh.connect(hostport, timeout=5) as mesh:
        assert mesh.address == tcp_cluster.scheduler_address


def test_plain_workers_take_no_restricted_routed_work_and_say_so(no_mesh, tcp_cluster):
    # they advertise none of the resources routed tasks are kept to: site= waited for
    # ever, and a forced target or needs= waited for the fallback's timeout and then
    # said a live worker was lost
    import numpy as np

    y = da.ones((100, 100), chunks=50).sum()
    with jm.Mesh.connect(tcp_cluster.scheduler_address, timeout=5) as mesh:
        started = time.monotonic()
        for call, what in [
            (lambda: mesh.compute(y, site="unknown"), "site='unknown'"),
            (lambda: mesh.compute(y, route="cpu:numpy"), "route=cpu:numpy"),
            (lambda: mesh.submit(np.sum, np.ones(3), needs="reduction"), "needs='reduction'"),
            (lambda: mesh.submit(np.sum, np.ones(3), on="cpu"), "on='cpu'"),
        ]:
            with pytest.raises(MeshError, match=rf"^{re.escape(what)} needs the mesh's own "
                                                r"workers, and these are plain Dask workers"):
                call()
        assert time.monotonic() - started < 4  # at once, not after the fallback's 5 s
        # what restricts nothing runs as before
        assert mesh.compute(y)[0] == 10000
        assert mesh.submit(np.sum, np.ones(3)).result() == 3


def test_a_scheduler_with_a_dashboard_keeps_its_link(no_mesh):
    with LocalCluster(n_workers=0, processes=False, protocol="tcp://", host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster:
        with jm.Mesh.connect(cluster.scheduler_address, timeout=5) as mesh:
            link = mesh.dashboard_link
            assert link and link.endswith("/status")
            assert link.split("/")[2] == cluster.dashboard_link.split("/")[2]


def test_mutual_tls_compute(no_mesh, tls_cluster, certs):
    assert tls_cluster.scheduler_address.startswith("tls://")
    with jm.Mesh.connect(tls_cluster.scheduler_address, security=_security(certs)) as mesh:
        assert (da.arange(100, chunks=10) * 2).sum().compute() == 9900
        assert len(mesh.inventory()) == 1


def test_plaintext_client_is_refused_by_tls_scheduler(no_mesh, tls_cluster, certs):
    hostport = tls_cluster.scheduler_address.split("://")[1]
    # the scheduler resets the connection, which says nothing of why: asked in TLS, it
    # answers, so the message says to use TLS (it said to check the address)
    for address in ("tcp://" + hostport, hostport):
        with pytest.raises(MeshError) as err:
            jm.Mesh.connect(address, timeout=3)
        assert re.match(rf"^tcp://{re.escape(hostport)} does not answer in plain tcp \(.*\): "
                        rf"the scheduler there speaks TLS, as far as this can tell; use "
                        rf"tls://{re.escape(hostport)} with its CA file and your certificate "
                        rf"and key \(--tls-ca-file, --tls-cert, --tls-key; from Python, "
                        rf"security=Security\(\.\.\.\)\)$", str(err.value)), str(err.value)
        assert "<TCP" not in str(err.value)  # Dask's comm, not a reason
    # and a worker told to join it
    import subprocess
    import sys

    cli = os.path.join(os.path.dirname(sys.executable), "jupyter-mesh")
    out = subprocess.run([cli, "worker", "tcp://" + hostport, "--nthreads", "1"],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "the scheduler there speaks TLS" in out.stderr.strip().splitlines()[-1], out.stderr
    with pytest.raises(MeshError, match="uses TLS: give its certificates"):
        jm.Mesh.connect(tls_cluster.scheduler_address)
    # a client with the CA but no client certificate is refused too (mutual TLS), at
    # once, before anything is sent
    with pytest.raises(MeshError, match="security has no tls_client_cert"):
        jm.Mesh.connect(tls_cluster.scheduler_address,
                        security=_security(certs, role_cert=False), timeout=3)


def test_magic_tls_options(ip, no_mesh, tls_cluster, certs, capsys):
    ip.run_line_magic(
        "mesh",
        f"connect {tls_cluster.scheduler_address} --tls-ca-file {certs['ca']} "
        f"--tls-cert {certs['cert']} --tls-key {certs['key']}",
    )
    mesh = jm.current()
    assert mesh.address == tls_cluster.scheduler_address
    assert da.ones(4, chunks=2).sum().compute() == 4
    # %mesh close of a mesh connected to disconnects, and says the mesh runs on (it
    # said "Closed the mesh at ...", on a shared hub as if it had stopped it for all)
    ip.run_line_magic("mesh", "close")
    assert (f"Disconnected from the mesh at {tls_cluster.scheduler_address} (it runs on: "
            f"its owner closes it)." in capsys.readouterr().out)
    assert mesh.closed and tls_cluster.scheduler.status.name == "running"


def test_non_dask_port_fails_within_timeout_naming_address(no_mesh, silent_port):
    t0, cpu0 = time.monotonic(), time.process_time()
    with pytest.raises(MeshError, match=f"127.0.0.1:{silent_port}.*within 2 s"):
        jm.Mesh.connect(f"tcp://127.0.0.1:{silent_port}", timeout=2)
    # when it says: not 5 s later, after spinning a core on the probe's failed result
    assert time.monotonic() - t0 < 6.5
    assert time.process_time() - cpu0 < 2.0


def test_a_refused_port_or_unknown_host_fails_at_once(no_mesh):
    # Dask's own connect retries a refused port until its timeout: nothing listens
    # there now, so the user hears so at once, and why
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # a port nothing listens on
    for address, why in ((f"tcp://127.0.0.1:{port}", "connection refused: nothing "
                          f"listens on port {port} of 127.0.0.1"),
                         ("tcp://no-such-host.invalid:8786", "host 'no-such-host.invalid' "
                          "not found")):
        t0 = time.monotonic()
        with pytest.raises(MeshError, match=re.escape(f"could not connect to {address} ({why}")):
            jm.Mesh.connect(address, timeout=30)
        assert time.monotonic() - t0 < 10


def test_a_server_of_another_protocol_is_said_not_a_scheduler(no_mesh):
    # a server that answers with bytes that are no Dask message (an SSH banner, which
    # Dask reads as a frame of 2.8 EiB): said so, not Dask's reader's own failure
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
            time.sleep(0.5)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        with pytest.raises(MeshError, match="this is not a Dask scheduler") as err:
            jm.Mesh.connect(f"tcp://127.0.0.1:{port}", timeout=5)
        assert "allocate" not in str(err.value) and "\n" not in str(err.value)
    finally:
        srv.close()


@pytest.mark.parametrize("bad", ["", "tcp://", "tcp://host", "h:port", 42,
                                 "tcp://127.0.0.1:99999", "tcp://127.0.0.1:0", "\ud800:9"])
def test_malformed_addresses(no_mesh, bad):
    with pytest.raises(MeshError, match="malformed address"):
        jm.Mesh.connect(bad)


def test_a_scheme_in_capitals_is_taken():
    from jupyter_mesh.mesh import check_address

    assert check_address("TCP://127.0.0.1:8786") == "tcp://127.0.0.1:8786"
    # a scheme that cannot be printed is said as Python writes it
    with pytest.raises(MeshError, match=r"not '\\ud800'"):
        check_address("\ud800://x:1")


@pytest.mark.parametrize("bad", ["ftp://h:1", "inproc://x", "ucx://127.0.0.1:5",
                                 "http://127.0.0.1:8787/status"])
def test_an_address_of_another_protocol_says_which_it_takes(no_mesh, bad):
    # a dashboard's http:// address was "malformed"
    scheme = bad.split("://")[0]
    with pytest.raises(MeshError, match=rf"^'{re.escape(bad)}': a Dask scheduler's address "
                                        rf"starts with tcp:// or tls:// or ws:// or wss://, "
                                        rf"not '{scheme}': use tcp://HOST:PORT"):
        jm.Mesh.connect(bad)


@pytest.mark.parametrize("bad", [0, -1, "5", True])
def test_bad_timeouts(no_mesh, bad):
    with pytest.raises(MeshError, match="timeout must be a positive number"):
        jm.Mesh.connect("tcp://127.0.0.1:1", timeout=bad)


@pytest.mark.parametrize("huge", [1e10, 1e308])
def test_a_timeout_longer_than_a_day_is_refused(no_mesh, huge):
    # longer ones overflow the event loop's clock, or wait for ever
    with pytest.raises(MeshError, match=r"^timeout must be at most 86400 s \(a day\)"):
        jm.Mesh.connect("tcp://127.0.0.1:1", timeout=huge)


def test_tls_files_are_checked_before_connecting(no_mesh, certs, tmp_path):
    with pytest.raises(MeshError, match=r"tcp://127.0.0.1:1 is not a TLS address, but TLS "
                                        r"files were given: use tls://127.0.0.1:1"):
        jm.Mesh.connect("tcp://127.0.0.1:1", security=_security(certs))
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(MeshError, match=r"the TLS files could not be read \(.*\): the CA, "
                                        r"certificate and key must be PEM files"):
        jm.Mesh.connect("tls://127.0.0.1:1", security=Security(
            tls_ca_file=str(bad), tls_client_cert=certs["cert"],
            tls_client_key=certs["key"], require_encryption=True))
    # Dask's TLS needs a CA and a client certificate: said at once, in one line
    with pytest.raises(MeshError, match=r"^security has no tls_client_cert: a tls:// "
                                        r"scheduler needs Security\(tls_ca_file="):
        jm.Mesh.connect("tls://127.0.0.1:1", security=Security(
            tls_ca_file=certs["ca"], require_encryption=True))
    with pytest.raises(MeshError, match=r"^security has no tls_ca_file and tls_client_cert"):
        jm.Mesh.connect("tls://127.0.0.1:1", security=Security(require_encryption=True))
    with pytest.raises(MeshError, match="the TLS files could not be read"):
        jm.Mesh.connect("tls://127.0.0.1:1", security=Security(
            tls_ca_file=certs["ca"], tls_client_cert=certs["ca"],  # a CA is not a key
            tls_client_key=certs["ca"], require_encryption=True))


def test_a_key_that_is_not_the_certificates_is_said_so(no_mesh, certs, tmp_path):
    # it said "could not be read (KEY_VALUES_MISMATCH): ... must be PEM files": they are
    from .certs import make_certs

    other = make_certs(tmp_path)
    with pytest.raises(MeshError) as info:
        jm.Mesh.connect("tls://127.0.0.1:1", security=Security(
            tls_ca_file=certs["ca"], tls_client_cert=certs["cert"],
            tls_client_key=other["key"], require_encryption=True))
    assert str(info.value) == (f"the TLS key {other['key']} is not the key of the "
                               f"certificate {certs['cert']}: give the key made with that "
                               f"certificate")


def test_a_key_encrypted_with_a_passphrase_is_said_so(no_mesh, certs, tmp_path):
    # OpenSSL asked for the passphrase on the terminal and waited for ever (without
    # one: "could not be read ... must be PEM files")
    import subprocess
    import sys

    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(open(certs["key"], "rb").read(), None)
    locked = tmp_path / "locked-key.pem"
    locked.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    want = (f"the TLS key {locked} is encrypted with a passphrase, which Dask cannot give: "
            f"use an unencrypted copy of it")
    with pytest.raises(MeshError) as info:
        jm.Mesh.connect("tls://127.0.0.1:1", security=Security(
            tls_ca_file=certs["ca"], tls_client_cert=certs["cert"],
            tls_client_key=str(locked), require_encryption=True))
    assert str(info.value).startswith(want)
    cli = os.path.join(os.path.dirname(sys.executable), "jupyter-mesh")
    out = subprocess.run([cli, "worker", "tls://127.0.0.1:1", "--tls-ca-file", certs["ca"],
                          "--tls-cert", certs["cert"], "--tls-key", str(locked)],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 2 and out.stderr.startswith(f"jupyter-mesh: {want}")


def test_bad_tls_files_are_named(no_mesh, certs, tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(MeshError, match=rf"must be PEM files; check {bad}$"):
        jm.Mesh.connect("tls://127.0.0.1:1", security=Security(
            tls_ca_file=str(bad), tls_client_cert=certs["cert"], tls_client_key=certs["key"],
            require_encryption=True))
    with pytest.raises(MeshError, match=rf"must be PEM files; check {bad} and "
                                        rf"{certs['key']}$"):
        jm.Mesh.connect("tls://127.0.0.1:1", security=Security(
            tls_ca_file=certs["ca"], tls_client_cert=str(bad), tls_client_key=certs["key"],
            require_encryption=True))
    with pytest.raises(MeshError, match=rf"^TLS file {tmp_path} is a folder: give the PEM "
                                        rf"file in it$"):
        jm.Mesh.connect("tls://127.0.0.1:1", security=Security(
            tls_ca_file=certs["ca"], tls_client_cert=certs["cert"],
            tls_client_key=str(tmp_path), require_encryption=True))
    missing = tmp_path / "nope.pem"
    with pytest.raises(MeshError, match=rf"^TLS file not found: {missing}: give the path "
                                        rf"of a PEM file$"):
        jm.Mesh.connect("tls://127.0.0.1:1", security=Security(
            tls_ca_file=certs["ca"], tls_client_cert=certs["cert"],
            tls_client_key=str(missing), require_encryption=True))


def test_security_must_be_a_security(no_mesh):
    with pytest.raises(MeshError, match="security must be a distributed.security.Security"):
        jm.Mesh.connect("tls://127.0.0.1:1", security={"ca": "x"})


def test_close_after_the_scheduler_died(ip, no_mesh, capsys, caplog, monkeypatch):
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://",
                           host="127.0.0.1", dashboard_address=None)
    address = cluster.scheduler_address
    ip.run_line_magic("mesh", f"connect {address}")
    mesh = jm.current()
    ip.run_cell_magic("mesh", "--remote", "a = 1")  # this notebook has a worker now
    cluster.close()
    # the dashboard link is what the scheduler said when the client connected (Dask's
    # own asked the scheduler again, and waited out the connect timeout: a scheduler
    # that died as Mesh.connect ended held it that long)
    t0 = time.monotonic()
    assert mesh.dashboard_link is None  # (this scheduler has no dashboard)
    assert time.monotonic() - t0 < 1
    deadline = time.monotonic() + 30
    while mesh.client.scheduler is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mesh.client.scheduler is None  # the client gave the scheduler up
    capsys.readouterr()
    # %mesh (status) says at once that the scheduler is gone, in one line
    t0 = time.monotonic()
    with pytest.raises(UsageError, match=f"the scheduler at {address} is not reachable"):
        ip.run_line_magic("mesh", "")
    assert time.monotonic() - t0 < 2
    with pytest.raises(MeshError, match="not reachable.*%mesh close"):
        mesh.inventory()
    # a remote cell says so too, before sending anything (it blamed a worker)
    with pytest.raises(UsageError, match=f"^the scheduler at {address} is not reachable"):
        ip.run_cell_magic("mesh", "--remote", "1 + 1")
    # as do the live panel (it showed one) and reset-remote (it waited, then said there
    # was no namespace, where this notebook had one)
    monkeypatch.setattr("jupyter_mesh.progress.in_notebook", lambda: True)
    with pytest.raises(UsageError, match=f"^the scheduler at {address} is not reachable"):
        ip.run_line_magic("mesh", "status --widget")
    t0 = time.monotonic()
    with pytest.raises(UsageError, match=f"^the scheduler at {address} is not reachable"):
        ip.run_line_magic("mesh", "reset-remote")
    assert time.monotonic() - t0 < 2
    # as does %mesh route auto (it was accepted; a forced target was not); off is
    with pytest.raises(UsageError, match=f"^the scheduler at {address} is not reachable"):
        ip.run_line_magic("mesh", "route auto")
    ip.run_line_magic("mesh", "route off")
    # displaying the mesh shows what is known and why no more (it raised, and a
    # notebook showed an error next to the text)
    shown = mesh._repr_html_()
    assert address in shown and "is not reachable" in shown and "%mesh close" in shown
    # in red in an untrusted notebook too (JupyterLab's sanitizer drops var() colours)
    assert "style='color:#b00020;color:var(--jp-error-color1" in shown
    assert repr(mesh) == f"<Mesh {address}>"
    import logging

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ip.run_line_magic("mesh", "close")  # still closes, naming the address
    # (it only disconnects: the mesh was another's to close, and its scheduler is gone)
    assert (f"Disconnected from the mesh at {address} (its scheduler was not reachable)"
            in capsys.readouterr().out)
    assert mesh.closed and jm.mesh._state.active() is None
    # quietly: Dask's client logged its cancelled reconnect as an ERROR, two tracebacks
    assert not [r for r in caplog.records if r.name.startswith("distributed.client")]


def test_the_sidebar_connects_to_a_tls_scheduler_with_dasks_tls_settings(tls_cluster, certs,
                                                                         tmp_path):
    import asyncio

    import dask

    from jupyter_mesh.server.manager import BadRequest, MeshManager

    address = tls_cluster.scheduler_address

    async def go():
        async with MeshManager(tmp_path) as manager:
            with pytest.raises(BadRequest, match=r"uses TLS: give this Jupyter server Dask's "
                                                 r"TLS settings \(distributed.comm.tls"):
                await manager.connect({"address": address})
            tls = {"distributed.comm.tls.ca-file": certs["ca"],
                   "distributed.comm.tls.client.cert": certs["cert"],
                   "distributed.comm.tls.client.key": certs["key"]}
            with dask.config.set(tls):
                mesh = await manager.connect({"address": address, "timeout": 10})
            assert mesh["address"] == address and mesh["origin"] == "connected"
            assert mesh["devices"] == 1

    asyncio.run(go())


def test_the_sidebar_connects_to_a_tls_mesh_whose_certificate_was_shared(tls_cluster,
                                                                         certs, tmp_path):
    # a TLS mesh of this user (the sidebar's own, a notebook's mesh.local.tls) shares
    # its certificate in the runtime directory: connecting to it needs no settings
    import asyncio
    import json
    import os

    from jupyter_mesh import discovery
    from jupyter_mesh.server.manager import MeshManager

    address = tls_cluster.scheduler_address
    directory = discovery.registry_dir(tmp_path)
    directory.mkdir(mode=0o700, parents=True)
    shared = directory / "tls-1.json"
    shared.write_text(json.dumps({
        "format": discovery.FORMAT, "address": address, "pid": os.getpid(),
        "pid_started": discovery.process_start_time(os.getpid()),
        "security": {"tls_ca_file": certs["ca"], "tls_client_cert": certs["cert"],
                     "tls_client_key": certs["key"]}}))
    shared.chmod(0o600)

    async def go():
        async with MeshManager(tmp_path) as manager:
            return await manager.connect({"address": address, "timeout": 10})

    mesh = asyncio.run(go())
    assert mesh["address"] == address and mesh["devices"] == 1
    # also where the server has Dask TLS settings of its own, for another CA's
    # schedulers: the handshake with those failed ("the certificates do not fit")
    import dask

    other = make_certs(tmp_path / "other-ca")
    with dask.config.set({"distributed.comm.tls.ca-file": other["ca"],
                          "distributed.comm.tls.client.cert": other["cert"],
                          "distributed.comm.tls.client.key": other["key"]}):
        mesh = asyncio.run(go())
    assert mesh["address"] == address and mesh["devices"] == 1


def test_certificates_held_in_memory_connect(no_mesh):
    # Security.temporary() keeps its CA and certificates in memory, not in files
    security = Security.temporary()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      protocol="tls://", host="127.0.0.1", dashboard_address=None,
                      security=security) as cluster:
        with jm.Mesh.connect(cluster.scheduler_address, security=security,
                             timeout=10) as mesh:
            assert da.ones(10, chunks=5).sum().compute() == 10
            assert len(mesh.inventory()) == 1


def test_a_scheduler_whose_jupyter_mesh_speaks_another_protocol_is_named(no_mesh,
                                                                          monkeypatch):
    # a scheduler started by another jupyter_mesh keeps its own plugin (Dask does not
    # replace one of the same name): the notebook says so at once, in one line
    import warnings

    from jupyter_mesh import MeshVersionWarning
    from jupyter_mesh._scheduler_plugin import PROTOCOL, MeshSchedulerPlugin

    inventory = MeshSchedulerPlugin.inventory
    with LocalCluster(n_workers=0, processes=False, protocol="tcp://", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        # this version's plugin: nothing to say
        with warnings.catch_warnings():
            warnings.simplefilter("error", MeshVersionWarning)
            with jm.Mesh.connect(cluster.scheduler_address, timeout=5) as mesh:
                assert len(mesh.inventory()) == 0

    def older(self, comm=None):
        info = inventory(self, comm)
        del info["protocol"], info["version"]  # as the plugin before PROTOCOL
        return info

    monkeypatch.setattr(MeshSchedulerPlugin, "inventory", older)
    with LocalCluster(n_workers=0, processes=False, protocol="tcp://", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        with pytest.warns(MeshVersionWarning) as caught:
            mesh = jm.Mesh.connect(cluster.scheduler_address, timeout=5)
        try:
            (w,) = caught.list
            text = str(w.message)
            assert "\n" not in text
            assert f"{cluster.scheduler_address} runs an older jupyter_mesh (protocol 1)" in text
            assert f"protocol {PROTOCOL}" in text and "install the same jupyter_mesh" in text
            assert len(mesh.inventory()) == 0  # the mesh still works
        finally:
            mesh.close()


#: a kernel of its own (a process: Ctrl-C there is a real SIGINT, which in the test
#: process an event loop of an earlier test would take for its next run)
_CTRL_C_KERNEL = """
import os, signal, sys, threading, time
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
import jupyter_mesh as jm

ip = InteractiveShell.instance()
ip.run_line_magic("load_ext", "jupyter_mesh")
ip.run_line_magic("mesh", "connect " + sys.argv[1])
kept = jm.current()
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
t0 = time.monotonic()
try:
    ip.run_line_magic("mesh", "connect tcp://127.0.0.1:" + sys.argv[2]
                      + " --timeout 30 --replace")
except UsageError as exc:
    print("error:", exc)
print("seconds:", time.monotonic() - t0)
print("kept:", jm.current() is kept and kept.client.submit(sum, [1, 2]).result() == 3)
kept.close()
"""


def test_ctrl_c_stops_a_connect_at_once_and_keeps_the_mesh_in_use(tcp_cluster, silent_port):
    import subprocess
    import sys

    # a port that accepts and never answers: a connect that would wait 30 s, and
    # Ctrl-C half a second in
    out = subprocess.run([sys.executable, "-c", _CTRL_C_KERNEL, tcp_cluster.scheduler_address,
                          str(silent_port)], capture_output=True, text=True, timeout=120)
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    assert re.match(r"^interrupted: not connected to tcp://127\.0\.0\.1:\d+; the mesh "
                    r"in use is kept$", lines.get("error", "")), out.stdout + out.stderr
    assert float(lines["seconds"]) < 15  # not the connect's 30 s
    assert lines["kept"] == "True"


def test_a_tls_handshake_that_fails_says_the_certificates_do_not_fit(
        no_mesh, tls_cluster, tmp_path):
    # certificates of another CA: the scheduler and the client do not trust each other
    other = make_certs(tmp_path / "other")
    with pytest.raises(MeshError, match=r"^the TLS handshake with tls://127\.0\.0\.1:\d+ "
                                        r"failed \(.*\): the certificates do not fit; "
                                        r"check that the CA file"):
        jm.Mesh.connect(tls_cluster.scheduler_address, timeout=3, security=Security(
            tls_ca_file=other["ca"], tls_client_cert=other["cert"],
            tls_client_key=other["key"], require_encryption=True))


def test_tls_paths_in_the_magic_may_start_with_a_tilde(ip, no_mesh, tls_cluster, certs,
                                                       monkeypatch):
    import os

    monkeypatch.setenv("HOME", os.path.dirname(certs["ca"]))
    ip.run_line_magic("mesh", f"connect {tls_cluster.scheduler_address} "
                              f"--tls-ca-file ~/ca.pem --tls-cert ~/cert.pem "
                              f"--tls-key ~/key.pem")
    try:
        assert jm.current().address == tls_cluster.scheduler_address
    finally:
        jm.current().close()
    # (in Mesh.connect's words, with what to do)
    with pytest.raises(UsageError, match=r"^TLS file not found: .*/nope\.pem: give the path "
                                         r"of a PEM file$"):
        ip.run_line_magic("mesh", f"connect {tls_cluster.scheduler_address} "
                                  f"--tls-ca-file ~/nope.pem --tls-cert ~/cert.pem "
                                  f"--tls-key ~/key.pem")


def test_tls_paths_in_the_magic_may_have_spaces_quoted_or_escaped(ip, no_mesh, tls_cluster,
                                                                  certs, tmp_path):
    import shutil

    spaced = tmp_path / "my certs"
    spaced.mkdir()
    for name in ("ca", "cert", "key"):
        shutil.copy(certs[name], spaced / f"{name}.pem")
    escaped = str(spaced).replace(" ", "\\ ")
    for ca, cert, key in [(f"{escaped}/ca.pem", f"{escaped}/cert.pem", f"{escaped}/key.pem"),
                          (f"'{spaced}/ca.pem'", f'"{spaced}/cert.pem"', f"'{spaced}/key.pem'")]:
        ip.run_line_magic("mesh", f"connect {tls_cluster.scheduler_address} "
                                  f"--tls-ca-file {ca} --tls-cert {cert} --tls-key {key}")
        try:
            assert jm.current().address == tls_cluster.scheduler_address
            assert jm.current().client.security.tls_ca_file == f"{spaced}/ca.pem"
        finally:
            jm.current().close()


def test_an_empty_security_is_no_tls_and_a_certificate_without_its_key_is_said(
        no_mesh, tcp_cluster, certs):
    # Security() with no files asks for no TLS: a tcp:// scheduler connects
    mesh = jm.Mesh.connect(tcp_cluster.scheduler_address, security=Security())
    try:
        assert da.ones(4, chunks=2).sum().compute() == 4
    finally:
        mesh.close()
    # one that asks for encryption is not dropped: a tcp:// address cannot give it
    with pytest.raises(MeshError, match=r"^tcp://127\.0\.0\.1:1 is not a TLS address"):
        jm.Mesh.connect("tcp://127.0.0.1:1", security=Security(require_encryption=True))
    # a certificate file without its key, and no key file given: said so
    with pytest.raises(MeshError, match=r"check .*cert\.pem \(with no key file, the "
                                        r"certificate file must hold the key too\)$"):
        jm.Mesh.connect("tls://127.0.0.1:1", security=Security(
            tls_ca_file=certs["ca"], tls_client_cert=certs["cert"],
            require_encryption=True))


def test_wss_addresses_need_tls_settings_as_tls_ones_do(no_mesh, certs):
    # Dask's websocket comm over TLS: the same checks as tls://
    # (nothing listens there: said so, as for ws://, not "give its certificates")
    with pytest.raises(MeshError, match=r"wss://127\.0\.0\.1:1.*connection refused: "
                                        r"nothing listens on port 1"):
        jm.Mesh.connect("wss://127.0.0.1:1", timeout=2)
    with pytest.raises(MeshError, match=r"^ws://127\.0\.0\.1:1 is not a TLS address, but TLS "
                                        r"files were given: use wss://127\.0\.0\.1:1, or"):
        jm.Mesh.connect("ws://127.0.0.1:1", security=_security(certs), timeout=2)


def _dask_scheduler(port: int | None = None):
    """A plain ``dask scheduler`` process on a free loopback port (or ``port``), once it
    listens: (the process, its port)."""
    import subprocess
    import sys

    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    sched = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "dask"),
                              "scheduler", "--host", "127.0.0.1", "--port", str(port),
                              "--no-dashboard"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until it listens
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    return sched, port


def test_closing_a_mesh_whose_scheduler_was_killed_is_quiet(no_mesh, capfd, caplog):
    import logging
    import os
    import signal

    sched, port = _dask_scheduler()
    try:
        mesh = jm.Mesh.connect(f"tcp://127.0.0.1:{port}", timeout=60)
        os.kill(sched.pid, signal.SIGKILL)
        sched.wait()
        deadline = time.monotonic() + 30
        while mesh.client.status == "running" and time.monotonic() < deadline:
            time.sleep(0.1)  # the client notices, and tries to reconnect
        time.sleep(1)
        capfd.readouterr()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            mesh.close()
        assert mesh.closed
        err = capfd.readouterr().err
        # Dask's client logged its cancelled reconnect as an ERROR, with two tracebacks
        assert "Traceback" not in err and "ERROR" not in err, err
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        if sched.poll() is None:
            sched.kill()


def test_a_timeout_too_short_to_connect_says_to_give_it_longer(no_mesh, tcp_cluster):
    # a scheduler does listen there: the message blamed it alone
    address = tcp_cluster.scheduler_address
    with pytest.raises(MeshError, match=rf"^could not connect to {address} within 1e-06 s "
                                        r"\(.*\): give it longer \(timeout=, --timeout\), or "
                                        r"check that a Dask scheduler listens there"):
        jm.Mesh.connect(address, timeout=1e-6, set_current=False)


def test_connect_replace_to_a_scheduler_back_at_the_address_of_a_dead_one(ip, no_mesh):
    # the current mesh's scheduler died and came back at its address: --replace said
    # "is the current mesh already: keep using it", which could not work
    import signal

    sched, port = _dask_scheduler()
    address = f"tcp://127.0.0.1:{port}"
    again = None
    try:
        ip.run_line_magic("mesh", f"connect {address}")
        dead = jm.current()
        os.kill(sched.pid, signal.SIGKILL)
        sched.wait()
        deadline = time.monotonic() + 30
        while dead._client_up() and time.monotonic() < deadline:
            time.sleep(0.1)
        # the panel says so, as %mesh status --widget does (it showed an empty one)
        with pytest.raises(MeshError, match=f"^the scheduler at {address} is not reachable"):
            dead.widget()
        # nothing there yet: said as for any address, and the mesh stays current
        with pytest.raises(UsageError, match=rf"^could not connect to {address}"):
            ip.run_line_magic("mesh", f"connect {address} --timeout 2 --replace")
        assert jm.current() is dead
        again, _ = _dask_scheduler(port)
        ip.run_line_magic("mesh", f"connect {address} --replace")
        mesh = jm.current()
        assert mesh is not dead and dead.closed and mesh.address == address
        assert mesh.client.submit(lambda: 1).key  # (a live client: it takes work)
        # a live current mesh at the address is still refused with --replace
        with pytest.raises(UsageError, match=rf"^{address} is the current mesh already"):
            ip.run_line_magic("mesh", f"connect {address} --replace")
        ip.run_line_magic("mesh", "close")
    finally:
        for proc in (sched, again):
            if proc is not None and proc.poll() is None:
                proc.kill()


def test_the_cli_worker_joins_a_tls_scheduler_and_says_when_its_certificates_do_not_fit(
        tls_cluster, certs, tmp_path):
    # the worker asks the scheduler who it is before it starts, with its own certificate
    import subprocess
    import sys

    from .certs import make_certs

    cli = os.path.join(os.path.dirname(sys.executable), "jupyter-mesh")
    address = tls_cluster.scheduler_address
    other = make_certs(tmp_path)  # another CA's: the scheduler does not trust it
    out = subprocess.run([cli, "worker", address, "--nthreads", "1", "--tls-ca-file",
                          other["ca"], "--tls-cert", other["cert"], "--tls-key", other["key"]],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"jupyter-mesh: the TLS handshake with {address} failed (")
    proc = subprocess.Popen([cli, "worker", address, "--nthreads", "1", "--name", "tls-cli",
                             "--tls-ca-file", certs["ca"], "--tls-cert", certs["cert"],
                             "--tls-key", certs["key"]],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = line_queue(proc.stdout)
        assert lines.get(timeout=90).startswith(f"jupyter-mesh worker joined {address}")
    finally:
        proc.terminate()
        proc.wait(30)




def test_a_port_that_hangs_up_at_once_is_not_said_to_have_timed_out(no_mesh):
    # it said "could not connect ... within 10 s" of a refusal that took no time
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()

    def hang_up():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                srv.accept()[0].close()
            except OSError:
                pass

    threading.Thread(target=hang_up, daemon=True).start()
    address = f"tcp://127.0.0.1:{srv.getsockname()[1]}"
    try:
        t0 = time.monotonic()
        with pytest.raises(MeshError) as info:
            jm.Mesh.connect(address, timeout=8)
        assert time.monotonic() - t0 < 6
    finally:
        stop.set()
        srv.close()
    assert str(info.value).startswith(f"could not connect to {address} (")
    assert "within" not in str(info.value)


def test_tls_to_a_plain_scheduler_says_it_does_not_answer_in_tls(no_mesh, tcp_cluster, certs):
    # the worker said "no Dask scheduler answered within 30 s" after half a second
    import subprocess
    import sys

    address = "tls://" + tcp_cluster.scheduler_address.split("://")[1]
    want = (rf"^{re.escape(address)} does not answer in TLS \(.*\): the scheduler there "
            rf"listens in plain tcp, as far as this can tell; use "
            rf"{re.escape(tcp_cluster.scheduler_address)}, or start the scheduler with TLS$")
    with pytest.raises(MeshError, match=want):
        jm.Mesh.connect(address, timeout=5, security=_security(certs))
    cli = os.path.join(os.path.dirname(sys.executable), "jupyter-mesh")
    out = subprocess.run([cli, "worker", address, "--nthreads", "1", "--tls-ca-file",
                          certs["ca"], "--tls-cert", certs["cert"], "--tls-key", certs["key"]],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert re.match(want, out.stderr.strip().splitlines()[-1].removeprefix("jupyter-mesh: "))


def test_an_expired_certificate_is_said_to_be_out_of_date(no_mesh, tmp_path):
    # it was said to be from another CA ("check that the CA file is the one that signed")
    import json
    import subprocess
    import sys

    old = make_certs(tmp_path / "old", expired=True)
    dask_cli = os.path.join(os.path.dirname(sys.executable), "dask")
    info = tmp_path / "scheduler.json"
    proc = subprocess.Popen(
        [dask_cli, "scheduler", "--host", "127.0.0.1", "--port", "0", "--protocol", "tls",
         "--no-dashboard", "--scheduler-file", str(info), "--tls-ca-file", old["ca"],
         "--tls-cert", old["cert"], "--tls-key", old["key"]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not info.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(info.read_text())["address"]
        # the scheduler's certificate is out of date
        fresh = {"ca": old["ca"], "cert": old["valid_cert"], "key": old["valid_key"]}
        with pytest.raises(MeshError, match=r"^the TLS handshake with tls://127\.0\.0\.1:\d+ "
                                            r"failed \(.*expired.*\): a certificate is out "
                                            r"of its validity dates; renew it"):
            jm.Mesh.connect(address, timeout=5, security=_security(fresh))
        # this side's: the scheduler refuses it in the handshake, and this side often
        # saw no more than the connection closing ("the certificates do not fit"): it
        # is checked here first, every time
        cli = os.path.join(os.path.dirname(sys.executable), "jupyter-mesh")
        for _ in range(3):
            with pytest.raises(MeshError, match=rf"^the TLS certificate {re.escape(old['cert'])} "
                                                rf"expired on \d{{4}}-\d\d-\d\d \d\d:\d\d UTC: "
                                                rf"renew it \(and check this machine's clock\)$"):
                jm.Mesh.connect(address, timeout=5, security=_security(
                    {"ca": old["ca"], "cert": old["cert"], "key": old["key"]}))
        out = subprocess.run([cli, "worker", address, "--nthreads", "1", "--tls-ca-file",
                              old["ca"], "--tls-cert", old["cert"], "--tls-key", old["key"]],
                             capture_output=True, text=True, timeout=90)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert "expired on" in out.stderr.strip().splitlines()[-1], out.stderr
    finally:
        proc.terminate()
        proc.wait(30)


def _sleepy(i):
    time.sleep(1)
    return i


@pytest.mark.timeout(180)
@pytest.mark.parametrize("route", ["auto", "off"])
def test_a_computation_whose_scheduler_is_stopped_elsewhere_fails_in_one_line(no_mesh,
                                                                             route):
    # the Mesh sidebar stops a mesh a notebook computes on: the cell failed with Dask's
    # traceback through jupyter_mesh, telling the user to re-run the work
    import signal
    import subprocess
    import sys

    import dask

    sched, port = _dask_scheduler()
    address = f"tcp://127.0.0.1:{port}"
    bin_dir = os.path.dirname(sys.executable)
    worker = None
    try:
        worker = subprocess.Popen([os.path.join(bin_dir, "jupyter-mesh"), "worker", address,
                                   "--nthreads", "1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mesh = jm.Mesh.connect(address, timeout=60, set_current=False)
        try:
            deadline = time.monotonic() + 60
            while not len(mesh.inventory()) and time.monotonic() < deadline:
                time.sleep(0.2)
            work = [dask.delayed(_sleepy)(i) for i in range(20)]
            threading.Timer(2.0, os.kill, (sched.pid, signal.SIGKILL)).start()
            with pytest.raises(MeshError) as info:
                mesh.compute(*work, route=route)
            text = str(info.value)
            assert text.startswith("the mesh's scheduler went away while this computation "
                                   "ran (stopped from the Mesh sidebar"), text
            assert "\n" not in text
        finally:
            mesh.close()
    finally:
        for proc in (worker, sched):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_remote_cell_running_when_the_mesh_closes_says_so(no_mesh):
    # a mesh closed by its owner (another notebook) closes its workers first: a remote
    # cell running then said its worker "died while running the cell (out of memory is
    # the usual cause...)", and that the next cell picks another worker
    import threading

    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                           protocol="tcp://", host="127.0.0.1", dashboard_address=None)
    address = cluster.scheduler_address
    mesh = jm.Mesh.connect(address, set_current=False)
    try:
        mesh.run_cell("1")
        outcome = []

        def run():
            try:
                mesh.run_cell("import time\nfor i in range(60):\n    time.sleep(0.5)")
            except BaseException as exc:
                outcome.append(exc)

        cell = threading.Thread(target=run)
        cell.start()
        time.sleep(1.5)
        cluster.close()
        cell.join(60)
        assert not cell.is_alive()
        said = str(outcome[0])
        assert said.startswith((
            f"the mesh's scheduler at {address} went away while the cell ran on ",
            f"the scheduler at {address} is not reachable")), outcome
        assert "out of memory" not in said and "\n" not in said
    finally:
        mesh.close()
        cluster.close()
