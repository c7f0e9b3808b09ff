"""The %mesh magics through a real IPython shell."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError

import jupyter_mesh as jm
from jupyter_mesh import _state
from jupyter_mesh.mesh import most_local_workers


@pytest.fixture(scope="module")
def started(ip):
    if _state.active() is not None:
        _state.active().close()
    ip.run_line_magic("mesh", "start --cpu 1 --gpu auto --site magic-site")
    mesh = jm.current()
    yield mesh
    if not mesh.closed:
        mesh.close()


def test_start_status_and_compute(ip, started, capsys):
    assert started.inventory().by_kind() == {"cpu": 1}
    assert started.inventory()[0].site == "magic-site"
    ip.run_line_magic("mesh", "")
    out = capsys.readouterr().out
    assert "cpu @ magic-site: 1" in out
    ip.run_line_magic("mesh", "status")
    assert "cpu @ magic-site" in capsys.readouterr().out
    ip.run_cell("import dask.array as da; _v = da.ones((100, 100), chunks=50).sum().compute()")
    assert ip.user_ns["_v"] == 10_000
    # once the router measured Dask's costs on the mesh, status says what they are
    ip.run_line_magic("mesh", "calibrate")
    capsys.readouterr()
    ip.run_line_magic("mesh", "status")
    assert "ms of Dask dispatch per task" in capsys.readouterr().out


@pytest.mark.parametrize(
    "line, match",
    [
        ("bogus", "unknown subcommand 'bogus'.*start\\|connect"),
        ("start --bogus 1", r"unrecognized arguments: --bogus 1; see %mesh start --help$"),
        # an option given twice (argparse would keep the last one silently)
        ("start --cpu 1 --cpu=2", r"^--cpu given twice: give it once; see %mesh start --help$"),
        # options are spelt out: no abbreviation of --cpu or --jax-cpu
        ("start --cp 1", r"unrecognized arguments: --cp 1; see %mesh start --help$"),
        ("scale --jax 1", r"unrecognized arguments: --jax 1; see %mesh scale --help$"),
        ("route auto off", r"unrecognized arguments: off; see %mesh route --help$"),
        # an empty word, quoted: it read "unrecognized arguments: ; see ..."
        ("status ''", r"unrecognized arguments: ''; see %mesh status --help$"),
        ("route auto '' ' '", r"unrecognized arguments: '' ' '; see %mesh route --help$"),
        ("start --cpu -1", "--cpu must be a whole number >= 0"),
        ("start --cpu two", "--cpu must be a whole number >= 0"),
        ("start --gpu abc", "--gpu must be 'auto' or a whole number"),
        ("start --tpu -3", "--tpu must be 'auto' or a whole number"),
        ("start --jax-cpu x", "--jax-cpu must be a whole number"),
        ("start --threads 0", "--threads must be a whole number >= 1"),
        ('start --site ""', "--site: site must be a name"),
        ("start --site a/b", "--site: site must be a name"),
        ("start --site unknown", "--site: site 'unknown' is where the mesh shows plain Dask"),
        ("start --replace --gpu 2", "no CUDA GPU found for --gpu 2 .*--jax-cpu N"),
        ("start --replace --tpu 1", "no TPU found"),
        ("start", "already active.*--replace"),
        ("connect", "arguments are required: ADDRESS; see %mesh connect --help"),
        ("connect tcp://127.0.0.1:1 --timeout -1", "--timeout must be a positive number"),
        ("connect tcp://127.0.0.1:1 --timeout soon", "--timeout must be a positive number"),
        ("connect tcp://127.0.0.1:1 --timeout 1e9", "^--timeout must be at most 86400 s"),
        ("connect 127.0.0.1:1 --tls-ca-file ca.pem", "TLS needs all three"),
        # an empty path (a variable not set) connected over plain TCP without a word
        ("connect 127.0.0.1:1 --tls-ca-file '' --tls-cert '' --tls-key ''",
         "^--tls-ca-file is empty: give the path of a PEM file$"),
        ("connect tcp://127.0.0.1:1 --tls-key ''",
         "^--tls-key is empty: give the path of a PEM file$"),
        ("connect 127.0.0.1:1 --tls-ca-file a --tls-cert b --tls-key c", "TLS file not found"),
        ("connect 127.0.0.1:1 --tls-ca-file / --tls-cert b --tls-key c",
         "^TLS file / is a folder: give the PEM file in it$"),
        ("connect tls://127.0.0.1:1 --replace", "connection refused: nothing listens on port 1"),
        ("connect not//an address --replace", "malformed address|unrecognized"),
        ("status --bogus", "unrecognized arguments"),
        ("close now", "unrecognized arguments"),
        ("calibrate now", "unrecognized arguments"),
        ("reset-remote all", "unrecognized arguments"),
        ("route auto extra", "unrecognized arguments"),
        ("start --threads abc", "--threads must be a whole number"),
        ("start --jax-cpu -1", "--jax-cpu must be a whole number"),
        ("connect tcp://127.0.0.1:1 --timeout 0", "--timeout must be a positive number"),
        ("connect tcp://127.0.0.1:1 --timeout nan", "--timeout must be a positive number"),
        ("connect tcp://127.0.0.1:1 --timeout inf", "--timeout must be a positive number"),
        ("connect tcp://127.0.0.1:1", "already active.*--replace"),
        # a tab separates the subcommand as a space does
        ("start\t--cpu 1", "already active.*--replace"),
        ("start --replace --cpu 10000", r"^--cpu must be a whole number from 0 to \d+ "
                                        r"\(four workers per core here\), not 10000"),
        ("start --replace --jax-cpu 10000", r"^--jax-cpu must be a whole number from 0 to \d+"),
        ("start --replace --threads 100000", r"^--threads must be a whole number from 1 to "
                                             r"\d+ \(four per core here\), not 100000"),
        ("scale", "usage: %mesh scale .*say how many workers of which kind"),
        ("scale --cpu -1", "--cpu must be a whole number >= 0"),
        ("scale --cpu many", "--cpu must be a whole number >= 0"),
        ("scale --cpu 10000", r"^--cpu must be a whole number from 0 to \d+"),
        ("scale --jax-cpu 10000", r"^--jax-cpu must be a whole number from 0 to \d+"),
        # the NumPy and JAX CPU workers share the limit
        (f"scale --jax-cpu {most_local_workers()}",
         rf"^--cpu and --jax-cpu together must be at most {most_local_workers()} workers "
         rf"\(four CPU workers per core here\), not 1 \+ {most_local_workers()}: use fewer$"),
        (f"start --replace --cpu 1 --jax-cpu {most_local_workers()}",
         r"^--cpu and --jax-cpu together must be at most"),
        # with why, as %mesh start --gpu 1 says it
        ("scale --gpu 99", r"^(no CUDA GPU found for --gpu 99 \(.+\): use --gpu 0|only \d+ "
                           r"CUDA GPUs? here \(as CuPy sees them\), not 99: use --gpu \d+ "
                           r"or fewer)$"),
        ("scale --tpu 1", r"no TPU found for that many tpu workers .*: use --tpu 0$"),
        ("scale --cpu 0", "a mesh needs at least one device: keep --cpu 1 or more$"),
        ("start --replace --gpu 1", r"use --gpu 0 or 'auto', --jax-cpu N to test"),
        ("scale --bogus 1", "unrecognized arguments"),
    ],
)
def test_bad_input_is_one_line_and_mesh_survives(ip, started, line, match):
    with pytest.raises(UsageError, match=match) as info:
        ip.run_line_magic("mesh", line)
    assert "\n" not in str(info.value)
    assert jm.current() is started and not started.closed
    assert started.inventory().by_kind() == {"cpu": 1}


def test_scale_changes_one_kind_and_keeps_the_others(ip, started, capsys):
    ip.run_line_magic("mesh", "scale --cpu 2")
    assert "cpu @ magic-site: 2" in capsys.readouterr().out
    assert started.inventory().by_kind() == {"cpu": 2}
    ip.run_line_magic("mesh", "scale --cpu 1")
    assert started.inventory().by_kind() == {"cpu": 1}
    assert jm.current() is started


def test_connect_dead_address_names_it_within_timeout(ip, started):
    import time

    t0 = time.monotonic()
    with pytest.raises(UsageError, match="127.0.0.1:9"):
        ip.run_line_magic("mesh", "connect tcp://127.0.0.1:9 --timeout 2 --replace")
    assert time.monotonic() - t0 < 15
    assert jm.current() is started


def test_connect_to_the_current_mesh_by_another_name_keeps_it(ip, started):
    # tcp://localhost:PORT is the scheduler at tcp://127.0.0.1:PORT: --replace must not
    # close it
    other = started.address.replace("tcp://127.0.0.1:", "tcp://localhost:")
    with pytest.raises(UsageError, match=rf"{other} is the current mesh already") as info:
        ip.run_line_magic("mesh", f"connect {other} --replace --timeout 10")
    assert "\n" not in str(info.value)
    assert jm.current() is started and not started.closed
    assert started.inventory().by_kind() == {"cpu": 1}


def test_remote_only_options_need_remote(ip, started):
    with pytest.raises(UsageError, match="^--on only works with --remote: add --remote"):
        ip.run_cell_magic("mesh", "--on gpu", "x = 1")
    with pytest.raises(UsageError, match="^--on, --site only work with --remote"):
        ip.run_cell_magic("mesh", "--on gpu --site a", "x = 1")
    with pytest.raises(UsageError, match="cannot be combined"):
        ip.run_cell_magic("mesh", "--remote --route gpu", "x = 1")


def test_cell_route_off_overrides_kernel_route(ip, started):
    ip.run_line_magic("mesh", "route auto")
    try:
        ip.run_cell("import dask.array as da; _w = da.ones((100, 100), chunks=50)")
        ip.run_cell("_s = _w.sum().compute()")
        routed = started.last_report
        assert routed is not None  # the kernel-wide route is on
        ip.run_cell_magic("mesh", "--route off", "_s = _w.sum().compute()")
        assert ip.user_ns["_s"] == 10_000
        # the cell ran unrouted, and the earlier report does not pass for its work
        assert started.last_report is None
        assert started.route_mode == "auto"  # and the kernel route is back after it
        ip.run_cell("_s = _w.sum().compute()")
        assert started.last_report is not None and started.last_report is not routed
    finally:
        ip.run_line_magic("mesh", "route off")


def test_a_route_set_inside_a_routed_cell_holds_after_it(ip, started, capsys):
    import dask

    before = dask.config.get("scheduler", None)
    try:
        ip.run_line_magic("mesh", "route cpu")
        ip.run_cell_magic("mesh", "--route auto",
                          "%mesh route off\n_inside = __import__('jupyter_mesh').current()"
                          ".route_mode")
        assert ip.user_ns["_inside"] == "auto"  # the cell's route while it runs
        assert "set to off for the kernel, from the end of the block" in \
            capsys.readouterr().out
        assert started.route_mode == "off"  # the last route set, once the cell ended
        assert dask.config.get("scheduler", None) == before
        ip.run_cell_magic("mesh", "--route off", "%mesh route auto")
        assert started.route_mode == "auto"
    finally:
        ip.run_line_magic("mesh", "route off")
    assert started.route_mode == "off"
    assert dask.config.get("scheduler", None) == before


def test_a_quoted_route_is_taken_as_typed(ip, started, capsys):
    try:
        ip.run_line_magic("mesh", "route 'auto'")
        assert started.route_mode == "auto"
        ip.run_line_magic("mesh", 'route "off"')
        assert started.route_mode == "off"
    finally:
        ip.run_line_magic("mesh", "route off")


@pytest.mark.parametrize("line, kept", [
    ("start --cpu 2   # an embedded mesh", "start --cpu 2"),
    ("# status", ""),
    ("connect tcp://host:1#x", "connect tcp://host:1#x"),  # "#" inside a word
    ("explain f('#')  # c", "explain f('#')"),
    ("explain x['it\\'s'] # c", "explain x['it\\'s']"),  # Python's escapes in quotes
    ("route a\\ #b", "route a\\ #b"),  # an escaped space starts no comment
])
def test_strip_comment(line, kept):
    from jupyter_mesh.magics import strip_comment

    assert strip_comment(line) == kept


@pytest.mark.parametrize("sub, line, want", [
    ("start", "--cpu '1' --jax-cpu \"0\" --site 'edge' --threads '2'",
     {"cpu": "1", "jax_cpu": "0", "site": "edge", "threads": "2"}),
    ("scale", "--cpu '2'", {"cpu": "2"}),
    ("connect", "'tcp://127.0.0.1:8786' --timeout '5'",
     {"address": "tcp://127.0.0.1:8786", "timeout": "5"}),
    ("route", "'cpu:jax'", {"target": "cpu:jax"}),
    (None, "--remote --on 'cpu' --site \"lab\" -o 'res' --timeout '3' --push 'a'",
     {"on": "cpu", "site": "lab", "output": "res", "timeout": "3", "push": "a"}),
    (None, "--route 'cpu:jax'", {"route": "cpu:jax"}),
])
def test_every_option_takes_a_quoted_value(sub, line, want):
    # IPython's splitting keeps quotes; every option reads '1' as 1, as a shell would
    from jupyter_mesh import magics

    parser = magics._cell_args if sub is None else magics.PARSERS[sub]
    args = magics.parse(parser, line)
    assert {k: getattr(args, k) for k in want} == want


def test_a_trailing_comment_is_not_an_argument(ip, started, capsys):
    # lines copied with their comments, as the README shows them
    try:
        ip.run_line_magic("mesh", "route auto                # every compute routed")
        assert started.route_mode == "auto"
        ip.run_line_magic("mesh", "                          # status: devices by kind")
        assert "cpu @ magic-site: 1" in capsys.readouterr().out
        ip.run_cell("import dask.array as da; _c = da.ones((100, 100), chunks=50)")
        plan = ip.run_line_magic("mesh", "explain _c.sum()  # the plan, nothing runs")
        assert plan.rows and plan.route == "auto"
        ip.run_cell_magic("mesh", "--route off   # this cell unrouted",
                          "_t = _c.sum().compute()")
        assert ip.user_ns["_t"] == 10_000
        # a "#" inside a word or quotes is the user's own
        with pytest.raises(UsageError, match="'#x'"):
            ip.run_line_magic("mesh", "route '#x'  # not a route")
    finally:
        ip.run_line_magic("mesh", "route off  # back")
    assert started.route_mode == "off"


def test_a_start_that_fails_outside_the_mesh_is_one_line_and_keeps_the_mesh(
        ip, started, monkeypatch):
    # e.g. Dask's "Nanny failed to start worker process": no traceback wall
    def broken(*args, **kwargs):
        raise RuntimeError("Nanny failed to start worker process\nmore lines")

    monkeypatch.setattr(jm.Mesh, "local", broken)
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("mesh", "start --cpu 1 --replace")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(
        "the mesh did not start (RuntimeError: Nanny failed to start worker process)")
    assert jm.current() is started and not started.closed


def test_start_replace_while_routing(ip, started, capsys):
    # Nannies pickle dask's config; the kernel's router in it must not break them.
    ip.run_line_magic("mesh", "route auto")
    try:
        capsys.readouterr()
        ip.run_line_magic("mesh", "start --replace --cpu 1 --threads 1")
        new = jm.current()
        assert new is not started and started.closed
        assert new.inventory().by_kind() == {"cpu": 1}
        # the route ended with the mesh it was set on: said, not silently off
        assert new.route_mode == "off"
        assert ("Routing of plain Dask calls (auto) ended with the mesh it was set on: "
                "%mesh route auto routes them on this one.") in capsys.readouterr().out
        ip.run_line_magic("mesh", "route cpu")
        ip.run_line_magic("mesh", "close")
        assert capsys.readouterr().out.endswith(
            "Routing of plain Dask calls (cpu) ended with it.\n")
        ip.run_line_magic("mesh", "start --cpu 1 --threads 1")  # (no route, no word)
        assert "Routing" not in capsys.readouterr().out
    finally:
        ip.run_line_magic("mesh", "route off")


def test_start_replace_swaps_the_mesh(ip, started):
    ip.run_line_magic("mesh", "start --replace --cpu 1 --site second --threads 1")
    new = jm.current()
    assert new is not started and started.closed
    assert new.inventory()[0].site == "second"


def test_close_then_messages(ip, started, capsys):
    ip.run_line_magic("mesh", "close")
    assert "Closed the mesh" in capsys.readouterr().out
    assert started.closed and _state.active() is None
    ip.run_line_magic("mesh", "close")
    assert "No active mesh to close: run %mesh start" in capsys.readouterr().out
    ip.run_line_magic("mesh", "status")
    assert "No active mesh" in capsys.readouterr().out
    with pytest.raises(jm.MeshError, match="%mesh start"):
        jm.current()


@pytest.mark.parametrize("line", ["start --help", "connect -h", "route --help",
                                  "explain --help", "explain -h", "start\t--help"])
def test_help_shows_the_options_and_changes_nothing(ip, line, capsys):
    before = _state.active()
    ip.run_line_magic("mesh", line)
    out = capsys.readouterr().out
    assert out.startswith(f"usage: %mesh {line.split()[0]}")
    assert _state.active() is before


def test_subcommand_help_writes_the_usage_as_the_overview_does(ip, capsys):
    # the positional first (argparse put it last: "[--route ROUTE] EXPR", "... address")
    ip.run_line_magic("mesh", "explain --help")
    assert capsys.readouterr().out.startswith("usage: %mesh explain EXPR [--route TARGET]\n")
    ip.run_line_magic("mesh", "connect --help")
    assert capsys.readouterr().out.startswith(
        "usage: %mesh connect ADDRESS [--timeout S] [--tls-ca-file F] [--tls-cert F] "
        "[--tls-key F] [--replace]\n")


def test_help_without_subcommand_lists_them(ip, capsys):
    ip.run_line_magic("mesh", "--help")
    out = capsys.readouterr().out
    for sub in ("start", "connect ADDRESS", "status [--widget]", "scale [--cpu N] "
                "[--jax-cpu N] [--gpu N] [--tpu N]", "route", "explain EXPR", "calibrate",
                "reset-remote", "close", "%%mesh --remote"):
        assert f"%mesh {sub}" in out or sub in out, sub
    # and every option of the cell magic, whose own --help needs a cell body
    assert "usage: %%mesh [--route TARGET] [--remote]" in out
    for option in ("--on TARGET", "--push <a,b>", "--timeout S", "-o NAME, --output NAME"):
        assert option in out, option
    assert "cell body is empty" in str(ip.run_cell("%%mesh --help").error_in_exec)
    # IPython's own help (%mesh?) shows the same
    from jupyter_mesh.magics import HELP

    assert ip.find_line_magic("mesh").__doc__ == HELP
    ip.run_cell_magic("mesh", "--help", "raise SystemExit('the cell must not run')")
    assert capsys.readouterr().out.startswith("usage: %%mesh [--route TARGET] [--remote]")


NO_MESH = r"^no active mesh: run %mesh start \(or jm\.Mesh\.local\(\)\) or %mesh connect ADDRESS"


@pytest.mark.parametrize("line, cell", [
    ("route auto", None),
    ("route", None),
    ("explain y", None),
    ("explain y --route gpu", None),
    ("calibrate", None),
    ("reset-remote", None),
    ("", "raise SystemExit('the cell must not run')"),
    ("--route auto", "raise SystemExit('the cell must not run')"),
    ("--route off", "raise SystemExit('the cell must not run')"),
])
def test_without_a_mesh_each_says_to_start_or_connect_one(ip, monkeypatch, line, cell):
    monkeypatch.setattr(_state, "_current", None)
    ip.user_ns["y"] = 1
    with pytest.raises(UsageError, match=NO_MESH) as info:
        if cell is None:
            ip.run_line_magic("mesh", line)
        else:
            ip.run_cell_magic("mesh", line, cell)
    assert "\n" not in str(info.value)
    assert _state.active() is None and ip.user_ns["y"] == 1


@pytest.mark.parametrize("key, value, line, match", [
    ("connect-timeout", "soon", "connect tcp://127.0.0.1:9",
     r"^config mesh\.connect-timeout must be a number of seconds, not 'soon'$"),
    ("connect-timeout", -1, "connect tcp://127.0.0.1:9",
     r"^config mesh\.connect-timeout must be a positive number of seconds, not -1$"),
    ("local.host", "", "start --cpu 1 --gpu 0 --tpu 0",
     r"^config mesh\.local\.host must be an interface address like '127\.0\.0\.1'"),
    ("local.dashboard-address", "anywhere", "start --cpu 1 --gpu 0 --tpu 0",
     r"^config mesh\.local\.dashboard-address must be HOST:PORT"),
    ("profile.measure-seconds", "soon", "start --cpu 1 --gpu 0 --tpu 0",
     r"^config mesh\.profile\.measure-seconds must be a number of seconds, not 'soon'$"),
])
def test_bad_config_is_one_line_from_the_magics(ip, monkeypatch, key, value, line, match):
    import dask.config

    monkeypatch.setattr(_state, "_current", None)
    with dask.config.set({f"mesh.{key}": value}):
        with pytest.raises(UsageError, match=match) as info:
            ip.run_line_magic("mesh", line)
    assert "\n" not in str(info.value)
    assert _state.active() is None


def test_a_mesh_error_in_a_cell_is_one_line_saying_where(ip, capsys):
    # what to do, and the line of the cell it came from: not a traceback through the
    # mesh's internals; the cell still fails and the kernel goes on
    from jupyter_mesh import MeshConfigError, MeshError

    capsys.readouterr()
    result = ip.run_cell("import jupyter_mesh as _jm\n_before = 1\n"
                         "_jm.Mesh.connect('tcp://127.0.0.1:1', timeout=-1)")
    assert isinstance(result.error_in_exec, MeshError) and not result.success
    out = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(out) == 1, out
    assert "MeshError" in out[0] and "timeout must be a positive number" in out[0]
    assert out[0].endswith("line 3: _jm.Mesh.connect('tcp://127.0.0.1:1', timeout=-1)]")
    # its subclasses alike; other errors keep IPython's traceback
    result = ip.run_cell("raise _jm.MeshConfigError('mesh.x: use a number')")
    assert isinstance(result.error_in_exec, MeshConfigError)
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    # %tb, %debug and %pdb see it, as they see any error a cell shows
    import sys

    assert sys.last_value is result.error_in_exec
    ip.run_cell("def _f():\n    return 1 / 0\n_f()")
    assert "Traceback" in capsys.readouterr().out
    assert ip.run_cell("_before + 1").result == 2
    # with colours off, none
    colors = ip.colors
    try:
        ip.run_line_magic("colors", "nocolor")
        capsys.readouterr()
        ip.run_cell("raise _jm.MeshError('plain')")
        assert capsys.readouterr().out.startswith("MeshError: plain  [In [")
    finally:
        ip.run_line_magic("colors", colors)


def test_unload_ext_takes_the_magics_and_reload_brings_them_back(ip):
    from jupyter_mesh import MeshError

    assert "mesh" in ip.magics_manager.magics["line"]
    ip.run_line_magic("unload_ext", "jupyter_mesh")
    try:
        assert "mesh" not in ip.magics_manager.magics["line"]
        assert "mesh" not in ip.magics_manager.magics["cell"]
        assert MeshError not in tuple(ip.custom_exceptions)
    finally:
        ip.run_line_magic("load_ext", "jupyter_mesh")
    assert "mesh" in ip.magics_manager.magics["line"]
    assert "mesh" in ip.magics_manager.magics["cell"]
    assert tuple(ip.custom_exceptions) == (MeshError,)


@pytest.mark.parametrize("line, words", [
    ("--tls-ca-file /home/o'neil/ca.pem", ["--tls-ca-file", "/home/o'neil/ca.pem"]),
    ("--site lab\\one", ["--site", "lab\\one"]),  # a backslash stays as typed
    ("--on 'cpu:jax' --cpu 2", ["--on", "cpu:jax", "--cpu", "2"]),
    ('--site="my lab" --cpu 2', ["--site=my lab", "--cpu", "2"]),
    ('--tls-ca-file "/x y/ca.pem"', ["--tls-ca-file", "/x y/ca.pem"]),
    ("--tls-ca-file C:\\certs\\ca.pem", ["--tls-ca-file", "C:\\certs\\ca.pem"]),
    # both at once: the escaped space stays, the apostrophe too
    ("--tls-ca-file ~/my\\ o'neil/ca.pem", ["--tls-ca-file", "~/my o'neil/ca.pem"]),
    # a backslash-escaped space: split as a shell splits it
    ("--tls-ca-file ~/my\\ certs/ca.pem --cpu 2", ["--tls-ca-file", "~/my certs/ca.pem",
                                                     "--cpu", "2"]),
    # a no-break space (pasted from a web page) separates words too; inside quotes
    # it is the value's own
    ("--cpu\u00a01\u2009--site 'a\u00a0b'", ["--cpu", "1", "--site", "a\u00a0b"]),
])
def test_option_words(line, words):
    from jupyter_mesh import magics

    assert magics._argv(line) == words


def test_ctrl_c_during_start_is_one_line_that_says_what_is_current(ip, monkeypatch):
    # Mesh.local closes what it had started when interrupted (tests/test_mesh_local.py);
    # the magic said so in a traceback through magics.py, mesh.py and distributed
    from types import SimpleNamespace

    was = _state._current
    in_use = SimpleNamespace(address="tcp://127.0.0.1:8", closed=False)
    new = SimpleNamespace(address="tcp://127.0.0.1:9", closed=False)

    def interrupted(then):
        def local(**kwargs):
            then()
            raise KeyboardInterrupt
        return staticmethod(local)

    _state.set_current(in_use)
    try:
        monkeypatch.setattr(jm.Mesh, "local", interrupted(lambda: None))
        with pytest.raises(UsageError, match=r"^interrupted: no mesh started; the mesh "
                                             r"in use is kept$"):
            ip.run_line_magic("mesh", "start --replace --cpu 1 --gpu 0 --tpu 0")
        assert _state.active() is in_use
        # interrupted once the replaced mesh was closed, before the new one was up
        monkeypatch.setattr(jm.Mesh, "local", interrupted(lambda: _state.set_current(None)))
        with pytest.raises(UsageError, match=r"^interrupted: no mesh started; no mesh is "
                                             r"in use now$"):
            ip.run_line_magic("mesh", "start --replace --cpu 1 --gpu 0 --tpu 0")
        # interrupted once the new mesh was current: it is named, and kept
        monkeypatch.setattr(jm.Mesh, "local", interrupted(lambda: _state.set_current(new)))
        with pytest.raises(UsageError, match=r"^interrupted: the mesh at "
                                             r"tcp://127\.0\.0\.1:9 started and is the "
                                             r"current mesh; %mesh close it"):
            ip.run_line_magic("mesh", "start --replace --cpu 1 --gpu 0 --tpu 0")
        assert _state.active() is new
    finally:
        _state.set_current(was)
