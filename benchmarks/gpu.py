"""The router on a real CUDA GPU, live: routed `auto` against forced targets and plain Dask.

Run where a GPU is usable by CuPy (``python -m benchmarks.gpu``): a local mesh of NumPy
CPU workers and one CuPy GPU worker; each workload computed by each policy, taking turns,
medians of the timed runs after one untimed run of each (CuPy compiles its kernels and
the workers import on first use). Prints a Markdown section naming the device; with
``--out FILE`` writes it there too (benchmarks/RESULTS.md takes it between its gpu
markers: ``--update``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import time
from typing import Any

RESULTS = os.path.join(os.path.dirname(__file__), "RESULTS.md")
BEGIN, END = "<!-- gpu:begin (written by benchmarks/gpu.py) -->", "<!-- gpu:end -->"
POLICIES = ("auto", "gpu", "cpu", "plain")


def workloads(scale: float = 1.0) -> dict[str, Any]:
    import dask.array as da

    n = int(8000 * scale) // 4 * 4
    m = int(16000 * scale) // 4 * 4
    x = da.random.random((n, n), chunks=n // 4).astype("float32")
    z = da.random.random((m, m), chunks=m // 4).astype("float32")
    return {
        f"matmul pipeline {n}, float32": ((x @ x.T) + 1).sum(axis=0),
        f"elementwise ETL {m}, float32": (da.exp(z) * 2 + da.sin(z) - z).mean(axis=0),
    }


def device_name() -> str:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    return f"{name} ({props['totalGlobalMem'] / 2**30:.0f} GiB)"


def run(repeats: int = 3, scale: float = 1.0, cpu: int = 2, threads: int = 4) -> dict[str, Any]:
    import dask
    import numpy as np

    import jupyter_mesh as jm

    out: dict[str, Any] = {"device": device_name(), "rows": [], "repeats": repeats,
                           "cpu": cpu, "threads": threads,
                           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    mesh = jm.Mesh.local(cpu=cpu, gpu=1, tpu=0, jax_cpu=0, threads_per_worker=threads,
                         set_current=False)
    try:
        with dask.config.set({"mesh.progress-after": 3600}):
            out["inventory"] = str(mesh.inventory().by_target())
            for label, y in workloads(scale).items():
                values: dict[str, Any] = {}
                times: dict[str, list[float]] = {p: [] for p in POLICIES}
                extra: dict[str, Any] = {}

                for policy in POLICIES:
                    _once(mesh, y, policy, None, values, times, extra)
                orders = list(itertools.permutations(POLICIES))
                for rep in range(repeats):
                    for policy in orders[(rep * 7) % len(orders)]:
                        _once(mesh, y, policy, times, values, times, extra)
                ref = values["plain"]
                same = all(np.allclose(v, ref, rtol=1e-3, atol=1e-3) for v in values.values())
                out["rows"].append({"workload": label, "same": same,
                                    "median": {p: statistics.median(t) for p, t in times.items()},
                                    "est": statistics.median(extra.get("est", [0.0])),
                                    "targets": extra.get("targets", []),
                                    "matmul_on": extra.get("matmul_on")})
    finally:
        mesh.close()
    return out


def _once(mesh: Any, y: Any, policy: str, timed: dict[str, list[float]] | None,
          values: dict[str, Any], times: dict[str, list[float]], extra: dict[str, Any]
          ) -> None:
    """One run of ``y`` by ``policy``: its value kept; timed unless ``timed`` is None."""
    import numpy as np

    t0 = time.perf_counter()
    if policy == "plain":
        got = mesh.client.compute(y, sync=True)
    else:
        (got,) = mesh.compute(y, route=policy)
    wall = time.perf_counter() - t0
    values[policy] = np.asarray(got)
    if timed is None:
        return
    times[policy].append(wall)
    if policy == "auto":
        report = mesh.last_report
        extra.setdefault("est", []).append(report.plan.makespan)
        extra["targets"] = sorted({r["target"] for r in report.rows})
        extra["matmul_on"] = report.ran_on("matmul")


def report(r: dict[str, Any]) -> str:
    lines = [
        "## GPU, live (a real CUDA GPU)", "",
        f"Device: **{r['device']}**, on a machine lent for the run ({platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}); run {r['when']}. "
        f"A local mesh of {r['cpu']} NumPy CPU workers ({r['threads']} threads each) and "
        f"1 CuPy GPU worker ({r['inventory']}). Each workload computed by each policy, "
        f"taking turns in an order that changes from run to run, medians of "
        f"{r['repeats']} timed runs after one untimed run of each, wall seconds of the "
        "whole call (planning, submission, the report). *auto* = `mesh.compute(y)`, the "
        "router choosing per op; *gpu* / *cpu* = `route=\"gpu\"` / `\"cpu\"` (every op it "
        "can run on that kind); *plain* = `client.compute(y)`, Dask's own placement over "
        "all workers (NumPy everywhere: a plain Dask task on the GPU worker runs NumPy on "
        "its host). *Same* = every policy's result allclose to plain Dask's "
        "(float32, rtol 1e-3).", "",
        "| workload | auto | gpu | cpu | plain Dask | plain / auto | auto est. | auto's targets "
        "| matmul ran on | same |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        m = row["median"]
        lines.append(
            f"| {row['workload']} | {m['auto']:.2f} s | {m['gpu']:.2f} s | {m['cpu']:.2f} s "
            f"| {m['plain']:.2f} s | {m['plain'] / m['auto']:.2f}x | {row['est']:.2f} s "
            f"| {', '.join(row['targets'])} | {', '.join(row['matmul_on'] or ['-'])} "
            f"| {'yes' if row['same'] else '**no**'} |")
    lines.append("")
    return "\n".join(lines)


def update(section: str, path: str = RESULTS) -> None:
    """Put ``section`` between the gpu markers of benchmarks/RESULTS.md (added at its
    end the first time)."""
    text = open(path).read()
    block = f"{BEGIN}\n{section.rstrip()}\n\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="workload size factor")
    ap.add_argument("--out", help="also write the section to this file")
    ap.add_argument("--update", action="store_true", help="write it into RESULTS.md")
    ap.add_argument("--from-file", help="update RESULTS.md from a section written earlier")
    args = ap.parse_args(argv)
    if args.from_file:
        update(open(args.from_file).read())
        return
    try:
        import cupy
    except ImportError:
        sys.exit("benchmarks.gpu needs CuPy and a CUDA GPU: pip install 'jupyter_mesh[gpu]'")
    if not cupy.is_available():
        sys.exit("benchmarks.gpu needs a CUDA GPU usable by CuPy; none is here")
    text = report(run(args.repeats, args.scale))
    print(text, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.update:
        update(text)


if __name__ == "__main__":
    main()
