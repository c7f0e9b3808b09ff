"""Progress bars: shown once work runs past ``mesh.progress-after``, never for quick work.

The threshold is set small here (0.2 s) against work that takes a second or more; the
quick work finishes well inside it.
"""

from __future__ import annotations

import re
import time

import dask
import dask.array as da
import pytest

from jupyter_mesh import MeshConfigError, progress

from .meshes import fresh_local_mesh, widget_tree


@pytest.fixture(scope="module")
def mesh():
    with fresh_local_mesh(cpu=1, jax_cpu=1, threads_per_worker=1) as m:
        yield m


@pytest.fixture
def quick_threshold():
    with dask.config.set({"mesh.progress-after": 0.2}):
        yield


def sleepy(n: int, seconds: float = 0.6) -> list:
    """``n`` tasks that each sleep (time.sleep pickles by reference)."""
    return [dask.delayed(time.sleep)(seconds, dask_key_name=f"sleepy-{i}-{seconds}")
            for i in range(n)]


def _nap(block):
    time.sleep(0.05)  # 16 blocks: the pipeline outlasts a 0.2 s threshold on any machine
    return block


#: one bar of the text progress: (target, done, total)
BAR = r"((?:cpu:\w+(?: \(numpy\))?)|any \(pools equivalent\)) \[#+\] (\d+)/(\d+)"


def plan_targets(report) -> set[str]:
    """The targets a report's rows name (a row of several: ``a×3 + b×1``)."""
    out = set()
    for row in report.rows:
        for part in row["target"].split(" + "):
            out.add(re.sub(r"×\d+$", "", part))
    return out


def slow_pipeline():
    x = da.random.random((800, 800), chunks=200)
    return ((x @ x.T).map_blocks(_nap, dtype=float) + 1).sum(axis=0)


@pytest.mark.parametrize("value", [-1, "soon", None, float("nan")])
def test_bad_progress_after_is_a_config_error_naming_the_key(value):
    with dask.config.set({"mesh.progress-after": value}):
        with pytest.raises(MeshConfigError, match="mesh.progress-after"):
            progress.progress_after()


@pytest.mark.parametrize("route", ["auto", "off", "cpu"])
def test_bad_progress_after_fails_compute_before_anything_runs(mesh, route):
    x = da.ones(10, chunks=5)
    mesh.compute(x.sum(), route="auto")
    plan, report = mesh.last_plan, mesh.last_report
    assert plan is not None and report is not None
    with dask.config.set({"mesh.progress-after": -2}):
        with pytest.raises(MeshConfigError, match="mesh.progress-after"):
            mesh.compute(x.sum(), route=route)
        # nothing was lost: the last computation's plan and report are still there
        assert mesh.last_plan is plan and mesh.last_report is report
        if route != "off":  # (a block routing nothing leaves plain Dask as it is)
            with pytest.raises(MeshConfigError, match="mesh.progress-after"), \
                    mesh.route(route):
                x.sum().compute()
            assert mesh.last_plan is plan and mesh.last_report is report
    # the mesh is fine afterwards
    assert mesh.compute(x.sum())[0] == 10


def test_default_threshold_is_two_seconds():
    assert progress.progress_after() == 2.0


def test_slow_routed_cell_shows_a_bar_per_target(ip, mesh, quick_threshold, capfd):
    ip.user_ns["sleepy"] = sleepy
    ip.run_cell_magic("mesh", "--route auto", "import dask\nout = dask.compute(*sleepy(2))")
    err = capfd.readouterr().err
    assert "route=auto:" in err
    final = err.strip().split("\r")[-1]
    assert final.endswith("finished")
    # a bar per target the plan used, each full, two tasks in all
    bars = re.findall(BAR, final)
    assert bars and {t for t, _, _ in bars} <= plan_targets(mesh.last_report)
    assert all(d == n for _, d, n in bars) and sum(int(n) for _, _, n in bars) == 2


def test_quick_routed_cell_shows_nothing(ip, mesh, quick_threshold, capfd):
    ip.run_cell_magic("mesh", "--route auto",
                      "import dask.array as da\nv = da.ones(8, chunks=4).sum().compute()")
    err = capfd.readouterr().err
    assert ip.user_ns["v"] == 8
    assert "route=" not in err and "[#" not in err


def test_default_threshold_hides_a_one_second_computation(mesh, capfd):
    mesh.compute(*sleepy(1, 0.5))
    assert "route=" not in capfd.readouterr().err


def test_compute_groups_bars_by_target(mesh, quick_threshold, capfd):
    (total,) = mesh.compute(slow_pipeline(), route="auto")
    assert total.shape == (800,)
    err = capfd.readouterr().err
    assert "route=auto" in err
    # the bars are the plan's targets: the pools it restricts ops to, or, where every
    # worker runs every op as fast and Dask places them, one bar saying so
    shown = {t for t, _, _ in re.findall(BAR, err)}
    assert shown and shown <= plan_targets(mesh.last_report)


def test_a_bar_over_fused_tasks_says_what_it_counts(mesh, quick_threshold, capfd):
    # the plan fuses the chain on one worker: the bar counts fewer tasks than the
    # report's rows, and says so
    (total,) = mesh.compute(slow_pipeline(), route="cpu:jax")
    err = capfd.readouterr().err
    report = mesh.last_report
    assert report.fused, "nothing was fused: this test needs a plan that fuses"
    assert (f"route=cpu:jax: Dask's tasks as submitted (a fused chain or batch is one; "
            f"the plan's {report.plan.ntasks} count each op):") in err
    counted = sum(int(n) for _, _, n in re.findall(BAR, err.strip().split("\r")[-1]))
    assert 0 < counted < report.plan.ntasks


def test_route_off_compute_shows_a_bar_too(mesh, quick_threshold, capfd):
    mesh.compute(*sleepy(2, 0.7), route="off")
    err = capfd.readouterr().err
    assert "route=off:" in err and "finished" in err


def test_report_timeline_comes_from_the_task_stream(mesh):
    mesh.compute(slow_pipeline(), route="cpu:jax")
    report = mesh.last_report
    assert report.timeline, "the scheduler's task stream was not recorded"
    from jupyter_mesh import viz

    bars, real = viz.measured_bars(report)
    assert real and {b["worker"] for b in bars} <= {d.name for d in mesh.inventory()}


def test_in_a_notebook_the_bar_is_a_widget(mesh, quick_threshold, monkeypatch):
    shown = []
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    monkeypatch.setattr(progress, "_display", lambda obj, text: shown.append(obj))
    mesh.compute(*sleepy(2))
    assert len(shown) == 1
    box = shown[0]
    from ipywidgets import VBox

    assert isinstance(box, VBox)
    bars_widget = box.children[1]
    elapsed, rows = bars_widget.children
    assert "Finished" in elapsed.value
    labels = [row.children[2].value for row in rows.children]
    targets = plan_targets(mesh.last_report)
    assert labels and all(any(t in lb for t in targets) for lb in labels)
    assert all(row.children[1].bar_style == "success" for row in rows.children)


@pytest.mark.parametrize("notebook", [True, False])
def test_an_interrupted_computation_leaves_its_bar_saying_so(mesh, quick_threshold,
                                                             monkeypatch, capfd, notebook):
    # Ctrl-C while the bar shows: it must not say "Computing" for ever
    from jupyter_mesh.router import api

    shown = []
    monkeypatch.setattr(progress, "in_notebook", lambda: notebook)
    monkeypatch.setattr(progress, "_display", lambda obj, text: shown.append(obj))

    def interrupted(*args, **kwargs):
        time.sleep(0.8)  # the bar is up and drawn (threshold 0.2 s, updates every 0.2 s)
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "_wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mesh.compute(*sleepy(2, 2.0))
    if notebook:
        (box,) = shown
        elapsed, rows = box.children[1].children
        assert "Stopped" in elapsed.value and "interrupted" in elapsed.value
        assert all(row.children[1].bar_style == "danger" for row in rows.children)
    else:
        err = capfd.readouterr().err
        assert err.rstrip("\n").endswith("stopped before the end: interrupted or failed")


def test_a_finished_widget_bar_is_well_formed_html(mesh, quick_threshold, monkeypatch):
    from html.parser import HTMLParser

    shown = []
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    monkeypatch.setattr(progress, "_display", lambda obj, text: shown.append(obj))
    mesh.compute(*sleepy(2))
    elapsed = shown[0].children[1].children[0].value

    class Depth(HTMLParser):
        depth = 0

        def handle_starttag(self, tag, attrs):
            self.depth += 1

        def handle_endtag(self, tag):
            self.depth -= 1
            assert self.depth >= 0, elapsed

    parser = Depth()
    parser.feed(elapsed)
    assert parser.depth == 0 and "Finished" in elapsed


def _fails_with_markup(seconds):
    time.sleep(seconds)
    raise ValueError("ev<i>il</i>&amp;<img src=x onerror=alert(1)>")


def test_a_tasks_error_in_the_bar_is_text_not_markup(mesh, quick_threshold, monkeypatch):
    # one output failed while another still ran: Dask's line put the exception's repr
    # in the bar's HTML as it was (and the saved copy kept it)
    from html.parser import HTMLParser

    shown, sent = [], []
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    monkeypatch.setattr(progress, "_display", lambda obj, text: shown.append(obj))
    # every state the widgets send the browser (Dask's raw line was sent, then ours)
    from ipywidgets import Widget

    notify = Widget.notify_change

    def recording(self, change):  # (sent at once, unless held by hold_sync)
        if change["name"] == "value" and not self._holding_sync:
            sent.append(str(change["new"]))
        return notify(self, change)

    monkeypatch.setattr(Widget, "notify_change", recording)
    with pytest.raises(ValueError, match="ev<i>il"):
        mesh.compute(dask.delayed(time.sleep)(1.5, dask_key_name="slow-one"),
                     dask.delayed(_fails_with_markup)(0.5), route="off")
    elapsed = shown[0].children[1].children[0].value
    assert "&lt;img src=x onerror=alert(1)&gt;" in elapsed and "<img" not in elapsed
    assert not [v for v in sent if "<img" in v], sent
    assert "&amp;amp;" in elapsed and "<i>" not in elapsed
    tags = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append(tag)

    Tags().feed(elapsed)
    assert set(tags) <= {"div", "b", "tt"}, tags


def test_a_bar_left_in_a_saved_notebook_reads_as_a_line_not_a_widget_repr(monkeypatch):
    # where widgets do not show (nbconvert, a viewer of the file), the output's text
    # stands in: a line that says what was there; the output has an id, so that the
    # bar's static copy replaces it at its end
    import IPython.display
    from ipywidgets import HTML, VBox

    sent = []
    monkeypatch.setattr(IPython.display, "display",
                        lambda obj, raw=False, display_id=None: sent.append(
                            (obj, raw, display_id)))
    got = progress._display(VBox([HTML("<b>route=auto</b>")]),
                            "route=auto: progress bar (a widget)")
    ((bundle, raw, display_id),) = sent
    assert raw and bundle["text/plain"] == "route=auto: progress bar (a widget)"
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert display_id and got == display_id


def test_slow_remote_cell_shows_the_time_it_has_run(mesh, quick_threshold, capfd):
    mesh.run_cell("import time\ntime.sleep(1.0)", on="cpu")
    err = capfd.readouterr().err
    assert "remote cell: finished" in err


def test_quick_remote_cell_shows_nothing(mesh, quick_threshold, capfd):
    mesh.run_cell("x = 1", on="cpu")
    assert "remote cell" not in capfd.readouterr().err


def test_remote_widget_bar_per_worker(mesh, quick_threshold, monkeypatch):
    shown = []
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    monkeypatch.setattr(progress, "_display", lambda obj, text: shown.append(obj))
    mesh.run_cell("import time\ntime.sleep(0.8)", on="cpu:jax", timeout=30)
    assert len(shown) == 1
    rows = shown[0].children[1:]
    assert len(rows) == 1
    bar, text = rows[0].children
    assert bar.bar_style == "success" and "finished after" in text.value
    assert "jax" in text.value  # the worker's name


def test_bad_progress_after_rejects_a_remote_cell_before_it_runs(mesh):
    with dask.config.set({"mesh.progress-after": "later"}):
        with pytest.raises(MeshConfigError, match="mesh.progress-after"):
            mesh.run_cell("y = 2", on="cpu")


def test_a_shown_bar_does_not_keep_the_results_alive(mesh, quick_threshold, capfd):
    # the same keys twice in a row: the second run must run its tasks again
    for _ in range(2):
        mesh.compute(*sleepy(2, 0.4))
        assert "finished" in capfd.readouterr().err
        assert len(mesh.last_report.records) == 2


@pytest.mark.parametrize("value", [float("inf"), 1e12, "inf"])
def test_an_infinite_threshold_means_no_bar(mesh, value, capfd):
    # ".inf" in the YAML turns bars off; it must not break the computation
    with dask.config.set({"mesh.progress-after": value}):
        for route in ("off", "auto"):
            (total,) = mesh.compute(da.ones(8, chunks=4).sum(), route=route)
            assert total == 8
    assert "[#" not in capfd.readouterr().err


def test_a_worker_that_finished_shows_green_while_others_run(monkeypatch):
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    monkeypatch.setattr(progress, "_display", lambda obj, text: None)
    watch = progress.RemoteWatch(["cpu-0", "cpu-1"], timeout=None)
    watch.after = 0.0
    watch.tick({})
    time.sleep(0.2)
    watch.tick({"cpu-0": "finished"})
    time.sleep(0.3)
    watch.tick({"cpu-0": "finished"})
    (bar0, text0), (bar1, text1) = watch.widgets["cpu-0"], watch.widgets["cpu-1"]
    assert bar0.bar_style == "success" and "cpu-0: finished after 0.2" in text0.value
    assert "running" in text1.value
    watch.done(ok=False)  # the other one was stopped
    assert bar0.bar_style == "success" and bar1.bar_style == "danger"
    assert "cpu-1: stopped after" in text1.value


def test_a_worker_the_cell_failed_or_timed_out_on_is_red_and_says_so(monkeypatch):
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    monkeypatch.setattr(progress, "_display", lambda obj, text: None)
    watch = progress.RemoteWatch(["cpu-0", "jax-cpu-0", "cpu-1"], timeout=None)
    watch.after = 0.0
    watch.tick({})
    time.sleep(0.2)
    watch.tick({"cpu-0": "failed"})  # it raised, while the others run on
    bar0, text0 = watch.widgets["cpu-0"]
    assert bar0.bar_style == "danger" and text0.value.startswith("cpu-0: failed after ")
    first = text0.value
    time.sleep(0.2)
    # the last ones end together with the loop: done() draws how each ended
    watch.done(ok=False, ended={"cpu-0": "failed", "jax-cpu-0": "finished",
                                "cpu-1": "timed out"})
    (bar1, text1), (bar2, text2) = watch.widgets["jax-cpu-0"], watch.widgets["cpu-1"]
    assert bar1.bar_style == "success" and text1.value.startswith("jax-cpu-0: finished after ")
    assert bar2.bar_style == "danger" and text2.value.startswith("cpu-1: timed out after ")
    assert (bar0.bar_style, text0.value) == ("danger", first)  # as it was


def test_an_error_drawing_the_remote_bar_does_not_stop_the_cell(monkeypatch):
    watch = progress.RemoteWatch(["cpu-0"], timeout=None)
    watch.after = 0.0
    watch.text = True

    def broken(*args):
        raise ValueError("I/O operation on closed file")

    monkeypatch.setattr(watch, "_draw", broken)
    watch.tick({})  # no exception


def _boom(block):
    time.sleep(0.6)
    raise ValueError("boom")


def test_a_failing_route_off_computation_releases_its_work(mesh, quick_threshold, capfd):
    y = da.ones(4, chunks=2).map_blocks(_boom, dtype=float).sum()
    with pytest.raises(ValueError, match="boom"):
        mesh.compute(y, route="off")
    deadline = time.monotonic() + 10
    while mesh.client.futures and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not mesh.client.futures  # the scheduler may drop all of it
    err = capfd.readouterr().err
    assert "route=off" in err and err.endswith("\n")  # the bar's line ended


def test_the_text_bar_stays_one_short_line_with_many_groups():
    # a line wider than the terminal wraps, and every redraw with "\r" leaves a line
    # behind: past TEXT_GROUPS groups, the others are counted together
    from types import SimpleNamespace

    fake = SimpleNamespace(width=10, title="route=off", elapsed=1.5)
    few = {"a": 4, "b": 2}
    line = progress.TextBars._line(fake, {"a": 1, "b": 0}, few)
    assert line.startswith("route=off: a [#######   ] 3/4 | b [##########] 2/2 | ")
    many = {f"group-{k:02d}": 2 for k in range(32)}
    line = progress.TextBars._line(fake, {g: 1 for g in many}, many)
    assert line.count("[") == progress.TEXT_GROUPS - 1
    assert f"{32 - progress.TEXT_GROUPS + 1} more groups 29/58" in line
    assert len(line) < 200


class _Terminal:
    """A stream that says it is a terminal, and keeps what was written."""

    def __init__(self):
        self.written = []

    def isatty(self):
        return True

    def write(self, text):
        self.written.append(text)

    def flush(self):
        pass

    def screen(self) -> list[str]:
        """The rows a terminal shows (\r goes back to the row's start, \x1b[K clears
        to its end)."""
        rows, col = [""], 0
        for ch in "".join(self.written).replace("\x1b[K", "\0"):
            if ch == "\n":
                rows.append("")
                col = 0
            elif ch == "\r":
                col = 0
            elif ch == "\0":
                rows[-1] = rows[-1][:col]
            else:
                rows[-1] = rows[-1][:col] + ch + rows[-1][col + 1:]
                col += 1
        return rows


def _bars(stream, title):
    bars = progress.TextBars.__new__(progress.TextBars)  # no scheduler: drawing only
    bars.title, bars.out, bars.width, bars.finished = title, progress.TextLine(stream), 20, False
    bars.last = ({}, {})
    bars._start_time = time.perf_counter() - 1.5  # (as Dask times it)
    return bars


def test_the_text_bar_fits_the_terminal_and_ends_on_one_row(monkeypatch):
    # a title of 120 characters on an 80-column terminal wrapped, and every redraw left
    # a row behind
    monkeypatch.setenv("COLUMNS", "80")
    term = _Terminal()
    bars = _bars(term, "route=auto: Dask's tasks as submitted " + "x" * 90)
    for left in (3, 2, 1):
        bars._draw_bar({"cpu:numpy": left}, {"cpu:numpy": 4})
    bars.done_here()
    rows = term.screen()
    assert rows[-1] == "" and len(rows) == 2, rows  # one row, ended
    (row,) = rows[:-1]
    assert len(row) <= 79 and row.startswith("route=auto: Dask's ")
    assert "…: cpu:numpy [" in row and row.endswith(" | finished")  # the title gave way


def test_a_text_bar_into_a_log_file_writes_a_line_now_and_then(monkeypatch):
    # no terminal: a redraw in place is impossible, and one line per 200 ms flooded logs
    import io

    log = io.StringIO()
    bars = _bars(log, "route=off")
    for left in range(50, 0, -1):
        bars._draw_bar({"a": left}, {"a": 50})
    bars.stop_here()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue()
    assert lines[0].startswith("route=off: a [") and lines[0].endswith("0/50 | 1.5s")
    assert lines[1].endswith(progress._STOPPED)


def test_the_remote_text_bar_leaves_the_cells_own_line_alone(monkeypatch):
    # a cell that draws its own "\r" progress: the bar drew over it and wiped it
    monkeypatch.setenv("COLUMNS", "80")
    term = _Terminal()
    monkeypatch.setattr(progress.sys, "stderr", term)
    monkeypatch.setattr(progress, "in_notebook", lambda: False)
    watch = progress.RemoteWatch(["cpu-0"], timeout=None)
    watch.after = 0.0
    watch.tick({})
    for pct in (10, 100):
        watch.clear_line()
        term.write(f"\rloading {pct:3d}%")
        watch.wrote(f"\rloading {pct:3d}%")
        watch.tick({})  # the cell's line is not ended: no bar over it
    watch.done(True, {"cpu-0": "finished"})
    rows = term.screen()
    assert rows[0] == "loading 100%", rows
    assert rows[1].startswith("remote cell: finished | ") and rows[2] == ""
    # output that ends its line: the bar is drawn under it, and taken off before more
    term.written.clear()
    watch = progress.RemoteWatch(["cpu-0"], timeout=None)
    watch.after = 0.0
    watch.tick({})
    watch.clear_line()
    term.write("result ready\n")
    watch.wrote("result ready\n")
    watch.tick({})
    watch.done(True, {"cpu-0": "finished"})
    assert term.screen() == ["result ready", term.screen()[1], ""]
    assert term.screen()[1].startswith("remote cell: finished | ")


def _remote_watch(monkeypatch, label, notebook):
    """A remote cell's bar for worker ``label``, shown at once, in a notebook (widgets)
    or a terminal (the returned screen)."""
    term = _Terminal()
    monkeypatch.setattr(progress.sys, "stderr", term)
    monkeypatch.setattr(progress, "in_notebook", lambda: notebook)
    watch = progress.RemoteWatch([label], timeout=None)
    watch.after = 0.0
    return watch, term


def test_the_remote_bar_names_the_worker_that_took_over(monkeypatch):
    # the cell's sticky worker was gone and another ran it: the bar named the dead one
    watch, _ = _remote_watch(monkeypatch, "cpu-0", notebook=True)
    watch.tick({})
    watch.relabel("cpu-0", "cpu-1")
    watch.tick({})
    ((bar, text),) = watch.widgets.values()
    assert list(watch.widgets) == ["cpu-1"] and text.value.startswith("cpu-1: running ")
    watch, term = _remote_watch(monkeypatch, "cpu-0", notebook=False)
    watch.relabel("cpu-0", "cpu-1")
    watch.tick({})
    assert term.screen()[0].startswith("remote cell: running on cpu-1 | ")


def test_the_remote_bar_says_a_cell_waits_for_another_worker(monkeypatch):
    # while a gone worker's cell waits for another (mesh.remote.worker-wait), the bar
    # said "running on" the dead worker for the whole wait
    watch, term = _remote_watch(monkeypatch, "cloud-1", notebook=False)
    watch.wait_for("cloud-1", "looking for another worker (site='cloud')")
    watch.tick({})
    line = term.screen()[0]
    assert line.startswith("remote cell: cloud-1 gone; looking for another worker "
                           "(site='cloud') | ") and "running on" not in line
    watch.relabel("cloud-1", "cloud-2")  # one came: it runs there
    watch.tick({})
    assert term.screen()[0].startswith("remote cell: running on cloud-2 | ")
    watch, _ = _remote_watch(monkeypatch, "cloud-1", notebook=True)
    watch.wait_for("cloud-1", "looking for another worker (site='cloud')")
    watch.tick({})
    ((bar, text),) = watch.widgets.values()
    assert text.value == "cloud-1: gone; looking for another worker (site=&#x27;cloud&#x27;)"


def test_a_narrow_terminal_keeps_the_time_and_the_ending(monkeypatch):
    # two targets of 40 tasks on 80 columns: the line was cut at its end, and said
    # neither how long it ran nor how it ended
    monkeypatch.setenv("COLUMNS", "80")
    term = _Terminal()
    bars = _bars(term, "route=auto: Dask's tasks as submitted")
    done = {"cpu:jax": 40, "cpu:numpy": 40}
    bars._draw_bar({"cpu:jax": 0, "cpu:numpy": 0}, done)
    bars.done_here()
    (row,) = term.screen()[:-1]
    assert len(row) <= 79 and row.endswith(" | 1.5s | finished"), row
    assert "cpu:jax" in row and "40/40" in row
    monkeypatch.setenv("COLUMNS", "60")  # narrower than the groups' text: it is cut
    term.written.clear()
    bars.stop_here()
    (row,) = term.screen()[:-1]
    assert len(row) <= 59 and row.endswith(f"… | 1.5s | {progress._STOPPED}"), row


def test_the_width_is_the_bars_own_terminals(monkeypatch):
    # stdout to a file, stderr on a terminal of 50 columns: the width was read from
    # stdout (80), and the line wrapped
    import fcntl
    import os
    import struct
    import termios

    monkeypatch.delenv("COLUMNS", raising=False)
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 50, 0, 0))
    with os.fdopen(slave, "w") as stream:
        assert progress.TextLine(stream).width() == 49
    os.close(master)


def test_the_cells_own_text_comes_out_before_the_line(monkeypatch):
    # stdout holds back a line until its end: the line (on stderr) came out first, and
    # the cell's "partial: " after it
    events = []

    class Out:
        def write(self, text):
            events.append(("stdout", text))

        def flush(self):
            events.append(("stdout flushed",))

    class Err(_Terminal):
        def write(self, text):
            events.append(("stderr", text))

    monkeypatch.setattr(progress.sys, "stdout", Out())
    monkeypatch.setattr(progress.sys, "stderr", Err())
    monkeypatch.setattr(progress, "in_notebook", lambda: False)
    watch = progress.RemoteWatch(["cpu-0"], timeout=None)
    watch.after = 0.0
    watch.done(True, {"cpu-0": "finished"})
    first_line = next(i for i, e in enumerate(events) if e[0] == "stderr")
    assert ("stdout flushed",) in events[:first_line]


def _freezes(monkeypatch):
    """Bars shown (with a display id each) and the static copies that replace them."""
    shown, updates = [], []

    def display(obj, text):
        shown.append(obj)
        return f"id-{len(shown)}"

    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    monkeypatch.setattr(progress, "_display", display)
    monkeypatch.setattr(progress, "_update", lambda bundle, display_id: updates.append(
        (display_id, bundle)))
    return shown, updates


def test_a_finished_bar_is_replaced_by_a_static_copy(mesh, quick_threshold, monkeypatch):
    # JupyterLab saves no widget state unless asked: a saved notebook opened again with
    # a new kernel said "Error displaying widget: model not found" where each bar was
    shown, updates = _freezes(monkeypatch)
    mesh.compute(*sleepy(2))
    ((display_id, bundle),) = updates
    assert display_id == "id-1"
    assert bundle["text/plain"].endswith(": finished")
    html = bundle["text/html"]
    assert "Finished" in html and "width:100.0%" in html and "#4caf50" in html  # green
    for row in shown[0].children[1].children[1].children:
        assert row.children[2].value in html  # each target's label and count
    # its widgets, shown nowhere now, are closed (their models and comms stayed for
    # the whole session: 23 a bar)
    widgets = list(widget_tree(shown[0]))
    assert len(widgets) > 10 and all(w.comm is None for w in widgets)


def test_a_remote_cells_bar_is_replaced_by_a_static_copy_at_its_end(monkeypatch):
    shown, updates = _freezes(monkeypatch)
    watch = progress.RemoteWatch(["cpu-0", "jax-cpu-0"], timeout=None)
    watch.after = 0.0
    watch.tick({})
    watch.show_again()  # (after the cell cleared its output)
    watch.done(ok=True, ended={"cpu-0": "finished", "jax-cpu-0": "failed"})
    assert [u[0] for u in updates] == ["id-1", "id-2"]
    html = updates[-1][1]["text/html"]
    assert "cpu-0: finished after" in html and "jax-cpu-0: failed after" in html
    assert "#4caf50" in html and "#f44336" in html  # green and red
    assert updates[-1][1]["text/plain"] == "remote cell: finished"
    assert shown[0].comm is None and all(c.comm is None for c in shown[0].children)


def test_a_static_copy_shows_what_the_widgets_show():
    from ipywidgets import HTML, FloatProgress, HBox, IntProgress, Label, VBox

    box = VBox([HTML("<b>title</b>"),
                HBox([IntProgress(value=3, max=4, bar_style="danger", description="d"),
                      Label("a < b")]),
                FloatProgress(value=0.5, min=0.0, max=1.0)])
    html = progress.widget_html(box)
    assert "<b>title</b>" in html and "a &lt; b" in html
    assert "width:75.0%" in html and "#f44336" in html and "<span>d</span>" in html
    assert "width:50.0%" in html and "flex-direction:row" in html
