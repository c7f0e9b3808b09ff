"""The README's "Python API at a glance" says each name in its table has a docstring."""

from __future__ import annotations

import re
from pathlib import Path

import jupyter_mesh as jm

README = Path(__file__).resolve().parent.parent / "README.md"


def _table_names() -> list[str]:
    text = README.read_text()
    start = text.index("The Python API at a glance (each has a docstring):")
    table = text[start:text.index("\n\n", text.index("|---|", start))]
    names = []
    for row in table.splitlines():
        first = row.split("|")[1] if row.count("|") >= 2 else ""
        names += re.findall(r"`((?:jm|mesh)\.[A-Za-z_.]+)", first)
    return names


def test_every_name_in_the_readmes_api_table_has_a_docstring():
    # mesh.last_plan and mesh.last_report were plain attributes: help() showed
    # NoneType's
    names = _table_names()
    assert {"mesh.last_plan", "mesh.last_report", "jm.current", "mesh.submit"} <= set(names)
    missing = []
    for name in names:
        owner, _, attr = name.partition(".")
        obj = jm.Mesh if owner == "mesh" else jm
        for part in attr.split("."):
            obj = getattr(obj, part)
        if not (getattr(obj, "__doc__", None) or "").strip():
            missing.append(name)
    assert missing == []
