"""A backend from the ``jupyter_mesh.backends`` entry-point group, end to end: a package
that declares one, a worker that drives its device with it, and the router placing the
ops it runs there (here a test backend whose "device" is the CPU: its arrays are NumPy
arrays of a subclass, so each conversion shows)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import dask.array as da
import numpy as np
import pytest

from jupyter_mesh import MeshError
from jupyter_mesh.router import backends

from .test_cli_worker import BIN, _stop, _wait_devices, scheduler_mesh  # noqa: F401

PACKAGE = '''
import numpy as np

from jupyter_mesh.router.backends import Backend


class Tagged(np.ndarray):
    """An array on the test backend's device: a NumPy array that says so."""


class TaggedBackend(Backend):
    name = "tagged"
    kinds = ("cpu",)
    op_classes = frozenset({"matmul", "elementwise", "reduction"})

    def available(self):
        return True

    def namespace(self):
        return np

    def model(self):
        return "tagged test device (the CPU)"

    def is_device_array(self, x):
        return isinstance(x, Tagged)

    def to_device(self, x):
        if isinstance(x, np.ndarray) and not isinstance(x, Tagged):
            return x.view(Tagged)
        return x

    def to_host(self, x):
        return np.asarray(x) if isinstance(x, Tagged) else x
'''


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The test backend's package, installed on a path this process and the workers
    it starts see (its entry point in its dist-info, as pip would write it)."""
    (tmp_path / "tagged_backend.py").write_text(textwrap.dedent(PACKAGE))
    info = tmp_path / "tagged_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tagged-backend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[jupyter_mesh.backends]\ntagged = tagged_backend:TaggedBackend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]))
    backends._registry.clear()  # found again, with the entry point
    yield tmp_path
    backends._registry.clear()
    sys.modules.pop("tagged_backend", None)


def test_an_entry_point_backend_is_found_and_can_be_targeted(installed):
    from jupyter_mesh.targets import allowed_targets, parse_target

    assert "tagged" in backends.backend_names()
    assert backends.get_backend("tagged").kinds == ("cpu",)
    assert str(parse_target("cpu:tagged")) == "cpu:tagged"
    assert "cpu:tagged" in allowed_targets()
    with pytest.raises(ValueError, match="unknown target 'gpu:tagged'.*cpu:tagged"):
        parse_target("gpu:tagged")  # it drives CPUs only
    # NumPy's and Dask's functions run natively on it; a user's own does not
    from jupyter_mesh.router.classify import native_backends

    assert "tagged" in native_backends("matmul", np.matmul)
    assert "tagged" not in native_backends("matmul", lambda a, b: a @ b)
    assert "tagged" not in native_backends("fft", np.fft.fft)  # not in its op classes


def test_a_worker_drives_its_device_with_an_entry_point_backend(installed, scheduler_mesh):  # noqa: F811
    mesh = scheduler_mesh
    proc = subprocess.Popen(
        [os.path.join(BIN, "jupyter-mesh"), "worker", mesh.address, "--site", "lab",
         "--nthreads", "1", "--backend", "tagged"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ),
    )
    try:
        (dev,) = _wait_devices(mesh, 1)
        assert (dev.kind, dev.backend, dev.model) == ("cpu", "tagged",
                                                      "tagged test device (the CPU)")
        assert dev.profile.method == "measured" and "'tagged'" in dev.profile.source
        x = da.random.random((400, 400), chunks=200)
        y = ((x @ x.T) + 1).sum(axis=0)
        expected = y.compute(scheduler="sync")
        (got,) = mesh.compute(y, route="cpu:tagged")
        # the answer comes back as host (plain NumPy) arrays, right
        assert type(got) is np.ndarray
        np.testing.assert_allclose(got, expected, rtol=1e-10)
        report = mesh.last_report
        assert report.ran_on("matmul") == ["tagged"] and report.ran_on("add") == ["tagged"]
        assert report.ran_on("random_sample") == ["numpy"]  # creation: not its op class
        # "auto": the worker is a CPU, so it measured NumPy too and runs each op with the
        # faster of its backend and NumPy; the plan says which
        plan = mesh.explain(y)
        (pool,) = plan.pools
        assert pool.numpy_profile is not None
        matmul = next(op for op in plan.model.ops if op.label == "matmul")
        assert {r["op"]: r["target"] for r in plan.rows}["matmul"] == (
            "cpu:tagged (numpy)" if plan.cost.runs_numpy(matmul, pool) else "cpu:tagged")
        with pytest.raises(MeshError, match="no live gpu worker"):
            mesh.compute(y, route="gpu")
    finally:
        _stop(proc)


#: bad --backend options (of the CLI and of the preload), and what the error says
BAD_BACKEND_ARGS = [
    (["--backend", "warp"], "unknown backend 'warp'"),
    (["--jax", "--backend", "numpy"], "--jax and --backend numpy disagree"),
]


@pytest.mark.parametrize("args, message", BAD_BACKEND_ARGS)
def test_cli_backend_bad_input(args, message):
    out = subprocess.run([os.path.join(BIN, "jupyter-mesh"), "worker", "tcp://127.0.0.1:1",
                          *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert message in out.stderr
    assert "installed are cupy, jax, numpy" in out.stderr or "--jax" in args


def test_dask_worker_preload_drives_an_entry_point_backend(installed, scheduler_mesh):  # noqa: F811
    proc = subprocess.Popen(
        [os.path.join(BIN, "dask"), "worker", scheduler_mesh.address, "--nthreads", "1",
         "--no-dashboard", "--preload", "jupyter_mesh.worker", "--backend", "tagged"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ),
    )
    try:
        (dev,) = _wait_devices(scheduler_mesh, 1)
        assert (dev.kind, dev.backend) == ("cpu", "tagged")
    finally:
        _stop(proc)


def test_a_bad_site_from_the_environment_is_named_as_such(monkeypatch):
    # it was said to be one of the preload's options, which had none
    import click

    from jupyter_mesh.worker import dask_setup

    monkeypatch.setenv("JUPYTER_MESH_SITE", "bad site")
    with pytest.raises(click.ClickException) as info:
        dask_setup.parse_args(click.Context(dask_setup), [])
    assert info.value.message == (
        "jupyter-mesh: site must be a name of letters, digits, '.', '_' or '-' (like "
        "'local' or 'edge-lab'), starting with a letter or digit, at most 63 characters, "
        "not 'bad site' (from the environment variable JUPYTER_MESH_SITE): the worker does "
        "not start")
    # --site wins over it
    ctx = dask_setup.make_context("dask_setup", ["--site", "lab"])
    assert ctx.params["site"] == "lab"


@pytest.mark.parametrize("args, error", BAD_BACKEND_ARGS)
def test_preload_backend_bad_input(args, error):
    import click

    from jupyter_mesh.worker import dask_setup

    # as `dask worker` parses them up front (a context of no name): click's one line
    with pytest.raises(click.ClickException, match=error) as info:
        dask_setup.parse_args(click.Context(dask_setup), list(args))
    assert info.value.exit_code == 2
    # where the preload starts (a nanny's worker process, dask spec), it says it
    ctx = dask_setup.make_context("dask_setup", list(args))
    with pytest.raises(MeshError, match=error):
        dask_setup.callback(object(), **ctx.params)


def test_a_backend_whose_package_is_broken_says_why(monkeypatch):
    # it was left out without a word: asked for, it was "unknown"
    import importlib.metadata

    broken = importlib.metadata.EntryPoint(
        name="opencl", value="no_such_module_for_jupyter_mesh:OpenCLBackend",
        group=backends.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [broken])
    monkeypatch.setattr(backends, "_registry", {})
    monkeypatch.setattr(backends, "_broken", {})
    with pytest.raises(MeshError) as info:
        backends.get_backend("opencl")
    assert str(info.value) == (
        "backend 'opencl' is installed (entry point of jupyter_mesh.backends) but did not "
        "load (ModuleNotFoundError: No module named 'no_such_module_for_jupyter_mesh'): fix "
        "or reinstall its package; the registered backends are cupy, jax, numpy")
    assert backends.get_backend("numpy").name == "numpy"  # the built-in ones are there


class _Half(backends.Backend):
    name = "half"
    kinds = ("cpu",)


class _NotABackend:
    name = "notsub"


class _Clash(backends.Backend):
    name = "numpy"
    kinds = ("cpu",)

    def available(self):
        return True

    def namespace(self):
        return np

    def is_device_array(self, x):
        return False

    def to_device(self, x):
        return x

    def to_host(self, x):
        return x


@pytest.mark.parametrize("ep_name, cls, why", [
    ("half", _Half, "MeshError: backend 'half' does not define available, namespace, "
                    "is_device_array, to_device"),
    ("notsub", _NotABackend, "is not a jupyter_mesh.router.backends.Backend: subclass it"),
    ("mynumpy", _Clash, "its name 'numpy' is a built-in backend's: name it otherwise"),
])
def test_a_half_written_plugin_is_refused_and_breaks_nothing(monkeypatch, ep_name, cls, why):
    # one such plugin installed anywhere broke every routed plan (AttributeError on its
    # op_classes) and every mesh.submit (NotImplementedError from its is_device_array),
    # or took the built-in NumPy backend's place
    import importlib.metadata

    from jupyter_mesh.router.classify import native_backends

    monkeypatch.setitem(sys.modules, "jm_test_plugins", sys.modules[__name__])
    ep = importlib.metadata.EntryPoint(name=ep_name, value=f"jm_test_plugins:{cls.__name__}",
                                       group=backends.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [ep])
    monkeypatch.setattr(backends, "_registry", {})
    monkeypatch.setattr(backends, "_broken", {})
    assert backends.backend_names() == ["cupy", "jax", "numpy"]
    assert type(backends.get_backend("numpy")).__name__ == "NumpyBackend"
    with pytest.raises(MeshError, match="did not load") as info:
        backends.get_backend(ep_name)
    assert why in str(info.value)
    # a target on it says why it is not there
    from jupyter_mesh.targets import parse_target

    with pytest.raises(ValueError, match=rf"unknown target 'cpu:{ep_name}'.*\(backend "
                                         rf"'{ep_name}' is installed but did not load: "):
        parse_target(f"cpu:{ep_name}")
    # the router and the conversions work as before
    assert "numpy" in native_backends("matmul", np.matmul)
    assert backends.to_host_any(np.ones(2)).tolist() == [1.0, 1.0]


PLUGINS = {
    "unavail": "def available(self):\n    return False\n",
    "modelraise": "def available(self):\n    return True\n\n"
                  "def model(self):\n    raise RuntimeError('no device here')\n",
    "measurebad": "def available(self):\n    return True\n\n"
                  "def measure(self, budget):\n    return {'flops32': 1}\n",
    "brokenimp": "def available(self):\n    return True\n",
}


def _install(tmp_path, monkeypatch, name, methods, module_line=""):
    """A plugin package of one backend class, on a path this process and its children
    see (its entry point in a dist-info, as pip writes it)."""
    source = (f"import numpy as np\n{module_line}\n"
              f"from jupyter_mesh.router.backends import Backend\n\n\n"
              f"class B(Backend):\n    name = {name!r}\n    kinds = ('cpu',)\n\n"
              + textwrap.indent("def namespace(self):\n    return np\n\n"
                                "def is_device_array(self, x):\n    return False\n\n"
                                "def to_device(self, x):\n    return x\n\n"
                                "def to_host(self, x):\n    return x\n\n" + methods,
                                "    "))
    (tmp_path / f"{name}_backend.py").write_text(source)
    info = tmp_path / f"{name}_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-backend\n"
                                   f"Version: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[jupyter_mesh.backends]\n{name} = {name}_backend:B\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]))


@pytest.mark.parametrize("name, says", [
    ("unavail", "backend 'unavail' cannot drive this worker: it is not available in this "
                "process"),
    ("modelraise", "backend 'modelraise' cannot drive this worker: its model() failed "
                   "(RuntimeError: no device here)"),
    ("measurebad", "backend 'measurebad' cannot drive this worker: its measure() gave "
                   "a dict, not a Profile"),
    ("brokenimp", "backend 'brokenimp' is installed (entry point of jupyter_mesh.backends) "
                  "but did not load (ModuleNotFoundError: No module named "
                  "'no_such_module_for_jupyter_mesh'"),
])
def test_cli_a_plugin_that_cannot_drive_the_worker_is_one_line(tmp_path, monkeypatch, name,
                                                                says):
    # a page of Dask's tracebacks (120-150 lines) before the last line said why; a
    # plugin whose package is broken was "unknown"
    _install(tmp_path, monkeypatch, name, PLUGINS[name],
             "import no_such_module_for_jupyter_mesh" if name == "brokenimp" else "")
    monkeypatch.setenv("DASK_MESH__PROFILE__CACHE_DIR", str(tmp_path / "cache"))
    out = subprocess.run([os.path.join(BIN, "jupyter-mesh"), "worker", "tcp://127.0.0.1:1",
                          "--backend", name], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [f"jupyter-mesh: {says}"] or \
        (name == "brokenimp" and out.stderr.startswith(f"jupyter-mesh: {says}")
         and len(out.stderr.strip().splitlines()) == 1), out.stderr
