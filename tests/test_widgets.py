"""``mesh.widget()``: the panel's controls change the mesh; bad values stay in the panel."""

from __future__ import annotations

import time

import dask
import dask.array as da
import numpy as np
import pytest

import jupyter_mesh as jm
from jupyter_mesh import MeshError, _state
from jupyter_mesh.widgets import MeshPanel

from .meshes import fresh_local_mesh, widget_tree


@pytest.fixture(scope="module")
def mesh():
    with fresh_local_mesh(cpu=1, jax_cpu=0, threads_per_worker=1) as m:
        yield m


@pytest.fixture
def panel(mesh):
    p = mesh.widget(refresh=0.2)
    yield p
    p.close()
    from jupyter_mesh.router import api

    api.set_route(mesh, "off")


def _wait_for(pred, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_panel_shows_devices_by_kind_and_site(panel, mesh):
    assert isinstance(panel, MeshPanel)
    assert "cpu @ local: 1" in panel.devices.value
    assert "cpu-0" in panel.devices.value
    assert mesh.address in panel.header.value
    assert set(panel.route.options) >= {"auto", "off", "cpu:numpy"}
    assert panel.refreshing


def test_scale_controls_scale_the_mesh_and_the_list_follows(panel, mesh):
    panel.counts["jax_cpu"].value = 1
    assert panel.scale_button is not None
    panel.scale_button.click()
    assert "scaled to" in panel.message.value
    assert "color:var(--jp-success-color0, #2e7d32)" in panel.message.value
    assert mesh.inventory().by_target() == {"cpu:numpy": 1, "cpu:jax": 1}
    assert _wait_for(lambda: "jax-cpu-0" in panel.devices.value)
    assert "cpu:jax" in panel.route.options


def test_route_selector_routes_plain_dask_calls(panel, mesh):
    if not mesh.inventory().select("cpu:jax"):
        mesh.scale(jax_cpu=1)
    panel.route.value = "cpu:jax"
    panel.route_button.click()
    assert mesh.route_mode == "cpu:jax"
    assert "routing plain Dask calls: cpu:jax" in panel.message.value
    before = mesh.last_report
    x = da.ones((400, 400), chunks=200)
    assert float((x @ x.T).sum().compute()) == 400.0**3
    assert mesh.last_report is not before
    assert "jax" in mesh.last_report.ran_on("matmul")
    panel.route.value = "off"
    panel.route_button.click()
    assert mesh.route_mode == "off"


@pytest.mark.parametrize("value, says", [
    ("warp-drive", "refused"),
    ("gpu", "no live gpu"),
    ("", "type a route"),
])
def test_bad_route_is_refused_in_the_panel(panel, mesh, value, says):
    panel.route.value = value
    panel.route_button.click()  # no exception reaches the caller (the kernel)
    assert says in panel.message.value
    # in JupyterLab's own error colour, readable in its dark theme too (#b00020 read
    # at 2.6:1 on its background)
    assert "color:var(--jp-error-color1, #b00020)" in panel.message.value
    # and, where JupyterLab's sanitizer drops var() colours (an untrusted notebook's
    # HTML), the fixed one before it stays: red still
    assert "color:#b00020;color:var(--jp-error-color1" in panel.message.value
    assert mesh.route_mode == "off"
    assert panel.route.value in ("off", value) if not value else panel.route.value == "off"


@pytest.mark.parametrize("counts, says", [
    ({"cpu": -1}, "cpu must be a whole number"),
    ({"cpu": 0, "jax_cpu": 0}, "at least one device"),
])
def test_bad_scale_is_refused_in_the_panel(panel, mesh, counts, says):
    before = mesh.inventory().by_target()
    for fam, n in counts.items():
        panel.counts[fam].value = n
    assert panel.scale_button is not None
    panel.scale_button.click()
    assert says in panel.message.value
    assert mesh.inventory().by_target() == before
    # the boxes show the mesh's real counts again
    assert panel.counts["cpu"].value == mesh.options["cpu"]


def test_refresh_stops_when_the_panel_closes(mesh):
    p = mesh.widget(refresh=0.1)
    assert p.refreshing
    p.close()
    assert _wait_for(lambda: not p.refreshing, timeout=5)


def test_a_closed_panel_closes_all_its_widgets_and_lets_go_of_its_mesh(mesh):
    # it closed its box alone: 29 models and comms stayed open a panel, and its
    # buttons' callbacks kept the panel (and through it the mesh) alive
    import gc
    import weakref

    p = mesh.widget(refresh=0)
    widgets = list(widget_tree(p))
    assert len(widgets) > 20 and all(w.comm is not None for w in widgets)
    p.close()
    assert [w for w in widgets if w.comm is not None] == []
    gone = weakref.ref(p)
    del p, widgets
    gc.collect()
    assert gone() is None


def test_one_panel_per_mesh_refreshes(mesh):
    # a cell run again made a new panel each time, and the old ones went on reading the
    # mesh (out of sight) until it closed
    first = mesh.widget(refresh=0.1)
    second = mesh.widget(refresh=0.1)
    try:
        assert _wait_for(lambda: not first.refreshing, timeout=5) and second.refreshing
        assert "no longer refreshes: a newer panel of this mesh does" in first.message.value
        first.refresh()  # by hand, it still shows the mesh
        assert "cpu-0" in first.devices.value
    finally:
        first.close()
        second.close()


def test_refresh_off(mesh):
    p = mesh.widget(refresh=0)
    try:
        assert not p.refreshing
        assert "cpu-0" in p.devices.value
    finally:
        p.close()


@pytest.mark.parametrize("refresh", [-1, "often", True, float("nan"), float("inf"), 0.001,
                                     86401, 1e10])
def test_bad_refresh_is_an_error(mesh, refresh):
    # (a wait of 1e10 s overflowed the refresh thread's clock and killed it)
    with pytest.raises(MeshError, match="refresh must be 0 .off. or a number of seconds "
                                        "from 0.1 to 86400"):
        mesh.widget(refresh=refresh)


@pytest.mark.parametrize("refresh", [np.int64(2), np.float32(1.0), 86400])
def test_refresh_takes_numpy_numbers(mesh, refresh):
    p = mesh.widget(refresh=refresh)
    try:
        assert p.refreshing and p.interval == float(refresh)
    finally:
        p.close()


def test_count_boxes_follow_a_scale_made_elsewhere(mesh):
    # the Scale button sends every box: a box still showing the count from before
    # %mesh scale or mesh.scale would undo it
    p = mesh.widget(refresh=0)
    try:
        mesh.scale(cpu=2)
        p.refresh()
        assert p.counts["cpu"].value == 2
        # a box the user has changed keeps the user's number
        p.counts["jax_cpu"].value = 1
        mesh.scale(cpu=1)
        p.refresh()
        assert p.counts["cpu"].value == 1 and p.counts["jax_cpu"].value == 1
    finally:
        p.close()
        if mesh.options.get("cpu") != 1:
            mesh.scale(cpu=1)


def test_count_boxes_show_a_worker_that_died_and_is_not_restarted_as_gone(mesh,
                                                                          monkeypatch):
    p = mesh.widget(refresh=0)
    try:
        assert p.counts["cpu"].value == 1
        # its nanny stopped: nothing restarts it (what a scale counts)
        monkeypatch.setattr(mesh, "_dead_workers", lambda: ["cpu-0"])
        p.refresh()
        assert p.counts["cpu"].value == 0
        monkeypatch.undo()
        p.refresh()
        assert p.counts["cpu"].value == 1
    finally:
        p.close()


def test_the_route_box_follows_a_route_set_elsewhere(mesh):
    # "Set route" sends the box: a box still showing the route from before %mesh route
    # would undo it
    from jupyter_mesh.router import api

    p = mesh.widget(refresh=0)
    try:
        assert p.route.value == "off"
        api.set_route(mesh, "cpu")
        p.refresh()
        assert p.route.value == "cpu"
        # what the user is typing stays
        p.route.value = "auto"
        api.set_route(mesh, "off")
        p.refresh()
        assert p.route.value == "auto"
    finally:
        p.close()
        api.set_route(mesh, "off")


def test_an_inventory_error_clears_once_the_inventory_reads_again(mesh, monkeypatch):
    p = mesh.widget(refresh=0)
    try:
        def gone():
            raise MeshError("the scheduler at x is not reachable")

        monkeypatch.setattr(mesh, "inventory", gone)
        p.refresh()
        assert "could not read the inventory: the scheduler at x" in p.message.value
        # the header no longer counts devices it cannot see; the last ones stay
        assert "not reachable now" in p.header.value and "cpu)" not in p.header.value
        assert "cpu-0" in p.devices.value
        monkeypatch.undo()
        p.refresh()
        assert p.message.value == "" and "cpu-0" in p.devices.value
        # (1 device, or 2 after an earlier test scaled the mesh)
        assert "not reachable" not in p.header.value and "cpu)" in p.header.value
    finally:
        p.close()


def test_a_bad_setting_is_not_said_to_be_an_unreachable_scheduler(mesh):
    p = mesh.widget(refresh=0)
    try:
        with dask.config.set({"mesh.connect-timeout": "soon"}):
            p.refresh()
        assert "config mesh.connect-timeout must be" in p.message.value
        assert "a setting is wrong" in p.header.value, p.header.value
        assert "not reachable" not in p.header.value
    finally:
        p.close()


def test_status_widget_magic_shows_the_panel_wherever_it_is(ip, mesh, monkeypatch):
    from jupyter_mesh import magics, progress

    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    shown = []
    monkeypatch.setattr(magics, "display", shown.append)
    # not the cell's last line: shown all the same (only a returned value of the last
    # line is; the panel was made unseen, and took over from the one in view)
    ip.run_cell("%mesh status --widget\nafter = 1")
    assert ip.user_ns["after"] == 1
    (p,) = shown
    try:
        assert isinstance(p, MeshPanel)
        # saved without widget state (nbconvert): the devices, not the widget's repr
        text = p._repr_mimebundle_()["text/plain"]
        assert text.startswith("Mesh inventory at") and "live panel" in text
        assert "MeshPanel(" not in text
    finally:
        p.close()


def test_status_widget_in_a_terminal_prints_the_devices(ip, mesh, capsys):
    # no widgets outside a notebook: the text inventory, and where the panel shows
    assert ip.run_line_magic("mesh", "status --widget") is None
    out = capsys.readouterr().out
    assert "Mesh inventory at" in out and "live panel in a notebook" in out


def test_refresh_stops_when_the_mesh_closes():
    active = _state.active()
    m = jm.Mesh.local(cpu=1, gpu=0, tpu=0, replace=active is not None)
    older = m.widget(refresh=0.1)
    p = m.widget(refresh=0.1)  # supersedes the first
    assert p.refreshing
    p.set_route("warp")  # an error in the message line, about the mesh that runs
    assert "refused" in p.message.value
    m.close()
    assert _wait_for(lambda: not p.refreshing, timeout=5)
    assert p._on_mesh_event not in _state.listeners  # the closed mesh is not kept alive
    # every panel says so at once, the superseded one too (it kept the devices, live
    # buttons and dashboard link of the mesh that was gone), and no old error stays
    for panel in (p, older):
        assert "(closed)" in panel.header.value and panel.devices.value == ""
        assert panel.route_button.disabled and panel.scale_button.disabled
        assert panel.message.value == ""
    older.close()
    p.close()
    with pytest.raises(MeshError, match="closed"):
        m.widget()

