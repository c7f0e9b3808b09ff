"""TPU chips on this host, found without holding them, and one chip per worker.

Only one process can hold a TPU chip. If the notebook's kernel asked JAX for the TPUs
itself, it would hold every chip and no TPU worker could start; and N workers that each
saw every chip would all try to open the same ones. So the kernel counts the chips in a
short child process (``python -m jupyter_mesh.devices._tpu``), which lets go of them
when it exits, and each TPU worker is given one chip through libtpu's environment
(``TPU_VISIBLE_CHIPS`` with one-chip process bounds and a port of its own), as
``CUDA_VISIBLE_DEVICES`` gives a GPU worker one GPU.

On TPU v2/v3 one chip is two JAX devices (cores): workers are per chip, not per device.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import subprocess
import sys
from typing import Any

from ._detect import DeviceInfo, tpu_possible

#: how long the child process may take to start libtpu and list the chips
PROBE_TIMEOUT = 180.0
#: what libtpu says when another process holds the chips
_BUSY = re.compile(r"in use|busy|locked", re.IGNORECASE)


def _chip_key(dev: Any) -> Any:
    coords = getattr(dev, "coords", None)
    return tuple(coords) if coords is not None else ("id", getattr(dev, "id", id(dev)))


def chips_of(devices: list[Any]) -> list[dict[str, Any]]:
    """JAX's TPU devices grouped into chips (a chip's cores share its coordinates), in
    the order JAX lists them: ``model``, ``memory`` (bytes, summed over the chip's
    cores) and ``cores`` of each."""
    chips: dict[Any, dict[str, Any]] = {}
    for dev in devices:
        chip = chips.setdefault(_chip_key(dev), {
            "model": str(getattr(dev, "device_kind", "TPU")), "memory": 0, "cores": 0})
        chip["cores"] += 1
        try:
            chip["memory"] += int((dev.memory_stats() or {}).get("bytes_limit", 0))
        except Exception:
            pass
    return list(chips.values())


def _probe() -> int:
    """Run in the child: print the chips as JSON, or the error, on one line."""
    try:
        import jax

        found = chips_of(list(jax.devices("tpu")))
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}))
        return 0
    print(json.dumps({"chips": found}))
    return 0


@functools.lru_cache(maxsize=1)
def _probed() -> tuple[tuple[DeviceInfo, ...], str | None]:
    env = dict(os.environ, JAX_PLATFORMS="tpu")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "jupyter_mesh.devices._tpu"], env=env,
            capture_output=True, text=True, timeout=PROBE_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return (), f"listing the TPUs took over {PROBE_TIMEOUT:.0f} s"
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    try:
        answer = json.loads(lines[-1])
    except (IndexError, ValueError):
        last = (done.stderr.strip().splitlines() or ["no answer"])[-1]
        return (), f"listing the TPUs failed: {last}"
    if "error" in answer:
        if _BUSY.search(answer["error"]):
            return (), f"JAX could not open the TPUs: {answer['error']}"
        # libtpu installed on a machine without TPUs (jax[tpu] on a laptop, say)
        return (), None
    return tuple(
        DeviceInfo(kind="tpu", backend="jax", model=c["model"], memory=int(c["memory"]),
                   index=i, extra={"cores": int(c["cores"])})
        for i, c in enumerate(answer["chips"])
    ), None


def chips() -> tuple[list[DeviceInfo], str | None]:
    """The TPU chips this host has, and why none were found where libtpu is installed
    but they could not be listed (in use by another process, say).

    Looked up once per process, in a child process (this process never opens them);
    ``([], None)`` at once where libtpu or JAX is not installed."""
    if not tpu_possible():
        return [], None
    found, why = _probed()
    if why is not None:
        _probed.cache_clear()  # a TPU that was busy may be free next time
    return list(found), why


def visible_chip(index: int, visible: str | None = None) -> str:
    """The chip the ``index``-th TPU worker gets: where this process was given only
    some chips (``TPU_VISIBLE_CHIPS=2,3``), the index counts those."""
    if visible is None:
        visible = os.environ.get("TPU_VISIBLE_CHIPS") or os.environ.get("TPU_VISIBLE_DEVICES")
    ids = [v.strip() for v in (visible or "").split(",") if v.strip()]
    return ids[index] if index < len(ids) else str(index)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def worker_env(index: int, port: int | None = None) -> dict[str, str]:
    """libtpu's environment for a worker process that drives one chip on its own: the
    chip, one-chip bounds, and a port for libtpu's controller that no other worker
    uses (both the current names and the older ones libtpu read)."""
    chip = visible_chip(index)
    port = port or free_port()
    return {
        "TPU_VISIBLE_CHIPS": chip,
        "TPU_VISIBLE_DEVICES": chip,
        "TPU_CHIPS_PER_PROCESS_BOUNDS": "1,1,1",
        "TPU_PROCESS_BOUNDS": "1,1,1",
        "TPU_PROCESS_PORT": str(port),
        "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{port}",
        "TPU_MESH_CONTROLLER_PORT": str(port),
    }


if __name__ == "__main__":
    sys.exit(_probe())
