"""Errors raised by jupyter_mesh."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar, cast

_F = TypeVar("_F", bound=Callable[..., Any])


class MeshError(RuntimeError):
    """A mesh cannot do what was asked; the message says what to do instead."""


class MeshConfigError(MeshError, ValueError):
    """A ``mesh.*`` Dask config value is invalid; the message names the key."""


class MeshFallbackWarning(RuntimeWarning):
    """A routed computation lost a device kind and finished on what was left."""


def check_flag(name: str, value: object) -> bool:
    """``value`` of the keyword ``name`` is True or False: a truthy ``"no"`` must not
    pass for True."""
    if not isinstance(value, bool):
        raise MeshError(f"{name}= takes True or False, not {value!r}")
    return value


def keywords_checked(fn: _F) -> _F:
    """A public function or method whose arguments are checked before it runs: a
    misspelled keyword or one positional too many is a one-line :class:`MeshError`
    that names what it takes (and the keyword meant), as ``mesh.compute`` says it,
    where Python gave a ``TypeError`` traceback."""
    import functools
    import inspect

    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    # (said without annotations: "(address, security=None, ...)")
    shown = sig.replace(parameters=[p.replace(annotation=p.empty) for p in params],
                        return_annotation=sig.empty)
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    open_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
    qualname = fn.__qualname__

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise _misnamed(qualname, shown, names, open_kwargs, kwargs, exc) from None
        return fn(*args, **kwargs)

    return cast("_F", checked)


def _misnamed(qualname: str, shown: Any, names: list[str], open_kwargs: bool,
              kwargs: dict[str, Any], exc: TypeError) -> MeshError:
    import difflib

    unknown = [k for k in kwargs if k not in names] if not open_kwargs else []
    if unknown:
        typo = unknown[0]
        near = ([n for n in names if n.startswith(typo) or typo.startswith(n)]
                or difflib.get_close_matches(typo, names, n=1, cutoff=0.6))
        takes = ", ".join(f"{n}=" for n in names) or "no keywords"
        return MeshError(f"{qualname} takes {takes}, not {typo}="
                         + (f": did you mean {near[0]}=?" if near else ""))
    params = list(shown.parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params) or "positional" not in str(exc):
        # (a required argument left out: inspect's own words name it)
        return MeshError(f"{qualname}: {exc}: it takes {shown}")
    first = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not params:
        return MeshError(f"{qualname} takes no arguments")
    if not first:
        return MeshError(f"{qualname} takes its arguments by name"
                         + (f" ({', '.join(f'{n}=' for n in names)})" if names else "")
                         + ", not by position")
    return MeshError(f"{qualname} takes at most {len(first)} by position ({', '.join(first)}): "
                     f"give the others by name, of {', '.join(f'{n}=' for n in names)}")


#: the packages whose frames stand between a user's code and a warning of jupyter_mesh
#: (Dask's, for a plain ``.compute()`` inside ``mesh.route``; IPython's, for a magic)
_BETWEEN = ("dask", "distributed", "IPython")


#: the most characters of a given value a message repeats (a request's body can be
#: megabytes)
SAID_MAX = 80


def said(value: Any, limit: int = SAID_MAX) -> str:
    """``repr(value)`` for a message, cut to ``limit`` characters (and how many the
    whole has) where it is longer."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def said_json(value: Any, limit: int = SAID_MAX) -> str:
    """A value of a JSON request body for a message, spelled as JSON spells it
    (``true``, ``"5"``, ``NaN``), cut as :func:`said` cuts it."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return said(value, limit)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def listed(names: Any, most: int = 8) -> str:
    """``names`` joined with commas, the first ``most`` of them and how many more."""
    names = [str(n) if len(str(n)) <= SAID_MAX else said(str(n)) for n in names]
    if len(names) <= most:
        return ", ".join(names)
    return f"{', '.join(names[:most])} and {len(names) - most} more"


def callers_level() -> int:
    """The ``stacklevel`` that points a warning from the function calling this at the
    user's own code: the first frame outside jupyter_mesh, Dask, distributed and
    IPython (a ``%mesh`` magic's line in a cell, a ``.compute()`` in a script)."""
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    dirs = [here]
    for name in _BETWEEN:
        path = getattr(sys.modules.get(name), "__file__", None)
        if path:
            dirs.append(os.path.dirname(path) + os.sep)
    skip = tuple(dirs)
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


#: jupyter_mesh's own frames between a user's call and the user's function that raised
#: (the router, the device wrapper on the worker, ``Mesh.compute``'s helpers)
_OURS = r"jupyter_mesh[\\/](router[\\/]|mesh\.py)"
OUR_FRAMES = re.compile(".*" + _OURS)


def shorten_ours_in_dask() -> None:
    """Put jupyter_mesh's frames in Dask's ``admin.traceback.shorten``, so that a
    Future's ``result()`` (``mesh.submit``'s) leaves them out as it leaves out Dask's
    own. A list the user emptied (every frame shown) stays empty."""
    import dask.config

    paths = dask.config.get("admin.traceback.shorten", None)
    if paths and _OURS not in paths:
        dask.config.set({"admin.traceback.shorten": [*paths, _OURS]})


class shorten_ours:
    """Context manager: an exception leaving it shows the user's call and the user's
    function, not jupyter_mesh's frames between them, as Dask leaves its own out
    (``dask.utils.shorten_traceback``; off, as Dask's is, where the user emptied
    ``admin.traceback.shorten``). The last frame (where it was raised) always stays;
    the first (the one holding this block) too, unless ``drop_first``: then the
    traceback starts below it (Python 3.11 and later)."""

    __slots__ = ("drop_first",)

    def __init__(self, drop_first: bool = False) -> None:
        self.drop_first = drop_first

    def __enter__(self) -> None:
        pass

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None or tb is None:
            return
        import dask.config

        if not dask.config.get("admin.traceback.shorten", None):
            return
        exc.__traceback__ = _without_ours(tb, self.drop_first)


def _without_ours(tb: TracebackType, drop_first: bool) -> TracebackType:
    head = tb
    prev = tb
    curr = tb.tb_next
    while curr is not None:
        if curr.tb_next is None or not OUR_FRAMES.match(curr.tb_frame.f_code.co_filename):
            prev.tb_next = curr
            prev = curr
        curr = curr.tb_next
    if drop_first and head.tb_next is not None and sys.version_info >= (3, 11):
        return head.tb_next
    return head
