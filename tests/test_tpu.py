"""TPU hosts: chips counted without holding them, one chip per worker.

There is no TPU here. The chip listing runs in a child process; these tests give that
child a *simulated* JAX (a small fake ``jax`` package on its path, labelled as one)
that reports TPU devices the way JAX does on a TPU host, and check what the mesh makes
of them. What libtpu does with the environment each worker gets is not tested here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import jupyter_mesh as jm
from jupyter_mesh.devices import _tpu
from jupyter_mesh.errors import MeshError
from jupyter_mesh.mesh import _worker_spec

FAKE_JAX = '''
"""SIMULATION: a stand-in for JAX on a TPU host (tests/test_tpu.py); not JAX."""
import os

class Device:
    def __init__(self, i, coords, core):
        self.id, self.coords, self.core_on_chip = i, coords, core
        self.device_kind = os.environ["FAKE_TPU_KIND"]
        self.platform = "tpu"

    def memory_stats(self):
        return {"bytes_limit": 8 << 30}

def devices(platform=None):
    assert os.environ.get("JAX_PLATFORMS") == "tpu", "the probe must ask for TPUs only"
    if os.environ.get("FAKE_TPU_BUSY"):
        raise RuntimeError("TPU initialization failed: The TPU is already in use by "
                           "process with pid 4242.\\nNot attempting to load libtpu.so")
    if os.environ.get("FAKE_TPU_NONE"):
        raise RuntimeError("Unable to initialize backend 'tpu': INTERNAL: Failed to "
                           "open libtpu: no TPU chips found")
    chips, cores = int(os.environ["FAKE_TPU_CHIPS"]), int(os.environ["FAKE_TPU_CORES"])
    return [Device(c * cores + k, [c % 2, c // 2, 0], k)
            for c in range(chips) for k in range(cores)]
'''


class _Untouchable:
    """Stands for JAX in this process: the kernel must never ask it for devices."""

    def __getattr__(self, name):
        raise AssertionError(f"the kernel process used jax.{name}: it would hold the TPU")


@pytest.fixture
def fake_tpu_host(tmp_path, monkeypatch):
    """A simulated TPU host: libtpu 'installed', JAX in child processes simulated."""
    (tmp_path / "jax").mkdir()
    (tmp_path / "jax" / "__init__.py").write_text(textwrap.dedent(FAKE_JAX))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(tmp_path), os.path.dirname(os.path.dirname(jm.__file__))]))
    monkeypatch.setattr(_tpu, "tpu_possible", lambda: True)
    monkeypatch.setitem(sys.modules, "jax", _Untouchable())
    monkeypatch.delenv("TPU_VISIBLE_CHIPS", raising=False)
    monkeypatch.delenv("TPU_VISIBLE_DEVICES", raising=False)
    _tpu._probed.cache_clear()

    def host(chips: int, cores: int = 1, kind: str = "TPU v5 lite", busy: bool = False,
             none: bool = False):
        monkeypatch.setenv("FAKE_TPU_CHIPS", str(chips))
        monkeypatch.setenv("FAKE_TPU_CORES", str(cores))
        monkeypatch.setenv("FAKE_TPU_KIND", kind)
        if busy:
            monkeypatch.setenv("FAKE_TPU_BUSY", "1")
        if none:
            monkeypatch.setenv("FAKE_TPU_NONE", "1")
        _tpu._probed.cache_clear()

    yield host
    _tpu._probed.cache_clear()


def test_chips_are_counted_in_a_child_process_not_in_the_kernel(fake_tpu_host):
    fake_tpu_host(4, kind="TPU v5 lite")
    found, why = _tpu.chips()
    assert why is None
    assert [c.index for c in found] == [0, 1, 2, 3]
    assert {(c.kind, c.backend, c.model) for c in found} == {("tpu", "jax", "TPU v5 lite")}
    assert found[0].memory == 8 << 30


def test_a_two_core_chip_is_one_worker_not_two(fake_tpu_host):
    # TPU v2/v3: JAX lists each chip's two cores as two devices (8 on a v3-8)
    fake_tpu_host(4, cores=2, kind="TPU v3")
    found, _ = _tpu.chips()
    assert len(found) == 4
    assert all(c.extra["cores"] == 2 and c.memory == 16 << 30 for c in found)


def test_a_busy_tpu_is_named_as_the_reason(fake_tpu_host):
    fake_tpu_host(4, busy=True)
    found, why = _tpu.chips()
    assert found == []
    assert "already in use by process with pid 4242" in why and "\n" not in why
    with pytest.raises(MeshError, match=r"no TPU found for tpu=1 \(this host has 0 TPU "
                                        r"chips \(JAX could not open the TPUs: .*in use"):
        jm.Mesh.local(cpu=1, gpu=0, tpu=1, set_current=False)
    # tpu="auto" starts no TPU worker, and says why rather than finding none silently
    with pytest.warns(UserWarning, match="no TPU workers: JAX could not open the TPUs"):
        with pytest.raises(MeshError, match="at least one device"):
            jm.Mesh.local(cpu=0, gpu=0, tpu="auto", set_current=False)


def test_libtpu_without_a_tpu_finds_none_quietly(fake_tpu_host, recwarn):
    # jax[tpu] installed on a machine with no TPU: no TPU workers, no warning
    fake_tpu_host(0, none=True)
    assert _tpu.chips() == ([], None)
    with pytest.raises(MeshError, match="at least one device"):
        jm.Mesh.local(cpu=0, gpu=0, tpu="auto", set_current=False)
    assert not [w for w in recwarn if "TPU" in str(w.message)]


def test_more_tpu_workers_than_chips_is_refused_before_anything_starts(fake_tpu_host):
    fake_tpu_host(2)
    with pytest.raises(MeshError, match=r"tpu=3 \(this host has 2 TPU chips\): use tpu=0"):
        jm.Mesh.local(cpu=1, gpu=0, tpu=3, set_current=False)


def test_each_tpu_worker_gets_one_chip_and_a_port_of_its_own(monkeypatch):
    monkeypatch.delenv("TPU_VISIBLE_CHIPS", raising=False)
    monkeypatch.delenv("TPU_VISIBLE_DEVICES", raising=False)
    envs = [_worker_spec("tpu", i, "local", 1, "127.0.0.1", "auto")["options"]["env"]
            for i in range(4)]
    assert [e["TPU_VISIBLE_CHIPS"] for e in envs] == ["0", "1", "2", "3"]
    for e in envs:
        assert e["JAX_PLATFORMS"] == "tpu"
        assert e["TPU_CHIPS_PER_PROCESS_BOUNDS"] == e["TPU_PROCESS_BOUNDS"] == "1,1,1"
        assert e["TPU_MESH_CONTROLLER_ADDRESS"] == f"localhost:{e['TPU_PROCESS_PORT']}"
    assert len({e["TPU_PROCESS_PORT"] for e in envs}) == 4
    # CPU workers are left alone
    cpu = _worker_spec("cpu", 0, "local", 1, "127.0.0.1", "auto")["options"]["env"]
    assert not any(k.startswith("TPU_") for k in cpu)


@pytest.mark.parametrize("visible, index, want", [
    ("2,3", 0, "2"), ("2,3", 1, "3"), (None, 1, "1"), ("", 0, "0"), ("5", 1, "1"),
])
def test_a_tpu_worker_gets_a_chip_this_process_was_given(visible, index, want):
    assert _tpu.visible_chip(index, visible) == want


def test_chips_of_groups_cores_by_their_coordinates():
    class Dev:
        def __init__(self, coords, kind="TPU v4"):
            self.coords, self.device_kind = coords, kind

        def memory_stats(self):
            return {"bytes_limit": 1}

    chips = _tpu.chips_of([Dev([0, 0, 0]), Dev([0, 0, 0]), Dev([1, 0, 0])])
    assert [(c["cores"], c["memory"]) for c in chips] == [(2, 2), (1, 1)]


def test_cli_tpu_worker_needs_a_chip_that_exists():
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "jupyter-mesh"), "worker",
         "tcp://127.0.0.1:1", "--tpu", "3"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "no TPU chip 3 here (this host has 0): leave out --tpu" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
