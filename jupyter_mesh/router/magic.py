"""The router's magics: ``%mesh route``, ``%mesh explain EXPR``, ``%%mesh --route``.

Thin: parse, call :class:`~jupyter_mesh.Mesh`, display. Misuse is a one-line
``UsageError``.
"""

from __future__ import annotations

import re
from typing import Any

from IPython.core.error import UsageError
from IPython.display import display

from ..errors import MeshError
from . import api
from .placement import parse_route_or_error

#: ``--route R`` or ``--route=R`` in a line of ``%mesh explain`` (group 1: R, or "")
_ROUTE_OPTION = re.compile(r"(?:^|\s)--route(?:=(\S*)|\s+(?!-)(\S+)|\s*$)")
_NAME_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _outside_strings(expr: str) -> str:
    """``expr`` with the insides of its string literals blanked (same length), so an
    option is looked for only in the code: ``d["a --route x"]`` names no route."""
    import io
    import tokenize

    lines = expr.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    masked = list(expr)
    strings = {tokenize.STRING, *(getattr(tokenize, t) for t in
                                  ("FSTRING_MIDDLE",) if hasattr(tokenize, t))}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(expr).readline):
            if tok.type in strings:
                a = starts[tok.start[0] - 1] + tok.start[1]
                b = starts[tok.end[0] - 1] + tok.end[1]
                masked[a:b] = ["_"] * (b - a)
    except (tokenize.TokenError, SyntaxError, IndentationError):
        pass  # not Python: the line is searched as it is (its evaluation will say so)
    return "".join(masked)


def _route(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]  # %mesh route 'auto', as %mesh start --site 'x' takes quotes
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
    block = api.ROUTES.blocks[-1] if api.ROUTES.blocks else None
    if block is not None:  # a %%mesh cell or a with-block around this line decides
        print(f"Routing of plain Dask calls set to {route} for the kernel, from the end of "
              f"the block that routes them {block.route} now (this %%mesh cell or "
              f"with mesh.route(...)).")
    elif route == "off":
        print("Routing off: plain Dask calls run where Dask puts them.")
    else:
        print(f"Routing plain Dask calls: {route} (%mesh route off to stop)")


def _lookup(shell: Any, expr: str) -> Any:
    """A name or dotted name from the user namespace; anything else is evaluated there."""
    expr = expr.strip()
    head = expr.split(".")[0]
    if _NAME_PATH.match(expr) and (head in shell.user_ns or not _known(head)):
        head, *rest = expr.split(".")
        if head not in shell.user_ns:
            raise UsageError(f"name {head!r} is not defined in the notebook")
        value = shell.user_ns[head]
        for attr in rest:
            try:
                value = getattr(value, attr)
            except Exception as exc:
                try:
                    exists = attr in dir(value)
                except Exception:
                    exists = True
                if isinstance(exc, AttributeError) and not exists:
                    raise UsageError(f"{expr}: no attribute {attr!r}") from None
                # a property that raised: its own error, as an expression's
                raise UsageError(_not_evaluated(expr, exc)) from None
        return value
    try:
        return shell.ev(expr)
    except Exception as exc:
        raise UsageError(_not_evaluated(expr, exc)) from None


def _known(name: str) -> bool:
    """A name Python knows without the notebook: a keyword (None, True) or a builtin."""
    import builtins
    import keyword

    return keyword.iskeyword(name) or hasattr(builtins, name)


def _not_evaluated(expr: str, exc: BaseException) -> str:
    """One line: the error's own lines joined (its first alone stopped mid-sentence,
    before the advice: Dask's "...along an axis that" / "has a single chunk...")."""
    said = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if len(said) > 500:
        said = said[:497] + "..."
    return f"could not evaluate {expr!r}: {type(exc).__name__}" + (f": {said}" if said else "")


def explain_line(shell: Any, mesh: Any, expr: str) -> Any:
    """``%mesh explain EXPR [--route R]``: the plan for the Dask collection(s) EXPR."""
    route = "auto"
    # the option is cut out of the line, and the expression evaluated as typed
    code = _outside_strings(expr)  # not in a string literal: d["a --route x"]
    found = list(_ROUTE_OPTION.finditer(code))
    if len(found) > 1:
        raise UsageError("--route given twice: give it once, e.g. %mesh explain y --route gpu")
    value = (expr[slice(*found[0].span(1))] if found[0].group(1) is not None else
             expr[slice(*found[0].span(2))] if found[0].group(2) is not None else ""
             ) if found else None
    if not value and (found or re.search(r"(?:^|\s)--route\b", code)):
        raise UsageError("--route needs a value: auto, off or a target such as gpu")
    if found and value:
        # (EXPR is taken as typed; the route is an option, expanded as others are)
        from ..magics import _expand

        route = _expand(shell, value)
        code = code[:found[0].start()] + " " + code[found[0].end():]
        expr = expr[:found[0].start()] + " " + expr[found[0].end():]
    other = re.search(r"(?:^|\s)(--[A-Za-z][\w-]*)", code)
    if other:  # "y --bogus" is Python (y minus minus bogus), but never what was meant
        raise UsageError(f"unknown option {other.group(1)}: %mesh explain takes EXPR "
                         f"[--route TARGET]; see %mesh explain --help")
    route = _route(route)
    try:  # a forced target the mesh lacks is refused before EXPR runs (it may compute)
        api._checked_route(mesh, route, True)
    except MeshError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
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
    if _awaits(shell, cell):
        # the magic runs the body as a cell of its own, from within the running one:
        # IPython cannot await there ("This event loop is already running")
        raise UsageError(
            "top-level await does not work in a %%mesh cell: await in a plain cell, "
            "with the Dask work in `with mesh.route(\"auto\"):` (or %mesh route auto)")
    try:
        ctx = mesh.route(mode)
    except MeshError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    reports: list[Any] = []
    mesh.report_sinks.append(reports)
    # the cell this magic runs in: the body runs under its number ("Cell In[6]" in a
    # traceback of cell 6; IPython counts the next cell already), and its error is the
    # body's own
    __tracebackhide__ = True  # IPython shows the body's frames, not this one
    outer = running_cell(shell)
    whole = outer is not None and _whole_cell(outer)
    try:
        with ctx:
            result = _run_body(shell, cell, outer, show_error=whole)
    finally:
        # by identity: an enclosing %%mesh cell's list may be equal (both empty)
        sinks = mesh.report_sinks
        sinks[:] = [s for s in sinks if s is not reports]
    if not getattr(result, "success", True):
        # the reports of the computations that finished before the error (a long one's
        # is worth keeping), under the body's traceback, shown already
        _show(reports)
        # the cell must still count as failed,
        # with the body's error (so that "Run All", nbconvert and papermill stop here
        # and name it), and show no second one
        err = result.error_before_exec or result.error_in_exec
        if whole and err is not None:
            outer.error_in_exec = err
            _fail_after(shell)
            return
        if err is not None:
            # called from code (run_cell_magic) or under another cell magic (%%time):
            # the body's own error, which the body's run did not show, reaches the
            # caller, which shows it once and names it (a syntax error as IPython shows
            # one: where in the cell, not IPython's frames that compiled it)
            if isinstance(err, SyntaxError):
                raise err.with_traceback(None)
            raise err
        raise CellFailed("the routed cell raised") from None
    _show(reports)


def _show(reports: list[Any]) -> None:
    """The cell's reports, the picture with the last one only (each is a megabyte or
    so of the notebook: a loop of ten computations put 14 MB in one cell)."""
    for report in reports[:-1]:
        report.picture = False
    for report in reports:
        display(report)


def _awaits(shell: Any, cell: str) -> bool:
    """Whether the body has a top-level ``await`` (IPython would run it as a
    coroutine) where it cannot: an event loop runs in this thread already (a Jupyter
    kernel's; terminal IPython runs the magic outside one, and the body's await works
    there). False where it does not compile (its run says why)."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    try:
        return bool(shell.should_run_async(cell, transformed_cell=shell.transform_cell(cell),
                                           preprocessing_exc_tuple=None))
    except Exception:
        return False


def _run_body(shell: Any, cell: str, outer: Any, show_error: bool = True) -> Any:
    """Run the body as a cell of its own, compiled under the running cell's number,
    its lines numbered as the notebook's cell numbers them; the shell's count, and its
    record of the running cell, as they were for the rest. ``show_error=False``: its
    error is not shown (the caller raises it)."""
    if outer is None:
        return _quiet_run(shell, cell, show_error=show_error)
    # a silent run (a frontend's own request) shows nothing and keeps no value
    silent = bool(getattr(getattr(outer, "info", None), "silent", False))
    count = shell.execution_count
    # the lines above the body (%%mesh, and %%time above it...): a traceback's "line 3"
    # and a MeshError's are the cell's own line 3
    raw = getattr(getattr(outer, "info", None), "raw_cell", None) or ""
    # (the body starts a line; IPython hands it over with a newline at its end)
    at = raw.find("\n" + cell.rstrip()) if cell.strip() else -1
    above = raw[:at + 1].count("\n") if at >= 0 else 0

    def restore(*_: Any) -> None:
        # IPython took the number for the body's name already: from here on (its value
        # shown as Out[N]) the count is the shell's own again
        shell.events.unregister("pre_run_cell", restore)
        shell.execution_count = count

    shell.execution_count = outer.execution_count
    shell.events.register("pre_run_cell", restore)
    try:
        # (as comments: IPython drops leading blank lines; a traceback shows them;
        # none before a cell magic, which IPython takes only on a cell's first line)
        starts_magic = cell.lstrip().startswith("%%")
        head = "" if starts_magic else "".join(
            f"# {line}\n" for line in raw.splitlines()[:above])
        return _quiet_run(shell, head + cell, silent=silent, show_error=show_error)
    finally:
        if restore in shell.events.callbacks["pre_run_cell"]:
            shell.events.unregister("pre_run_cell", restore)
        shell.execution_count = count
        shell.displayhook.exec_result = outer  # the body's run reset it


def _quiet_run(shell: Any, cell: str, silent: bool = False, show_error: bool = True
               ) -> Any:
    """``shell.run_cell``, where a body that ends in ``;`` shows no value (IPython
    looks for the ``;`` in the running cell's text, the ``%%mesh`` call), and with
    ``show_error=False`` its error is not shown."""
    hook = shell.displayhook
    saved: dict[str, Any] = {}
    try:
        quiet = bool(hook.semicolon_at_end_of_expression(shell.transform_cell(cell)))
    except Exception:  # (code that does not compile: its run says why)
        quiet = False
    if quiet:
        saved["quiet"] = hook.__dict__.get("quiet")
        hook.quiet = lambda: True
    if not show_error:
        # (CustomTB: IPython shows an exception of set_custom_exc's, MeshError's, with it)
        for name in ("showtraceback", "showsyntaxerror", "CustomTB"):
            saved[name] = shell.__dict__.get(name)
            setattr(shell, name, lambda *a, **k: None)
    try:
        return shell.run_cell(cell, silent=silent)
    finally:
        for name, old in saved.items():
            owner = hook if name == "quiet" else shell
            if old is None:
                owner.__dict__.pop(name, None)
            else:
                setattr(owner, name, old)


def _whole_cell(outer: Any) -> bool:
    """Whether the running cell is this ``%%mesh`` cell itself (not code that calls
    ``run_cell_magic``, which must see the failure as an exception)."""
    raw = getattr(getattr(outer, "info", None), "raw_cell", None) or ""
    return re.match(r"\s*%%mesh(\s|$)", raw) is not None


def _fail_after(shell: Any) -> None:
    """Once the running cell is over, IPython says it failed (``ipython -c`` exits 1)."""
    def failed(*_: Any) -> None:
        shell.events.unregister("post_execute", failed)
        shell.last_execution_succeeded = False

    # post_execute: it follows every run, silent ones too (post_run_cell does not)
    shell.events.register("post_execute", failed)


def running_cell(shell: Any) -> Any:
    """The ExecutionResult of the cell running now (its ``execution_count`` is the
    number the notebook shows), or None outside one."""
    result = getattr(getattr(shell, "displayhook", None), "exec_result", None)
    return result if hasattr(result, "execution_count") else None


class CellFailed(Exception):
    """A ``%%mesh`` cell raised; its traceback was shown already, so this shows none."""

    def _render_traceback_(self) -> list[str]:
        return []
