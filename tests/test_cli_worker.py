"""Workers joining an existing Dask scheduler: the CLI and the Dask preload."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from distributed import Scheduler

import jupyter_mesh as jm

from .meshes import line_queue

BIN = os.path.dirname(sys.executable)
#: a file that exists but is no PEM file
NOT_PEM = os.path.abspath(__file__)


@pytest.fixture
def scheduler_mesh(no_mesh):
    """A bare Dask scheduler (no workers) in a thread, and a mesh connected to it."""
    import asyncio
    import threading

    ready = threading.Event()
    box = {}

    def run():
        async def main():
            s = Scheduler(host="127.0.0.1", port=0, dashboard_address=None)
            await s
            box["s"] = s
            box["loop"] = asyncio.get_running_loop()
            box["stop"] = asyncio.Event()
            ready.set()
            await box["stop"].wait()
            await s.close()

        asyncio.run(main())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(30)
    mesh = jm.Mesh.connect(box["s"].address, timeout=10)
    yield mesh
    mesh.close()
    box["loop"].call_soon_threadsafe(box["stop"].set)
    t.join(30)


def _wait_devices(mesh, n, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inv = mesh.inventory()
        if len(inv) >= n:
            return inv
        time.sleep(0.3)
    raise AssertionError(f"only {len(mesh.inventory())} devices joined")


def _ctrl_c(proc, within):
    """Ctrl-C to the worker ``proc``; its stderr, once it ended within ``within`` s."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert time.monotonic() - t0 < within
    return err


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_cli_worker_joins_with_site(scheduler_mesh):
    proc = subprocess.Popen(
        [os.path.join(BIN, "jupyter-mesh"), "worker", scheduler_mesh.address,
         "--site", "edge-lab", "--nthreads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        inv = _wait_devices(scheduler_mesh, 1)
        dev = inv[0]
        assert (dev.kind, dev.backend, dev.site) == ("cpu", "numpy", "edge-lab")
        assert dev.profile is not None and dev.profile.method == "measured"
        fut = scheduler_mesh.client.submit(lambda: 6 * 7)
        assert fut.result(timeout=30) == 42
        # a scheduler on this machine: the worker and its nanny listen on 127.0.0.1
        # only (Dask's own default for a worker is every interface)
        import psutil

        nanny = psutil.Process(proc.pid)
        listening = {c.laddr.ip for p in [nanny, *nanny.children(recursive=True)]
                     for c in p.net_connections(kind="inet") if c.status == "LISTEN"}
        assert listening == {"127.0.0.1"}
    finally:
        _stop(proc)
    # the scheduler plugin drops the device when the worker leaves
    deadline = time.monotonic() + 30
    while len(scheduler_mesh.inventory()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(scheduler_mesh.inventory()) == 0


def test_dask_worker_with_preload_joins_with_site(scheduler_mesh):
    proc = subprocess.Popen(
        [os.path.join(BIN, "dask"), "worker", scheduler_mesh.address, "--nthreads", "1",
         "--no-dashboard", "--preload", "jupyter_mesh.worker", "--site", "us-east"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        inv = _wait_devices(scheduler_mesh, 1)
        assert (inv[0].kind, inv[0].site) == ("cpu", "us-east")
        res = scheduler_mesh.client.run(lambda dask_worker: dict(dask_worker.state.total_resources))
        assert list(res.values())[0]["mesh-cpu-numpy"] == 1
    finally:
        _stop(proc)


@pytest.mark.parametrize(
    "args, message",
    [
        (["worker", "tcp://127.0.0.1:1", "--site", "bad site"], "site must be"),
        (["worker", "nonsense://x"], "not 'nonsense': use tcp://HOST:PORT"),
        (["worker", "tcp://127.0.0.1:1", "--nthreads", "0"], "--nthreads must be"),
        (["worker", "tcp://127.0.0.1:1", "--nthreads", "1000000"],
         "--nthreads must be a whole number from 1 to "),
        # argparse's own errors: one line too (it printed its usage first)
        (["worker", "tcp://127.0.0.1:1", "--nthreads", "abc"],
         "jupyter-mesh worker: argument --nthreads: invalid int value: 'abc': see "
         "jupyter-mesh worker --help"),
        (["worker"], "the following arguments are required: address: see"),
        (["worker", "tcp://127.0.0.1:1", "--tls-key"], "expected one argument"),
        (["wroker"], "jupyter-mesh: argument command: invalid choice: 'wroker'"),
        # an unknown option points to the help that lists the worker's options
        (["worker", "tcp://127.0.0.1:1", "--bogus"],
         "jupyter-mesh worker: unrecognized arguments: --bogus: see jupyter-mesh worker "
         "--help"),
        (["worker", "tcp://127.0.0.1:1", "--name", " "], "--name must not be blank"),
        # a size is bytes (Dask reads a share of the host's memory from a number only)
        (["worker", "tcp://127.0.0.1:1", "--memory-limit", "1B"],
         "--memory-limit: memory_limit '1B' is 1 B, less than a worker process needs"),
        (["worker", "tcp://127.0.0.1:1", "--memory-limit", ""],
         "--memory-limit: memory_limit must be 'auto', a number of bytes or a size"),
        (["worker", "tcp://127.0.0.1:1", "--host", ""], "--host must be an interface "
                                                        "address like 127.0.0.1"),
        (["worker", "tls://127.0.0.1:1"], "needs --tls-ca-file"),
        (["worker", "tcp://127.0.0.1:1", "--gpu", "99"], "no CUDA GPU 99 here"),
        (["worker", "tcp://127.0.0.1:1", "--gpu", "99"], "or use --jax for a TPU"),
        # --jax given: not told to give it
        (["worker", "tcp://127.0.0.1:1", "--jax", "--gpu", "99"],
         "to join as a CPU worker\n"),
        (["worker", "tcp://127.0.0.1:1", "--tpu", "0", "--backend", "numpy"],
         "--tpu drives a TPU chip through JAX: leave out --gpu and --backend"),
        (["worker", "tcp://127.0.0.1:1", "--tls-ca-file", "a", "--tls-cert", "b",
          "--tls-key", "c"], "is not a TLS address, but TLS files were given: use tls://"),
        (["worker", "tcp://127.0.0.1:1", "--memory-limit", "lots"],
         "--memory-limit: memory_limit must be 'auto', a number of bytes or a size like "
         "'4 GiB', not 'lots'"),
        (["worker", "tcp://127.0.0.1:1", "--memory-limit=-1GB"],
         "--memory-limit: memory_limit must be"),
        # a bare number counts bytes: 4 B, and a nanny restarting the worker for ever
        (["worker", "tcp://127.0.0.1:1", "--memory-limit", "4"],
         "--memory-limit: memory_limit '4' is 4 B, less than a worker process needs"),
        (["worker", "tcp://127.0.0.1:1", "--memory-limit", "0.00001"],
         "--memory-limit: memory_limit '0.00001' is "),
        (["worker", "tcp://127.0.0.1:1", "--backend", "cupy"],
         "--backend cupy drives a CUDA GPU, and there is none here"),
        (["worker", "tcp://127.0.0.1:1", "--host", "banana"],
         "--host banana is not an address of this machine"),
        (["worker", "tcp://127.0.0.1:1", "--host", "192.0.2.7"],
         "--host 192.0.2.7 is not an address of this machine"),
        # a name with an empty label: IDNA's UnicodeError, said as Dask failing to start
        (["worker", "tcp://127.0.0.1:1", "--host", "bad..host"],
         "--host bad..host is not an address of this machine (not a valid host name)"),
        (["worker", "tls://127.0.0.1:1", "--tls-ca-file", "/tmp", "--tls-cert", "a",
          "--tls-key", "b"], "TLS file /tmp is a folder: give the PEM file in it"),
        (["worker", "tls://127.0.0.1:1", "--tls-ca-file", "no-such-ca.pem", "--tls-cert",
          "no-such-cert.pem", "--tls-key", "no-such-key.pem"],
         "TLS file not found: no-such-ca.pem: give the path of a PEM file"),
        (["worker", "tls://127.0.0.1:1", "--tls-ca-file", NOT_PEM, "--tls-cert", NOT_PEM,
          "--tls-key", NOT_PEM], f"the CA, certificate and key must be PEM files; check "
                                 f"{NOT_PEM}"),
        # an empty path (a shell variable not set) joined over plain TCP
        (["worker", "tcp://127.0.0.1:1", "--tls-ca-file", ""],
         "--tls-ca-file is empty: give the path of a PEM file"),
        (["worker", "tls://127.0.0.1:1", "--tls-ca-file", "a", "--tls-cert", " ",
          "--tls-key", "c"], "--tls-cert is empty: give the path of a PEM file"),
        # argparse kept the last of a repeated option without a word
        (["worker", "tcp://127.0.0.1:1", "--site", "bad site", "--site", "ok"],
         "--site given twice: give it once"),
        (["worker", "tcp://127.0.0.1:1", "--nthreads=1", "--nthreads", "2"],
         "--nthreads given twice: give it once"),
        # an abbreviation beside the whole option slipped past the check above
        (["worker", "tcp://127.0.0.1:1", "--nth", "2", "--nthreads", "3"],
         "unrecognized arguments: --nth 2"),
        # it said the command was missing
        (["--bogus", "worker"], "unrecognized arguments: --bogus (options go after the "
                                "command"),
    ],
)
def test_cli_bad_input(args, message):
    out = subprocess.run([os.path.join(BIN, "jupyter-mesh"), *args], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert message in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr  # one line, no traceback


@pytest.mark.parametrize("args, env, status, message", [
    # a host nothing resolves: it said to give --host (exit 2), which was not the reason
    (["worker", "tcp://nosuchhost.invalid:8786"], {}, 1,
     "jupyter-mesh: could not join tcp://nosuchhost.invalid:8786: host "
     "'nosuchhost.invalid' not found: check the scheduler's address"),
    # settings the worker process reads as it starts: pages of Dask's tracebacks there
    (["worker", "tcp://127.0.0.1:1"], {"DASK_MESH__PROFILE__MEASURE_SECONDS": "abc"}, 2,
     "jupyter-mesh: config mesh.profile.measure-seconds must be a number of seconds, not "
     "'abc'"),
    # a section given one value: Dask merged the defaults over it, and it was gone
    (["worker", "tcp://127.0.0.1:1"], {"DASK_MESH__PROFILE": "abc"}, 2,
     "jupyter-mesh: config mesh.profile is a section of settings (cache-dir, "
     "measure-seconds), not 'abc' (in a Dask YAML file or a DASK_ variable)"),
    (["worker", "tcp://127.0.0.1:1"], {"DASK_MESH__PROFILE__CACHE_DIR": "/proc/nope"}, 2,
     "jupyter-mesh: config mesh.profile.cache-dir: "),
    (["worker", "tcp://127.0.0.1:1"], {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "-1"}, 2,
     "jupyter-mesh: config distributed.comm.timeouts.connect must be a time like '30s', "
     "not -1"),
    (["worker", "tcp://127.0.0.1:1"], {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "abc"}, 2,
     "jupyter-mesh: config distributed.comm.timeouts.connect must be a time like '30s', "
     "not 'abc'"),
])
def test_cli_refusals_before_starting_are_one_line(args, env, status, message):
    out = subprocess.run([os.path.join(BIN, "jupyter-mesh"), *args], capture_output=True,
                         text=True, timeout=60, env={**os.environ, **env})
    assert out.returncode == status, out.stderr
    assert out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr


def test_cli_gpu_index_counts_the_visible_gpus_and_devices_get_one_thread(monkeypatch):
    import asyncio

    import distributed

    from jupyter_mesh import cli
    from jupyter_mesh.devices import _detect

    made = {}

    class Made(Exception):
        pass

    class RecordingNanny:  # what the CLI would start, recorded instead
        def __init__(self, address, **kwargs):
            made.update(kwargs)
            raise Made

    def start(*argv):
        made.clear()
        args = cli._parser().parse_args(["worker", "tcp://127.0.0.1:1", *argv])
        with pytest.raises(Made):
            asyncio.run(cli.run_worker(args))
        return made

    monkeypatch.setattr(distributed, "Nanny", RecordingNanny)
    monkeypatch.setattr(_detect, "cuda_devices", lambda: ["gpu-a", "gpu-b"])
    # a hub gave this process GPUs 5 and 7: --gpu 1 is the second of those
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    got = start("--gpu", "1")
    assert got["env"]["CUDA_VISIBLE_DEVICES"] == "7" and got["nthreads"] == 1
    # one of two GPUs: half the host's memory, not one thread's share of the cores
    from distributed.system import MEMORY_LIMIT

    assert got["memory_limit"] == MEMORY_LIMIT // 2
    assert start("--gpu", "0", "--memory-limit", "3 GiB")["memory_limit"] == "3 GiB"
    # without --gpu, a worker that will find an accelerator also gets one thread, and
    # its share of the host's memory (here one of 4 GPUs or TPU chips); --jax too (on a
    # TPU host JAX drives a chip)
    monkeypatch.setattr(cli, "_detects_accelerator", lambda jax=False: 4)
    for argv in [(), ("--jax",), ("--backend", "jax")]:
        got = start(*argv)
        assert (got["nthreads"], got["memory_limit"]) == (1, MEMORY_LIMIT // 4), argv
    monkeypatch.setattr(cli, "_detects_accelerator", lambda jax=False: 0)
    assert start()["nthreads"] == _detect.cpu_cores()
    assert start("--jax")["nthreads"] == _detect.cpu_cores()
    assert start()["memory_limit"] == "auto"  # a CPU worker: Dask's own share
    assert start("--nthreads", "3")["nthreads"] == 3
    # a JAX worker computes in 64 bits, unless the environment turns that off (it was
    # turned on over the user's JAX_ENABLE_X64=0)
    assert start("--jax")["env"]["JAX_ENABLE_X64"] == "1"
    monkeypatch.setenv("JAX_ENABLE_X64", "0")
    assert start("--jax")["env"]["JAX_ENABLE_X64"] == "0"


def test_the_accelerators_a_worker_without_gpu_or_tpu_finds(monkeypatch):
    from jupyter_mesh import cli
    from jupyter_mesh.devices import _detect, _tpu

    # SIMULATED devices: two CUDA GPUs and three TPU chips, as detection reports them
    monkeypatch.setattr(_detect, "cuda_available", lambda: True)
    monkeypatch.setattr(_detect, "cuda_devices", lambda: ["gpu-a", "gpu-b"])
    monkeypatch.setattr(_detect, "tpu_possible", lambda: True)
    monkeypatch.setattr(_tpu, "chips", lambda: (["c0", "c1", "c2"], ""))
    assert cli._detects_accelerator() == 2  # CuPy's GPU first
    assert cli._detects_accelerator(jax=True) == 3  # JAX takes a TPU
    monkeypatch.setattr(_detect, "cuda_available", lambda: False)
    assert cli._detects_accelerator() == 3
    monkeypatch.setattr(_tpu, "chips", lambda: ([], "no chips"))
    assert cli._detects_accelerator() == 0
    monkeypatch.setattr(_detect, "tpu_possible", lambda: False)
    monkeypatch.setattr(_detect, "jax_gpu_count", lambda: 0)
    assert cli._detects_accelerator(jax=True) == 0
    # JAX with its CUDA plugin drives GPUs (--jax on a GPU host): counted too
    monkeypatch.setattr(_detect, "jax_gpu_count", lambda: 4)
    assert cli._detects_accelerator(jax=True) == 4
    assert cli._detects_accelerator() == 0  # (without --jax: CuPy's, and it has none)


def test_jax_drives_no_gpu_without_its_cuda_plugin(monkeypatch):
    from jupyter_mesh.devices import _detect

    # plain `pip install jax` (as here): 0 at once, no child process
    real = _detect.importlib.util.find_spec
    monkeypatch.setattr(_detect.importlib.util, "find_spec",
                        lambda name: None if name in _detect.JAX_CUDA_PLUGINS else real(name))
    monkeypatch.setattr(_detect, "_jax_gpus_probed", lambda: pytest.fail("probed"))
    assert _detect.jax_gpu_count() == 0


def test_a_worker_listens_where_it_reaches_the_scheduler():
    from jupyter_mesh import MeshError
    from jupyter_mesh.cli import listen_host

    assert listen_host("tcp://127.0.0.1:8786", None) == "127.0.0.1"
    assert listen_host("tls://localhost:8786", None) == "127.0.0.1"
    # another machine: the one interface that reaches it, never every interface nor
    # loopback (where that machine could not reach the worker); no route: say so
    try:
        remote = listen_host("tcp://192.0.2.7:8786", None)
    except MeshError as exc:
        assert "give --host ADDRESS" in str(exc)
    else:
        assert remote not in ("", "0.0.0.0", "::", "127.0.0.1") and remote.count(".") == 3
    assert listen_host("tcp://192.0.2.7:8786", "0.0.0.0") == "0.0.0.0"  # asked for
    # IPv6 loopback, in brackets as Dask's addresses hold it
    assert listen_host("tcp://[::1]:8786", None) == "[::1]"
    assert listen_host("tcp://[::1]:8786", "::1") == "[::1]"


def test_a_scheduler_that_cannot_be_reached_is_said_in_one_line():
    # Dask's Nanny wraps the OSError that says why in "Nanny failed to start."
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}
    out = subprocess.run([os.path.join(BIN, "jupyter-mesh"), "worker", "tcp://127.0.0.1:1",
                          "--nthreads", "1"], capture_output=True, text=True, timeout=60,
                         env=env)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("jupyter-mesh: could not join tcp://127.0.0.1:1: ")
    assert last.endswith("check that a Dask scheduler listens there, this host can "
                         "reach it, and the protocol (tcp/tls) is right")


def test_ctrl_c_stops_a_worker_that_is_still_joining(silent_port):
    # a port that accepts and never answers: it waits its connect timeout (30 s)
    address = f"tcp://127.0.0.1:{silent_port}"
    proc = subprocess.Popen([os.path.join(BIN, "jupyter-mesh"), "worker", address,
                             "--nthreads", "1"], stderr=subprocess.PIPE, text=True)
    try:
        # it says when it starts to join (its Ctrl-C handler is in place then)
        first = proc.stderr.readline()
        assert first.strip() == f"jupyter-mesh worker: joining {address} (Ctrl-C stops)"
        time.sleep(1)
        err = _ctrl_c(proc, within=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == ("jupyter-mesh worker: stopped before it joined "
                                           f"{address}")


def test_a_worker_started_before_its_scheduler_joins_it_when_it_comes():
    # a job script or a compose file starts both at once: a refused port is tried again
    # until the connect timeout, as Dask does
    import socket

    from distributed import LocalCluster

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "60s"}
    proc = subprocess.Popen([os.path.join(BIN, "jupyter-mesh"), "worker", address,
                             "--nthreads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    out, err = line_queue(proc.stdout), line_queue(proc.stderr)
    try:
        seen = []
        while not any("nothing listens at" in x for x in seen):
            seen.append(err.get(timeout=60))
        assert seen[-1].strip() == (f"jupyter-mesh worker: nothing listens at {address} "
                                    f"yet; trying again for up to 60 s "
                                    f"(distributed.comm.timeouts.connect)")
        with LocalCluster(n_workers=0, processes=False, scheduler_port=port,
                          host="127.0.0.1", dashboard_address=None) as cluster:
            while not any(x.startswith("jupyter-mesh worker joined") for x in seen):
                seen.append(out.get(timeout=60))
            assert len(cluster.scheduler.workers) == 1
    finally:
        _stop(proc)


@pytest.mark.parametrize("answer", ["nothing", "http"])
def test_a_port_that_is_no_dask_scheduler_fails_in_its_timeout(silent_port, answer):
    # Dask's own join waited for ever on a port that accepts connections and never
    # speaks Dask (another server's, a dashboard's)
    import http.server
    import threading

    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}
    server = None
    if answer == "http":
        server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        address = f"tcp://127.0.0.1:{server.server_address[1]}"
    else:
        address = f"tcp://127.0.0.1:{silent_port}"
    try:
        t0 = time.monotonic()
        out = subprocess.run([os.path.join(BIN, "jupyter-mesh"), "worker", address,
                              "--nthreads", "1"], capture_output=True, text=True, timeout=60,
                             env=env)
    finally:
        if server is not None:
            server.shutdown()
    assert time.monotonic() - t0 < 30
    assert out.returncode == 1 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"jupyter-mesh: could not join {address}: ")
    assert last.endswith("check that a Dask scheduler listens there, this host can "
                         "reach it, and the protocol (tcp/tls) is right")


def test_a_worker_dask_refuses_says_why_in_one_line(scheduler_mesh):
    # a name another worker has: Dask's scheduler refuses it, deep in the Nanny's start
    first = subprocess.Popen(
        [os.path.join(BIN, "jupyter-mesh"), "worker", scheduler_mesh.address, "--nthreads",
         "1", "--name", "twin"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_devices(scheduler_mesh, 1)
        out = subprocess.run([os.path.join(BIN, "jupyter-mesh"), "worker",
                              scheduler_mesh.address, "--nthreads", "1", "--name", "twin"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1
        last = out.stderr.strip().splitlines()[-1]
        assert last == ("jupyter-mesh: a worker of that scheduler has the name 'twin' "
                        "already: give another --name, or leave it out")
        # said before the worker starts (81 lines of Dask's tracebacks came first)
        assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) <= 2
    finally:
        _stop(first)


def test_dasks_records_of_a_refused_name_are_left_out():
    # two workers started at once under one --name both pass the check before they
    # start; the scheduler refuses the later one deep in the nanny's start, and Dask's
    # worker and nanny logged ~80 lines of it before the one line that says so
    import logging

    from jupyter_mesh.devices._worker_plugin import _NoNameTaken

    def record(level, msg, exc=None):
        info = (type(exc), exc, None) if exc is not None else None
        return logging.LogRecord("distributed.nanny", level, __file__, 1, msg, (), info)

    refused = ValueError("Unexpected response from register: {'status': 'error', "
                         "'message': 'name taken, dup'}")
    failed = RuntimeError("Worker failed to start.")
    failed.__cause__ = refused
    keep = _NoNameTaken().filter
    assert not keep(record(logging.ERROR, "Unable to connect to scheduler: name taken, dup"))
    assert not keep(record(logging.ERROR, "Failed to start worker", failed))
    # anything else stays, as Dask logs it
    assert keep(record(logging.ERROR, "Failed to start worker", RuntimeError("other")))
    assert keep(record(logging.INFO, "Worker name: dup"))


def _has_cuda() -> bool:
    from jupyter_mesh.devices._detect import cuda_devices

    return bool(cuda_devices())


@pytest.mark.parametrize("options, why", [
    (["--site", "a/b"], "site must be a name of letters, digits, '.', '_' or '-' (like "
                        "'local' or 'edge-lab'), starting with a letter or digit, at most "
                        "63 characters, not 'a/b'"),
    # the inventory's site of plain Dask workers: workers there were taken for plain
    (["--site", "unknown"], "site 'unknown' is where the mesh shows plain Dask workers "
                            "(which have no site): name yours otherwise, like 'lab'"),
    # a GPU asked for where there is none: it joined as a plain CPU worker after a
    # traceback
    (["--backend", "warp"], "unknown backend 'warp': the registered backends are cupy, "
                            "jax, numpy"),
    (["--backend", "numpy", "--jax"], "--jax and --backend numpy disagree: give one of "
                                      "them"),
    pytest.param(["--backend", "cupy"], "asked for a gpu worker but CuPy sees no CUDA GPU "
                                        "here: ask for a CPU worker instead",
                 marks=pytest.mark.skipif(_has_cuda(), reason="this host has a CUDA GPU")),
])
def test_a_bad_preload_option_starts_no_worker(scheduler_mesh, options, why):
    # Dask logs a preload's error and starts a plain worker anyway: this one stops
    out = subprocess.run(
        [os.path.join(BIN, "dask"), "worker", scheduler_mesh.address, "--nthreads", "1",
         "--no-dashboard", "--preload", "jupyter_mesh.worker", *options],
        capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert (f"jupyter-mesh: {why} (in --preload jupyter_mesh.worker's options): the worker "
            f"does not start") in out.stderr
    assert len(scheduler_mesh.inventory()) == 0
    if "cupy" not in options:  # said as `dask worker` parses its options: no nanny
        # started, so none of its tracebacks
        assert "Traceback" not in out.stderr and out.returncode == 2, out.stderr


def test_a_bad_preload_option_of_a_worker_without_a_nanny_starts_no_worker(scheduler_mesh):
    # dask spec's worker runs in the command's own process, and Dask does not parse its
    # preload's options up front: said as the options were parsed, the error was
    # logged by Dask and the worker started anyway, as a plain Dask worker
    import json

    spec = {"w": {"cls": "distributed.Worker", "opts": {
        "nthreads": 1, "preload": ["jupyter_mesh.worker"],
        "preload_argv": ["--site", "bad site!"]}}}
    out = subprocess.run(
        [os.path.join(BIN, "dask"), "spec", scheduler_mesh.address, "--spec",
         json.dumps(spec)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert ("site must be a name of letters, digits, '.', '_' or '-' (like 'local' or "
            "'edge-lab'), starting with a letter or digit, at most 63 characters, not "
            "'bad site!' (in --preload jupyter_mesh.worker's options): the worker does not "
            "start") in out.stderr
    assert len(scheduler_mesh.inventory()) == 0


def test_version_and_help():
    from jupyter_mesh import __version__

    out = subprocess.run([os.path.join(BIN, "jupyter-mesh"), "--version"],
                         capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, f"jupyter-mesh {__version__}")
    out = subprocess.run([os.path.join(BIN, "jupyter-mesh"), "worker", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "``" not in out.stdout
    assert "1 for a GPU or TPU worker" in " ".join(out.stdout.split())


def test_a_second_ctrl_c_stops_a_closing_worker_at_once(scheduler_mesh, tmp_path):
    # a worker whose close takes long (here a preload's teardown sleeps 60 s): the
    # first Ctrl-C closes it cleanly, a second one stops it at once
    slow = tmp_path / "slow_close.py"
    slow.write_text("import asyncio\n\nasync def dask_teardown(worker):\n"
                    "    await asyncio.sleep(60)\n")
    env = dict(os.environ, DASK_DISTRIBUTED__WORKER__PRELOAD=f'["{slow}"]')
    proc = subprocess.Popen([os.path.join(BIN, "jupyter-mesh"), "worker",
                             scheduler_mesh.address, "--nthreads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        _wait_devices(scheduler_mesh, 1)
        # joined, as it says (the scheduler lists the worker a moment before its nanny's
        # start returns: a Ctrl-C in between stops it "before it joined")
        out = line_queue(proc.stdout)
        while not out.get(timeout=60).startswith("jupyter-mesh worker joined"):
            pass
        proc.send_signal(signal.SIGINT)
        while True:  # it says that it closes, and how to stop at once
            line = proc.stderr.readline()
            assert line, "the worker ended before it said it closes"
            if line.startswith("jupyter-mesh worker: closing"):
                break
        assert line.strip() == "jupyter-mesh worker: closing (Ctrl-C again stops at once)"
        time.sleep(0.5)
        assert proc.poll() is None  # still closing: the teardown sleeps
        err = _ctrl_c(proc, within=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    # (Python's resource tracker may add its warning of semaphores left behind after it)
    assert ("jupyter-mesh worker: stopped at once (a second Ctrl-C); the worker did not "
            "close cleanly") in err.splitlines()
    # the worker process went with it: the scheduler drops the device
    deadline = time.monotonic() + 30
    while len(scheduler_mesh.inventory()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(scheduler_mesh.inventory()) == 0


def test_scaling_a_local_mesh_leaves_a_joined_workers_memory_limit_alone(no_mesh):
    # the local mesh shares the host's memory among its own workers after a scale; it
    # gave a worker that joined from outside the same share, over its --memory-limit
    from .meshes import fresh_local_mesh

    with fresh_local_mesh(cpu=1, threads_per_worker=1) as mesh:
        proc = subprocess.Popen([os.path.join(BIN, "jupyter-mesh"), "worker", mesh.address,
                                 "--nthreads", "1", "--name", "joined", "--site", "cloud",
                                 "--memory-limit", "1 GiB"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_devices(mesh, 2)
            mesh.scale(cpu=2)
            _wait_devices(mesh, 3)

            def limits(dask_worker):
                return dask_worker.name, dask_worker.memory_manager.memory_limit

            got = dict(mesh.client.run(limits).values())
            assert got["joined"] == 2**30
            assert got["cpu-0"] == got["cpu-1"] != 2**30  # the mesh's own share it
            on_scheduler = mesh.client.run_on_scheduler(lambda dask_scheduler: {
                ws.name: ws.memory_limit for ws in dask_scheduler.workers.values()})
            assert on_scheduler == got
            assert {d.name: d.memory for d in mesh.inventory()}["joined"] == 2**30
        finally:
            _stop(proc)


def test_a_ctrl_c_while_dasks_modules_load_is_said_in_one_line(monkeypatch, capsys):
    # it came before main's handler was in place: a KeyboardInterrupt traceback
    from jupyter_mesh import cli
    from jupyter_mesh.devices import _worker_plugin

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(_worker_plugin, "quiet_name_taken", interrupted)
    assert cli.main(["worker", "tcp://127.0.0.1:1"]) == 130
    assert capsys.readouterr().err == "jupyter-mesh worker: stopped before it started\n"
