"""The router's magics: ``%mesh route``, ``%mesh explain EXPR``, ``%%mesh --route``.

Thin: parse, call :class:`~jupyter_mesh.Mesh`, display. Misuse is a one-line
``UsageError``.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.display import display

from ..errors import MeshError
from . import api
from .placement import parse_route_or_error

_NAME_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _route(text: str) -> Any:
    try:
        return parse_route_or_error(text)
    except MeshError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None


def route_line(shell: Any, mesh: Any, target: str | None) -> None:
    """``%mesh route [auto|off|TARGET]``: show or set how plain Dask calls are routed."""
    if target is None:
        print(f"Routing of plain Dask calls: {mesh.route_mode}")
        return
    route = _route(target)
    try:
        api.set_route(mesh, route)
    except MeshError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    if route == "off":
        print("Routing off: plain Dask calls run where Dask puts them.")
    else:
        print(f"Routing plain Dask calls: {route} (%mesh route off to stop)")


def _lookup(shell: Any, expr: str) -> Any:
    """A name or dotted name from the user namespace; anything else is evaluated there."""
    expr = expr.strip()
    if _NAME_PATH.match(expr):
        head, *rest = expr.split(".")
        if head not in shell.user_ns:
            raise UsageError(f"name {head!r} is not defined in the notebook")
        value = shell.user_ns[head]
        for attr in rest:
            try:
                value = getattr(value, attr)
            except AttributeError:
                raise UsageError(f"{expr}: no attribute {attr!r}") from None
        return value
    try:
        return shell.ev(expr)
    except Exception as exc:
        raise UsageError(f"could not evaluate {expr!r}: {type(exc).__name__}: {exc}") from None


def explain_line(shell: Any, mesh: Any, expr: str) -> Any:
    """``%mesh explain EXPR [--route R]``: the plan for the Dask collection(s) EXPR."""
    route = "auto"
    try:
        parts = shlex.split(expr)
    except ValueError:
        parts = [expr]
    if "--route" in parts:
        i = parts.index("--route")
        if i + 1 >= len(parts):
            raise UsageError("--route needs a value: auto, off or a target such as gpu")
        route = parts[i + 1]
        expr = " ".join(parts[:i] + parts[i + 2:])
    route = _route(route)
    value = _lookup(shell, expr)
    colls = tuple(value) if isinstance(value, tuple) else (value,)
    try:
        return mesh.explain(*colls, route=route)
    except MeshError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None


def routed_cell(shell: Any, mesh: Any, route: str | None, cell: str) -> None:
    """``%%mesh [--route R]``: run the cell with its Dask work routed, then show the
    report of each routed computation the cell ran, in order."""
    mode = _route(route if route is not None else "auto")
    try:
        ctx = mesh.route(mode)
    except MeshError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    reports: list[Any] = []
    mesh.report_sinks.append(reports)
    try:
        with ctx:
            result = shell.run_cell(cell)
    finally:
        mesh.report_sinks.remove(reports)
    if getattr(result, "success", True):
        for report in reports:
            display(report)
