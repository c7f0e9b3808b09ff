"""``mesh.widget()``: an ipywidgets panel of the mesh, with scale and route controls.

The panel holds no logic of its own: it shows :meth:`Mesh.inventory`, calls
:meth:`Mesh.scale` and routes the kernel's plain Dask calls the way ``%mesh route``
does (:func:`jupyter_mesh.router.api.set_route`). A value the mesh refuses is shown in
the panel's message line; no exception escapes into the kernel.
"""

from __future__ import annotations

import contextlib
import html
import threading
import weakref
from typing import TYPE_CHECKING, Any

import ipywidgets as w
import numpy as np

from . import _state
from .errors import MeshError
from .inventory import (
    ERROR_COLOUR,
    OK_COLOUR,
    Inventory,
    colour_style,
    format_bytes,
    plural,
)

if TYPE_CHECKING:
    from .mesh import Mesh

#: families a local mesh can scale from the panel (GPU and TPU counts follow hardware)
SCALABLE = ("cpu", "jax_cpu")


def devices_html(inv: Inventory) -> str:
    """The devices grouped by kind and site, one row per device."""
    e = html.escape
    rows = []
    for (kind, site), devs in inv.groups().items():
        rows.append(
            f"<tr><th colspan='5' style='text-align:left'>{e(kind)} @ {e(site)}: "
            f"{len(devs)}</th></tr>"
        )
        # columns apart, and no cell wrapping mid-word
        td = "<td style='white-space:nowrap;padding:0 12px 0 0'>"
        for d in devs:
            rows.append(
                f"<tr>{td}{e(d.name or d.worker)}</td>{td}{e(d.backend)}</td>"
                f"{td}{e(d.model[:40])}</td>{td}{d.tasks} tasks</td>"
                f"{td}{format_bytes(d.memory_used)} / {format_bytes(d.memory)}</td></tr>"
            )
    if not rows:
        rows.append("<tr><td>no devices</td></tr>")
    return "<table class='jupyter-mesh-devices'>" + "".join(rows) + "</table>"


#: the shortest refresh interval of a panel (a shorter one would poll the scheduler
#: without pause)
MIN_REFRESH = 0.1
#: the longest refresh interval (a day): a thread's wait cannot take much more
MAX_REFRESH = 86400.0


class MeshPanel(w.VBox):
    """The mesh's devices by kind and site (refreshed live), scale and route controls.

    Parameters
    ----------
    mesh:
        The mesh to show and control.
    refresh:
        Seconds between refreshes of the device list; 0 turns live refresh off. The
        refresh stops when the panel is closed or the mesh closes.
    """

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        # where widgets do not show (nbconvert, a viewer of the file), the text stands
        # in: what the panel shows, not the widget's repr (JupyterLab itself says
        # "model not found" in a notebook saved without widget state: see the README)
        data = super()._repr_mimebundle_(**kwargs)
        if isinstance(data, dict):
            data["text/plain"] = self.text()
        return data

    def text(self) -> str:
        """The panel as text: the mesh's devices, and that the panel is a widget."""
        try:
            shown = repr(self.mesh.inventory())
        except Exception:  # closed, or its scheduler gone
            shown = repr(self.mesh)
        return f"{shown}\n(live panel: a widget, shown in a notebook)"

    def __init__(self, mesh: Mesh, refresh: float = 2.0, **kwargs: Any) -> None:
        if (isinstance(refresh, (bool, np.bool_))
                or not isinstance(refresh, (int, float, np.integer, np.floating))
                or not (refresh == 0 or MIN_REFRESH <= refresh <= MAX_REFRESH)):
            raise MeshError(f"refresh must be 0 (off) or a number of seconds from "
                            f"{MIN_REFRESH:g} to {MAX_REFRESH:g} (a day), not {refresh!r}")
        self.mesh = mesh
        self.interval = float(refresh)
        self.header = w.HTML()
        self.devices = w.HTML()
        self.message = w.HTML()
        self.route = w.Combobox(description="route", ensure_option=False,
                                placeholder="auto, off or a target such as cpu:jax",
                                layout=w.Layout(width="320px"))
        self.route_button = w.Button(description="Set route", icon="random")
        self.route_button.on_click(lambda _: self.set_route(self.route.value))
        controls: list[w.Widget] = [w.HBox([self.route, self.route_button])]
        self.counts: dict[str, w.IntText] = {}
        self.scale_button: w.Button | None = None
        if mesh.owns_cluster:
            live = mesh._live_counts()
            for fam in SCALABLE:
                self.counts[fam] = w.IntText(
                    value=live.get(fam, 0), description=fam,
                    layout=w.Layout(width="160px"))
            self.scale_button = w.Button(description="Scale", icon="sliders")
            self.scale_button.on_click(lambda _: self.scale())
            controls.append(w.HBox([*self.counts.values(), self.scale_button]))
        #: per count box, the mesh's count it last showed: a box the user has not
        #: changed since follows the mesh when it is scaled elsewhere
        self._shown = {fam: box.value for fam, box in self.counts.items()}
        self.route.value = self._route_shown = str(mesh.route_mode)
        #: the last refresh could not read the inventory (its message is shown)
        self._unread = False
        super().__init__([self.header, self.devices, *controls, self.message], **kwargs)
        self.add_class("jupyter-mesh-widget")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        _state.listeners.append(self._on_mesh_event)
        self.refresh()
        if self.interval > 0 and not mesh.closed:
            # one panel per mesh refreshes: a cell run again made a new one each time,
            # and the old ones, out of sight, went on reading the mesh until it closed
            ref = _LIVE.get(mesh)
            older = ref() if ref is not None else None
            if older is not None and older is not self:
                older._superseded()
            _LIVE[mesh] = weakref.ref(self)
            self._thread = threading.Thread(target=self._loop, name="jupyter-mesh-widget",
                                            daemon=True)
            self._thread.start()

    def _superseded(self) -> None:
        self._stop.set()
        self._say("This panel no longer refreshes: a newer panel of this mesh does "
                  "(panel.refresh() updates this one).")

    # ------------------------------------------------------------ state
    @property
    def refreshing(self) -> bool:
        """Whether the live refresh is running."""
        return self._thread is not None and self._thread.is_alive()

    def refresh(self) -> None:
        """Show the mesh's devices now."""
        mesh = self.mesh
        if mesh.closed:
            self.header.value = "<b>Mesh</b> (closed)"
            self.devices.value = ""
            self.message.value = ""  # what it said was about the mesh that ran
            self._disable()
            return
        try:
            inv = mesh.inventory()
        except Exception as exc:
            why = _first_line(exc)
            self._say(f"could not read the inventory: {why}", error=True)
            self._unread = True
            # the devices as last read stay, said to be so; the header counts nothing
            # (a bad setting is no sign that the scheduler is out of reach)
            state = ("devices not read: a setting is wrong (see below)"
                     if why.startswith("config ") else "not reachable now")
            self.header.value = (
                f"<b>Mesh</b> <code>{html.escape(mesh.address or '')}</code>: {state} (the "
                f"devices below are as last read)")
            return
        if self._unread:  # it reads again: the error no longer holds
            self._unread = False
            self.message.value = ""
        link = inv.dashboard or mesh.dashboard_link
        dash = (f" &middot; <a href='{html.escape(link)}' target='_blank' rel='noopener noreferrer'>dashboard</a>"
                if link else "")
        self.header.value = (
            f"<b>Mesh</b> <code>{html.escape(inv.address or mesh.address)}</code>: "
            f"{plural(len(inv), 'device')} ({html.escape(inv.summary())}){dash} &middot; "
            f"routing: <code>{html.escape(str(mesh.route_mode))}</code>"
        )
        self.devices.value = devices_html(inv)
        # a box the user has not changed follows the mesh: scaled elsewhere (%mesh
        # scale, mesh.scale), or a worker that died and is not restarted
        live = mesh._live_counts() if self.counts else {}
        for fam, box in self.counts.items():
            now = live.get(fam, 0)
            if box.value == self._shown.get(fam) and box.value != now:
                box.value = now
            self._shown[fam] = now
        route = str(mesh.route_mode)  # the route box likewise (%mesh route, mesh.route)
        if self.route.value == self._route_shown and self.route.value != route:
            self.route.value = route
        self._route_shown = route
        options = ["auto", "off", *sorted(inv.by_target())]
        if list(self.route.options) != options:
            self.route.options = options

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self.mesh.closed:
                break
            self.refresh()
        self.refresh()  # a last look: shows "closed" when the mesh went away

    def _on_mesh_event(self, event: str, mesh: Any) -> None:
        if event == "close" and mesh is self.mesh:
            self._stop.set()
            _LIVE.pop(mesh, None)
            # every panel of it says so at once, one a newer panel superseded too
            # (it showed the devices and live buttons of a mesh that was gone)
            self.refresh()
            # nothing more to hear about: the closed mesh is not kept alive through it
            with contextlib.suppress(ValueError):
                _state.listeners.remove(self._on_mesh_event)

    def close(self) -> None:
        """Close the panel and stop its refresh."""
        stop = getattr(self, "_stop", None)  # None: __init__ refused its arguments
        if stop is not None:
            stop.set()
        try:
            _state.listeners.remove(self._on_mesh_event)
        except ValueError:
            pass
        # its parts too: the kernel and the notebook otherwise keep their models and
        # comms for the whole session (29 a panel), and the buttons' callbacks the
        # panel and its mesh
        from .progress import close_parts

        with contextlib.suppress(Exception):
            close_parts(self)
        super().close()

    def _disable(self) -> None:
        for control in (self.route, self.route_button, self.scale_button,
                        *self.counts.values()):
            if control is not None:
                control.disabled = True

    def _say(self, text: str, error: bool = False) -> None:
        colour = ERROR_COLOUR if error else OK_COLOUR
        self.message.value = (f"<span style='{colour_style(colour)}'>"
                              f"{html.escape(text)}</span>")

    # ------------------------------------------------------------ controls
    def set_route(self, value: Any) -> bool:
        """Route the kernel's plain Dask calls as ``%mesh route VALUE`` does."""
        from .router import api

        text = str(value).strip() if value is not None else ""
        if not text:
            self._say("type a route: auto, off or a target such as cpu:jax", error=True)
            return False
        try:
            self.mesh._check_open()
            api.set_route(self.mesh, text)
        except Exception as exc:  # shown in the panel, never raised into the kernel
            self._say(f"route {text!r} refused: {_first_line(exc)}", error=True)
            self.route.value = self._route_shown = str(self.mesh.route_mode)
            return False
        self._say("routing off: plain Dask calls run where Dask puts them" if text == "off"
                  else f"routing plain Dask calls: {self.mesh.route_mode}")
        self.refresh()
        return True

    def scale(self) -> bool:
        """Scale the local mesh to the counts in the panel."""
        counts = {fam: box.value for fam, box in self.counts.items()}
        if not counts:
            self._say("this mesh was connected to, not started here: it cannot scale",
                      error=True)
            return False
        self._say("scaling to " + ", ".join(f"{k}={v}" for k, v in counts.items()) + " ...")
        try:
            self.mesh.scale(**counts)
        except Exception as exc:
            self._say(f"scale refused: {_first_line(exc)}", error=True)
            live = self.mesh._live_counts()
            for fam, box in self.counts.items():
                box.value = self._shown[fam] = live.get(fam, 0)
            return False
        self._say("scaled to " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        self.refresh()
        return True


#: the panel of each mesh that refreshes (weakly: a panel holds its mesh, and this
#: must keep neither alive)
_LIVE: weakref.WeakKeyDictionary[Any, weakref.ref[MeshPanel]] = weakref.WeakKeyDictionary()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
