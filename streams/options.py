"""`WorkerOptions`: how one stream worker consumes. A module of its own, without Faust, so that `llmcf --help` takes
its flag defaults from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerOptions:
    """How one worker consumes: batch size and wait, Faust's web port (None = no web server), item wait."""

    batch_size: int = 2000
    batch_within_s: float = 0.2
    web_port: int | None = None
    item_wait_s: float = 60.0
