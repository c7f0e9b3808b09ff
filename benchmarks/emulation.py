"""The task every P1 workload runs (EMULATION): it sleeps its modelled time.

It lives in its own module so that tasks refer to it by name. Defined in the module that
``python -m benchmarks.router`` runs as ``__main__``, it would travel by value, pickled
into every task, and each worker would unpickle the function's code again for each
task: a per-task cost that Dask default, the router and the bound's measurement would
all pay, and the policy that dispatches more tasks more.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def emulate(base: float, accel: float, *deps: Any) -> Any:
    """Sleep the modelled time of this op on this worker (EMULATION)."""
    from jupyter_mesh.router._device import worker_backend

    time.sleep(base * accel if worker_backend() == "jax" else base)
    return np.ones(4)
