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
