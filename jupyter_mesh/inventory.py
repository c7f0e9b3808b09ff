"""The mesh's devices as the notebook sees them: :class:`Device` and :class:`Inventory`."""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .devices._profile import Profile
from .errors import MeshError, keywords_checked
from .targets import Target, parse_target

#: text colours of the HTML reprs and the panel: JupyterLab's theme colours where they
#: are defined (readable in its light and dark themes: the fixed #b00020 read at 2.6:1
#: on the dark theme's background), else these
ERROR_COLOUR = "var(--jp-error-color1, #b00020)"
OK_COLOUR = "var(--jp-success-color0, #2e7d32)"


def colour_style(colour: str) -> str:
    """A ``style`` attribute's text colour: the fixed fallback first, then the theme's.
    JupyterLab's sanitizer (an untrusted notebook's HTML output) drops a ``var()``
    colour; a browser takes the last it understands."""
    fallback = colour.rsplit(",", 1)[-1].strip(" )") if colour.startswith("var(") \
        else colour
    return f"color:{fallback};color:{colour}" if fallback != colour else f"color:{colour}"


def format_ms(seconds: float) -> str:
    """Seconds as milliseconds, in two significant figures below 100 ms and as whole
    milliseconds above (``.2g`` wrote 123 ms as "1.2e+02 ms")."""
    ms = seconds * 1e3
    return f"{ms:.2g} ms" if abs(ms) < 99.5 else f"{ms:.0f} ms"


def format_bytes(n: float | int | None) -> str:
    if not n:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        # (by the number as it is written: 1048575 B is 1.0 MiB, not 1024.0 KiB)
        if round(value, 0 if unit == "B" else 1) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


@dataclass
class Device:
    """One device of the mesh: a Dask worker driving one CPU process, GPU or TPU."""

    worker: str
    kind: str
    backend: str
    model: str
    memory: int
    site: str
    profile: Profile | None
    name: str = ""
    host: str = ""
    nthreads: int = 1
    tasks: int = 0
    memory_used: int = 0
    managed: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def profile_text(self) -> str:
        """The profile in words; a CPU worker of another backend (JAX on the CPU) adds
        the NumPy figures it measured too (it runs NumPy where that is faster)."""
        text = self.profile.summary() if self.profile else "no profile"
        rec = (self.extra or {}).get("numpy_profile")
        if isinstance(rec, dict):
            try:
                numpy = Profile.from_dict(rec)
            except (TypeError, ValueError, KeyError):
                return text
            text += (f"; NumPy {numpy.flops32 / 1e9:,.0f} GFLOP/s fp32, "
                     f"{numpy.flops64 / 1e9:,.0f} fp64")
        return text

    @property
    def target(self) -> str:
        """``KIND:BACKEND`` of this device."""
        return f"{self.kind}:{self.backend}"

    def matches(self, target: str | Target) -> bool:
        t = parse_target(target) if isinstance(target, str) else target
        return t.matches(self.kind, self.backend)

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Device:
        known = {
            "worker", "kind", "backend", "model", "memory", "site", "profile", "name",
            "host", "nthreads", "tasks", "memory_used", "managed",
        }
        prof = rec.get("profile")
        return cls(
            worker=rec["worker"],
            kind=rec.get("kind", "cpu"),
            backend=rec.get("backend", "numpy"),
            model=rec.get("model", ""),
            memory=int(rec.get("memory") or 0),
            site=rec.get("site", "unknown"),
            profile=Profile.from_dict(prof) if prof else None,
            name=str(rec.get("name", "")),
            host=rec.get("host", ""),
            nthreads=int(rec.get("nthreads") or 1),
            tasks=int(rec.get("tasks") or 0),
            memory_used=int(rec.get("memory_used") or 0),
            managed=bool(rec.get("managed", True)),
            extra={k: v for k, v in rec.items() if k not in known},
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "worker": self.worker, "name": self.name, "kind": self.kind,
            "backend": self.backend, "model": self.model, "memory": self.memory,
            "memory_used": self.memory_used, "site": self.site, "host": self.host,
            "nthreads": self.nthreads, "tasks": self.tasks, "managed": self.managed,
            "profile": self.profile.to_dict() if self.profile else None, **self.extra,
        }



def plural(n: int, word: str) -> str:
    """``n`` and ``word``, plural but for one: "1 device", "3 devices"."""
    return f"{n} {word}{'' if n == 1 else 's'}"

class Inventory:
    """The devices of a mesh at one moment, grouped by kind and site.

    Iterating yields :class:`Device` records.
    """

    def __init__(
        self,
        devices: Iterable[Device],
        address: str = "",
        dashboard: str | None = None,
    ) -> None:
        self.devices: list[Device] = sorted(
            devices, key=lambda d: (d.kind, d.site, d.backend, d.name, d.worker)
        )
        from ._links import safe_link

        self.address = address
        self.dashboard = safe_link(dashboard)  # only a link a browser may open

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]], address: str = "",
                     dashboard: str | None = None) -> Inventory:
        return cls([Device.from_record(r) for r in records], address, dashboard)

    def __iter__(self) -> Iterator[Device]:
        return iter(self.devices)

    def __len__(self) -> int:
        return len(self.devices)

    def __getitem__(self, i: int) -> Device:
        return self.devices[i]

    def by_kind(self) -> dict[str, int]:
        """Number of devices per kind, e.g. ``{"cpu": 2, "gpu": 4}``."""
        return dict(Counter(d.kind for d in self.devices))

    def by_target(self) -> dict[str, int]:
        """Number of devices per ``KIND:BACKEND``."""
        return dict(Counter(d.target for d in self.devices))

    def by_site(self) -> dict[str, int]:
        """Number of devices per site, e.g. ``{"local": 2, "edge-lab": 1}``."""
        return dict(Counter(d.site for d in self.devices))

    def groups(self) -> dict[tuple[str, str], list[Device]]:
        """Devices grouped by (kind, site)."""
        out: dict[tuple[str, str], list[Device]] = {}
        for d in self.devices:
            out.setdefault((d.kind, d.site), []).append(d)
        return out

    @keywords_checked
    def select(self, target: str | Target | None = None, site: str | None = None) -> Inventory:
        """The devices matching a target and/or a site."""
        if isinstance(target, str):
            try:
                t: Target | None = parse_target(target)
            except ValueError as exc:
                raise MeshError(str(exc).splitlines()[0]) from None
        elif target is None or isinstance(target, Target):
            t = target
        else:
            raise MeshError(f"a target is a string such as 'gpu', 'cpu' or 'cpu:jax', not "
                            f"{type(target).__name__} {target!r}")
        if site is not None and not isinstance(site, str):
            raise MeshError(f"site must be a site name such as 'local', not "
                            f"{type(site).__name__} {site!r}")
        devs = [
            d for d in self.devices
            if (t is None or d.matches(t)) and (site is None or d.site == site)
        ]
        return Inventory(devs, self.address, self.dashboard)

    def summary(self) -> str:
        if not self.devices:
            return "no devices"
        return ", ".join(f"{n} {k}" for k, n in sorted(self.by_kind().items()))

    def __repr__(self) -> str:
        lines = [f"Mesh inventory at {self.address or '?'}: {plural(len(self), 'device')} "
                 f"({self.summary()})"]
        if self.dashboard:
            lines.append(f"dashboard: {self.dashboard}")
        # columns as wide as the longest name (Dask names a worker by its address)
        width = max([12, *(len(d.name or d.worker) for d in self)])
        # and the models' as the longest model (at most 40), not padded to 40 each
        model = max([0, *(len(d.model[:40]) for d in self)])
        for (kind, site), devs in self.groups().items():
            lines.append(f"{kind} @ {site}: {len(devs)}")
            for d in devs:
                prof = d.profile_text()
                lines.append(
                    f"  {d.name or d.worker:<{width}} {d.backend:<6} {d.model[:40]:<{model}} "
                    f"mem {format_bytes(d.memory_used)}/{format_bytes(d.memory)}  "
                    f"tasks {d.tasks}  {prof}"
                )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        e = html.escape
        head = (
            f"<div class='jupyter-mesh-inventory'><b>Mesh</b> at <code>{e(self.address)}</code>: "
            f"{plural(len(self), 'device')} ({e(self.summary())})"
        )
        if self.dashboard:
            head += f" &middot; <a href='{e(self.dashboard)}' target='_blank' rel='noopener noreferrer'>dashboard</a>"
        rows = []
        for (kind, site), devs in self.groups().items():
            rows.append(
                f"<tr><th colspan='6' style='text-align:left'>{e(kind)} @ {e(site)} "
                f"({len(devs)})</th></tr>"
            )
            for d in devs:
                prof = e(d.profile_text())
                # (no cell but the profile wraps mid-word: "jax-cpu- / 0")
                td = "<td style='white-space:nowrap'>"
                rows.append(
                    "<tr>"
                    f"{td}{e(d.name or d.worker)}</td>{td}{e(d.backend)}</td>"
                    f"<td>{e(d.model)}</td>"
                    f"{td}{format_bytes(d.memory_used)} / {format_bytes(d.memory)}</td>"
                    f"{td}{d.tasks}</td><td>{prof}</td></tr>"
                )
        table = (
            "<table><thead><tr><th>device</th><th>backend</th><th>model</th>"
            "<th>memory</th><th>tasks</th><th>profile</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>"
        )
        return head + table + "</div>"
