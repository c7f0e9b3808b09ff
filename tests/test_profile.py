from __future__ import annotations

import dask.config

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


def test_profile_round_trips_through_dict():
    prof = Profile(1.0, 2.0, 3.0, 4.0, 5e-6, method="table", source="x")
    assert Profile.from_dict(prof.to_dict()) == prof
