"""Dask preload that makes any Dask worker a mesh worker.

    dask worker tcp://scheduler:8786 --preload jupyter_mesh.worker --site edge-lab [--jax]
        [--backend NAME]

The site may also come from the ``JUPYTER_MESH_SITE`` environment variable.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from .devices._worker_plugin import MeshWorkerPlugin


def _checked(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Say a bad option as ``dask worker`` parses it, before any nanny starts: Dask's
    command parses a preload's options up front, with a context of no name, and a bad
    one found later, in the worker's process, ended in the nanny's tracebacks. Where a
    preload starts (``Preload.start`` names its context ``dask_setup``: a nanny's worker
    process, ``dask spec``, a worker in a kernel) :func:`dask_setup` says it, and stops
    a worker of its own process."""
    from .errors import MeshError

    if ctx.info_name is None:
        try:
            _check_options(**{**ctx.params, param.name or "": value})
        except MeshError as exc:
            raise _BadOption(_said(exc)) from None
    return value


class _BadOption(click.ClickException):
    """Click shows it as ``Error: ...`` alone (its usage line would be of a nameless
    command: Dask parses these options with a bare context); a usage error's status."""

    exit_code = 2


def _said(exc: Exception) -> str:
    why = str(exc).removeprefix("jupyter_mesh: ")
    where = "" if why.endswith("JUPYTER_MESH_SITE)") else \
        " (in --preload jupyter_mesh.worker's options)"
    return f"jupyter-mesh: {why}{where}: the worker does not start"


def _check_options(site: str | None = None, use_jax: bool = False,
                   backend: str | None = None) -> tuple[str, str | None]:
    """The worker's site and backend name; a MeshError for a bad one."""
    from .errors import MeshError
    from .mesh import check_site
    from .router.backends import get_backend

    if not site and os.environ.get("JUPYTER_MESH_SITE"):
        try:
            site = check_site(os.environ["JUPYTER_MESH_SITE"])
        except MeshError as exc:
            raise MeshError(f"{str(exc).removeprefix('jupyter_mesh: ')} (from the "
                            f"environment variable JUPYTER_MESH_SITE)") from None
    site = check_site(site or "default")
    if backend is not None:
        if use_jax and backend != "jax":
            raise MeshError(f"--jax and --backend {backend} disagree: give one of them")
        backend = get_backend(backend).name  # MeshError naming the installed ones
    return site, backend


@click.command()
@click.option("--site", default=None, help="site label of this worker", callback=_checked)
@click.option("--jax", "use_jax", is_flag=True, help="drive the device with JAX",
              callback=_checked)
@click.option("--backend", default=None, callback=_checked,
              help="drive the device with this backend (numpy, cupy, jax, or one from the "
                   "jupyter_mesh.backends entry-point group)")
def dask_setup(worker: Any, site: str | None, use_jax: bool, backend: str | None) -> None:
    """Detect this worker's device before it registers with the scheduler."""
    from .errors import MeshError

    try:
        site, backend = _check_options(site, use_jax, backend)
        plugin = MeshWorkerPlugin(site=site, backend=backend or ("jax" if use_jax else None))
        plugin.setup(worker)
    except MeshError as exc:
        if not _own_process(worker):
            raise  # (a worker in someone's process, a kernel's: Dask logs it)
        # Dask logs a preload's error and starts the worker anyway, as a plain Dask
        # worker that no site or target reaches: this one does not start at all
        print(_said(exc), file=sys.stderr, flush=True)
        os._exit(2)


def _own_process(worker: Any) -> bool:
    """Whether ``worker`` runs in a process of its own: started by a nanny, or by
    Dask's ``dask worker`` command itself (``--no-nanny``)."""
    if getattr(worker, "nanny", None):
        return True
    return os.path.basename(sys.argv[0] if sys.argv else "") in ("dask", "dask-worker")
