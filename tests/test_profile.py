from __future__ import annotations

import contextlib
import re
import time

import dask.config
import pytest

from jupyter_mesh.devices import _profile
from jupyter_mesh.devices._profile import Profile, lookup_known


def test_known_accelerator_names_its_source():
    prof = lookup_known("NVIDIA H100 80GB HBM3")
    assert prof is not None
    assert prof.method == "table"
    assert "datasheet" in prof.source
    assert prof.flops32 > 1e13
    assert lookup_known("NVIDIA H200") .source.startswith("NVIDIA H200")
    assert lookup_known("AMD EPYC 7B13") is None


def test_a_known_name_matches_a_whole_word_of_the_model():
    # NVIDIA's L40 and L40S are not its L4 (2.5-3x its figures): measured, not L4's
    assert "L4" in lookup_known("NVIDIA L4").source
    assert lookup_known("NVIDIA L40S") is None and lookup_known("NVIDIA L40") is None
    assert "A100" in lookup_known("NVIDIA A100-SXM4-80GB").source
    assert "V100" in lookup_known("Tesla V100-SXM2-32GB").source


@pytest.mark.parametrize("model, flops32, bandwidth, board", [
    ("NVIDIA H100 80GB HBM3", 67e12, 3.35e12, "SXM"),
    ("NVIDIA H100 PCIe", 51e12, 2.0e12, "PCIe"),
    ("NVIDIA H100 NVL", 60e12, 3.9e12, "NVL"),
    ("NVIDIA H200 NVL", 60e12, 4.8e12, "NVL"),
    ("NVIDIA A100-SXM4-80GB", 19.5e12, 2.0e12, "80GB SXM"),
    ("NVIDIA A100-PCIE-40GB", 19.5e12, 1.555e12, "40GB PCIe"),
    ("NVIDIA A100 80GB PCIe", 19.5e12, 1.935e12, "80GB PCIe"),
    ("Tesla V100-PCIE-32GB", 14e12, 0.9e12, "PCIe"),
    ("Tesla V100-SXM2-32GB", 15.7e12, 0.9e12, "SXM2"),
])
def test_pcie_and_nvl_boards_get_their_own_figures(model, flops32, bandwidth, board):
    # (names as CUDA gives them) PCIe and NVL boards are slower than the SXM parts
    prof = lookup_known(model)
    assert (prof.flops32, prof.mem_bandwidth) == (flops32, bandwidth)
    assert prof.source.endswith(f"({board})") or f"({board}," in prof.source


def test_tpus_are_known_by_the_names_jax_gives_them():
    # jax.devices()[0].device_kind on each Cloud TPU generation
    assert "v5e" in lookup_known("TPU v5 lite").source
    assert "v5p" in lookup_known("TPU v5").source
    assert "v6e" in lookup_known("TPU v6 lite").source
    assert "v4 " in lookup_known("TPU v4").source
    assert lookup_known("TPU v4 lite") is None  # v4i, another chip: measured, not v4's table


def test_measurement_is_bounded_and_says_so():
    prof = _profile.measure_numpy(0.3)
    assert prof.method == "measured"
    assert "measured with NumPy" in prof.source
    assert prof.flops32 > 0 and prof.flops64 > 0 and prof.mem_bandwidth > 0


def test_measured_profiles_are_cached_per_host_and_device(tmp_path):
    calls = []

    def measure(budget):
        calls.append(budget)
        return Profile(1e9, 5e8, 1e10, source="fake measurement")

    with dask.config.set({"mesh.profile.cache-dir": str(tmp_path),
                          "mesh.profile.measure-seconds": 0.5}):
        key = _profile.cache_key("cpu", "numpy", "Test CPU")
        first = _profile.cached_or_measure(key, measure)
        second = _profile.cached_or_measure(key, measure)
        other = _profile.cached_or_measure(_profile.cache_key("cpu", "jax", "Test CPU"), measure)
    assert calls == [0.5, 0.5]  # measured once per (host, kind, backend, model)
    assert first == second
    assert other.source == "fake measurement"
    assert (tmp_path / "profiles.json").exists()
    # JAX on the CPU computes on as many cores as its process may use: one pinned to
    # fewer cores is measured on its own
    with dask.config.set({"mesh.profile.cache-dir": str(tmp_path)}):
        one = _profile.cache_key("cpu", "jax", "Test CPU", 1)
        two = _profile.cache_key("cpu", "jax", "Test CPU", 2)
        assert len({one, two, _profile.cache_key("cpu", "jax", "Test CPU")}) == 3
        _profile.cached_or_measure(one, measure)
        _profile.cached_or_measure(two, measure)
        _profile.cached_or_measure(one, measure)
    assert len(calls) == 4


def test_profiles_cached_by_an_older_measurement_are_measured_again(tmp_path):
    # a profile timed before matmuls of MATMUL_SIDE (an older version's cache, keyed
    # without the version) is not what the cost model now expects
    import json
    import socket

    old_key = f"{socket.gethostname()}|cpu|numpy|Test CPU"
    (tmp_path / "profiles.json").write_text(
        json.dumps({old_key: Profile(1.0, 1.0, 1.0, source="384").to_dict()}))
    with dask.config.set({"mesh.profile.cache-dir": str(tmp_path)}):
        prof = _profile.cached_or_measure(_profile.cache_key("cpu", "numpy", "Test CPU"),
                                          lambda budget: Profile(2e9, 1e9, 1e10,
                                                                 source="new"))
    assert prof.source == "new"


def _fresh(budget):
    return Profile(2e9, 1e9, 1e10, source="measured now")


@pytest.mark.parametrize("cache, entry", [
    ([1, 2], None),  # not an object: every worker failed to start (TypeError)
    ({}, {"flops32": 1e9}),  # fields missing
    ({}, {**Profile(0.0, 0.0, 1e10).to_dict()}),  # no FLOP/s: every plan divided by 0
    ({}, {**Profile(1e9, 1e9, 1e10).to_dict(), "flops64": "fast"}),
    ({}, {**Profile(1e9, 1e9, 1e10).to_dict(), "mem_bandwidth": -1.0}),
    ({}, {**Profile(1e9, 1e9, 1e10).to_dict(), "launch_latency": float("nan")}),
])
def test_an_entry_of_the_cache_that_is_no_profile_is_measured_again(tmp_path, cache, entry):
    import json

    key = _profile.cache_key("cpu", "numpy", "Test CPU")
    if entry is not None:
        cache = {key: entry}
    (tmp_path / "profiles.json").write_text(json.dumps(cache))
    with dask.config.set({"mesh.profile.cache-dir": str(tmp_path)}):
        ctx = (pytest.warns(RuntimeWarning, match=r"is not a profile .*measuring it again")
               if entry is not None else contextlib.nullcontext())
        with ctx:
            assert _profile.cached_or_measure(key, _fresh).source == "measured now"
        # and replaced: the next worker reads the new one
        assert _profile.cached_or_measure(key, _no_measure).source == "measured now"


def test_what_makes_no_profile_is_named_and_float64_may_be_absent():
    # a TPU has no float64 units (the table gives it 0): still a profile
    assert _profile.profile_problem(Profile(1e14, 0.0, 1e12, 16e9)) is None
    assert _profile.profile_problem(Profile(1e9, 1e9, -1.0)) == "mem_bandwidth=-1.0"
    assert _profile.profile_problem(Profile(0.0, 1e9, 1e10)) == "flops32=0.0"
    assert _profile.profile_problem([1]) == "a list, not a profile"


def test_a_cache_that_cannot_be_written_measures_and_says_so(tmp_path):
    # caching saves the next worker a measurement: its failure must not stop this one
    # (every worker of a shared cache folder whose file another user owns failed)
    (tmp_path / "profiles.json.tmp").mkdir()  # where the new cache is written first
    key = _profile.cache_key("cpu", "numpy", "Test CPU")
    with dask.config.set({"mesh.profile.cache-dir": str(tmp_path)}), \
            pytest.warns(RuntimeWarning, match=r"cannot write the profile cache .*not kept"):
        assert _profile.cached_or_measure(key, _fresh).source == "measured now"


def test_a_lock_held_elsewhere_neither_blocks_a_cached_profile_nor_hangs(tmp_path,
                                                                         monkeypatch):
    # a process that held the cache's lock for good stopped every worker from starting,
    # even with its profile cached
    import fcntl
    import json

    key = _profile.cache_key("cpu", "numpy", "Test CPU")
    (tmp_path / "profiles.json").write_text(
        json.dumps({key: Profile(3e9, 1e9, 1e10, source="cached").to_dict()}))
    monkeypatch.setattr(_profile, "LOCK_WAIT", 0.3)
    with open(tmp_path / "profiles.json.lock", "a+") as other, \
            dask.config.set({"mesh.profile.cache-dir": str(tmp_path),
                             "mesh.profile.measure-seconds": 0.01}):
        fcntl.flock(other, fcntl.LOCK_EX)  # (held by "another process" all along)
        started = time.monotonic()
        assert _profile.cached_or_measure(key, _no_measure).source == "cached"
        new = _profile.cache_key("cpu", "jax", "Test CPU")
        with pytest.warns(RuntimeWarning, match=r"has held the profile cache's lock .* "
                                                r"measuring without the cache"):
            assert _profile.cached_or_measure(new, _fresh).source == "measured now"
        assert time.monotonic() - started < 5
    assert new not in json.loads((tmp_path / "profiles.json").read_text())


def test_cpu_profiles_time_matmuls_of_chunk_sized_blocks(monkeypatch):
    # the side is what the measurement times: a smaller side gives a slower rate for
    # NumPy here, and the number a plan uses must come from blocks of real size
    import numpy as np

    sides = []
    real_ones = np.ones

    def ones(shape, dtype=None):
        if isinstance(shape, tuple) and len(shape) == 2:
            sides.append(shape[0])
        return real_ones(shape, dtype=dtype)

    monkeypatch.setattr(np, "ones", ones)
    _profile.measure_numpy(0.05)
    assert sides and set(sides) == {_profile.MATMUL_SIDE} and _profile.MATMUL_SIDE >= 1000


def test_profile_round_trips_through_dict():
    prof = Profile(1.0, 2.0, 3.0, 4.0, 5e-6, method="table", source="x")
    assert Profile.from_dict(prof.to_dict()) == prof


def _no_measure(budget):
    raise AssertionError("nothing is measured with a bad cache-dir")


def test_a_cache_dir_that_is_a_file_is_one_line(tmp_path):
    from jupyter_mesh.errors import MeshConfigError

    afile = tmp_path / "afile"
    afile.write_text("kept")
    with dask.config.set({"mesh.profile.cache-dir": str(afile)}):
        for call in (_profile.check_config,
                     lambda: _profile.cached_or_measure("k", _no_measure)):
            with pytest.raises(MeshConfigError, match=(
                    rf"^config mesh\.profile\.cache-dir must be a folder, but {afile} is a "
                    rf"file: name a folder, or null for ~/\.cache/jupyter-mesh$")):
                call()
    assert afile.read_text() == "kept"  # nothing that was there is lost


@pytest.mark.parametrize("bad", [123, True, ["a"], b"/tmp"])
def test_a_cache_dir_that_is_no_path_is_one_line(bad):
    from jupyter_mesh.errors import MeshConfigError

    with dask.config.set({"mesh.profile.cache-dir": bad}):
        with pytest.raises(MeshConfigError, match=(
                rf"^config mesh\.profile\.cache-dir must be a folder path, or null for "
                rf"~/\.cache/jupyter-mesh, not {re.escape(repr(bad))}$")):
            _profile.check_config()


def test_a_cache_dir_that_cannot_be_made_is_one_line(tmp_path):
    from jupyter_mesh.errors import MeshConfigError

    (tmp_path / "afile").write_text("")
    inside = tmp_path / "afile" / "profiles"  # under a file: no folder can be made
    with dask.config.set({"mesh.profile.cache-dir": str(inside)}):
        with pytest.raises(MeshConfigError, match=(
                rf"^config mesh\.profile\.cache-dir: cannot make {inside} \(.*\): name a "
                rf"folder you can write, or null for ~/\.cache/jupyter-mesh$")):
            _profile.check_config()


def test_a_cache_dir_under_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with dask.config.set({"mesh.profile.cache-dir": "~/profiles"}):
        _profile.check_config()
    assert (tmp_path / "profiles").is_dir()


@pytest.mark.parametrize("bad", [-1, "soon", None, True])
def test_bad_measure_seconds_is_one_line(tmp_path, bad):
    from jupyter_mesh.errors import MeshConfigError

    with dask.config.set({"mesh.profile.cache-dir": str(tmp_path),
                          "mesh.profile.measure-seconds": bad}):
        with pytest.raises(MeshConfigError, match=(
                rf"^config mesh\.profile\.measure-seconds must be a .*number of seconds, "
                rf"not {bad!r}$")):
            _profile.check_config()
