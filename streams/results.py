"""The `cot-results` batch processor: fill each pending sample with its generated chain of thought.

Lifecycle of one batch (`ResultBatchProcessor.process`):
1. decode through the dead-letter policy; keep the latest result per request id (by `generated_at`);
2. PostgreSQL: complete the samples (CoT text, embedding as float32 bytes, status 'generated', `cot_stored_at`);
3. vector index: set `status='generated'` and the CoT embedding on the samples' points, one payload update per batch,
   vectors untouched (`cot_retrievable` freshness);
4. flush the dead letters; return, after which Faust acks the batch and may commit its offsets.
Writes are retried until they succeed; a re-delivered batch rewrites the same values (a stored CoT is replaced only by
a later `generated_at`), so a crash anywhere before the commit is harmless.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmcf.dead_letters import SourceRecord
from llmcf.events import CotResult
from llmcf.metrics import EVENTS, observe_freshness
from storage.repository import Repository
from storage.vectors import VectorIndex
from streams.batch import Writer, store_latest
from streams.processor import BatchProcessor


@dataclass(eq=False)
class ResultBatchProcessor(BatchProcessor):
    """Processes one consumed batch of `cot-results` records; see the module docstring for the lifecycle."""

    topic: str
    repository: Repository
    index: VectorIndex
    writer: Writer

    async def process(self, records: Sequence[SourceRecord]) -> None:
        consumed, stored = await store_latest(self.writer, self.topic, CotResult, records, "store cot results",
                                              lambda result: result.request_id, lambda result: result.generated_at,
                                              self.repository.complete_cot_samples)
        updates = {
            c.event.request_id: {"status": "generated", "cot_embedding": list(c.event.cot_embedding)} for c in stored
        }
        await self.writer.call("index cot results", lambda: self.index.set_payload(updates))
        observe_freshness("cot_retrievable", (c.event.ts for c in stored))
        EVENTS.labels(topic=self.topic, outcome="ok").inc(len(consumed))
        await self.writer.flush_dead_letters()
