"""Kernel meshes register in the Jupyter runtime directory; the sidebar finds them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

from jupyter_mesh import _state, discovery
from jupyter_mesh.server.manager import Conflict, MeshManager


class FakeMesh:
    """Just what a registration reads from a mesh."""

    def __init__(self, address="tcp://127.0.0.1:8786"):
        self.address = address
        self.dashboard_link = "http://127.0.0.1:8787/status"
        self.owns_cluster = True
        self.site = "local"
        self.closed = False
        self.last_plan = None
        self.last_report = None
        self.client = SimpleNamespace(security=None,
                                      _scheduler_identity={"id": "Scheduler-abc"})


class FakePlan:
    route = "auto"

    def __init__(self, op):
        self.rows = [{"op": op, "target": "cpu:jax", "tasks": 2, "est_seconds": 0.1}]


def write_private(path, text):
    """A registration file as the kernel writes it: this user's alone (mode 600)."""
    path.write_text(text)
    path.chmod(0o600)
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_register_writes_and_close_removes(tmp_path, monkeypatch):
    monkeypatch.setattr(discovery, "WATCH_INTERVAL", 0.05)
    mesh = FakeMesh()
    path = discovery.register(mesh, tmp_path)
    try:
        assert path.parent == tmp_path / "jupyter-mesh"
        data = json.loads(path.read_text())
        assert data["pid"] == os.getpid()
        assert data["address"] == "tcp://127.0.0.1:8786"
        assert data["dashboard"] == "http://127.0.0.1:8787/status"
        assert data["plans"] == []
        (reg,) = discovery.read_registrations(tmp_path)
        assert reg["address"] == mesh.address
        # the sidebar knows the scheduler by its id under any name of its host
        assert reg["scheduler_id"] == "Scheduler-abc"

        # the kernel's recent router plans reach the file
        mesh.last_plan = FakePlan("matmul-1")
        deadline = time.time() + 5
        while time.time() < deadline and not json.loads(path.read_text())["plans"]:
            time.sleep(0.05)
        (plan,) = json.loads(path.read_text())["plans"]
        assert plan["kind"] == "plan" and plan["route"] == "auto"
        assert plan["rows"] == [
            {"op": "matmul-1", "target": "cpu:jax", "tasks": 2, "est_seconds": 0.1}
        ]
    finally:
        discovery.unregister(mesh)
    assert not path.exists()
    assert discovery.read_registrations(tmp_path) == []


def test_a_dashboard_link_known_later_reaches_the_registration(tmp_path, monkeypatch):
    # (a connected mesh may learn its link after it was made current)
    monkeypatch.setattr(discovery, "WATCH_INTERVAL", 0.05)
    mesh = FakeMesh()
    mesh.dashboard_link = None
    path = discovery.register(mesh, tmp_path)
    try:
        assert json.loads(path.read_text())["dashboard"] is None
        mesh.dashboard_link = "http://[::1]:8787/status"
        deadline = time.time() + 5
        while time.time() < deadline and not json.loads(path.read_text())["dashboard"]:
            time.sleep(0.05)
        assert json.loads(path.read_text())["dashboard"] == "http://[::1]:8787/status"
    finally:
        discovery.unregister(mesh)


def test_dead_and_broken_registrations_are_pruned(tmp_path):
    directory = discovery.registry_dir(tmp_path)
    directory.mkdir(mode=0o700, parents=True)
    dead = write_private(directory / "mesh-dead.json",
                         json.dumps({"pid": dead_pid(), "address": "tcp://127.0.0.1:1"}))
    broken = write_private(directory / "mesh-broken.json", "{not json")
    os.utime(broken, (time.time() - 60, time.time() - 60))
    fresh = write_private(directory / "mesh-fresh.json", "{half written")
    write_private(directory / "mesh-alive.json",
                  json.dumps({"pid": os.getpid(), "address": "tcp://127.0.0.1:2"}))

    regs = discovery.read_registrations(tmp_path)
    assert [r["address"] for r in regs] == ["tcp://127.0.0.1:2"]
    assert not dead.exists() and not broken.exists()
    assert fresh.exists()  # may be a file being written right now


def test_reused_pid_counts_as_dead():
    started = discovery.process_start_time(os.getpid())
    assert discovery.pid_alive(os.getpid(), started)
    assert not discovery.pid_alive(os.getpid(), started - 1000)
    assert not discovery.pid_alive(dead_pid())
    assert not discovery.pid_alive("123")


def test_only_the_current_mesh_registers(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    server_side, kernel_side = FakeMesh("tcp://127.0.0.1:1"), FakeMesh("tcp://127.0.0.1:2")
    previous = _state._current
    try:
        _state.notify("open", server_side)  # like Mesh(..., set_current=False)
        assert discovery.read_registrations(tmp_path) == []
        _state.set_current(kernel_side)
        _state.notify("open", kernel_side)
        assert [r["address"] for r in discovery.read_registrations(tmp_path)] == [
            "tcp://127.0.0.1:2"
        ]
        _state.notify("close", kernel_side)
        assert discovery.read_registrations(tmp_path) == []
    finally:
        _state.set_current(previous)
        discovery.unregister(kernel_side)


def test_discovery_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("JUPYTER_MESH_DISCOVERY", "0")
    mesh = FakeMesh()
    previous = _state._current
    try:
        _state.set_current(mesh)
        _state.notify("open", mesh)
        assert discovery.read_registrations(tmp_path) == []
    finally:
        _state.set_current(previous)
        discovery.unregister(mesh)


KERNEL = textwrap.dedent(
    """
    import os, sys
    import jupyter_mesh as jm
    from jupyter_mesh import discovery

    class Plan:
        route = "auto"
        rows = [{"op": "sum-aggregate", "target": "cpu", "tasks": 1, "est_seconds": 0.01}]

    mesh = jm.Mesh.local(cpu=1, gpu=0, tpu=0, site="kernel-site")
    print("ready", mesh.address, flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "plan":
            mesh.last_plan = Plan()
            print("planned", flush=True)
        elif cmd == "close":
            mesh.close()
            print("closed", flush=True)
        elif cmd == "crash":
            # die without unregistering, as a killed kernel would (but leave no workers)
            discovery._registrations.clear()
            mesh.close()
            os._exit(0)
    """
)


def start_kernel_like(tmp_path):
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-c", KERNEL],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()
    assert line.startswith("ready"), line
    return proc, line.split()[1]


def send(proc, cmd):
    proc.stdin.write(cmd + "\n")
    proc.stdin.flush()
    if cmd != "crash":
        return proc.stdout.readline().strip()


async def wait_for(predicate, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_manager_finds_kernel_meshes_and_forgets_closed_ones(tmp_path):
    asyncio.run(_manager_finds_kernel_meshes_and_forgets_closed_ones(tmp_path))


async def _manager_finds_kernel_meshes_and_forgets_closed_ones(tmp_path):
    proc, address = start_kernel_like(tmp_path)
    try:
        async with MeshManager(tmp_path) as manager:
            (summary,) = await manager.list()
            assert summary["origin"] == "kernel"
            assert summary["address"] == address
            assert not summary["can_stop"] and not summary["can_scale"]
            assert summary["kernels"][0]["pid"] == proc.pid

            detail = await manager.get(summary["id"])
            assert detail["status"] == "running", detail["error"]
            (group,) = detail["groups"]
            assert (group["kind"], group["site"], len(group["devices"])) == (
                "cpu",
                "kernel-site",
                1,
            )
            with pytest.raises(Conflict, match="%mesh close"):
                await manager.stop(summary["id"])

            assert send(proc, "plan") == "planned"

            async def has_plans():
                return (await manager.get(summary["id"]))["plans"]

            (plan,) = await wait_for(has_plans)
            assert plan["rows"][0]["op"] == "sum-aggregate"

            assert send(proc, "close") == "closed"
            assert await manager.list() == []
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_manager_prunes_a_dead_kernel(tmp_path):
    asyncio.run(_manager_prunes_a_dead_kernel(tmp_path))


async def _manager_prunes_a_dead_kernel(tmp_path):
    proc, address = start_kernel_like(tmp_path)
    try:
        async with MeshManager(tmp_path) as manager:
            assert [m["address"] for m in await manager.list()] == [address]
            send(proc, "crash")
            proc.wait(timeout=30)
            assert list(discovery.registry_dir(tmp_path).glob("mesh-*.json"))  # left behind
            assert await manager.list() == []
            assert not list(discovery.registry_dir(tmp_path).glob("mesh-*.json"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tls_file_paths_travel_with_the_registration(tmp_path):
    from jupyter_mesh.server.manager import _security_from

    files = {}
    for name in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text("-")
    mesh = FakeMesh("tls://127.0.0.1:8786")
    mesh.client = SimpleNamespace(security=SimpleNamespace(**{k: str(v) for k, v in files.items()}))
    path = discovery.register(mesh, tmp_path)
    try:
        (reg,) = discovery.read_registrations(tmp_path)
        assert reg["security"] == {k: str(v) for k, v in files.items()}
        security = _security_from(reg)
        assert security.tls_ca_file == str(files["tls_ca_file"])
        assert security.tls_client_cert == str(files["tls_client_cert"])
        assert security.require_encryption
    finally:
        discovery.unregister(mesh)
    assert not path.exists()
    # a user's own PEM held in memory is never written to disk (a local mesh's own
    # certificate is: tests/test_mesh_local_tls.py); plain tcp needs no security
    mesh.client = SimpleNamespace(security=SimpleNamespace(tls_ca_file="-----BEGIN CERT"))
    assert discovery._security_files(mesh) is None
    mesh.options = {"security": mesh.client.security}
    assert discovery._security_files(mesh) == {"tls_ca_file": "-----BEGIN CERT"}
    assert _security_from({"address": "tcp://h:1", "security": reg["security"]}) is None


def test_every_plan_and_report_of_a_quick_loop_reaches_the_file(tmp_path):
    # the watcher looked once a second: of a %%mesh loop's computations the sidebar
    # listed about one; the router now tells it of each one as it makes it
    from jupyter_mesh import _state

    mesh = FakeMesh()
    path = discovery.register(mesh, tmp_path)
    try:
        for op in ("a", "b", "c"):
            mesh.last_plan, mesh.last_report = FakePlan(op), None
            _state.notify("plan", mesh)
            mesh.last_report = FakePlan(op)
            _state.notify("report", mesh)
        deadline = time.time() + 5
        while time.time() < deadline and len(json.loads(path.read_text())["plans"]) < 6:
            time.sleep(0.05)
        got = [(p["kind"], p["rows"][0]["op"]) for p in json.loads(path.read_text())["plans"]]
        assert got == [(k, op) for op in "abc" for k in ("plan", "report")], got
    finally:
        discovery.unregister(mesh)


def test_a_plan_the_watcher_sees_while_the_router_records_it_is_listed_once(
        tmp_path, monkeypatch):
    # the watcher thread woke while the router's announcement built the plan's record
    # (slow for a large plan): both appended it, and the copy pushed a real plan out
    # of the sidebar's short list
    from jupyter_mesh import _state

    mesh = FakeMesh()
    discovery.register(mesh, tmp_path)
    reg = discovery._registrations[id(mesh)]
    build = discovery.plan_record
    woke = []

    def watcher_wakes_meanwhile(obj, kind):
        if not woke:
            woke.append(reg.check_plans())
        return build(obj, kind)

    monkeypatch.setattr(discovery, "plan_record", watcher_wakes_meanwhile)
    try:
        mesh.last_plan = FakePlan("a")
        _state.notify("plan", mesh)
        assert reg.check_plans() is False  # nothing new for the watcher afterwards
        assert [(p["kind"], p["rows"][0]["op"]) for p in reg.plans] == [("plan", "a")]
        assert woke == [False]
    finally:
        discovery.unregister(mesh)


def test_plan_records_carry_the_plans_notes():
    # what the sidebar shows under a plan: e.g. Dask's costs as measured on the mesh
    plan = FakePlan("matmul-1")
    plan.notes = ["measured on this mesh: 5 ms of Dask dispatch per task"]
    rec = discovery.plan_record(plan, "plan")
    assert rec["notes"] == plan.notes
    report = FakePlan("matmul-1")
    report.plan = plan  # a report's notes are its plan's
    assert discovery.plan_record(report, "report")["notes"] == plan.notes
    plan.notes = [f"note {i}" for i in range(50)]
    assert len(discovery.plan_record(plan, "plan")["notes"]) == discovery.MAX_NOTES
    assert "notes" not in discovery.plan_record(FakePlan("x"), "plan")
    json.dumps(rec)


def registration(pid=None, **fields):
    return json.dumps({"address": "tcp://127.0.0.1:2", "pid": pid or os.getpid(), **fields})


def test_registrations_only_from_this_users_private_directory_and_files(tmp_path):
    directory = discovery.registry_dir(tmp_path)
    directory.mkdir(mode=0o700, parents=True)
    write_private(directory / "mesh-mine.json", registration())
    shared = directory / "mesh-shared.json"
    shared.write_text(registration(dashboard="javascript:x"))
    shared.chmod(0o666)  # anyone may write it: not trusted, and not removed
    assert [r["address"] for r in discovery.read_registrations(tmp_path)] == [
        "tcp://127.0.0.1:2"]
    assert shared.exists()
    # a directory others may write: nothing in it is read; writing there first makes
    # it this user's alone again (it is ours), and someone else's is refused (below)
    directory.chmod(0o777)
    assert discovery.read_registrations(tmp_path) == []
    discovery._write_atomic(directory / "mesh-new.json", {"address": "x"})
    assert directory.stat().st_mode & 0o777 == 0o700


def test_a_registration_with_fields_of_the_wrong_type_keeps_the_right_ones(tmp_path):
    directory = discovery.registry_dir(tmp_path)
    directory.mkdir(mode=0o700, parents=True)
    write_private(directory / "mesh-odd.json", registration(
        created="yesterday", plans={"not": "a list"}, dashboard=5, site="lab",
        security={"tls_ca_file": 3}, owns_cluster=1))
    (reg,) = discovery.read_registrations(tmp_path)
    assert reg["site"] == "lab" and reg["pid"] == os.getpid()
    assert not {"created", "plans", "dashboard", "security", "owns_cluster"} & set(reg)


def test_plans_whose_time_is_not_a_number_are_dropped(tmp_path):
    # the sidebar orders plans by their time: a string there broke the whole listing
    directory = discovery.registry_dir(tmp_path)
    directory.mkdir(mode=0o700, parents=True)
    write_private(directory / "mesh-odd.json", registration(
        plans=[{"at": "yesterday"}, {"at": 5}, {"at": True}, 3, {"route": "auto"}]))
    (reg,) = discovery.read_registrations(tmp_path)
    assert reg["plans"] == [{"at": 5}, {"route": "auto"}]


def test_an_unsafe_registry_is_named_and_the_mesh_still_works(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    directory = discovery.registry_dir(tmp_path)
    directory.mkdir(parents=True)
    monkeypatch.setattr(discovery, "private", lambda path: False)  # e.g. someone else's
    mesh = FakeMesh()
    monkeypatch.setattr(_state, "_current", mesh)
    with pytest.warns(UserWarning, match="the Mesh sidebar will not list this mesh: .* "
                                         "is not this user's alone"):
        discovery._on_mesh_event("open", mesh)
    assert discovery.registration_of(mesh) is None
    assert not list(directory.iterdir())


def test_a_reports_record_has_its_plans_notes_and_its_own():
    plan = FakePlan("matmul-1")
    plan.notes = ["measured on this mesh: 1 ms per task"]

    class Report:
        rows = plan.rows
        notes = ["matmul-1: not run by this computation: its results were there"]

    report = Report()
    report.plan = plan
    rec = discovery.plan_record(report, "report")
    assert rec["notes"] == ["measured on this mesh: 1 ms per task",
                            "matmul-1: not run by this computation: its results were there"]
    assert discovery.plan_record(plan, "plan")["notes"] == plan.notes
