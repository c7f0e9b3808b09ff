"""Progress bars for work that runs longer than ``mesh.progress-after`` seconds.

Routed computations (``mesh.compute``, ``%%mesh`` cells, ``with mesh.route(...)``) get
one bar per target (``cpu:numpy``, ``cpu:jax``, ``gpu:cupy``...), built on Dask's
:class:`~distributed.diagnostics.progressbar.MultiProgressWidget` (the scheduler reports
per group of keys); remote cells get one bar per worker with the time the cell has run.
In a notebook the bars are ipywidgets; elsewhere a one-line text bar on stderr (stdout
stays for the results). Quick work shows nothing.

The bars run on the mesh client's event loop, never on the kernel's (which is busy
running the cell), and only this module's code decides when to show them: the router
and remote cells call :class:`FuturesWatch` and :class:`RemoteWatch` at one place each.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.progress import format_time
from distributed.diagnostics.progressbar import MultiProgressBar, MultiProgressWidget

from . import _config

if TYPE_CHECKING:
    from .mesh import Mesh

#: seconds the end of a computation waits for its bar's last update
_FINAL_WAIT = 2.0


def progress_after() -> float:
    """Seconds work must run before a bar appears (``mesh.progress-after``).

    Raises
    ------
    MeshConfigError
        When the setting is negative or not a number; the message names the key.
    """
    return _config.get_seconds("progress-after")  # inf (".inf" in YAML): never a bar


def in_notebook() -> bool:
    """Whether output goes to a Jupyter frontend that can show ipywidgets."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None or getattr(shell, "kernel", None) is None:
            return False
        import ipywidgets  # noqa: F401
    except Exception:
        return False
    return True


def _display(obj: Any, text: str) -> str | None:
    """Show a widget; ``text`` stands in for it where widgets do not show (nbconvert,
    a viewer of the file), instead of the widget's repr. Returns the output's display
    id (for :func:`_freeze`), or None."""
    import uuid

    from IPython.display import display

    try:
        bundle = obj._repr_mimebundle_()
    except Exception:  # not a widget after all: show it as it is
        bundle = None
    if isinstance(bundle, dict) and bundle:
        display_id = uuid.uuid4().hex
        display({**bundle, "text/plain": text}, raw=True, display_id=display_id)
        return display_id
    display(obj)
    return None


def _update(bundle: dict[str, str], display_id: str) -> None:
    from IPython.display import update_display

    update_display(bundle, raw=True, display_id=display_id)


def _freeze(display_id: str | None, obj: Any, text: str) -> bool:
    """Replace a bar that has ended by a static copy of it (HTML): JupyterLab saves no
    widget's state unless asked to, and a saved notebook opened again (with a new
    kernel) showed "Error displaying widget: model not found" where the bar was.
    Whether it was replaced."""
    if display_id is None:
        return False
    try:  # a bar must never break the computation
        _update({"text/html": widget_html(obj), "text/plain": text}, display_id)
    except Exception:
        return False
    return True


def _close_tree(w: Any) -> None:
    """Close a tree of ipywidgets that shows nowhere any more (a bar replaced by its
    static copy): its models, their layouts and styles, and their comms, which the
    kernel and the notebook's widget manager otherwise keep for the whole session
    (23 a bar)."""
    with contextlib.suppress(Exception):
        close_parts(w)
        w.close()


def close_parts(w: Any) -> None:
    """Close what a widget is made of (its children's trees, its layout and style),
    not the widget itself: for a box's own ``close``."""
    from ipywidgets import Box, Widget

    if isinstance(w, Box):
        for child in w.children:
            _close_tree(child)
    for part in ("layout", "style"):
        sub = getattr(w, part, None)
        if isinstance(sub, Widget):
            sub.close()


#: colours of a progress bar's bar_style, as ipywidgets draws them (a fixed colour:
#: an untrusted notebook's sanitizer drops CSS variables)
_BAR_COLOURS = {"success": "#4caf50", "danger": "#f44336", "warning": "#ff9800",
                "info": "#2196f3", "": "#2196f3"}


def widget_html(w: Any) -> str:
    """A static HTML copy of a tree of ipywidgets (boxes, HTML and labels, progress
    bars) as it shows now."""
    import html

    from ipywidgets import HTML, Box, FloatProgress, HTMLMath, IntProgress, Label, VBox

    if isinstance(w, Box):
        direction = "column" if isinstance(w, VBox) else "row"
        inner = "".join(widget_html(c) for c in w.children)
        return (f'<div style="display:flex;flex-direction:{direction};gap:4px;'
                f'align-items:{"stretch" if direction == "column" else "center"}">'
                f"{inner}</div>")
    if isinstance(w, (HTML, HTMLMath)):
        return f"<div>{w.value}</div>"
    if isinstance(w, Label):
        return f"<span>{html.escape(str(w.value))}</span>"
    if isinstance(w, (FloatProgress, IntProgress)):
        span = (w.max - w.min) or 1
        pct = max(0.0, min(100.0, 100.0 * (w.value - w.min) / span))
        colour = _BAR_COLOURS.get(w.bar_style or "", _BAR_COLOURS[""])
        label = (f"<span>{html.escape(str(w.description))}</span>"
                 if getattr(w, "description", "") else "")
        return (f'{label}<div style="width:300px;height:14px;background:#e0e0e0">'
                f'<div style="width:{pct:.1f}%;height:100%;background:{colour}"></div>'
                f"</div>")
    value = getattr(w, "value", None)
    return f"<span>{html.escape(str(value if value is not None else ''))}</span>"


class GroupBy:
    """Key -> group (a target label), as the scheduler's progress plugin calls it.

    Pickled to the scheduler with the bar: a mapping and a default, nothing else.
    """

    def __init__(self, groups: Mapping[Any, str], default: str = "other") -> None:
        self.groups = dict(groups)
        self.default = default

    def __call__(self, key: Any) -> str:
        return self.groups.get(key, self.default)


#: what a bar says when its work stopped before the end
_STOPPED = "stopped before the end: interrupted or failed"


#: the most groups the text bar draws a bar for (the others count together)
TEXT_GROUPS = 4

#: where the text bar's stream is no terminal (a log file, a pipe): seconds between
#: two of its lines (it cannot redraw one in place there)
LOG_EVERY = 10.0


def _fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, an ellipsis saying so."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


class TextLine:
    """One line of progress on a text stream. On a terminal it is redrawn in place,
    never wider than the terminal (a wider line wraps, and each redraw leaves a row
    behind); elsewhere (a log file) it is written as a line of its own every
    :data:`LOG_EVERY` seconds, and at its end."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.tty = bool(self.stream.isatty())
        except Exception:
            self.tty = False
        #: whether the line is on the screen now (a terminal's last row)
        self.drawn = False
        self._logged_at: float | None = None

    def width(self) -> int:
        """The columns of the terminal this line is written to (``COLUMNS`` first, as
        ``shutil`` reads it; stdout may go to a file while this stream is a terminal),
        less one: a full row moves some terminals' cursor down."""
        import os
        import shutil

        try:
            columns = int(os.environ["COLUMNS"])
            if columns <= 0:
                raise ValueError(columns)  # (as shutil reads it)
        except (KeyError, ValueError):
            try:
                columns = os.get_terminal_size(self.stream.fileno()).columns
            except Exception:
                columns = shutil.get_terminal_size((80, 24)).columns
        return max(columns - 1, 1)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except ValueError:  # the stream was closed under us
            pass

    def draw(self, line: str) -> None:
        if self.tty:
            self._write("\r\x1b[K" + _fit(line, self.width()))
            self.drawn = True
            return
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            self._write(line + "\n")

    def end(self, line: str) -> None:
        if self.tty:
            self._write("\r\x1b[K" + _fit(line, self.width()) + "\n")
        else:
            self._write(line + "\n")
        self.drawn = False

    def clear(self) -> None:
        """Take the line off the screen (before other output: it starts on a line of
        its own; the next draw puts the line back under it)."""
        if self.tty and self.drawn:
            self._write("\r\x1b[K")
        self.drawn = False


class TextBars(MultiProgressBar):
    """Dask's multi-group progress as one line of text, rewritten in place."""

    def __init__(self, keys: Any, scheduler: Any = None, *, title: str = "",
                 stream: Any = None, width: int = 20, **kwargs: Any) -> None:
        super().__init__(keys, scheduler, **kwargs)
        self.title = title
        self.out = TextLine(stream)
        self.width = width
        self.finished = False
        self.last: tuple[Mapping[Any, int], Mapping[Any, int]] = ({}, {})

    def _line(self, remaining: Mapping[Any, int], all: Mapping[Any, int],
              end: str | None = None, room: int | None = None) -> str:
        groups = sorted(all, key=str)
        # one line: the groups past the first few count together
        shown = groups if len(groups) <= TEXT_GROUPS else groups[: TEXT_GROUPS - 1]
        rest = groups[len(shown):]

        def parts(width: int) -> list[str]:
            out = []
            for group in shown:
                n = all[group]
                done = n - remaining.get(group, 0)
                filled = int(width * done / n) if n else width
                bar = f" [{'#' * filled:<{width}}]" if width else ""
                out.append(f"{group}{bar} {done}/{n}")
            if rest:
                n = sum(all[g] for g in rest)
                done = n - sum(remaining.get(g, 0) for g in rest)
                out.append(f"{len(rest)} more groups {done}/{n}")
            return out

        # the time and how it ended are never cut: where the terminal is too narrow the
        # title gives way first, then the bars narrow, then the groups' text is cut
        last = " | ".join([format_time(self.elapsed).strip(), *([end] if end else [])])
        tail = ""
        for width in (self.width, 10, 5, 0):
            tail = " | ".join([*parts(width), last])
            if room is None or len(tail) <= room:
                break
        if room is not None and len(tail) > room:
            tail = f"{_fit(' | '.join(parts(0)), max(room - len(last) - 3, 1))} | {last}"
        if not self.title:
            return tail
        title = self.title if room is None else _fit(self.title, room - len(tail) - 2)
        return f"{title}: {tail}" if len(title) > 3 else tail

    def _room(self) -> int | None:
        return self.out.width() if self.out.tty else None

    def _draw_bar(self, remaining: Any, all: Any, status: Any = None, **kwargs: Any) -> None:
        self.last = (remaining, all)
        self.out.draw(self._line(remaining, all, room=self._room()))

    def _end(self, end: str) -> None:
        self.out.end(self._line(*self.last, end=end, room=self._room()))
        self.finished = True

    def _draw_stop(self, remaining: Any = None, status: Any = None, **kwargs: Any) -> None:
        self._end("finished" if status == "finished" else "stopped (error or cancelled)")

    def stop_here(self) -> None:
        """The work stopped before Dask's last word (Ctrl-C): the line says so."""
        self._end(_STOPPED)

    def done_here(self) -> None:
        """The work finished before Dask's last word reached the bar."""
        self._end("finished")


class WidgetBars(MultiProgressWidget):
    """Dask's multi-group progress widget, with a title, that says when it is done."""

    def __init__(self, keys: Any, scheduler: Any = None, *, title: str = "",
                 **kwargs: Any) -> None:
        super().__init__(keys, scheduler, **kwargs)
        from ipywidgets import HTML, VBox

        self.finished = False
        self.box = VBox([HTML(f"<b>{_escape(title)}</b>"), self.widget])

    def _draw_stop(self, *args: Any, **kwargs: Any) -> None:
        elapsed = getattr(self, "elapsed_time", None)
        # Dask's last line replaced before the browser gets it (hold_sync sends the
        # final value only): it closes one <div> too many, and puts an exception's
        # repr in the HTML as it is (a "<" in a task's message vanished, or was markup)
        hold = elapsed.hold_sync() if elapsed is not None else contextlib.nullcontext()
        try:
            with hold:
                super()._draw_stop(*args, **kwargs)
                if kwargs.get("status") != "error":
                    self._say("Finished:", "")
                else:
                    from distributed.core import clean_exception

                    _, exc, _ = clean_exception(kwargs.get("exception"))
                    self._say("Exception", f" <tt>{_escape(repr(exc))}</tt>", before=True)
        finally:
            self.finished = True

    def _say(self, what: str, why: str, before: bool = False) -> None:
        """The bar's last line: ``what``, the time, ``why`` (HTML); ``before``: ``why``
        first, then the time."""
        elapsed = getattr(self, "elapsed_time", None)
        if elapsed is not None:
            took = format_time(self.elapsed).strip()
            said = f"{why}: {took}" if before else f" {took}{why}"
            elapsed.value = (f'<div style="padding: 0px 10px 5px 10px"><b>{what}</b>'
                             f"{said}</div>")

    def stop_here(self) -> None:
        """The work stopped before Dask's last word (Ctrl-C): the bar says so, and
        the groups that did not finish turn red."""
        for bar in getattr(self, "bars", {}).values():
            if bar.value < 1.0:
                bar.bar_style = "danger"
        self._say("Stopped:", f" ({_STOPPED})")
        self.finished = True

    def done_here(self) -> None:
        """The work finished before Dask's last word reached the bar."""
        for bar in getattr(self, "bars", {}).values():
            bar.value = 1.0
            bar.bar_style = "success"
        self._say("Finished:", "")
        self.finished = True


class FuturesWatch:
    """Show a bar for Dask futures once they have run longer than the threshold.

    ``FuturesWatch(mesh, groups)`` before submitting (it reads the setting, and notes
    the scheduler's task-stream position for the report's timeline); ``started(futures)``
    after submitting waits at most what is left of the threshold and then shows the bar;
    ``stopped()`` when the work is over; ``timeline()`` returns the task stream of what
    ran since.

    Parameters
    ----------
    mesh:
        The mesh the work runs on.
    groups:
        Key -> bar (a target label); None groups by Dask's key prefix.
    title:
        Shown above (or before) the bars.
    timeline:
        False: the caller gets the task stream elsewhere (the scheduler plugin keeps a
        routed computation's), so this asks the scheduler for nothing.
    """

    def __init__(self, mesh: Mesh, groups: Mapping[Any, str] | None = None,
                 title: str = "jupyter_mesh", timeline: bool = True) -> None:
        self.after = progress_after()
        self.mesh = mesh
        self.groups = groups
        self.title = title
        self.t0 = time.perf_counter()
        self.bar: TextBars | WidgetBars | None = None
        self.cursor: int | None = None
        if not timeline:
            return
        try:
            client = mesh.client
            scheduler = client.scheduler  # None once the client lost its scheduler
            self.cursor = (client.sync(scheduler.get_task_stream_index)
                           if scheduler is not None else None)
        except Exception:
            self.cursor = None

    @property
    def shown(self) -> bool:
        return self.bar is not None

    def started(self, futures: list[Any], check: Any = None) -> None:
        """Wait up to the threshold for ``futures``; show the bar if they still run.
        ``check``, if given, is called every second of the wait and may raise (a mesh
        left without workers must not wait out the threshold first)."""
        # Wait on the futures' client-side callbacks: no round trips, no polling delay,
        # and no TimeoutError whose traceback would keep the futures (and their results
        # on the workers) alive.
        deadline = self.t0 + self.after
        left = [len(futures)]
        lock = threading.Lock()
        all_done = threading.Event()

        def one_done(_: Any) -> None:
            with lock:
                left[0] -= 1
                if left[0] <= 0:
                    all_done.set()

        if not futures or math.isinf(self.after):  # inf: bars off
            return
        for f in futures:
            f.add_done_callback(one_done)
        # a very large threshold must not overflow the wait
        while True:
            left_s = max(deadline - time.perf_counter(), 0.0)
            step = left_s if check is None else min(left_s, 1.0)
            if all_done.wait(min(step, threading.TIMEOUT_MAX)):
                return
            if left_s <= step:
                break
            if check is not None:
                check()
        try:
            self._show(futures)
        except Exception:  # a bar must never break the computation
            self.bar = None

    def _show(self, futures: list[Any]) -> None:
        client = self.mesh.client
        scheduler, loop = client.scheduler, client.loop
        if scheduler is None or loop is None:  # the client lost its scheduler: no bar
            return
        group_by: Any = GroupBy(self.groups) if self.groups is not None else "prefix"
        kwargs = dict(scheduler=scheduler.address, group_by=group_by,
                      complete=True, interval="200ms", title=self.title)
        bar: TextBars | WidgetBars
        if in_notebook():
            bar = WidgetBars(futures, **kwargs)
            self.display_id = _display(bar.box, f"{self.title}: progress bar (a widget)")
        else:
            bar = TextBars(futures, **kwargs)
        bar._start_time = self.t0  # elapsed counts from the submission, as Dask's does
        self.bar = bar

        async def listen() -> None:
            # Dask's listener raises when its comm closes (a bar stopped early, or a
            # scheduler gone): that ends the bar, quietly
            with contextlib.suppress(Exception):
                await bar.listen()

        loop.add_callback(listen)

    def stopped(self, aborted: bool = False) -> None:
        """The work is over: give the bar a moment for its final state. ``aborted``
        (an error, Ctrl-C): no waiting; the bar stops where it is."""
        bar = self.bar
        if bar is None:
            return
        deadline = time.monotonic() + (0.0 if aborted else _FINAL_WAIT)
        while not bar.finished and time.monotonic() < deadline:
            time.sleep(0.02)
        if not bar.finished:
            self.bar = None
            with contextlib.suppress(Exception):
                comm = getattr(bar, "comm", None)
                if comm is not None:
                    comm.abort()  # it listens no more
            with contextlib.suppress(Exception):
                if aborted:
                    bar.stop_here()  # not "Computing" for ever
                else:
                    bar.done_here()  # it finished; Dask's last word came late
        box = getattr(bar, "box", None)
        if box is not None and _freeze(  # (a widget bar, as it ended)
                getattr(self, "display_id", None), box, f"{self.title}: " + (
                    _STOPPED if aborted else "finished")):
            _close_tree(box)

    def timeline(self) -> list[dict[str, Any]] | None:
        """The scheduler's task-stream records (start and stop per task) since the
        watch began, or None when the scheduler could not say."""
        if self.cursor is None:
            return None
        client = self.mesh.client
        scheduler = client.scheduler
        if scheduler is None:
            return None
        try:
            return list(client.sync(scheduler.get_task_stream, start_index=self.cursor))
        except Exception:
            return None


class RemoteWatch:
    """Bars for a remote cell: one per worker, the seconds it has run so far.

    The remote-cell loop calls :meth:`tick` every few hundred milliseconds from the
    thread that runs the cell and :meth:`done` at the end.
    """

    def __init__(self, labels: list[str], timeout: float | None = None) -> None:
        self.after = progress_after()
        self.labels = labels
        self.timeout = timeout
        self.t0 = time.monotonic()
        self.widgets: dict[str, Any] | None = None
        self.box: Any = None
        self.text = False
        self.line: TextLine | None = None
        #: the cell's own output ended mid-line (a "\r" progress of its own, a prompt):
        #: the text bar waits for its next line instead of drawing over it
        self.mid_line = False
        #: how the cell ended on each worker it ended on so far: "finished" (green), or
        #: "failed", "timed out", "stopped" (red)
        self.ended: dict[str, str] = {}
        #: seconds after the start at which each worker's run ended
        self.finished_at: dict[str, float] = {}
        #: what the cell waits for, where it runs nowhere yet (its worker was gone)
        self.waiting: dict[str, str] = {}

    @property
    def shown(self) -> bool:
        return self.widgets is not None or self.text

    def wait_for(self, label: str, what: str) -> None:
        """The cell, sent to worker ``label``, found it gone and waits for another:
        the bar says ``what``, not that it runs there (until :meth:`relabel`)."""
        self.waiting[label] = what

    def tick(self, ended: dict[str, str] | None = None) -> None:
        """Draw the bars; ``ended``: the workers the cell ended on so far, each with
        how (see :attr:`ended`)."""
        elapsed = time.monotonic() - self.t0
        if ended is not None:
            for label in set(ended) - set(self.ended):
                self.finished_at[label] = elapsed
            self.ended = dict(ended)
        if not self.shown:
            if elapsed < self.after:
                return
            try:
                self._show()
            except Exception:
                self.text = False
                return
        with contextlib.suppress(Exception):  # a bar must never stop the cell
            self._draw(elapsed)

    def _show(self) -> None:
        if not in_notebook():
            self.text = True
            self.line = TextLine(sys.stderr)
            return
        from ipywidgets import HTML, FloatProgress, HBox, VBox

        widgets = {}
        rows = []
        for label in self.labels:
            bar = FloatProgress(min=0.0, max=1.0, value=0.0, bar_style="info")
            text = HTML("")
            widgets[label] = (bar, text)
            rows.append(HBox([bar, text]))
        self.widgets = widgets
        self.box = VBox([HTML("<b>remote cell</b>"), *rows])
        self.display_ids = [_display(self.box, "remote cell: progress bar (a widget)")]

    def show_again(self) -> None:
        """After the cell cleared its output (``clear_output`` on the worker), which
        took the bars with it: show them again, above what the cell shows next."""
        if self.widgets is not None:
            with contextlib.suppress(Exception):  # a bar must never stop the cell
                self.display_ids.append(
                    _display(self.box, "remote cell: progress bar (a widget)"))

    def _fraction(self, elapsed: float) -> float:
        if self.timeout:
            return min(elapsed / self.timeout, 1.0)
        return 1.0  # no end known: a full bar that says how long it has run

    def _draw(self, elapsed: float, end: str | None = None) -> None:
        spent = format_time(elapsed).strip()
        if self.widgets is not None:
            for label, (bar, text) in self.widgets.items():
                how = self.ended.get(label)
                if how is not None:  # ended on that worker, while others may run on
                    took = format_time(self.finished_at.get(label, elapsed)).strip()
                    bar.value = 1.0
                    bar.bar_style = "success" if how == "finished" else "danger"
                    text.value = f"{_escape(label)}: {how} after {took}"
                elif end is not None:
                    bar.value = 1.0
                    bar.bar_style = "success" if end == "finished" else "danger"
                    text.value = f"{_escape(label)}: {end} after {spent}"
                elif label in self.waiting:
                    text.value = f"{_escape(label)}: gone; {_escape(self.waiting[label])}"
                else:
                    bar.value = self._fraction(elapsed)
                    text.value = f"{_escape(label)}: running {spent}"
        elif self.line is not None:
            # what the cell printed last comes out before the line (stdout holds a line
            # back until its end; the line is on stderr)
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            running = [lb for lb in self.labels if lb not in self.ended]
            waits = [f"{lb} gone; {self.waiting[lb]}" for lb in running if lb in self.waiting]
            runs = [lb for lb in running if lb not in self.waiting]
            state = end or "; ".join(
                ([f"running on {', '.join(runs)}"] if runs else []) + waits)
            limit = f" of {self.timeout:g} s" if self.timeout else ""
            text = f"remote cell: {state} | {spent}{limit}"
            if end is not None:
                if self.mid_line:  # the cell's last line stays as it left it
                    self.line.clear()
                    self.line._write("\n")
                self.line.end(text)
            elif running and not self.mid_line:
                self.line.draw(text)

    def done(self, ok: bool = True, ended: dict[str, str] | None = None) -> None:
        """The end: each worker in ``ended`` as it ended there, the others (still
        running when the cell was given up) "finished" if ``ok``, else "stopped"."""
        if ended is not None:
            self.tick(ended)
        if self.shown:
            try:
                self._draw(time.monotonic() - self.t0, "finished" if ok else "stopped")
            except Exception:
                pass
            # (a static copy, which a notebook saved and opened again still shows)
            ids = list(getattr(self, "display_ids", ()))
            frozen = [_freeze(display_id, self.box, "remote cell: " + (
                "finished" if ok else "stopped")) for display_id in ids]
            box = getattr(self, "box", None)
            if ids and all(frozen) and box is not None:
                _close_tree(box)

    def clear_line(self) -> None:
        """Before the cell's output (or a message) in a terminal: take the text bar's
        line off, so the output starts where the cell left off (the next tick draws
        the bar again, under it)."""
        if self.line is not None:
            self.line.clear()

    def wrote(self, text: str) -> None:
        """The cell wrote ``text`` to the terminal: the bar waits while its line is
        not ended."""
        if text:
            self.mid_line = not text.endswith("\n")

    def relabel(self, old: str, new: str) -> None:
        """The cell moved from worker ``old`` to ``new`` (``old`` was gone)."""
        self.labels = [new if label == old else label for label in self.labels]
        self.waiting.pop(old, None)
        if self.widgets is not None and old in self.widgets:
            self.widgets = {new if k == old else k: v for k, v in self.widgets.items()}


def _escape(text: str) -> str:
    import html

    return html.escape(text)
