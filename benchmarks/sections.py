"""Each benchmark owns one section of benchmarks/RESULTS.md, between its markers."""

from __future__ import annotations

import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def replace_section(begin: str, end: str, section: str, path: str = RESULTS) -> None:
    """Replace only the text between ``begin`` and ``end`` (other sections are others');
    append the section, with its markers, where it is not there yet."""
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    block = f"{begin}\n{section}{end}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail.lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    with open(path, "w") as f:
        f.write(text)
