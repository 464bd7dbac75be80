"""Pinning a process's native thread pools (OpenMP, OpenBLAS, MKL) before numpy, torch or onnxruntime start them.

On a machine shared with other processes, two threads per pool fighting other work measured 10-18x slower than one
(../shared/docs/platform.md), so every `llmcf` command pins them to its own thread setting. The pools read these
variables once, when the library loads, hence a function the CLI calls before importing a stage; a variable the user
set explicitly is left alone.
"""

from __future__ import annotations

import os

POOL_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def pin_native_threads(threads: int) -> None:
    """Set each pool's thread count to `threads` unless the environment already sets it."""
    for name in POOL_VARIABLES:
        os.environ.setdefault(name, str(threads))


def free_threads() -> int:
    """Threads for one CPU-bound process started now: the cores this process may use, less those the 1-minute load
    average says other work holds, less one left for the rest of the machine; at least 1 (so 1 on 2 cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores - 1, int(cores - load)))
