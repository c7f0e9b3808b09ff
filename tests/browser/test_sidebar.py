"""The Mesh sidebar in a real browser: Playwright drives Debian's Chromium against a
``jupyter lab`` this test starts on 127.0.0.1.

Screenshots go to ``test-artifacts/browser/`` at the repository root.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BUILT = REPO / "jupyter_mesh" / "labextension"
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("JUPYTER_MESH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
NOTEBOOK = {
    "cells": [
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "mesh-start",
            "metadata": {},
            "outputs": [],
            "source": "%load_ext jupyter_mesh\n%mesh start --cpu 1",
        },
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "mesh-compute",
            "metadata": {},
            "outputs": [],
            "source": "import dask.array as da\nimport jupyter_mesh as jm\n\n"
            "x = da.random.random((400, 400), chunks=200)\n"
            "jm.current().compute((x @ x.T).sum(), route='auto')",
        },
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "mesh-explain",
            "metadata": {},
            "outputs": [],
            "source": "from IPython.display import display\n\n"
            "display(jm.current().explain((x @ x.T).sum()))\n"
            "display(jm.current().explain((x + 1).sum()))",
        },
    ],
    "metadata": {
        "kernelspec": {
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
            "name": "python3",
        },
        "language_info": {"name": "python"},
    },
    "nbformat": 4,
    "nbformat_minor": 5,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, token: str, path: str, method: str = "GET", body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"{base}/{path}",
        data=data,
        method=method,
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        text = resp.read()
    return json.loads(text) if text else None


@pytest.fixture
def lab(tmp_path):
    """A ``jupyter lab`` with the Mesh extensions, isolated in tmp dirs; yields its URL."""
    if not (BUILT / "package.json").exists():
        pytest.fail(
            f"the lab extension is not built ({BUILT}): run `pip install -e .` or "
            f"`cd labextension && jlpm install && jlpm build:prod`"
        )
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
    # the freshly built extension, whatever is installed in the environment
    extra = tmp_path / "labextensions"
    extra.mkdir()
    (extra / "jupyter-mesh").symlink_to(BUILT, target_is_directory=True)
    root = tmp_path / "root"
    root.mkdir()
    (root / "kernel-mesh.ipynb").write_text(json.dumps(NOTEBOOK))
    env = dict(os.environ)
    for name, sub in (
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("JUPYTER_CONFIG_DIR", "config"),
        ("IPYTHONDIR", "ipython"),
    ):
        (tmp_path / sub).mkdir()
        env[name] = str(tmp_path / sub)
    notification = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True)
    (notification / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    port, token = free_port(), secrets.token_hex(16)
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        '--ServerApp.jpserver_extensions={"jupyter_mesh": True}',
        f"--LabApp.extra_labextensions_path={extra}",
        f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
        f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
        "--LabApp.news_url=",
        "--ServerApp.shutdown_no_activity_timeout=0",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp_path / "jupyter-lab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                api(base, token, "jupyter-mesh/api/health")
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    log.flush()
                    pytest.fail(
                        "jupyter lab did not start:\n"
                        + (tmp_path / "jupyter-lab.log").read_text()[-3000:]
                    )
                time.sleep(0.5)
        yield {"base": base, "token": token, "proc": proc}
    finally:
        for kernel in _quiet(lambda: api(base, token, "api/kernels")) or []:
            _quiet(lambda k=kernel: api(base, token, f"api/kernels/{k['id']}", "DELETE"))
        for mesh in (_quiet(lambda: api(base, token, "jupyter-mesh/api/meshes")) or {}).get(
            "meshes", []
        ):
            if mesh["can_stop"]:
                _quiet(
                    lambda m=mesh: api(base, token,
                                       f"jupyter-mesh/api/meshes/{m['id']}?force=true",
                                       "DELETE")
                )
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "jupyter-lab.log", ARTIFACTS / "jupyter-lab.log")


def _quiet(fn):
    try:
        return fn()
    except Exception:
        return None


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def widen(page, sidebar, width: int) -> None:
    """Drag the side bar's edge so that the panel is ``width`` pixels wide."""
    box = sidebar.bounding_box()
    handle = page.locator("#jp-main-split-panel > .lm-SplitPanel-handle").first
    hbox = handle.bounding_box()
    if box is None or hbox is None:
        return
    x, y = hbox["x"] + hbox["width"] / 2, hbox["y"] + hbox["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + (width - box["width"]), y, steps=5)
    page.mouse.up()


def run_cell(page, cell, count: int) -> None:
    """Run one notebook cell and wait for its execution count."""
    prompt = cell.locator(".jp-InputArea-prompt")
    deadline = time.time() + 60
    # a key press can arrive before the kernel's session is wired up: press again
    while prompt.inner_text().strip() in ("[ ]:", "[\xa0]:", ""):
        assert time.time() < deadline, "the notebook never ran its cell"
        cell.locator(".cm-content").click()
        page.keyboard.press("Shift+Enter")
        page.wait_for_timeout(3000)
    expect_prompt = f"[{count}]:"
    from playwright.sync_api import expect

    expect(prompt).to_have_text(expect_prompt, timeout=120_000)


#: the WCAG contrast ratio of an element's text on its background (an rgba background
#: laid over the first opaque one behind it)
CONTRAST_JS = """e => {
  const rgba = c => (c.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const layers = [];
  for (let n = e; n; n = n.parentElement) {
    const c = rgba(getComputedStyle(n).backgroundColor);
    const a = c.length > 3 ? c[3] : 1;
    if (a > 0) { layers.push([c[0], c[1], c[2], a]); if (a >= 1) break; }
  }
  let bg = [255, 255, 255];
  for (const [r, g, b, a] of layers.reverse()) {
    bg = [r * a + bg[0] * (1 - a), g * a + bg[1] * (1 - a), b * a + bg[2] * (1 - a)];
  }
  const fg = rgba(getComputedStyle(e).color);
  const [hi, lo] = [lum(fg), lum(bg)].sort((x, y) => y - x);
  return (hi + 0.05) / (lo + 0.05);
}"""


#: how opaque an element is drawn: its opacity and its ancestors' together
OPACITY_JS = """e => {
  let o = 1;
  for (let n = e; n; n = n.parentElement) o *= Number(getComputedStyle(n).opacity);
  return o;
}"""


def test_sidebar_starts_a_mesh_and_finds_a_kernel_mesh(lab):
    from playwright.sync_api import expect, sync_playwright

    base, token = lab["base"], lab["token"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            console_errors: list[str] = []
            page.on("console", lambda m: m.type == "error" and console_errors.append(m.text))
            page.goto(f"{base}/lab?token={token}")

            # the Mesh tab is in the left side bar; open it: the empty state says what to do
            tab = page.locator('.jp-SideBar.jp-mod-left [data-id="jupyter-mesh-sidebar"]')
            expect(tab).to_be_visible(timeout=60_000)
            tab.click()
            sidebar = page.locator("#jupyter-mesh-sidebar")
            expect(sidebar).to_be_visible()
            expect(sidebar.locator(".jp-Mesh-title")).to_have_text("Mesh")
            widen(page, sidebar, 420)
            expect(sidebar.locator(".jp-Mesh-empty")).to_contain_text("No mesh yet", timeout=20_000)
            shot(page, "01-empty")

            # start a local mesh with 1 CPU worker from the sidebar
            sidebar.locator(".jp-Mesh-start summary").click()
            form = sidebar.locator(".jp-Mesh-start form")
            form.locator('input[name="cpu"]').fill("1")
            form.locator('input[name="gpu"]').fill("0")
            form.locator('input[name="tpu"]').fill("0")
            form.locator(".jp-Mesh-startButton").click()
            started = sidebar.locator('.jp-Mesh-meshItem[data-origin="sidebar"]')
            expect(started).to_have_count(1, timeout=120_000)
            devices = sidebar.locator('.jp-Mesh-device[data-kind="cpu"]')
            expect(devices).to_have_count(1, timeout=30_000)
            expect(sidebar.locator('.jp-Mesh-group[data-kind="cpu"]')).to_contain_text("@ local")
            expect(sidebar.locator(".jp-Mesh-utilization")).to_contain_text("Tasks")
            (local,) = api(base, token, "jupyter-mesh/api/meshes")["meshes"]
            assert local["origin"] == "sidebar" and local["counts"] == {"cpu": 1}
            shot(page, "02-local-mesh")

            # a notebook starts its own mesh: it appears in the sidebar by itself
            page.goto(f"{base}/lab/tree/kernel-mesh.ipynb?token={token}")
            sidebar = page.locator("#jupyter-mesh-sidebar")
            expect(sidebar).to_be_visible(timeout=60_000)  # restored across the reload
            cell = page.locator(".jp-Notebook .jp-Cell.jp-CodeCell").first
            expect(cell).to_be_visible(timeout=60_000)
            # run the cell once the kernel is connected and idle
            expect(page.locator(".jp-StatusBar-TextItem", has_text="| Idle")).to_have_count(
                1, timeout=90_000
            )
            run_cell(page, cell, 1)
            expect(cell.locator(".jp-OutputArea-output")).not_to_have_count(0)
            kernel_item = sidebar.locator('.jp-Mesh-meshItem[data-origin="kernel"]')
            expect(kernel_item).to_have_count(1, timeout=60_000)
            expect(kernel_item).to_contain_text("kernel-mesh.ipynb")
            expect(kernel_item).to_contain_text("1 cpu", timeout=30_000)
            kernel_item.click()
            expect(sidebar.locator(".jp-Mesh-detailName")).to_have_text("kernel-mesh.ipynb")
            expect(sidebar.locator('.jp-Mesh-device[data-kind="cpu"]')).to_have_count(
                1, timeout=30_000
            )
            kernel_mesh = [
                m
                for m in api(base, token, "jupyter-mesh/api/meshes")["meshes"]
                if m["origin"] == "kernel"
            ]
            assert len(kernel_mesh) == 1 and kernel_mesh[0]["address"] != local["address"]
            shot(page, "03-kernel-mesh")

            # the router's plan and report of a computation in the notebook show up
            run_cell(page, page.locator(".jp-Notebook .jp-Cell.jp-CodeCell").nth(1), 2)
            plans = sidebar.locator(".jp-Mesh-plans")
            expect(plans.locator(".jp-Mesh-plan.jp-mod-plan")).not_to_have_count(0, timeout=30_000)
            expect(plans.locator(".jp-Mesh-plan.jp-mod-report")).not_to_have_count(0)
            report = plans.locator(".jp-Mesh-plan.jp-mod-report").first
            report.locator("summary").click()
            expect(report.locator(".jp-Mesh-planTable thead")).to_contain_text("target")
            # it stays open, and a focused button keeps its focus, as the sidebar polls
            # (each poll re-rendered them: the plan closed, focus fell to the page)
            polled: list[str] = []
            page.on("request", lambda r: "/jupyter-mesh/api/meshes" in r.url
                    and polled.append(r.url))
            sidebar.locator(".jp-Mesh-dashboardButton").focus()
            # scrolled down to read the plan (a short window, so the panel scrolls): it
            # stays there too (focus put back on the button scrolled the panel up to it)
            page.set_viewport_size({"width": 1400, "height": 480})
            page.wait_for_timeout(500)
            scrolled = sidebar.evaluate("e => { e.scrollTop = e.scrollHeight; "
                                        "return e.scrollTop; }")
            page.wait_for_timeout(6000)
            assert polled, "no poll re-rendered the sidebar meanwhile"
            expect(report).to_have_attribute("open", "")
            assert page.evaluate(
                "() => document.activeElement.classList.contains('jp-Mesh-dashboardButton')")
            assert scrolled > 0 and sidebar.evaluate("e => e.scrollTop") == scrolled
            page.set_viewport_size({"width": 1400, "height": 900})
            expect(report.locator(".jp-Mesh-planTable tbody tr")).not_to_have_count(0)
            # under it, the plan's notes: Dask's costs, measured on the kernel's mesh
            expect(report.locator(".jp-Mesh-planNotes")).to_contain_text(
                "measured on this mesh")
            sidebar.locator(".jp-Mesh-devices").scroll_into_view_if_needed()
            shot(page, "04-plans")  # docs/images/sidebar.png

            # two plan pictures in one notebook: BokehJS came inline with the first only
            # (jupyter_mesh.viz), and JupyterLab renders both
            explain = page.locator(".jp-Notebook .jp-Cell.jp-CodeCell").nth(2)
            run_cell(page, explain, 3)
            pictures = explain.locator(".jupyter-mesh-picture")
            expect(pictures).to_have_count(2, timeout=30_000)
            page.wait_for_function(
                "() => window.Bokeh && Object.keys(Bokeh.index).length >= 2", timeout=30_000)
            sizes = pictures.evaluate_all("els => els.map(e => e.innerHTML.length)")
            assert sizes[0] > 500_000 > 20 * sizes[1], sizes
            rendered = pictures.evaluate_all(
                "els => els.map(e => Object.values(Bokeh.index).some("
                "v => e.contains(v.el) || (v.el.getRootNode && e.contains(v.el.getRootNode().host))))")
            assert rendered == [True, True], rendered

            # the sidebar's mesh, into the notebook: the connection snippet
            sidebar.locator('.jp-Mesh-meshItem[data-origin="sidebar"]').click()
            sidebar.locator(".jp-Mesh-snippetButton").click()
            cells = page.locator(".jp-Notebook .jp-Cell.jp-CodeCell")
            expect(cells.filter(has_text="%mesh connect")).to_have_count(1, timeout=10_000)
            expect(cells.filter(has_text="%mesh connect")).to_contain_text(
                local["address"].split("://")[1]
            )

            # polling pauses while the panel is hidden, and resumes when it is shown
            polls: list[str] = []
            page.on(
                "request", lambda r: "/jupyter-mesh/api/meshes" in r.url and polls.append(r.url)
            )
            tab.click()  # collapse the side bar
            expect(sidebar).to_be_hidden()
            page.wait_for_timeout(1000)
            polls.clear()
            page.wait_for_timeout(5000)
            assert polls == [], "the sidebar polls while hidden"
            tab.click()
            expect(sidebar).to_be_visible()
            page.wait_for_timeout(3000)
            assert polls, "the sidebar did not refresh when shown again"

            # the dark theme: the sidebar follows JupyterLab's theme variables
            light = sidebar.evaluate("e => getComputedStyle(e).backgroundColor")
            api(
                base,
                token,
                "lab/api/settings/@jupyterlab/apputils-extension:themes",
                "PUT",
                {"raw": '{"theme": "JupyterLab Dark"}'},
            )
            page.reload()
            sidebar = page.locator("#jupyter-mesh-sidebar")
            expect(sidebar).to_be_visible(timeout=60_000)
            expect(page.locator("body[data-jp-theme-light='false']")).to_have_count(
                1, timeout=30_000
            )
            expect(sidebar.locator(".jp-Mesh-meshItem")).to_have_count(2, timeout=30_000)
            # the selected mesh is restored across the reload
            expect(sidebar.locator(".jp-Mesh-meshItem.jp-mod-selected")).to_have_attribute(
                "data-origin", "sidebar", timeout=30_000
            )
            # the list is one Tab stop, the selected mesh; the arrow keys move in it
            items = sidebar.locator(".jp-Mesh-meshItem")
            assert items.evaluate_all("els => els.map(e => e.tabIndex)") == [0, -1]
            items.first.focus()
            page.keyboard.press("ArrowDown")
            kernel_item = sidebar.locator('.jp-Mesh-meshItem[data-origin="kernel"]')
            expect(kernel_item).to_have_class(re.compile("jp-mod-selected"))
            expect(kernel_item).to_be_focused()
            assert items.evaluate_all("els => els.map(e => e.tabIndex)") == [-1, 0]
            expect(sidebar.locator(".jp-Mesh-device")).to_have_count(1, timeout=30_000)
            dark = sidebar.evaluate("e => getComputedStyle(e).backgroundColor")
            assert dark != light
            # a refused scale is said next to the Scale form (the banner at the top may
            # be scrolled out of view), and readable in the dark theme (near-white text
            # on a light pink background, before)
            sidebar.locator('.jp-Mesh-meshItem[data-origin="sidebar"]').click()
            scale = sidebar.locator(".jp-Mesh-scaleForm")
            scale.locator('input[name="scale-cpu"]').fill("500")
            scale.locator('button[type="submit"]').click()
            refusal = scale.locator(".jp-Mesh-error")
            expect(refusal).to_be_visible(timeout=30_000)
            expect(refusal).to_contain_text("four per core")
            # the field named as the form labels it, not by the API's key ("cpu")
            expect(refusal).to_contain_text(re.compile(r"^CPU workers must be"))
            assert refusal.evaluate(CONTRAST_JS) >= 4.5, refusal.evaluate(CONTRAST_JS)
            expect(sidebar.locator(".jp-Mesh-errors .jp-Mesh-error")).to_have_count(0)
            # and the panel never scrolls sideways
            assert sidebar.evaluate("e => e.scrollWidth <= e.clientWidth + 1")
            shot(page, "05-dark")

            # the server stops answering: the list is shown as last seen (dimmed, not
            # live), and an action says the server cannot be reached ("Failed to
            # fetch", before), and what to do
            page.route("**/jupyter-mesh/api/**", lambda route: route.abort())
            sidebar.locator(".jp-Mesh-refresh").click()
            expect(sidebar.locator(".jp-Mesh-errors")).to_contain_text(
                "The Jupyter server did not answer", timeout=30_000)
            expect(sidebar.locator(".jp-Mesh-list.jp-mod-stale")).to_have_count(1)
            scale.locator('input[name="scale-cpu"]').fill("2")
            scale.locator('button[type="submit"]').click()
            expect(scale.locator(".jp-Mesh-error")).to_contain_text(
                "Could not reach the Jupyter server", timeout=30_000)
            expect(scale.locator(".jp-Mesh-error")).to_contain_text("is it still running?")
            # the list is dimmed, not what says what is wrong
            unreachable = scale.locator(".jp-Mesh-error")
            assert unreachable.evaluate(OPACITY_JS) == 1
            assert unreachable.evaluate(CONTRAST_JS) >= 4.5
            assert sidebar.locator(".jp-Mesh-meshItem").first.evaluate(OPACITY_JS) < 1
            page.unroute("**/jupyter-mesh/api/**")
            sidebar.locator(".jp-Mesh-refresh").click()
            expect(sidebar.locator(".jp-mod-stale")).to_have_count(0, timeout=30_000)
            expect(sidebar.locator(".jp-Mesh-errors .jp-Mesh-error")).to_have_count(0)
            # and the form's word about a server that did not answer goes with it
            expect(scale.locator(".jp-Mesh-error")).to_be_hidden()
            # a restarted server (another run, without the old run's meshes): the mesh
            # shown went with the old run, said so ("stopped elsewhere", before)
            shown = sidebar.locator(".jp-Mesh-meshItem.jp-mod-selected .jp-Mesh-meshName")
            name = shown.inner_text()
            listing = re.compile(r".*/jupyter-mesh/api/meshes(\?.*)?$")  # (not one mesh)
            page.route(listing, lambda route: route.fulfill(
                status=200, content_type="application/json",
                body='{"meshes": [], "server": "another-run"}'))
            sidebar.locator(".jp-Mesh-refresh").click()
            expect(sidebar.locator(".jp-Mesh-errors")).to_contain_text(
                f"{name} is gone (the Jupyter server restarted, and the meshes it started "
                f"stopped with it)", timeout=30_000)
            page.unroute(listing)
            sidebar.locator(".jp-Mesh-refresh").click()
            expect(sidebar.locator(".jp-Mesh-meshItem.jp-mod-selected")).to_have_count(
                1, timeout=30_000)
            expect(sidebar.locator(".jp-Mesh-errors .jp-Mesh-error")).to_have_count(0)
            api(
                base,
                token,
                "lab/api/settings/@jupyterlab/apputils-extension:themes",
                "PUT",
                {"raw": '{"theme": "JupyterLab Light"}'},
            )

            # the kernel goes away: so does its mesh
            kernel_item = sidebar.locator('.jp-Mesh-meshItem[data-origin="kernel"]')
            for kernel in api(base, token, "api/kernels"):
                api(base, token, f"api/kernels/{kernel['id']}", "DELETE")
            expect(kernel_item).to_have_count(0, timeout=60_000)

            # by keyboard: Scale keeps the focus where it was (it fell to the top of
            # the page), and so does Stop, in the sidebar; a mesh stopped here is not
            # said to have been stopped elsewhere (a poll during the stop said so)
            sidebar.locator('.jp-Mesh-meshItem[data-origin="sidebar"]').click()
            field = sidebar.locator('.jp-Mesh-scaleForm input[name="scale-cpu"]')
            field.fill("2")
            field.press("Enter")
            expect(sidebar.locator('.jp-Mesh-device[data-kind="cpu"]')).to_have_count(
                2, timeout=60_000)
            expect(sidebar.locator('.jp-Mesh-scaleForm input[name="scale-cpu"]')).to_be_focused(
                timeout=10_000)
            # (with another mesh left in the list, and then with none)
            other = api(base, token, "jupyter-mesh/api/meshes", "POST",
                        {"cpu": 1, "gpu": 0, "tpu": 0})
            expect(sidebar.locator(".jp-Mesh-meshItem")).to_have_count(2, timeout=60_000)
            for left in (1, 0):
                sidebar.locator('.jp-Mesh-meshItem[data-origin="sidebar"]').first.click()
                stop = sidebar.locator(".jp-Mesh-stopButton")
                expect(stop).to_be_enabled(timeout=30_000)
                stop.focus()
                page.keyboard.press("Enter")
                expect(sidebar.locator(".jp-Mesh-meshItem")).to_have_count(
                    left, timeout=60_000)
                page.wait_for_timeout(3000)  # (a poll or two after it)
                focused = page.evaluate("() => document.activeElement.outerHTML.slice(0, 120)")
                assert page.evaluate("() => document.getElementById('jupyter-mesh-sidebar')"
                                     ".contains(document.activeElement)"), focused
                if left:
                    assert "jp-Mesh-meshItem" in focused, focused
                expect(sidebar.locator(".jp-Mesh-errors")).not_to_contain_text("is gone")
            assert other["id"]
            assert not [e for e in console_errors if "jupyter-mesh" in e], console_errors
        except BaseException:
            _quiet(lambda: shot(page, "failure"))
            raise
        finally:
            browser.close()
