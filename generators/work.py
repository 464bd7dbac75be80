"""What the pool's two threads hand each other: a consumed record tagged with its partition's assignment epoch
(`Work`), and, once the generation thread decoded it, the request with its prompt (`Prepared`)."""

from __future__ import annotations

from dataclasses import dataclass

from generators.prompt import Prompt
from llmcf.dead_letters import SourceRecord
from llmcf.events import CotRequest


@dataclass
class Work:
    """A consumed record, tagged with the assignment epoch of its partition when it was consumed."""

    record: SourceRecord
    epoch: int
    request_id: str | None = None  # None for a record that does not decode
    generated: bool = False  # set by the generation thread before the batch comes back


@dataclass(frozen=True)
class Prepared:
    """A decoded request with its prompt, ready for the backend."""

    work: Work
    request: CotRequest
    prompt: Prompt
