"""The interface every batch processor implements (`items`, `interactions`, `cot-results`): what the worker's delivery
(`streams.delivery`) hands each consumed batch to."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from llmcf.dead_letters import SourceRecord


class BatchProcessor(Protocol):
    """Processes the consumed records of one topic, a batch at a time."""

    topic: str
    """The topic whose records it processes: `BatchDelivery` routes each batch to the processor of its topic."""

    async def process(self, records: Sequence[SourceRecord]) -> None:
        """Called by `BatchDelivery` with each batch its topic's agent took, and with each offset range the delivery
        repair read from the broker, one batch of the topic at a time. Returns once the batch is durable (stored,
        indexed, published, its dead letters flushed), after which its offsets may be committed; records that cannot
        be used are dead-lettered, not raised. Raises only for what it cannot handle (a bug): the delivery then
        processes the whole batch again, so processing must be idempotent."""
        ...
