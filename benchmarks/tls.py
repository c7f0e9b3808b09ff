"""What TLS costs a local mesh (``mesh.local.tls``, on by default under JupyterHub).

One command::

    .venv/bin/python benchmarks/tls.py            # prints a Markdown report
    .venv/bin/python benchmarks/tls.py --update   # and rewrites its section of
                                                  # benchmarks/RESULTS.md

Two local meshes run side by side in this process, the same in all but TLS (2 CPU
workers of one thread each): one over plain ``tcp://`` on 127.0.0.1, one over
``tls://`` with a certificate made for it. The same work runs on each in turn, the
order changing from round to round, so load from elsewhere hits both alike; the table
gives medians and the ratio TLS / plain.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

try:  # run as `python -m benchmarks.NAME` or as a script
    from .sections import replace_section
except ImportError:
    from sections import replace_section  # type: ignore[no-redef]

BEGIN = "<!-- tls:begin (written by benchmarks/tls.py) -->"
END = "<!-- tls:end -->"


def _inc(x: int) -> int:
    return x + 1


def workloads(mesh: Any) -> dict[str, Callable[[], Any]]:
    import dask.array as da

    client = mesh.client

    def many_small_tasks() -> Any:
        # 300 tasks of nothing: what Dask's own messages cost per task
        return client.gather(client.map(_inc, range(300), pure=False))

    def array_with_transfers() -> Any:
        # a matrix product of 4 x 4 blocks: blocks of 2 MB cross between the workers
        x = da.random.random((2000, 2000), chunks=500)
        return client.compute((x @ x.T).sum(), sync=True)

    def remote_cell() -> Any:
        return mesh.run_cell("pass")

    return {"300 no-op tasks": many_small_tasks,
            "2000x2000 matmul, 64 blocks moved": array_with_transfers,
            "remote cell round trip": remote_cell}


def measure(rounds: int) -> dict[str, dict[str, float]]:
    import dask

    import jupyter_mesh as jm

    meshes = {}
    for name, tls in (("plain", False), ("tls", True)):
        with dask.config.set({"mesh.local.tls": tls}):
            meshes[name] = jm.Mesh.local(cpu=2, gpu=0, tpu=0, jax_cpu=0,
                                         threads_per_worker=1, set_current=False)
    try:
        assert meshes["tls"].address.startswith("tls://")
        assert meshes["plain"].address.startswith("tcp://")
        work = {name: workloads(m) for name, m in meshes.items()}
        times: dict[str, dict[str, list[float]]] = {
            w: {"plain": [], "tls": []} for w in work["plain"]}
        for r in range(rounds + 1):  # the first round warms up (imports, connections)
            order = ("plain", "tls") if r % 2 else ("tls", "plain")
            for w in times:
                for name in order:
                    t0 = time.perf_counter()
                    work[name][w]()
                    if r:
                        times[w][name].append(time.perf_counter() - t0)
        return {w: {k: statistics.median(v) for k, v in t.items()} for w, t in times.items()}
    finally:
        for m in meshes.values():
            m.close()


def report(rows: dict[str, dict[str, float]], rounds: int) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "## TLS on a local mesh",
        "",
        f"`benchmarks/tls.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{platform.machine()} with {os.cpu_count()} cores shared with other work, "
        f"Python {platform.python_version()}. Two local meshes side by side, the same "
        f"but for TLS (`mesh.local.tls`, on by default under JupyterHub): 2 CPU workers "
        f"of one thread each on 127.0.0.1; medians of {rounds} rounds after one warm-up "
        f"round, the two meshes taking turns. Load average when written: {load:.2f}.",
        "",
        "| work | plain tcp:// | tls:// | TLS / plain |",
        "|---|---:|---:|---:|",
    ]
    for work, t in rows.items():
        lines.append(f"| {work} | {t['plain'] * 1e3:.1f} ms | {t['tls'] * 1e3:.1f} ms | "
                     f"{t['tls'] / t['plain']:.2f}x |")
    return "\n".join(lines) + "\n\n"


def update_results(section: str) -> None:
    replace_section(BEGIN, END, section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (>= 5)")
    parser.add_argument("--update", action="store_true",
                        help="write the section 'TLS on a local mesh' of RESULTS.md")
    args = parser.parse_args()
    if args.rounds < 5:
        parser.error("--rounds must be at least 5")
    section = report(measure(args.rounds), args.rounds)
    sys.stdout.write(section)
    if args.update:
        update_results(section)


if __name__ == "__main__":
    main()
