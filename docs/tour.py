"""Make the README's tour pictures from the example notebooks.

Runs ``examples/routing.ipynb`` and ``examples/resilience.ipynb`` in a kernel, takes
the HTML that their plan and report cells displayed (table plus Bokeh picture, BokehJS
inline) and photographs it in headless Chromium with the network blocked, so what is
saved is what a notebook shows offline::

    .venv/bin/python docs/tour.py          # writes docs/images/*.png
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"
CHROMIUM = "/usr/bin/chromium"

#: (notebook, the start of the cell whose HTML output to photograph, css class, image)
SHOTS = [
    ("routing.ipynb", "plan = mesh.explain", "jupyter-mesh-plan", "routing-plan.png"),
    ("routing.ipynb", "(auto,) = mesh.compute", "jupyter-mesh-report", "routing-report.png"),
    ("resilience.ipynb", "report = mesh.last_report", "jupyter-mesh-report",
     "resilience-fallback.png"),
]


def run(name: str) -> nbformat.NotebookNode:
    # each photographed output stands alone: BokehJS in every picture, not only in the
    # first one a kernel shows (mesh.viz.bokehjs), which the kernel inherits from here
    os.environ["DASK_MESH__VIZ__BOKEHJS"] = "every"
    nb = nbformat.read(ROOT / "examples" / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    return nb


def html_of(nb: nbformat.NotebookNode, starts: str) -> str:
    cell = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith(starts))
    return next(o.data["text/html"] for o in cell.outputs
                if "data" in o and "text/html" in o.data)


def photograph(html: str, css_class: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    page_html = ("<html><body style='font: 12px sans-serif; margin: 8px; width: 960px'>"
                 f"{html}</body></html>")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900},
                                    device_scale_factor=1)
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(
                ("data:", "about:", "blob:")) else r.abort())
            page.set_content(page_html)
            page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0")
            page.wait_for_timeout(500)  # let the canvases paint
            page.locator(f".{css_class}").first.screenshot(path=str(out))
        finally:
            browser.close()


def main() -> int:
    IMAGES.mkdir(parents=True, exist_ok=True)
    done: dict[str, nbformat.NotebookNode] = {}
    for name, starts, css_class, image in SHOTS:
        if name not in done:
            done[name] = run(name)
        out = IMAGES / image
        photograph(html_of(done[name], starts), css_class, out)
        print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
