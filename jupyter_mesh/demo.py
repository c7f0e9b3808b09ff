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
from typing import Any

#: the Jupyter kernel the notebook runs in
KERNEL = "python3"


def run(path: str, timeout: int = 600) -> int:
    import nbformat
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import run_sync
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

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
    # Ctrl-C: the kernel runs in a session of its own (jupyter_client starts it so) and
    # does not get it; nbclient's own handler shuts it down, which looked like a kernel
    # that died. Here it interrupts the cell, and the run stops after it (see _Stop)
    stop = _Stop()
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
                NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, km=km,
                               on_notebook_start=stop.listen(km),
                               on_cell_executed=stop.check).execute()
            finally:  # (a kernel manager given to nbclient is the giver's to end)
                if km.has_kernel:  # (a dead kernel's error is the one to say)
                    with contextlib.suppress(Exception):
                        run_sync(km.shutdown_kernel)(now=True)
    except Exception as exc:
        if stop.pressed or (isinstance(exc, CellExecutionError)
                            and exc.ename == "KeyboardInterrupt"):
            # the user stopped it (a cell that raised KeyboardInterrupt, too): no cell
            # of theirs failed, and the kernel did not die of itself
            print(f"jupyter_mesh.demo: stopped (Ctrl-C) while running {path}",
                  file=sys.stderr)
            return 130
        return _said(exc, path, timeout)
    finally:
        if sigint is not None and signal.getsignal(signal.SIGINT) is not sigint:
            with contextlib.suppress(ValueError):  # (not the main thread: nothing set)
                signal.signal(signal.SIGINT, sigint)
    if stop.pressed:  # (the last cell caught the interrupt and ended)
        print(f"jupyter_mesh.demo: stopped (Ctrl-C) while running {path}", file=sys.stderr)
        return 130
    print(f"ran {path} in {time.monotonic() - t0:.1f} s")
    _show_inventory(nb)
    return 0


class _Stop:
    """Ctrl-C while the notebook runs: the first interrupts the kernel's cell, and no
    cell runs after it; a second shuts the kernel down."""

    def __init__(self) -> None:
        self.pressed = 0

    def listen(self, km: Any) -> Any:
        def started(notebook: Any = None, **_: Any) -> None:
            # (after nbclient's own handler, which this one replaces)
            import asyncio

            loop = asyncio.get_running_loop()

            def pressed() -> None:
                self.pressed += 1
                if self.pressed == 1:
                    asyncio.ensure_future(km.interrupt_kernel())
                else:
                    asyncio.ensure_future(km.shutdown_kernel(now=True))

            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGINT, pressed)

        return started

    def check(self, **_: Any) -> None:
        if self.pressed:
            raise _Stopped


class _Stopped(Exception):
    """The run stopped after a cell, on Ctrl-C."""


def _said(exc: Exception, path: str, timeout: int) -> int:
    from jupyter_client.kernelspec import NoSuchKernel
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    if isinstance(exc, CellExecutionError):
        what = f"{exc.ename}: {exc.evalue}".splitlines()[0]
        return _fail(f"a cell of {path} failed: {what}")
    if isinstance(exc, CellTimeoutError):
        return _fail(f"a cell of {path} ran longer than {timeout} s and was stopped: "
                     f"run the notebook in Jupyter to see which one, or make it faster")
    if isinstance(exc, DeadKernelError):
        first = (str(exc).strip().splitlines() or ["no reason given"])[0]
        return _fail(f"the kernel died while running {path} ({first}): it may have run "
                     f"out of memory; run the notebook in Jupyter to see where")
    if isinstance(exc, NoSuchKernel):
        return _fail(f"no {KERNEL} kernel is installed for Jupyter: install one with "
                     f"python -m ipykernel install --user")
    raise exc


def _show_inventory(nb: Any) -> None:
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
