"""``%%mesh --remote`` and ``%mesh reset-remote``: parse, call :class:`Mesh`, show."""

from __future__ import annotations

import re
import sys
from typing import Any

from IPython.core.error import UsageError
from IPython.display import display

from ..errors import MeshError
from ._client import (
    CellResult,
    RemoteOutput,
    check_identifier,
    check_names,
    magic_words,
    without_widget,
)
from ._errors import CellSyntaxError, RemoteCellError, RemoteCellLost


def remote_cell(shell: Any, mesh: Any, args: Any, cell: str) -> Any:
    """Run ``cell`` remotely as ``args`` (the parsed ``%%mesh`` line) says.

    Returns the value of the last expression as the worker rendered it (shown as the
    cell's ``Out``), or None. With ``--all`` every worker's value is shown, labelled.
    """
    try:
        push_names = check_names(args.push, "--push")
        if args.output is not None:
            check_identifier(args.output, "-o")
        pull_names = check_names(args.pull, "--pull")
    except MeshError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    # names IPython keeps for itself (Out, _oh, get_ipython, exit...): set to a value
    # from a worker, they break the kernel (every later cell fails to display)
    for option, names in (("-o", [args.output] if args.output else []),
                          ("--pull", pull_names)):
        own = [n for n in names if ipython_own(n)]
        if own:
            raise UsageError(f"{option}: {own[0]!r} is one of IPython's own names in the "
                             f"notebook: use a name of your own")
    if args.output is not None and args.output in pull_names:
        # both would set it, and -o would silently win
        raise UsageError(f"-o and --pull both name {args.output!r}: give -o a name of its "
                         f"own (-o keeps the cell's value, --pull the worker's variable)")
    user_ns = shell.user_ns
    missing = [n for n in push_names if n not in user_ns]
    if missing:
        raise UsageError(
            f"--push: {', '.join(repr(n) for n in missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not defined in the notebook"
        )
    try:
        with magic_words():  # its messages name the magic's flags (--on), not on=
            result = mesh.run_cell(
                cell, on=args.on, site=args.site, all=args.all,
                push={n: user_ns[n] for n in push_names}, pull=args.pull,
                timeout=args.timeout, value=args.output is not None,
                filename=f"<remote In[{_cell_number(shell)}]>",
                first_line=2,  # (line 1 is the %%mesh line, as the notebook numbers it)
            )
    except CellSyntaxError:
        raise
    except SyntaxError as exc:
        raise CellSyntaxError(exc) from None
    except RemoteCellError as exc:
        if args.all and exc.results:
            # the workers where it ran to its end: their displays, before the error
            # (the cell failed, so no name is set: exc.results has their values)
            _show_outputs(exc.results)
        raise
    except MeshError as exc:
        if args.all and isinstance(exc, RemoteCellLost) and exc.results:
            _show_outputs(exc.results)  # (as above: no name is set)
        raise UsageError(str(exc).splitlines()[0]) from None
    if args.all:
        return _show_all(shell, args, result)
    return _store_one(shell, args, result)


#: the names IPython's shell keeps in a notebook's namespace for itself
IPYTHON_OWN = frozenset({"In", "Out", "_oh", "_ih", "_dh", "_", "__", "___", "_i", "_ii",
                         "_iii", "get_ipython", "exit", "quit"})


def ipython_own(name: str) -> bool:
    """Whether ``name`` is one IPython keeps for itself (``_5`` and ``_i5`` too: the
    output and input of cell 5)."""
    return name in IPYTHON_OWN or re.fullmatch(r"_i?\d+", name) is not None


def _no_value(args: Any) -> None:
    """Say that ``-o NAME`` stored nothing: the cell ended with a statement, not an
    expression (NAME keeps what it held)."""
    print(f"jupyter_mesh: -o {args.output}: the cell does not end with an expression, so "
          f"it has no value to store; {args.output} is unchanged (end the cell with the "
          f"expression to keep)", file=sys.stderr, flush=True)


def _store_one(shell: Any, args: Any, result: CellResult) -> Any:
    shell.user_ns.update(result.pulled)
    if args.output is not None:
        if result.has_value:
            shell.user_ns[args.output] = result.value
        else:
            _no_value(args)
    if result.data is None:
        return None
    return RemoteOutput(result.data, result.metadata)


def _show_all(shell: Any, args: Any, results: list[CellResult]) -> None:
    names = {n for r in results for n in r.pulled}
    for name in names:
        shell.user_ns[name] = {r.label: r.pulled[name] for r in results if name in r.pulled}
    if args.output is not None:
        # every worker ran the same cell: each has a value, or none has
        if any(r.has_value for r in results):
            shell.user_ns[args.output] = {r.label: r.value for r in results}
        else:
            _no_value(args)
    _show_outputs(results)


def _show_outputs(results: list[CellResult]) -> None:
    for r in results:
        if r.data is not None:
            print(f"Out[{r.label}]:", flush=True)
            display(without_widget(r.data), raw=True, metadata=r.metadata)


def reset_remote(shell: Any, mesh: Any) -> None:
    """Forget this notebook's remote namespaces and which workers cells stick to."""
    dropped = mesh.reset_remote()
    if dropped:
        print(f"Reset the remote namespaces on {', '.join(dropped)}.")
    else:
        print("No remote namespaces to reset.")


def _cell_number(shell: Any) -> int:
    """The number the notebook shows for the running cell (IPython counts the next one
    already while a cell runs)."""
    from ..router.magic import running_cell

    outer = running_cell(shell)
    return int(outer.execution_count) if outer is not None else int(shell.execution_count)
