"""Run a notebook headless and print what it showed of the mesh.

    python -m jupyter_mesh.demo examples/quickstart.ipynb
"""

from __future__ import annotations

import sys
import time


def run(path: str, timeout: int = 600) -> int:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    t0 = time.monotonic()
    NotebookClient(nb, timeout=timeout, kernel_name="python3").execute()
    print(f"ran {path} in {time.monotonic() - t0:.1f} s")
    shown = set()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            text = out.get("text") or out.get("data", {}).get("text/plain", "")
            if "Mesh inventory" in text and text not in shown:
                shown.add(text)
                print(text.rstrip())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m jupyter_mesh.demo NOTEBOOK.ipynb", file=sys.stderr)
        return 2
    return run(args[0])


if __name__ == "__main__":
    sys.exit(main())
