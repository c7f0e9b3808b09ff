"""The sidebar's state, tested alone: MeshManager without Tornado."""

from __future__ import annotations

import asyncio

import pytest

from jupyter_mesh.server import manager as manager_module
from jupyter_mesh.server.manager import (
    BadRequest,
    Conflict,
    Entry,
    Failed,
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
        ({"cpu": -1}, "cpu must be a whole number from 0 to"),
        ({"cpu": 100_000}, "cpu must be a whole number from 0 to"),
        ({"threads_per_worker": 100_000}, "threads_per_worker must be a whole number from 1"),
        ({"cpu": "two"}, "cpu must be"),
        ({"cpu": True}, "cpu must be a whole number from 0 to"),
        ({"cpu": True}, "not true"),
        ({"gpu": "many"}, 'or "auto"'),
        ({"site": ""}, "site must be"),
        # said as JSON says it (Python's None, True)
        ({"site": None}, 'site must be a name in quotes, like "edge-lab", not null'),
        ({"site": True}, 'site must be a name in quotes, like "edge-lab", not true'),
        # Mesh.local's rule, said before anything starts
        # values as JSON spells them, not as Python does
        ({"site": "a b"}, 'site must be a name of letters, digits, ".", "_" or "-" (like '
                          '"local" or "edge-lab"), starting with a letter or digit, at most '
                          '63 characters, not "a b"'),
        # within the characters, but not the rest of the rule, which the message says
        ({"site": "-lab"}, 'starting with a letter or digit, at most 63 characters, not "-lab"'),
        ({"site": "x" * 64}, 'at most 63 characters, not "xxxx'),
        ({"site": 3}, "site must be a name"),
        ({"site": "unknown"}, 'site "unknown" is where the mesh shows plain Dask workers'),
        ({"gpu": "AUTOMATIC"}, "gpu must be a whole number from 0 to"),
        ({"workers": 3}, "unknown option(s) workers"),
        ({"threads_per_worker": 0}, "threads_per_worker must be a whole number from 1 to"),
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


@pytest.mark.parametrize("auto", ["AUTO", "Auto", " auto "])
def test_auto_is_taken_in_any_case_as_mesh_local_takes_it(auto):
    from jupyter_mesh.mesh import check_count

    assert validate_start({"gpu": auto, "tpu": auto}) == {"gpu": "auto", "tpu": "auto"}
    assert check_count("gpu", auto, allow_auto=True) == "auto"


@pytest.mark.parametrize(
    "body, message",
    [
        ({}, "JSON object of counts"),
        ({"fpga": 1}, "cannot scale fpga"),
        ({"cpu": -2}, "cpu must be a whole number from 0 to"),
        ({"jax_cpu": 100_000}, "(four per core here)"),
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
        ({"address": None}, 'address must be text, like "tcp://host:8786", not null'),
        ({"address": ["x"]}, 'address must be text, like "tcp://host:8786", not ["x"]'),
        ({"address": "not an address at all"},
         'malformed address "tcp://not an address at all": use tcp://HOST:PORT'),
        ({"address": "http://127.0.0.1:8787"},
         '"http://127.0.0.1:8787": a Dask scheduler\'s address starts with tcp:// or '
         'tls:// or ws:// or wss://, not "http"'),
        ({"address": "tcp://127.0.0.1:1", "timeout": -1}, "timeout must be"),
        ({"address": "tcp://127.0.0.1:1", "timeout": 0},
         "timeout must be a number of seconds in (0, 120], not 0"),
        ({"address": "tcp://127.0.0.1:1", "timeout": 121},
         "timeout must be a number of seconds in (0, 120], not 121"),
        ({"address": "tcp://127.0.0.1:1", "timeout": True},
         "timeout must be a number of seconds in (0, 120], not true"),
        ({"address": "tcp://127.0.0.1:1", "timeout": float("nan")},
         "timeout must be a number of seconds in (0, 120], not NaN"),
        ({"address": "tcp://127.0.0.1:1", "timeout": float("inf")},
         "timeout must be a number of seconds in (0, 120], not Infinity"),
        ({"address": "tcp://127.0.0.1:1", "timeout": "5"},
         "timeout must be a number of seconds in (0, 120], not \"5\""),
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
        # under another name of its host too (the scheduler's own id says it is the same)
        other = mesh["address"].replace("127.0.0.1", "localhost")
        assert other != mesh["address"]
        again = await manager.connect({"address": other})
        assert again["id"] == mesh["id"] and len(await manager.list()) == 1

        stopped = await manager.stop(mesh["id"])
        assert stopped == {"id": mesh["id"], "stopped": True, "disconnected": False}
        assert await manager.list() == []
        with pytest.raises(NotFound):
            await manager.get(mesh["id"])


def test_counts_are_capped_at_four_per_core():
    from jupyter_mesh.devices._detect import cpu_cores

    top = manager_module.most_local()
    assert top == 4 * cpu_cores()
    assert validate_start({"cpu": top}) == {"cpu": top}
    with pytest.raises(BadRequest, match=f"from 0 to {top}"):
        validate_start({"cpu": top + 1})


def test_what_dask_fails_at_is_one_line_and_leaves_the_rest(tmp_path, monkeypatch):
    asyncio.run(_what_dask_fails_at(tmp_path, monkeypatch))


async def _what_dask_fails_at(tmp_path, monkeypatch):
    def cannot_start(**kwargs):
        raise RuntimeError("Cluster failed to start\n  ... a long traceback ...")

    monkeypatch.setattr(manager_module.Mesh, "local", staticmethod(cannot_start))
    async with MeshManager(tmp_path) as manager:
        with pytest.raises(Failed) as info:
            await manager.start({"cpu": 1})
        assert str(info.value) == ("could not start the mesh: RuntimeError: Cluster failed "
                                   "to start; see the server's log, or start fewer workers")
        assert info.value.status == 500 and await manager.list() == []


def test_a_mesh_being_started_is_listed_as_starting(tmp_path, monkeypatch):
    asyncio.run(_listed_while_starting(tmp_path, monkeypatch))


async def _listed_while_starting(tmp_path, monkeypatch):
    # another sidebar (or tab) polling while one starts a mesh sees it at once
    import threading

    go_on = threading.Event()

    def slow_start(**kwargs):
        assert go_on.wait(10)
        return _SlowMesh()

    monkeypatch.setattr(manager_module.Mesh, "local", staticmethod(slow_start))
    monkeypatch.setattr(manager_module.discovery, "share_security", lambda *a: None)
    async with MeshManager(tmp_path) as manager:
        monkeypatch.setattr(manager, "_sample", _no_sample)
        starting = asyncio.ensure_future(manager.start({"cpu": 1}))
        await asyncio.sleep(0.1)
        (listed,) = await manager.list()
        assert (listed["status"], listed["name"], listed["address"]) == (
            "starting", "Local mesh 1", "")
        assert (await manager.get(listed["id"]))["status"] == "starting"
        for act in (manager.stop(listed["id"], force=True),
                    manager.scale(listed["id"], {"cpu": 2})):
            with pytest.raises(Conflict) as info:
                await act
            assert str(info.value) == "Local mesh 1 is still starting: try again once it runs"
        go_on.set()
        started = await starting
        assert (started["id"], started["status"], started["address"]) == (
            listed["id"], "running", _SlowMesh.address)
        assert [m["status"] for m in await manager.list()] == ["running"]
        # one that fails to start leaves the list as it was
        go_on.clear()
        monkeypatch.setattr(manager_module.Mesh, "local", staticmethod(
            lambda **kw: (_ for _ in ()).throw(RuntimeError("no luck"))))
        with pytest.raises(Failed):
            await manager.start({"cpu": 1})
        assert [m["id"] for m in await manager.list()] == [listed["id"]]


class _SlowMesh:
    """A mesh whose scaling takes a while (and that records being closed)."""

    owns_cluster = True
    options: dict = {}
    address = "tcp://127.0.0.1:1"
    dashboard_link = None

    def __init__(self):
        self.closed = False

    def scale(self, **counts):
        import time

        time.sleep(0.3)
        if self.closed:
            raise RuntimeError("the cluster was closed while scaling")

    def close(self):
        self.closed = True


def test_a_mesh_being_scaled_cannot_be_stopped_meanwhile(tmp_path, monkeypatch):
    asyncio.run(_stop_while_scaling(tmp_path, monkeypatch))


async def _stop_while_scaling(tmp_path, monkeypatch):
    async with MeshManager(tmp_path) as manager:
        slow = _SlowMesh()
        manager._entries["local-x"] = Entry(id="local-x", origin="sidebar",
                                            address=slow.address, name="Local mesh 1",
                                            mesh=slow)
        monkeypatch.setattr(manager, "_sample", _no_sample)
        monkeypatch.setattr(manager, "detail", lambda entry: {"id": entry.id})
        scaling = asyncio.ensure_future(manager.scale("local-x", {"cpu": 2}))
        await asyncio.sleep(0.05)
        with pytest.raises(Conflict, match="busy with another change: try again"):
            await manager.stop("local-x")
        assert await scaling == {"id": "local-x"} and not slow.closed
        assert (await manager.stop("local-x"))["stopped"] and slow.closed


async def _no_sample(entry, **kwargs):
    return None


def _kernel_registration(runtime_dir, record):
    """A registration, as a kernel (this process) that connected to the mesh at
    tcp://127.0.0.1:8786 and made the plan ``record`` writes it; its path."""
    import json
    import os

    from jupyter_mesh import discovery

    directory = discovery.registry_dir(runtime_dir)
    directory.mkdir(mode=0o700, parents=True)
    path = directory / "mesh-1.json"
    path.write_text(json.dumps({
        "address": "tcp://127.0.0.1:8786", "pid": os.getpid(), "id": "k1",
        "pid_started": discovery.process_start_time(os.getpid()), "plans": [record]}))
    path.chmod(0o600)
    return path


def test_plans_a_kernel_made_on_a_mesh_the_sidebar_shows_are_shown(tmp_path):
    asyncio.run(_kernel_plans_on_a_sidebar_mesh(tmp_path))


async def _kernel_plans_on_a_sidebar_mesh(tmp_path):
    # the main workflow: Start in the sidebar, connect a notebook to it, compute there;
    # the notebook's router plans reach the sidebar through its registration


    async with MeshManager(tmp_path) as manager:
        manager._entries["local-x"] = Entry(id="local-x", origin="sidebar",
                                            address="tcp://127.0.0.1:8786", name="Local mesh 1")
        record = {"kind": "plan", "route": "auto", "rows": [{"op": "matmul"}]}
        _kernel_registration(tmp_path, record)
        await manager.refresh_kernels()
        await manager.refresh_kernels()  # read again: still once
        entry = manager._entries["local-x"]
        assert list(entry.plans) == [record] and "kernel-k1" in entry.kernels
        assert list(manager._entries) == ["local-x"]  # no duplicate entry for the kernel


class _StalledMesh(_SlowMesh):
    """A mesh whose scheduler takes long to answer."""

    def inventory(self):
        import time

        time.sleep(1.0)
        raise AssertionError("the sidebar should not have waited for this")


def test_one_slow_mesh_does_not_hold_up_the_list(tmp_path, monkeypatch):
    asyncio.run(_slow_mesh_list(tmp_path, monkeypatch))


async def _slow_mesh_list(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(manager_module, "SAMPLE_TIMEOUT", 0.2)
    async with MeshManager(tmp_path) as manager:
        manager._entries["local-x"] = Entry(id="local-x", origin="sidebar",
                                            address="tcp://127.0.0.1:1", name="Local mesh 1",
                                            mesh=_StalledMesh())
        started = time.monotonic()
        (listed,) = await manager.list()
        assert time.monotonic() - started < 0.9
        assert "did not answer within 0.2 s: it may be busy; showing what it said last" in \
            listed["error"]
        await asyncio.sleep(1.0)  # let the stalled thread finish before the loop closes


class _RunningMesh:
    """A mesh the sidebar started, with ``workers`` worker processes (no processes)."""

    owns_cluster = True
    address = "tcp://127.0.0.1:2"
    dashboard_link = None

    def __init__(self, workers):
        from types import SimpleNamespace

        self.cluster = SimpleNamespace(worker_spec={f"cpu-{i}": {} for i in range(workers)})
        self.closed = False

    def scale(self, **counts):
        self.cluster.worker_spec = {f"cpu-{i}": {} for i in range(counts.get("cpu", 0))}


def _sidebar_mesh(manager, mesh, monkeypatch):
    """``mesh`` as the sidebar's "local-x", with no sampling and a short detail."""
    manager._entries["local-x"] = Entry(id="local-x", origin="sidebar", address=mesh.address,
                                        name="Local mesh 1", mesh=mesh)
    monkeypatch.setattr(manager, "_sample", _no_sample)
    monkeypatch.setattr(manager, "detail", lambda entry: {"id": entry.id})


def test_the_sidebars_meshes_share_four_workers_per_core(tmp_path, monkeypatch):
    asyncio.run(_worker_budget(tmp_path, monkeypatch))


async def _worker_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(manager_module, "most_local", lambda: 8)
    started = []
    monkeypatch.setattr(manager_module.Mesh, "local", staticmethod(
        lambda **kw: started.append(kw)))
    async with MeshManager(tmp_path) as manager:
        _sidebar_mesh(manager, _RunningMesh(6), monkeypatch)
        # 6 running + 3 more (each start alone allowed) is past 8: refused, nothing started
        with pytest.raises(Conflict, match=r"would have 9 worker processes, more than 8 "
                                           r"\(four per core\): stop or scale down"):
            await manager.start({"cpu": 3, "gpu": 0, "tpu": 0})
        with pytest.raises(Conflict, match="would have 9"):
            await manager.start({"gpu": 0, "tpu": 0, "jax_cpu": 1})  # + the default 2 CPUs
        # GPUs or TPUs this machine lacks are said so, not blamed on the meshes running
        # (stopping them would not help)
        monkeypatch.setattr(manager_module.Mesh, "local", staticmethod(
            lambda **kw: started.append(kw)))
        from jupyter_mesh.devices import _detect, _tpu

        monkeypatch.setattr(_detect, "cuda_devices", lambda: [])
        monkeypatch.setattr(_tpu, "chips", lambda: ([], "no TPU here"))
        with pytest.raises(BadRequest, match=r"^no CUDA GPU found for gpu=2"):
            await manager.start({"cpu": 1, "gpu": 2, "tpu": 0})
        with pytest.raises(BadRequest, match=r"^no TPU found for tpu=8"):
            await manager.start({"cpu": 1, "gpu": 0, "tpu": 8})
        assert started == []
        # scaling counts the mesh's own workers once
        assert await manager.scale("local-x", {"cpu": 8}) == {"id": "local-x"}
        assert await manager.scale("local-x", {"cpu": 6}) == {"id": "local-x"}
        manager._starting = 2  # another mesh of 2 starting: 6 + 1 + 2 is past 8
        with pytest.raises(Conflict, match="would have 9"):
            await manager.scale("local-x", {"jax_cpu": 1})
        manager._starting = 0
        assert await manager.scale("local-x", {"cpu": 8}) == {"id": "local-x"}
        # over the budget (another mesh started with "auto" GPUs, say): scaling down
        # is still allowed
        manager._starting = 3
        assert await manager.scale("local-x", {"cpu": 7}) == {"id": "local-x"}
        manager._starting = 0


def test_slow_connects_do_not_hold_up_the_other_calls(tmp_path, silent_port):
    # a connect waits on a scheduler that may never answer; eight of them at once
    # used up the default thread pool (6 threads on 2 cores) and the sidebar's list
    # waited behind them
    import time

    async def go():
        async with MeshManager(runtime_dir=tmp_path) as manager:
            slow = [asyncio.ensure_future(manager.connect(
                {"address": f"tcp://127.0.0.1:{silent_port}", "timeout": 4}))
                for _ in range(8)]
            await asyncio.sleep(0.5)  # all of them waiting on the silent port
            t0 = time.monotonic()
            assert await manager.list() == []
            listed = time.monotonic() - t0
            results = await asyncio.gather(*slow, return_exceptions=True)
            return listed, results

    listed, results = asyncio.run(go())
    assert listed < 2.0
    assert all(isinstance(r, Exception) and "within 4 s" in str(r) for r in results)


@pytest.mark.parametrize("reg_address, scheduler_id", [
    ("tcp://127.0.0.1:8786", None),
    # the notebook connected to it as localhost: the same mesh
    ("tcp://localhost:8786", None),
    # through another name of the host (its IP, a DNS name): the scheduler's own id
    ("tcp://node-7.example:8786", "Scheduler-1"),
])
def test_stopping_a_mesh_a_notebook_uses_needs_force(tmp_path, reg_address, scheduler_id):
    asyncio.run(_stop_a_used_mesh(tmp_path, reg_address, scheduler_id))


async def _stop_a_used_mesh(tmp_path, reg_address="tcp://127.0.0.1:8786", scheduler_id=None):
    # a notebook connected to the sidebar's mesh: Stop would pull it from under the
    # kernel. It is refused, naming the notebook, unless forced (the sidebar asks first)
    import json
    import os
    from types import SimpleNamespace

    from jupyter_mesh import discovery

    class Closable:
        closed = False
        client = SimpleNamespace(_scheduler_identity={"id": "Scheduler-1"})

        def close(self):
            self.closed = True

    async with MeshManager(tmp_path) as manager:
        mesh = Closable()
        manager._entries["local-x"] = Entry(id="local-x", origin="sidebar", mesh=mesh,
                                            address="tcp://127.0.0.1:8786", name="Local mesh 1")
        directory = discovery.registry_dir(tmp_path)
        directory.mkdir(mode=0o700, parents=True)
        path = directory / "mesh-1.json"
        reg = {"address": reg_address, "pid": os.getpid(), "id": "k1", "kernel_id": "kid-1",
               "pid_started": discovery.process_start_time(os.getpid())}
        if scheduler_id:
            reg["scheduler_id"] = scheduler_id
        path.write_text(json.dumps(reg))
        path.chmod(0o600)

        async def paths():
            return {"kid-1": "analysis.ipynb"}

        manager.kernel_paths = paths
        with pytest.raises(Conflict, match=r"^Local mesh 1 is in use by analysis\.ipynb: its kernel "
                                           r"would lose it; close it there first \(%mesh "
                                           r"close\), or stop it anyway \(the sidebar asks "
                                           r"first; the API takes force=true\)$"):
            await manager.stop("local-x")
        assert not mesh.closed and "local-x" in manager._entries
        assert list(manager._entries) == ["local-x"]  # one entry for the one scheduler
        assert (await manager.stop("local-x", force=True))["stopped"] and mesh.closed


def test_kernels_on_one_scheduler_make_one_entry(tmp_path):
    asyncio.run(_kernels_on_one_scheduler(tmp_path))


async def _kernels_on_one_scheduler(tmp_path):
    # a notebook that started a mesh and two that connected to it (as localhost, and
    # through another host name): one entry, named after the first, listing all three
    import json
    import os

    from jupyter_mesh import discovery

    directory = discovery.registry_dir(tmp_path)
    directory.mkdir(mode=0o700, parents=True)
    started = discovery.process_start_time(os.getpid())
    regs = [
        {"address": "tcp://localhost:8786", "id": "k2", "created": 2.0},
        {"address": "tcp://127.0.0.1:8786", "id": "k1", "created": 3.0, "owns_cluster": True,
         "scheduler_id": "Scheduler-1"},
        {"address": "tcp://node-7.example:8786", "id": "k3", "created": 1.0,
         "scheduler_id": "Scheduler-1"},
        {"address": "tcp://127.0.0.1:9999", "id": "k4", "created": 4.0},  # another one
    ]
    for reg in regs:
        path = directory / f"mesh-{reg['id']}.json"
        path.write_text(json.dumps({**reg, "pid": os.getpid(), "pid_started": started}))
        path.chmod(0o600)
    # a connected mesh known by its address alone (still connecting): a kernel on it as
    # localhost, with the scheduler's id, and one through another name with that id
    for reg in ({"address": "tcp://localhost:7000", "id": "k5", "scheduler_id": "S-7"},
                {"address": "tcp://node-9.example:7000", "id": "k6", "scheduler_id": "S-7"}):
        path = directory / f"mesh-{reg['id']}.json"
        path.write_text(json.dumps({**reg, "pid": os.getpid(), "pid_started": started,
                                    "created": 5.0}))
        path.chmod(0o600)
    async with MeshManager(tmp_path) as manager:
        manager._connect_kernel = _no_connect
        manager._entries["connect-x"] = Entry(id="connect-x", origin="connected",
                                              address="tcp://127.0.0.1:7000", name="x")
        await manager.refresh_kernels()
        assert sorted(manager._entries["connect-x"].kernels) == ["kernel-k5", "kernel-k6"]
        assert sorted(manager._entries) == ["connect-x", "kernel-k1", "kernel-k4"]
        assert sorted(manager._entries["kernel-k1"].kernels) == [
            "kernel-k1", "kernel-k2", "kernel-k3"]
        await manager.refresh_kernels()  # read again: the same
        assert sorted(manager._entries) == ["connect-x", "kernel-k1", "kernel-k4"]


async def _no_connect(entry):
    return None


def test_a_kernels_mesh_says_whether_it_started_it_and_when_it_is_gone(tmp_path):
    # a notebook that connected to a mesh is not the one that started it (its %mesh
    # close leaves it running); a mesh stopped under a notebook says what to do there,
    # not %mesh connect's advice to check the address
    import json
    import os
    import socket

    from jupyter_mesh import discovery

    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    directory = discovery.registry_dir(tmp_path)
    directory.mkdir(mode=0o700, parents=True)
    started = discovery.process_start_time(os.getpid())
    for kid, owns, address in (("k1", False, f"tcp://127.0.0.1:{port}"),
                               ("k2", True, "tcp://127.0.0.1:1")):
        path = directory / f"mesh-{kid}.json"
        path.write_text(json.dumps({"address": address, "id": kid, "created": 1.0,
                                    "owns_cluster": owns, "pid": os.getpid(),
                                    "pid_started": started}))
        path.chmod(0o600)

    async def go():
        async with MeshManager(tmp_path) as manager:
            await manager.refresh_kernels()
            for kid in ("kernel-k1", "kernel-k2"):
                await manager.wait_connected(kid)
            return {m["id"]: m for m in await manager.list()}

    listed = asyncio.run(go())
    assert listed["kernel-k1"]["kernel_started"] is False
    assert listed["kernel-k2"]["kernel_started"] is True
    error = listed["kernel-k1"]["error"]
    assert error.startswith(f"this notebook's mesh at tcp://127.0.0.1:{port} does not "
                            f"answer (connection refused") and error.endswith(
        "): if it was stopped, run %mesh close in the notebook"), error
    assert "check that" not in error and "\n" not in error
    assert error.count(str(port)) <= 2  # (the address once, and the port in the reason)


def test_a_request_too_big_by_itself_is_a_bad_request(tmp_path, monkeypatch):
    # each count allowed alone, together too many: it said 409 "stop or scale down a
    # mesh first", with no mesh running (on a host with the GPUs and TPUs asked for)
    top = manager_module.most_local()
    monkeypatch.setattr(manager_module, "found_accelerators", lambda gpu, tpu: ([], [], None))

    async def go():
        async with MeshManager(tmp_path) as manager:
            with pytest.raises(BadRequest, match="cpu and jax_cpu together must be at most"):
                await manager.start({"cpu": 1, "jax_cpu": top, "gpu": 0, "tpu": 0})
            # GPU and TPU workers count too: stopping other meshes would not help
            for body in ({"cpu": 1, "gpu": top}, {"cpu": 4, "tpu": top - 3}, {"gpu": top - 1}):
                with pytest.raises(BadRequest, match=(
                        rf"a mesh of {top + 1} worker processes is more than {top} \(four "
                        rf"per core here\): ask for fewer workers")):
                    await manager.start(body)
            assert manager._entries == {}

    asyncio.run(go())


def test_a_scale_too_big_by_itself_is_a_bad_request(tmp_path, monkeypatch):
    async def go():
        monkeypatch.setattr(manager_module, "most_local", lambda: 8)
        async with MeshManager(tmp_path) as manager:
            mesh = _RunningMesh(1)
            _sidebar_mesh(manager, mesh, monkeypatch)
            with pytest.raises(BadRequest, match="a mesh of 10 worker processes is more "
                                                 "than 8 .*: ask for fewer workers"):
                await manager.scale("local-x", {"cpu": 5, "jax_cpu": 5})
            assert len(mesh.cluster.worker_spec) == 1  # nothing changed
            assert await manager.scale("local-x", {"cpu": 8}) == {"id": "local-x"}

    asyncio.run(go())


def test_a_start_refused_before_or_while_starting_takes_no_name(tmp_path, monkeypatch):
    # a mesh of no devices, or of TPUs this host lacks, is refused before it is listed
    # as starting; one that Mesh.local refuses is listed while it starts, then gone,
    # and the next mesh gets the number it had
    from jupyter_mesh import MeshError

    seen = []

    async def go():
        async with MeshManager(tmp_path) as manager:
            def local(**kw):
                seen.append([e.name for e in manager._entries.values()])
                if kw.get("jax_cpu"):
                    raise MeshError("jax_cpu needs JAX: pip install 'jupyter_mesh[tpu]'")
                return _RunningMesh(kw.get("cpu", 2))

            monkeypatch.setattr(manager_module.Mesh, "local", staticmethod(local))
            monkeypatch.setattr(manager, "_sample", _no_sample)
            monkeypatch.setattr(manager, "detail", lambda entry: {"name": entry.name})
            monkeypatch.setattr(manager_module.discovery, "share_security",
                                lambda *a: None)
            with pytest.raises(BadRequest, match="a mesh needs at least one device: use "
                                                 "cpu=1 or more"):
                await manager.start({"cpu": 0, "gpu": 0, "tpu": 0})
            assert seen == [] and manager._entries == {}
            with pytest.raises(BadRequest, match="no TPU found"):
                await manager.start({"cpu": 1, "tpu": 1})  # (this host has none)
            assert seen == [] and manager._entries == {}
            with pytest.raises(BadRequest, match="jax_cpu needs JAX"):
                await manager.start({"cpu": 1, "jax_cpu": 1, "gpu": 0, "tpu": 0})
            assert seen == [["Local mesh 1"]] and manager._entries == {}
            assert await manager.start({"cpu": 1, "gpu": 0, "tpu": 0}) == {
                "name": "Local mesh 1"}

    asyncio.run(go())


def test_connects_to_one_scheduler_at_once_make_one_entry(tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, protocol="tcp://", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        asyncio.run(_connects_at_once(tmp_path, cluster.scheduler_address))


async def _connects_at_once(tmp_path, address):
    # three clicks on Connect, or three sidebars: each connect finishes on its own, and
    # each used to add its entry after finding none
    async with MeshManager(tmp_path) as manager:
        got = await asyncio.gather(*(manager.connect({"address": address})
                                     for _ in range(3)))
        assert len({m["id"] for m in got}) == 1
        assert [m["address"] for m in await manager.list()] == [address]


@pytest.mark.parametrize("origin, todo", [
    ("connected", "press Disconnect, then connect again once it is back"),
    ("sidebar", "press Stop, then Start a new one"),
])
def test_a_mesh_that_cannot_be_read_says_what_to_do_in_the_sidebar(tmp_path, origin, todo):
    # the mesh's own error gives a kernel's advice (%mesh close ...): not the sidebar's
    from jupyter_mesh import MeshError

    class Gone(_SlowMesh):
        def inventory(self):
            raise MeshError("the scheduler at tcp://127.0.0.1:1 is not reachable (Dask's "
                            "client is closed): run %mesh close, then %mesh start or "
                            "%mesh connect ADDRESS")

    async def go():
        async with MeshManager(tmp_path) as manager:
            entry = Entry(id="x", origin=origin, address="tcp://127.0.0.1:1", name="x",
                          mesh=Gone())
            entry.last_devices = [{"kind": "cpu", "site": "local", "worker": "tcp://w:1"}]
            manager._entries["x"] = entry
            await manager._sample(entry, force=True)
            # the devices it had are gone with it: none listed, none counted
            detail = manager.detail(entry)
            assert (detail["devices"], detail["counts"], detail["groups"]) == (0, {}, [])
            return entry.error

    assert asyncio.run(go()) == (
        "cannot read the inventory of tcp://127.0.0.1:1: the scheduler at "
        "tcp://127.0.0.1:1 is not reachable (Dask's client is closed): " + todo)


def test_a_mesh_scaling_up_counts_its_new_workers_once(tmp_path, monkeypatch):
    asyncio.run(_budget_while_scaling(tmp_path, monkeypatch))


async def _budget_while_scaling(tmp_path, monkeypatch):
    # Mesh.scale puts its new workers in the cluster's spec at once: the budget counted
    # them twice while the scale ran (a start that fitted was refused meanwhile)
    import threading

    monkeypatch.setattr(manager_module, "most_local", lambda: 8)
    release = threading.Event()

    class Scaling(_RunningMesh):
        def scale(self, **counts):
            super().scale(**counts)  # the spec first, as Mesh.scale does
            release.wait(10)

    async with MeshManager(tmp_path) as manager:
        _sidebar_mesh(manager, Scaling(1), monkeypatch)
        scaling = asyncio.ensure_future(manager.scale("local-x", {"cpu": 2}))
        await asyncio.sleep(0.3)
        assert manager._local_workers() == 2  # not 3
        manager._check_budget(6)  # 2 + 6 = 8 fits
        with pytest.raises(Conflict, match="would have 9"):
            manager._check_budget(7)
        release.set()
        await scaling
        assert manager._local_workers() == 2


def test_dasks_client_errors_are_one_line_in_the_servers_log(caplog):
    # a scheduler the server holds a client of goes away: Dask logs tracebacks
    import logging

    from jupyter_mesh.server import OneLineClientErrors, quiet_client_tracebacks

    quiet_client_tracebacks()
    quiet_client_tracebacks()  # once
    log = logging.getLogger("distributed.client")
    assert sum(isinstance(f, OneLineClientErrors) for f in log.filters) == 1
    try:
        raise ConnectionRefusedError("[Errno 111] Connection refused\nmore")
    except ConnectionRefusedError:
        log.exception("Failed to reconnect to scheduler after %s seconds", 30)
    (record,) = [r for r in caplog.records if r.name == "distributed.client"]
    assert record.getMessage() == ("Failed to reconnect to scheduler after 30 seconds "
                                   "(ConnectionRefusedError: [Errno 111] Connection refused)")
    assert record.exc_info is None and "Traceback" not in caplog.text


def test_the_scale_form_counts_the_workers_that_run(tmp_path):
    # a worker that died for good was still counted: the same number again sent nothing
    class OneDied(_RunningMesh):
        options = {"cpu": 2, "jax_cpu": 1}

        def _live_counts(self):
            return {"cpu": 1, "jax_cpu": 1, "gpu": 0, "tpu": 0}

    async def go():
        async with MeshManager(tmp_path) as manager:
            entry = Entry(id="local-x", origin="sidebar", address="tcp://127.0.0.1:2",
                          name="Local mesh 1", mesh=OneDied(2))
            manager._entries["local-x"] = entry
            return manager.detail(entry)["scale"]

    assert asyncio.run(go()) == {"cpu": 1, "jax_cpu": 1}


def test_one_meshs_detail_reads_the_kernels_that_use_it_now(tmp_path, monkeypatch):
    asyncio.run(_detail_reads_kernels(tmp_path, monkeypatch))


async def _detail_reads_kernels(tmp_path, monkeypatch):
    # GET meshes/ID of a mesh the sidebar started: the kernels using it (and their
    # plans) were read only by GET meshes, so polling the detail alone showed none, and
    # after the kernel was gone still showed it


    async with MeshManager(tmp_path) as manager:
        manager._entries["local-x"] = Entry(id="local-x", origin="sidebar",
                                            address="tcp://127.0.0.1:8786", name="Local mesh 1")
        monkeypatch.setattr(manager, "_sample", _no_sample)
        monkeypatch.setattr(manager, "detail", lambda entry: {
            "kernels": sorted(entry.kernels), "plans": list(entry.plans)})
        assert await manager.get("local-x") == {"kernels": [], "plans": []}
        record = {"kind": "plan", "route": "auto", "rows": [{"op": "matmul"}]}
        path = _kernel_registration(tmp_path, record)
        got = await manager.get("local-x")
        assert got["kernels"] == ["kernel-k1"] and got["plans"] == [record]
        path.unlink()  # the kernel is gone
        assert (await manager.get("local-x"))["kernels"] == []


def test_a_connect_queued_behind_others_keeps_to_its_timeout(tmp_path, monkeypatch):
    asyncio.run(_queued_connects(tmp_path, monkeypatch))


async def _queued_connects(tmp_path, monkeypatch):
    # connects run in a few threads; one queued behind connects to a scheduler that
    # does not answer waited for a thread and then its whole timeout, and said it had
    # waited the timeout once
    import time

    from jupyter_mesh import MeshError

    given = []

    def never_answers(address, timeout=None, **kwargs):
        given.append(timeout)
        time.sleep(1.0)
        raise MeshError(f"could not connect to {address} within {timeout:g} s")

    monkeypatch.setattr(manager_module, "CONNECT_THREADS", 1)
    monkeypatch.setattr(manager_module.Mesh, "connect", staticmethod(never_answers))
    async with MeshManager(tmp_path) as manager:
        started = time.monotonic()
        results = await asyncio.gather(
            manager._connect_in_thread("tcp://a:1", timeout=3.0),
            manager._connect_in_thread("tcp://b:1", timeout=3.0),
            manager._connect_in_thread("tcp://c:1", timeout=1.2),
            return_exceptions=True)
        took = time.monotonic() - started
    assert given[0] == 3.0 and 1.5 <= given[1] <= 2.2, given  # what was left of it
    assert len(given) == 2 and took < 3.5, (given, took)
    assert str(results[2]) == ("no connection was free for 1.2 s (every one of the 1 "
                               "waits on a scheduler that does not answer): try again "
                               "once they give up")
    # the sidebar gives no timeout: mesh.connect-timeout's counts from the request too
    given.clear()
    import dask

    with dask.config.set({"mesh.connect-timeout": 1.2}):
        async with MeshManager(tmp_path) as manager:
            results = await asyncio.gather(
                manager._connect_in_thread("tcp://a:1"),
                manager._connect_in_thread("tcp://b:1"), return_exceptions=True)
    assert given == [None] and "no connection was free for 1.2 s" in str(results[1])


def test_a_mesh_several_notebooks_use_lists_the_newest_plans_of_all():
    # each notebook's plans were appended in turn to the mesh's short list: the last
    # notebook merged pushed the others' out, the newest plan of all included
    from jupyter_mesh import discovery
    from jupyter_mesh.server.manager import Entry, _merge_plans

    entry = Entry(id="x", origin="sidebar", address="tcp://h:1", name="m")
    a = {"plans": [{"kind": "plan", "at": 100.0, "rows": []},
                   {"kind": "plan", "at": 300.0, "rows": []}]}
    b = {"plans": [{"kind": "plan", "at": 200.0 + i, "rows": []}
                   for i in range(discovery.MAX_PLANS)]}
    for _ in range(3):  # (each refresh merges every notebook's registration)
        _merge_plans(entry, a)
        _merge_plans(entry, b)
    times = [p["at"] for p in entry.plans]
    assert times == [201.0 + i for i in range(discovery.MAX_PLANS - 1)] + [300.0]
    # a broken record's time (NaN, an integer past float's range) neither hides the
    # newest plans nor stops the refresh; a record listed twice is kept once
    newest = {"kind": "plan", "at": 1000.0, "rows": []}
    _merge_plans(entry, {"plans": [newest, dict(newest), {"kind": "plan", "at": float("nan")},
                                   {"kind": "plan", "at": 10**400}]})
    times = [p["at"] for p in entry.plans]
    assert times[-2:] == [300.0, 1000.0] and times.count(1000.0) == 1
