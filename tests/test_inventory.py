from __future__ import annotations

import pytest

from jupyter_mesh import Inventory, MeshError
from jupyter_mesh.devices._profile import lookup_known


def _records():
    h100 = lookup_known("H100").to_dict()
    return [
        {"worker": "tcp://a:1", "name": "cpu-0", "kind": "cpu", "backend": "numpy",
         "model": "EPYC", "memory": 8 << 30, "site": "us-east", "profile": None},
        {"worker": "tcp://a:2", "name": "gpu-0", "kind": "gpu", "backend": "cupy",
         "model": "NVIDIA H100", "memory": 80 << 30, "site": "us-east", "profile": h100,
         "compute_capability": "9.0"},
        {"worker": "tcp://b:1", "name": "gpu-1", "kind": "gpu", "backend": "cupy",
         "model": "NVIDIA H100", "memory": 80 << 30, "site": "edge-lab", "profile": h100},
    ]


def test_counts_and_groups():
    inv = Inventory.from_records(_records(), "tcp://s:8786")
    assert len(inv) == 3
    assert inv.by_kind() == {"cpu": 1, "gpu": 2}
    assert inv.by_site() == {"us-east": 2, "edge-lab": 1}
    assert inv.by_target() == {"cpu:numpy": 1, "gpu:cupy": 2}
    groups = inv.groups()
    assert [d.name for d in groups[("gpu", "edge-lab")]] == ["gpu-1"]
    assert {d.kind for d in inv} == {"cpu", "gpu"}
    gpu = inv.select("gpu", site="us-east")
    assert [d.worker for d in gpu] == ["tcp://a:2"]
    assert gpu[0].extra["compute_capability"] == "9.0"
    assert gpu[0].profile.method == "table"


def test_text_and_html_reprs_group_by_kind_and_site():
    inv = Inventory.from_records(_records(), "tcp://s:8786", "http://127.0.0.1:8787/status")
    text = repr(inv)
    assert "gpu @ edge-lab: 1" in text and "cpu @ us-east: 1" in text
    assert "NVIDIA H100" in text and "table" in text
    html = inv._repr_html_()
    assert "gpu @ edge-lab" in html and "http://127.0.0.1:8787/status" in html
    assert "<table>" in html


def test_the_text_counts_in_words_and_keeps_its_columns_with_long_names():
    recs = _records()
    recs[0]["name"] = "tcp://127.0.0.1:40123"  # Dask names a worker by its address
    text = repr(Inventory.from_records(recs, "tcp://s:8786"))
    rows = [ln for ln in text.splitlines() if ln.startswith("  ")]
    assert len({ln.index(" mem ") for ln in rows}) == 1, text
    one = repr(Inventory.from_records(recs[:1], "tcp://s:8786"))
    assert ": 1 device (" in one and ": 3 devices (" in text
    # the model column is as wide as the longest model, not padded to 40 (a line was
    # 150 characters, 32 of them spaces)
    assert "  tcp://127.0.0.1:40123 numpy  EPYC mem " in one, one


def test_a_device_whose_memory_is_not_known_shows_a_dash_not_zero():
    recs = _records()
    recs[2]["memory"] = 0  # a chip whose driver does not say (JAX without memory stats)
    inv = Inventory.from_records(recs, "tcp://s:8786")
    lines = repr(inv).splitlines()
    assert [ln for ln in lines if ln.strip().startswith("gpu-1")][0].split("mem ")[1] \
        .startswith("-/-  ")
    assert [ln for ln in lines if ln.strip().startswith("gpu-0")][0].split("mem ")[1] \
        .startswith("-/80.0 GiB  ")
    assert "<td style='white-space:nowrap'>- / -</td>" in inv._repr_html_()


def test_a_jax_cpu_worker_shows_the_numpy_figures_it_measured_too():
    from jupyter_mesh.devices._profile import Profile

    jax = Profile(flops32=5e10, flops64=2e10, mem_bandwidth=2e9, launch_latency=2e-5,
                  method="measured", source="test")
    numpy = Profile(flops32=7e10, flops64=3.3e10, mem_bandwidth=1.2e10,
                    launch_latency=2e-6, method="measured", source="test")
    rec = {"worker": "tcp://a:3", "name": "jax-cpu-0", "kind": "cpu", "backend": "jax",
           "model": "EPYC", "memory": 8 << 30, "site": "local", "profile": jax.to_dict(),
           "numpy_profile": numpy.to_dict()}
    inv = Inventory.from_records([rec], "tcp://s:8786")
    for text in (repr(inv), inv._repr_html_()):
        assert "50 GFLOP/s fp32, 20 GFLOP/s fp64" in text  # JAX's
        assert "NumPy 70 GFLOP/s fp32, 33 fp64" in text
    # a NumPy profile that is not one is left out, not an error
    rec["numpy_profile"] = {"flops32": "fast"}
    assert "NumPy" not in repr(Inventory.from_records([rec], "tcp://s:8786"))


def test_empty_inventory():
    inv = Inventory([], "tcp://s:1")
    assert inv.by_kind() == {}
    assert "no devices" in repr(inv)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target": 3}, r"a target is a string such as 'gpu', 'cpu' or 'cpu:jax', not int 3"),
        ({"target": ["gpu"]}, r"a target is a string such as 'gpu'"),
        ({"target": "fpga"}, r"unknown target 'fpga': use one of cpu, gpu, tpu, cpu:numpy"),
        ({"target": "gpu:torch"}, r"unknown target 'gpu:torch': use one of"),
        ({"site": 3}, r"site must be a site name such as 'local', not int 3"),
    ],
)
def test_select_bad_input_is_one_line(kwargs, match):
    inv = Inventory.from_records(_records(), "tcp://s:8786")
    with pytest.raises(MeshError, match=match) as info:
        inv.select(**kwargs)
    assert "\n" not in str(info.value)
    assert len(inv) == 3  # nothing was lost


def test_select_takes_a_target_object():
    from jupyter_mesh.targets import Target

    inv = Inventory.from_records(_records(), "tcp://s:8786")
    assert len(inv.select(Target("gpu"))) == 2
    assert len(inv.select(None, site="edge-lab")) == 1
