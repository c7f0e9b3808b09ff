"""Run a notebook headless and print what it showed of the mesh.

    python -m jupyter_mesh.demo examples/quickstart.ipynb
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import time

#: the Jupyter kernel the notebook runs in
KERNEL = "python3"


def run(path: str, timeout: int = 600) -> int:
    import nbformat
    from jupyter_client.kernelspec import NoSuchKernel
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import run_sync
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except FileNotFoundError:
        return _fail(f"no notebook at {path}: give the path of an .ipynb file, e.g. "
                     f"examples/quickstart.ipynb")
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return _fail(f"{path} is not a notebook ({first}): give an .ipynb file")
    t0 = time.monotonic()
    # nbclient sets Ctrl-C's handler before it starts the kernel and, where the start
    # fails, never puts it back: Ctrl-C then did nothing in the process that called this
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with tempfile.TemporaryDirectory(prefix="jupyter-mesh-demo-") as ipc:
            # the kernel talks over local sockets (over TCP, ipykernel warns that the
            # code and outputs travel in plain text)
            km = AsyncKernelManager(kernel_name=KERNEL, transport="ipc",
                                    ip=os.path.join(ipc, "kernel"))
            try:
                NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, km=km).execute()
            finally:  # (a kernel manager given to nbclient is the giver's to end)
                if km.has_kernel:  # (a dead kernel's error is the one to say)
                    with contextlib.suppress(Exception):
                        run_sync(km.shutdown_kernel)(now=True)
    except CellExecutionError as exc:
        if exc.ename == "KeyboardInterrupt":
            # Ctrl-C in the terminal reaches the kernel too (one process group): the
            # user stopped it, no cell of theirs failed
            print(f"jupyter_mesh.demo: stopped (Ctrl-C) while running {path}",
                  file=sys.stderr)
            return 130
        what = f"{exc.ename}: {exc.evalue}".splitlines()[0]
        return _fail(f"a cell of {path} failed: {what}")
    except CellTimeoutError:
        return _fail(f"a cell of {path} ran longer than {timeout} s and was stopped: "
                     f"run the notebook in Jupyter to see which one, or make it faster")
    except DeadKernelError as exc:
        first = (str(exc).strip().splitlines() or ["no reason given"])[0]
        return _fail(f"the kernel died while running {path} ({first}): it may have run "
                     f"out of memory; run the notebook in Jupyter to see where")
    except NoSuchKernel:
        return _fail(f"no {KERNEL} kernel is installed for Jupyter: install one with "
                     f"python -m ipykernel install --user")
    finally:
        if sigint is not None and signal.getsignal(signal.SIGINT) is not sigint:
            with contextlib.suppress(ValueError):  # (not the main thread: nothing set)
                signal.signal(signal.SIGINT, sigint)
    print(f"ran {path} in {time.monotonic() - t0:.1f} s")
    # the mesh as the notebook last showed it (a notebook may show it more than once;
    # a widget's stand-in text is no inventory)
    last = None
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW in data:
                continue
            text = out.get("text") or data.get("text/plain", "")
            if "Mesh inventory" in text:
                last = text
    if last is not None:
        # the demo's kernel has ended, and a mesh it started with it: its dashboard
        # link would answer nothing
        print("the mesh the notebook ran on, as it showed it (a mesh the notebook "
              "started ended with its kernel):")
        print("\n".join(line for line in last.rstrip().splitlines()
                        if not line.startswith("dashboard:")))
    return 0


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _fail(message: str) -> int:
    print(f"jupyter_mesh.demo: {message}", file=sys.stderr)
    return 1


USAGE = "usage: python -m jupyter_mesh.demo NOTEBOOK.ipynb"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if len(args) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    return run(args[0])


if __name__ == "__main__":
    sys.exit(main())
