"""Progress lines of long ranker jobs (training, evaluation, update rounds), each with the time elapsed."""

from __future__ import annotations

import time
from typing import Callable


class Stepper:
    """Prints progress lines with the elapsed time."""

    def __init__(self, log: Callable[[str], None], started: float | None = None) -> None:
        self.log, self.started = log, time.perf_counter() if started is None else started

    def __call__(self, message: str) -> None:
        self.log(f"[{time.perf_counter() - self.started:7.1f} s] {message}")
