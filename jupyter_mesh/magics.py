"""``%mesh`` and ``%%mesh``: thin wrappers that parse, call the API and display.

Every subcommand has its own ``@magic_arguments`` parser; misuse raises ``UsageError``
(one line, no traceback) and leaves any active mesh untouched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import display

from . import _state
from .errors import MeshError

SUBCOMMANDS = ("start", "connect", "status", "scale", "close", "route", "explain",
               "calibrate", "reset-remote")
USAGE = (
    "usage: %mesh [start|connect ADDRESS|status [--widget]|scale [--cpu N] [--jax-cpu N] "
    "[--gpu N] [--tpu N]|close|route [TARGET]|explain EXPR [--route TARGET]|calibrate|"
    "reset-remote]; %%mesh [--route TARGET] or %%mesh --remote [--on TARGET] [--site S] "
    "[--all] [--push a,b] [--pull a,b] [-o NAME] [--timeout S]; each takes --help"
)

HELP = """The mesh of this notebook: devices of every kind (CPUs, GPUs, TPUs) used as one.

%mesh start [--cpu 2] [--gpu auto] [--tpu auto] [--jax-cpu 0] [--site local]
            [--threads N] [--replace]       start an embedded mesh on 127.0.0.1
%mesh connect ADDRESS [--timeout S] [--tls-ca-file F --tls-cert F --tls-key F]
            [--replace]                     attach to a running Dask scheduler
%mesh status [--widget]                     devices by kind and site (the default)
%mesh scale [--cpu N] [--jax-cpu N] [--gpu N] [--tpu N]
                                            workers of each kind of a local mesh
%mesh route [auto|off|TARGET]               route plain Dask calls (no argument: show)
%mesh explain EXPR [--route TARGET]         the router's plan, without computing
%mesh calibrate                             measure Dask's own costs on the mesh now
%mesh reset-remote                          forget this notebook's remote namespaces
%mesh close                                 close the mesh

%%mesh [--route TARGET]                     route the cell's Dask work; report after
%%mesh --remote [--on TARGET] [--site S] [--all] [--push a,b] [--pull a,b]
                [-o NAME] [--timeout S]     run the cell on a worker

TARGET: auto, off, cpu, gpu, tpu or KIND:BACKEND (cpu:jax). Each subcommand takes
--help (%mesh start --help); %mesh --help ends with every option of %%mesh."""


# ---------------------------------------------------------------- argument parsers
# The decorated functions are never called: they only carry their parsers.
@magic_arguments()
@argument("--cpu", default="2", metavar="N",
          help="CPU worker processes, NumPy (whole number >= 0; default 2)")
@argument("--gpu", default="auto", metavar="N",
          help="CUDA GPU workers, CuPy, or 'auto': one per GPU found (default auto)")
@argument("--tpu", default="auto", metavar="N",
          help="TPU workers, JAX, or 'auto': one per TPU chip found (default auto)")
@argument("--jax-cpu", default="0", metavar="N",
          help="CPU workers driven by JAX, to try the accelerator path (default 0)")
@argument("--site", default="local", metavar="SITE",
          help="site label of the workers (default local)")
@argument("--threads", default=None, metavar="N",
          help="threads per CPU worker (default: the cores shared out among the workers)")
@argument("--replace", action="store_true", help="close the active mesh first")
def _start_args(line: str) -> None:
    """%mesh start: start an embedded local mesh on 127.0.0.1."""


@magic_arguments()
@argument("address", metavar="ADDRESS",
          help="scheduler address, tcp://HOST:PORT or tls://HOST:PORT")
@argument("--timeout", default=None, metavar="S", help="seconds to wait for the scheduler")
@argument("--tls-ca-file", default=None, metavar="F", help="CA certificate (PEM) for tls://")
@argument("--tls-cert", default=None, metavar="F", help="client certificate (PEM) for tls://")
@argument("--tls-key", default=None, metavar="F", help="client private key (PEM) for tls://")
@argument("--replace", action="store_true", help="close the active mesh first")
def _connect_args(line: str) -> None:
    """%mesh connect: attach to a running Dask scheduler."""


@magic_arguments()
@argument("--widget", action="store_true", help="show a live ipywidgets panel")
def _status_args(line: str) -> None:
    """%mesh status: devices grouped by kind and site."""


@magic_arguments()
@argument("--cpu", default=None, metavar="N", help="number of CPU worker processes")
@argument("--jax-cpu", default=None, metavar="N", help="number of CPU workers driven by JAX")
@argument("--gpu", default=None, metavar="N", help="number of CUDA GPU workers")
@argument("--tpu", default=None, metavar="N", help="number of TPU workers")
def _scale_args(line: str) -> None:
    """%mesh scale: set how many workers of each kind a local mesh has (kinds not
    named keep theirs)."""


@magic_arguments()
def _close_args(line: str) -> None:
    """%mesh close: close the active mesh."""


@magic_arguments()
@argument("target", nargs="?", default=None, metavar="TARGET",
          help="auto, off, or a target such as gpu or cpu:jax")
def _route_args(line: str) -> None:
    """%mesh route: show or set how plain Dask calls are routed."""


@magic_arguments()
@argument("expr", metavar="EXPR", help="a Dask collection in your namespace, or an "
                                       "expression giving one (a tuple for several)")
@argument("--route", default="auto", metavar="TARGET",
          help="auto (the router chooses per op), off, or a target such as gpu or cpu:jax")
def _explain_args(line: str) -> None:
    """%mesh explain: show the router's plan for Dask collections, without computing them."""


@magic_arguments()
def _calibrate_args(line: str) -> None:
    """%mesh calibrate: measure Dask's own costs on the mesh now, per task, per
    dependency and per transfer, and the bandwidth between workers (the router's cost
    model uses them where mesh.task-overhead, mesh.dependency-latency,
    mesh.links.network-latency or mesh.links.network-bandwidth is auto)."""


@magic_arguments()
def _reset_remote_args(line: str) -> None:
    """%mesh reset-remote: forget the remote namespaces of this notebook."""


@magic_arguments()
@argument("--route", default=None, metavar="TARGET",
          help="auto (the default), off or a target for the Dask work in the cell")
@argument("--remote", action="store_true", help="run the cell on a worker")
@argument("--on", default=None, metavar="TARGET",
          help="with --remote: the worker's target (cpu, gpu, tpu or KIND:BACKEND such "
               "as cpu:jax)")
@argument("--site", default=None, metavar="SITE", help="with --remote: the worker's site")
@argument("--all", action="store_true", help="with --remote: every matching worker")
@argument("--push", default=None, metavar="a,b",
          help="with --remote: names to send to the worker")
@argument("--pull", default=None, metavar="a,b",
          help="with --remote: names to bring back")
@argument("-o", "--output", default=None, metavar="NAME",
          help="with --remote: store the last expression's value in NAME")
@argument("--timeout", default=None, metavar="S",
          help="with --remote: seconds before the cell is stopped")
def _cell_args(line: str) -> None:
    """%%mesh: route the Dask work in the cell, or run it remotely."""


PARSERS = {
    "start": _start_args,
    "connect": _connect_args,
    "status": _status_args,
    "scale": _scale_args,
    "close": _close_args,
    "route": _route_args,
    "calibrate": _calibrate_args,
    "reset-remote": _reset_remote_args,
}

# an option is spelt out: argparse would take --cp for --cpu and --j for --jax-cpu
# (IPython's parser takes no allow_abbrev of its own)
for _func in (*PARSERS.values(), _cell_args):
    _func.parser.allow_abbrev = False
# the positional first, as the overview and the README write them (argparse puts it
# after the options)
_explain_args.parser.usage = "%(prog)s EXPR [--route TARGET]"
_connect_args.parser.usage = ("%(prog)s ADDRESS [--timeout S] [--tls-ca-file F] "
                              "[--tls-cert F] [--tls-key F] [--replace]")


def parse(func: Any, argstring: str, name: str = "%mesh") -> Any:
    """The arguments of ``name`` (a subcommand as typed, e.g. ``%mesh start``); a
    UsageError that points to its own help."""
    see = f"see {name} --help"
    try:
        argv = _argv(argstring)
        args = _unquoted(func.parser.parse_args(argv))
        _once_each(func.parser, argv)
        return args
    except UsageError as exc:
        said = str(exc).splitlines()[0]
        if said.startswith("unrecognized arguments:"):
            # quoted where that shows them: an empty word ('') read as nothing at all
            with contextlib.suppress(Exception):
                extra = func.parser.parse_known_args(argv)[1]
                if any(not w.strip() or w != w.strip() for w in extra):
                    said = f"unrecognized arguments: {' '.join(map(shlex.quote, extra))}"
        raise UsageError(f"{said}; {see}") from None
    except SystemExit:  # argparse --help
        raise UsageError(see) from None
    except ValueError as exc:  # unbalanced quotes and the like
        raise UsageError(f"{exc}: {see}") from None


def _argv(argstring: str) -> list[str]:
    """The words of a magic's options, split as a POSIX shell splits them, quotes
    (``--site "my lab"``, ``--site="my lab"``) and a backslash before a space
    (``--tls-ca-file ~/my\\ certs/ca.pem``) included, but every other backslash kept
    as typed (a Windows path); a lone quote inside a word (``o'neil``) as IPython
    splits it, the word kept whole."""
    from IPython.utils.process import arg_split

    space = "\0"  # a backslash-escaped space, kept out of the splitting
    text = argstring.replace("\\ ", space)
    lex = shlex.shlex(text, posix=True)
    lex.whitespace_split = True
    # any space separates words outside quotes: a no-break space pasted from a web
    # page too (it made "--cpu 1" one word, said back as "unrecognized: --cpu 1")
    lex.whitespace += "".join(sorted({c for c in text if c.isspace()} - set(lex.whitespace)))
    lex.escape = ""
    lex.commenters = ""
    try:
        words = list(lex)
    except ValueError:  # an unbalanced quote: IPython's splitting keeps it in its word
        words = arg_split(text)
    return [w.replace(space, " ") for w in words]


def _expand(shell: Any, line: str) -> str:
    """``line`` with IPython's expansion of ``$name`` and ``{expression}``, where it
    succeeds, as IPython's own ``var_expand`` does it: from the user namespace and the
    local names of the code that ran the magic (``%mesh connect $addr`` in a function)."""
    from IPython.utils.text import DollarFormatter

    names = dict(shell.user_ns)
    frame: Any = sys._getframe(1)
    while frame is not None and not (
            frame.f_code.co_name in ("run_line_magic", "run_cell_magic")
            and frame.f_locals.get("self") is shell):
        frame = frame.f_back
    if frame is not None and frame.f_back is not None:
        names.update(frame.f_back.f_locals)
    try:
        return DollarFormatter().vformat(line, args=[], kwargs=names)
    except Exception:  # what it cannot expand is left as typed, as IPython does
        return line


def _outside_quotes(line: str) -> bool:
    """Whether the end of ``line`` is outside any quotes."""
    states = [quote for *_, quote in _scan(line)]
    return not states or not states[-1]


def _once_each(parser: Any, argv: list[str]) -> None:
    """A UsageError where an option is given twice (argparse keeps the last one
    silently: ``--route gpu --route cpu`` would route to the CPUs)."""
    names = {}
    for action in parser._actions:
        for option in action.option_strings:
            names[option] = "/".join(action.option_strings)
    seen: set[str] = set()
    for token in argv:
        option = names.get(token.split("=", 1)[0])
        if option is None and len(token) > 2 and token[0] == "-" and token[1] != "-":
            option = names.get(token[:2])  # a short option with its value: -oNAME
        if option is None:
            continue
        if option in seen:
            raise UsageError(f"{option} given twice: give it once")
        seen.add(option)


def unquote(value: Any) -> Any:
    """A value typed in one pair of matching quotes without them (``'cpu:jax'``,
    ``"edge lab"``), as a shell reads it; anything else as it is."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] \
            and value[0] in "'\"":
        return value[1:-1]
    return value


def _unquoted(args: Any) -> Any:
    """Parsed options with each value's quotes taken off (IPython's splitting keeps
    them): every option takes ``--cpu '1'`` as ``--cpu 1``."""
    for name, value in vars(args).items():
        setattr(args, name, [unquote(v) for v in value] if isinstance(value, list)
                else unquote(value))
    return args


def show_mesh_error(shell: Any, etype: type, value: BaseException, tb: Any,
                    tb_offset: int | None = None) -> list[str]:
    """IPython's display of a :class:`MeshError` a cell raises (``%load_ext
    jupyter_mesh`` sets it as the shell's custom exception handler): its one line, which
    says what to do, and the cell line it came from, not a traceback through the
    mesh's internals. The cell still fails."""
    if hasattr(value, "_render_traceback_"):
        # one that shows itself (a remote cell's error, with the worker's traceback)
        shell.showtraceback((etype, value, tb), tb_offset=tb_offset)
        return []
    # as IPython's own display keeps them: %tb, %debug and %pdb see this error
    sys.last_type, sys.last_value, sys.last_traceback = etype, value, tb
    if hasattr(sys, "last_exc"):
        sys.last_exc = value
    where = _raised_at(shell, tb)
    from .remote._errors import _header

    line = f"{_header(etype.__name__)}: {value}" + (f"  [{where}]" if where else "")
    shell._showtraceback(etype, value, [line])
    if getattr(shell, "call_pdb", False):
        shell.debugger(force=True)
    return [line]


def _raised_at(shell: Any, tb: Any) -> str:
    """Where in the user's code an exception came from: the last frame of its
    traceback outside installed packages, the standard library and this package
    (``In [3], line 2: y.compute()`` for a cell); "" where there is none."""
    import linecache
    import sysconfig
    import traceback

    skip = tuple(os.path.join(os.path.realpath(p), "") for p in {
        sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
        sysconfig.get_paths()["stdlib"], os.path.dirname(os.path.abspath(__file__))})
    found = None
    for frame, lineno in traceback.walk_tb(tb):
        name = frame.f_code.co_filename
        if name.startswith("<") and not name.startswith("<ipython-input"):
            continue  # code made on the fly (<string>, <frozen ...>)
        if not name.startswith("<") and os.path.realpath(name).startswith(skip):
            continue
        found = (name, lineno)
    if found is None:
        return ""
    name, lineno = found
    cells = getattr(getattr(shell, "compile", None), "_filename_map", {}) or {}
    place = f"In [{cells[name]}], line {lineno}" if name in cells else f"{name}:{lineno}"
    code = linecache.getline(name, lineno).strip()
    return f"{place}: {code}" if code else place


def _interrupted(before: Any, made: str, not_made: str) -> UsageError:
    """What a Ctrl-C during %mesh start or connect left: the new mesh, if it was made
    current already (``made``, with ``{address}``), else ``not_made`` and what is
    current now."""
    now = _state.active()
    if now is not None and now is not before:
        return UsageError(f"interrupted: {made.format(address=now.address)}; %mesh close "
                          f"it if you did not want it")
    kept = ("; the mesh in use is kept" if now is not None
            else "; no mesh is in use now" if before is not None else "")
    return UsageError(f"interrupted: {not_made}{kept}")


def _kernel_route(mesh: Any) -> str | None:
    """The route of the kernel's plain Dask calls to ``mesh`` (``%mesh route``), if
    one is set: it ends when the mesh closes."""
    if mesh is None:
        return None
    from .router import api

    route = api.ROUTES.kernel
    return str(route.route) if route is not None and route.mesh is mesh else None


def _say_route_ended(routed: str | None, mesh: Any) -> None:
    """After a mesh replaced another: that the kernel's route to the old one ended."""
    if routed and _kernel_route(mesh) is None:
        print(f"Routing of plain Dask calls ({routed}) ended with the mesh it was set "
              f"on: %mesh route {routed} routes them on this one.")


def _as_usage(exc: Exception) -> UsageError:
    return UsageError(str(exc).splitlines()[0])


_API_OPTION = re.compile(r"\b(cpu|gpu|tpu|jax_cpu|threads_per_worker)=(\w+|'auto')")
_OPTION_NAMES = {"jax_cpu": "jax-cpu", "threads_per_worker": "threads"}


def _as_options(message: str) -> str:
    """An API message (``use gpu=0 or 'auto'``) as the magic's options spell it
    (``use --gpu 0 or 'auto'``)."""
    message = message.replace("cpu and jax_cpu together", "--cpu and --jax-cpu together")
    return _API_OPTION.sub(
        lambda m: f"--{_OPTION_NAMES.get(m.group(1), m.group(1))} {m.group(2).strip(chr(39))}",
        message)


@magics_class
class MeshMagics(Magics):
    """The ``%mesh`` line magic and ``%%mesh`` cell magic."""

    @line_cell_magic
    @no_var_expand
    def mesh(self, line: str, cell: str | None = None) -> Any:
        # IPython hands a magic its line as typed, a trailing "# comment" included,
        # and a trailing ";": no part of the last option, and, as after any other line,
        # no Out[] (IPython decides that from the code it made of the line, which does
        # not end in ";", so the magic returns nothing)
        line = strip_comment(line).rstrip()
        quiet = line.endswith(";") and _outside_quotes(line)
        if quiet:
            line = line[:-1].rstrip()
        if cell is not None or line.split(None, 1)[:1] != ["explain"]:
            # $name and {expression} in options, as IPython expands them for other
            # magics; never in %mesh explain's EXPR, which is Python evaluated as typed
            line = _expand(self.shell, line)
        if cell is not None:
            __tracebackhide__ = True  # (see _cell)
            if _asks_help(line):
                print(_help_text(_cell_args, "%%mesh"))
                return None
            return self._cell(line, cell)
        # any whitespace (a tab too) separates the subcommand from its arguments
        parts = line.strip().split(None, 1)
        sub = parts[0] if parts else "status"
        rest = parts[1] if len(parts) > 1 else ""
        if sub in ("-h", "--help", "help"):
            # and the cell magic's options in full: IPython runs no cell magic on a
            # cell with nothing below its first line, so %%mesh --help alone shows none
            print(HELP + "\n\n" + _help_text(_cell_args, "%%mesh"))
            return None
        if sub == "explain":
            if _asks_help(rest):
                print(_help_text(_explain_args, "%mesh explain"))
                return None
            plan = self._explain(rest)
            return None if quiet else plan  # (no Out[] after a ";", as after a line)
        if sub not in PARSERS:
            raise UsageError(f"unknown subcommand {sub!r}: {USAGE}")
        if _asks_help(rest):
            print(_help_text(PARSERS[sub], f"%mesh {sub}"))
            return None
        args = parse(PARSERS[sub], rest, f"%mesh {sub}")
        out = getattr(self, "_" + sub.replace("-", "_"))(args)
        return None if quiet else out

    # ------------------------------------------------------------ foundation
    def _start(self, args: Any) -> None:
        from .mesh import Mesh, most_local_workers

        kwargs: dict[str, Any] = {}
        before = _state.active()
        routed = _kernel_route(before)
        try:
            if args.threads is not None:
                kwargs["threads_per_worker"] = _whole(args.threads, "--threads", minimum=1)
                top = most_local_workers()
                if kwargs["threads_per_worker"] > top:
                    raise UsageError(f"--threads must be a whole number from 1 to {top} "
                                     f"(four per core here), not {args.threads}")
            mesh = Mesh.local(
                cpu=_local(args.cpu, "--cpu"),
                gpu=_count_or_auto(args.gpu, "--gpu"),
                tpu=_count_or_auto(args.tpu, "--tpu"),
                jax_cpu=_local(args.jax_cpu, "--jax-cpu"),
                site=_site(args.site),
                replace=args.replace,
                **kwargs,
            )
        except MeshError as exc:
            raise UsageError(_as_options(str(exc).splitlines()[0])) from None
        except UsageError:
            raise
        except KeyboardInterrupt:
            # (what it had started is closed again: Mesh.local sees to it)
            raise _interrupted(before, "the mesh at {address} started and is the current "
                                       "mesh", "no mesh started") from None
        except Exception as exc:  # e.g. a worker process that could not start
            why = (str(exc).splitlines() or [""])[0] or type(exc).__name__
            raise UsageError(f"the mesh did not start ({type(exc).__name__}: {why}); the "
                             f"mesh in use, if any, is kept: check the terminal that runs "
                             f"Jupyter for the workers' own messages") from None
        display(mesh)
        _say_route_ended(routed, mesh)

    def _connect(self, args: Any) -> None:
        from .mesh import Mesh

        security = None
        tls = (args.tls_ca_file, args.tls_cert, args.tls_key)
        for option, path in zip(("--tls-ca-file", "--tls-cert", "--tls-key"), tls,
                                strict=True):
            if path is not None and not path.strip():
                # (a shell variable that was not set): never plain TCP in its place
                raise UsageError(f"{option} is empty: give the path of a PEM file")
        if any(tls):
            if not all(tls):
                raise UsageError(
                    "TLS needs all three of --tls-ca-file, --tls-cert and --tls-key"
                )
            import os

            from distributed.security import Security

            # (~ as a shell expands it: the magic gets the text as typed)
            ca, cert, key = (os.path.expanduser(p) for p in tls)
            for path in (ca, cert, key):  # (as Mesh.connect says it)
                if os.path.isdir(path) or not os.path.isfile(path):
                    from .mesh import check_tls_files

                    try:
                        check_tls_files(path, None, None)
                    except MeshError as exc:
                        raise UsageError(str(exc)) from None
            security = Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key,
                                require_encryption=True)
        timeout = None
        if args.timeout is not None:
            timeout = _positive(args.timeout, "--timeout")
            from .mesh import MAX_CONNECT_TIMEOUT

            if timeout > MAX_CONNECT_TIMEOUT:
                raise UsageError(f"--timeout must be at most {MAX_CONNECT_TIMEOUT} s (a day), "
                                 f"not {args.timeout}")
        address = args.address
        if security is not None and "://" not in address:
            address = "tls://" + address
        before = _state.active()
        routed = _kernel_route(before)
        try:
            mesh = Mesh.connect(address, security=security, timeout=timeout,
                                replace=args.replace)
        except MeshError as exc:
            raise _as_usage(exc) from None
        except KeyboardInterrupt:
            raise _interrupted(before, "connected to {address}, which is the current mesh",
                               f"not connected to {address}") from None
        display(mesh)
        _say_route_ended(routed, mesh)

    def _status(self, args: Any) -> Any:
        mesh = _state.active()
        if mesh is None:
            print("No active mesh: run %mesh start (local) or %mesh connect ADDRESS.")
            return None
        if args.widget:
            from .progress import in_notebook

            if not in_notebook():  # a terminal: the text, and where the panel shows
                try:
                    display(mesh.inventory())
                except MeshError as exc:
                    raise _as_usage(exc) from None
                print("(%mesh status --widget shows a live panel in a notebook)")
                return None
            try:  # a mesh whose scheduler is gone: said as the plain status says it
                mesh.inventory()
            except MeshError as exc:
                raise _as_usage(exc) from None
            # shown wherever the line is, as the plain status shows the devices (only
            # a cell's last line shows what a magic returns: elsewhere the panel was
            # made, unseen, and took over from the one in view)
            display(mesh.widget())
            return None
        try:
            inventory = mesh.inventory()
        except MeshError as exc:
            raise _as_usage(exc) from None
        display(inventory)
        if mesh.calibration is not None:  # Dask's own costs, as the router measured them
            print(repr(mesh.calibration))
        return None

    def _scale(self, args: Any) -> None:
        mesh = _current_or_usage()
        counts: dict[str, int] = {}
        for family, option in (("cpu", "--cpu"), ("jax_cpu", "--jax-cpu"),
                               ("gpu", "--gpu"), ("tpu", "--tpu")):
            value = getattr(args, family)
            if value is not None:
                counts[family] = (_local(value, option) if family in ("cpu", "jax_cpu")
                                  else _whole(value, option))
        if not counts:
            raise UsageError("usage: %mesh scale [--cpu N] [--jax-cpu N] [--gpu N] [--tpu N]: "
                             "say how many workers of which kind")
        try:
            inventory = mesh.scale(**counts)
        except MeshError as exc:
            raise UsageError(_as_options(str(exc).splitlines()[0])) from None
        display(inventory)

    def _close(self, args: Any) -> None:
        mesh = _state.active()
        if mesh is None:
            print("No active mesh to close: run %mesh start to start one.")
            return
        address = mesh.address
        routed = _kernel_route(mesh)
        owned = mesh.owns_cluster
        try:
            mesh._check_reachable()
            reachable = True
        except MeshError:
            reachable = False
        mesh.close()
        # a mesh this notebook connected to runs on for its owner and everyone else
        # (unless its scheduler is gone already)
        done = (f"Closed the mesh at {address}." if owned else
                f"Disconnected from the mesh at {address} (it runs on: its owner closes it)."
                if reachable else
                f"Disconnected from the mesh at {address} (its scheduler was not reachable).")
        print(done + (
            f" Routing of plain Dask calls ({routed}) ended with it." if routed else ""))

    # ------------------------------------------------------------ router
    def _route(self, args: Any) -> Any:
        from .router import magic as router_magic

        return router_magic.route_line(self.shell, _current_or_usage(), args.target)

    def _explain(self, expr: str) -> Any:
        from .router import magic as router_magic

        if not expr.strip():
            raise UsageError("usage: %mesh explain EXPR (a Dask collection in your namespace)")
        return router_magic.explain_line(self.shell, _current_or_usage(), expr.strip())

    def _calibrate(self, args: Any) -> Any:
        mesh = _current_or_usage()
        try:
            return mesh.calibrate()
        except MeshError as exc:
            raise _as_usage(exc) from None

    # ------------------------------------------------------------ remote cells
    def _reset_remote(self, args: Any) -> Any:
        from .remote import magic as remote_magic

        try:
            return remote_magic.reset_remote(self.shell, _current_or_usage())
        except MeshError as exc:
            raise _as_usage(exc) from None

    # ------------------------------------------------------------ cells
    def _cell(self, line: str, cell: str) -> Any:
        __tracebackhide__ = True  # a cell's error shows its own frames, not the magic's
        args = parse(_cell_args, line, "%%mesh")
        remote_only = [
            name for name, value in (
                ("--on", args.on), ("--site", args.site), ("--all", args.all),
                ("--push", args.push), ("--pull", args.pull), ("-o", args.output),
                ("--timeout", args.timeout),
            ) if value not in (None, False)
        ]
        if args.remote:
            if args.route is not None:
                raise UsageError("--route and --remote cannot be combined: choose one")
            from .remote import magic as remote_magic

            return remote_magic.remote_cell(self.shell, _current_or_usage(), args, cell)
        if remote_only:
            verb = "works" if len(remote_only) == 1 else "work"
            raise UsageError(f"{', '.join(remote_only)} only {verb} with --remote: add "
                             f"--remote to run the cell on a worker")
        from .router import magic as router_magic

        return router_magic.routed_cell(self.shell, _current_or_usage(), args.route, cell)


MeshMagics.mesh.__doc__ = HELP


def _help_text(func: Any, title: str) -> str:
    """A subcommand's options, titled as the user types it."""
    import copy

    parser = copy.copy(func.parser)
    parser.prog = title.lstrip("%")  # IPython's help format puts one % before it
    text = parser.format_help().replace("::\n\n", "", 1).lstrip()
    if not text.startswith(title):
        text = text.replace("%" + parser.prog, title, 1)
    # the usage's continuation lines (up to the first blank line) line up under its
    # first option, after "usage: " and the name as typed
    usage, sep, rest = text.partition("\n\n")
    first, *more = ("usage: " + usage).split("\n")
    column = len("usage: ") + len(title) + 1
    return "\n".join([first] + [" " * column + m.strip() for m in more]) + sep + rest


def _asks_help(argstring: str) -> bool:
    return any(tok in ("-h", "--help") for tok in argstring.split())


def _current_or_usage() -> Any:
    try:
        return _state.current()
    except MeshError as exc:
        raise _as_usage(exc) from None


def _whole(value: str, option: str, minimum: int = 0) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        n = None
    if n is None or n < minimum:
        raise UsageError(f"{option} must be a whole number >= {minimum}, not {value!r}")
    return n


def _local(value: str, option: str) -> int:
    """A count of local worker processes, capped as Mesh.local caps it, named as typed."""
    from .mesh import check_local_count

    try:
        return check_local_count(option, _whole(value, option))
    except MeshError as exc:
        raise _as_usage(exc) from None


def _count_or_auto(value: str, option: str) -> int | str:
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        n = int(str(value).strip())
    except ValueError:
        n = -1
    if n < 0:
        raise UsageError(f"{option} must be 'auto' or a whole number >= 0, not {value!r}")
    return n


def _positive(value: str, option: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = -1.0
    if not x > 0 or x != x or x == float("inf"):
        raise UsageError(f"{option} must be a positive number of seconds, not {value!r}")
    return x


def _site(value: str) -> str:
    from .mesh import check_site

    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]

    try:
        return check_site(value)
    except MeshError as exc:
        raise UsageError(f"--site: {exc}") from None


def _scan(line: str) -> Any:
    """Each character of ``line`` as ``(index, character, escaped, quote)``: whether a
    backslash escaped it (in quotes too, as Python reads them), and the quote open
    after it ("" outside quotes)."""
    quote = ""
    escaped = False
    for i, c in enumerate(line):
        if escaped:
            escaped = False
            yield i, c, True, quote
            continue
        if c == "\\":
            escaped = True
        elif quote:
            if c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        yield i, c, False, quote


def strip_comment(line: str) -> str:
    """``line`` without a trailing comment: from a ``#`` that starts a word (at the
    start or after whitespace) outside quotes, as Python and the shell read one
    (``tcp://host#x`` and ``'#'`` keep theirs)."""
    word_start = True  # after whitespace that no backslash escaped
    for i, c, escaped, quote in _scan(line):
        if c == "#" and word_start and not escaped and not quote:
            return line[:i].rstrip()
        word_start = c.isspace() and not escaped and not quote
    return line


def split(line: str) -> list[str]:
    """Split a magic line like a shell would, with a usage error on bad quoting."""
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"{exc}: {USAGE}") from None
