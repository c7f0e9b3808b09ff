"""Device kinds, backends and the target strings that name them.

A *target* is ``KIND`` or ``KIND:BACKEND`` (``gpu``, ``tpu``, ``cpu:jax``); ``auto``
lets the router choose and ``off`` disables routing.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS: tuple[str, ...] = ("cpu", "gpu", "tpu")
BACKENDS: tuple[str, ...] = ("numpy", "cupy", "jax")
DEFAULT_BACKEND: dict[str, str] = {"cpu": "numpy", "gpu": "cupy", "tpu": "jax"}
#: which backends can drive which kind
KIND_BACKENDS: dict[str, tuple[str, ...]] = {
    "cpu": ("numpy", "jax"),
    "gpu": ("cupy", "jax"),
    "tpu": ("jax",),
}
ROUTE_MODES: tuple[str, ...] = ("auto", "off")
RESOURCE_PREFIX = "mesh-"


@dataclass(frozen=True)
class Target:
    """Where work may run: a device kind and, optionally, the backend driving it."""

    kind: str
    backend: str | None = None

    def __str__(self) -> str:
        return self.kind if self.backend is None else f"{self.kind}:{self.backend}"

    def matches(self, kind: str, backend: str) -> bool:
        """Whether a device of ``kind`` driven by ``backend`` satisfies this target."""
        return kind == self.kind and (self.backend is None or backend == self.backend)

    @property
    def resource(self) -> str:
        """The Dask resource name that workers matching this target advertise."""
        if self.backend is None:
            return kind_resource(self.kind)
        return backend_resource(self.kind, self.backend)


def kind_resource(kind: str) -> str:
    return f"{RESOURCE_PREFIX}{kind}"


def backend_resource(kind: str, backend: str) -> str:
    return f"{RESOURCE_PREFIX}{kind}-{backend}"


def site_resource(site: str) -> str:
    """The Dask resource every worker at ``site`` advertises: restrictions to a site by
    resource hold for a worker that rejoins under a new address (a nanny's restart),
    where a list of addresses would not."""
    return f"{RESOURCE_PREFIX}site:{site}"


def kind_backends(kind: str) -> tuple[str, ...]:
    """The backends that can drive ``kind``: NumPy, CuPy and JAX as
    :data:`KIND_BACKENDS` says, and those of the ``jupyter_mesh.backends`` entry-point
    group that say they drive it."""
    from .router.backends import plugin_backends

    return KIND_BACKENDS[kind] + tuple(b.name for b in plugin_backends() if kind in b.kinds)


def allowed_targets() -> list[str]:
    """Every target string the mesh understands, for error messages."""
    out = list(KINDS)
    for kind in KINDS:
        out.extend(f"{kind}:{b}" for b in kind_backends(kind))
    return out


def parse_target(text: str) -> Target:
    """Parse ``KIND`` or ``KIND:BACKEND``; raise ``ValueError`` saying what is allowed."""
    if not isinstance(text, str):
        raise ValueError(
            f"a target must be a string such as 'gpu' or 'cpu:jax', not {type(text).__name__}"
        )
    raw = text.strip().lower()
    kind, sep, backend = raw.partition(":")
    kind, backend = kind.strip(), backend.strip()  # "cpu : jax" as "cpu:jax"
    if kind not in KINDS or (sep and backend not in KIND_BACKENDS[kind]
                             and backend not in kind_backends(kind)):
        from .router import backends

        broken = backends.broken_backends().get(backend) if sep else None
        raise ValueError(
            f"unknown target {text!r}: use one of {', '.join(allowed_targets())}"
            + (f" (backend {backend!r} is installed but did not load: {broken})"
               if broken else "")
        )
    return Target(kind, backend or None)


def parse_route(text: str) -> str | Target:
    """Parse a route: ``auto``, ``off`` or a target."""
    if isinstance(text, str) and text.strip().lower() in ROUTE_MODES:
        return text.strip().lower()
    try:
        return parse_target(text)
    except ValueError:
        raise ValueError(
            f"unknown route {text!r}: use auto, off or a target "
            f"({', '.join(allowed_targets())})"
        ) from None
