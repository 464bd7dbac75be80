"""The `interactions` batch processor: validate, persist, keep histories, decide and queue chains of thought.

Lifecycle of one batch (`InteractionBatchProcessor.process`), in this order:
1. decode through the dead-letter policy; observe `ingested` freshness; start the PostgreSQL upsert of the interactions
   (and users) on the writer thread, where it runs while steps 2-3 run on the event loop;
2. wait (bounded) until the batch's target items are known to the catalogue (the `items` topic is consumed by another
   agent, possibly behind); an interaction whose item is still unknown after `item_wait_s` is stored, but its sample is
   dead-lettered (`processing_failed`) instead of decided;
3. merge each user's new interactions into their history (once per user per batch) and decide, per interaction, whether
   its sample gets a CoT (`streams.decisions`); build the request (history = the user's items *before* it) and the
   sample's retrieval vector;
4. once the interactions are stored (`stored` freshness), at the same time on two threads: PostgreSQL upserts the
   sampled CoT samples as 'pending', and the vector index upserts them, key = request id (`retrievable` freshness):
   a sample is a retrievable in-context example before any LLM has seen it. Neither write needs the other, and the
   index write holds the GIL while PostgreSQL waits on its socket, so together they cost little more than the index;
5. a sample refused by either write is not requested (and is removed from the index if only PostgreSQL refused it);
6. publish the requests to `cot-requests` and flush the producer;
7. flush the dead letters, then write the merged histories to the table, and return.
Only after the body returns does Faust ack the batch; it flushes the table's changelog before it commits the offsets.

If any write fails it is retried until it succeeds (`streams.batch`), so nothing later in the list happens before it.
If the process dies anywhere before the commit, the batch is consumed again: PostgreSQL and the index upsert by
deterministic ids (same rows, same points), the history merge ignores interactions it already holds, and the requests
are published again under the same request ids (duplicates on `cot-requests` are possible by at-least-once design;
the generator pool and storage dedupe by request id).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from functools import partial
from typing import NamedTuple

import numpy as np

from llmcf.dead_letters import SourceRecord
from llmcf.embeddings import EMBEDDING_DIMENSION
from llmcf.events import CotRequest, InteractionEvent, epoch_ms
from llmcf.metrics import EVENTS, observe_freshness
from llmcf.samples import encode_history, sample_vector
from storage.repository import Repository
from storage.vectors import Point, VectorIndex
from streams.batch import Consumed, Writer, decode_records
from streams.catalogue import Catalogue, CatalogueItem
from streams.decisions import CotPolicy, CotReason, cot_request_id
from streams.history import HistoryItem, HistoryStore, before, latest, merge
from streams.metrics import COT_DECISIONS
from streams.publisher import RequestPublisher

log = logging.getLogger(__name__)

ITEM_POLL_S = 0.25
_NO_HISTORY = np.zeros((0, EMBEDDING_DIMENSION), dtype=np.float32)


class Sample(NamedTuple):
    """A sampled interaction, ready to write: its CoT request and its pending point in the vector index."""

    record: SourceRecord
    event: InteractionEvent
    request: CotRequest
    point: Point


def build_sample(
    consumed: Consumed[InteractionEvent],
    interaction: HistoryItem,
    reason: CotReason,
    target: CatalogueItem,
    past: Sequence[tuple[HistoryItem, CatalogueItem]],
    requested_at: datetime,
) -> Sample:
    """The request and the pending point of one sampled interaction, from already validated data (no re-validation)."""
    event = consumed.event
    request_id = cot_request_id(interaction.interaction_id)
    request = CotRequest.model_construct(
        request_id=request_id,
        user_id=event.user_id,
        item_id=event.item_id,
        label=event.label,
        ts=event.ts,
        target=target.snapshot,
        history=[item.as_history[entry.label] for entry, item in past],
        reason=reason,
        requested_at=requested_at,
    )
    history_vectors = np.stack([item.vector for _, item in past]) if past else _NO_HISTORY
    point = Point(
        key=request_id,
        vector=sample_vector(history_vectors, target.vector),
        payload={
            "user_id": event.user_id,
            "item_id": event.item_id,
            "label": event.label,
            "ts": interaction.ts_ms,
            "status": "pending",
            "history": encode_history([entry.item_id for entry, _ in past]),
        },
    )
    return Sample(consumed.record, event, request, point)


class InteractionBatchProcessor:
    """Processes one consumed batch of `interactions` records; see the module docstring for the lifecycle."""

    def __init__(
        self,
        topic: str,
        repository: Repository,
        index: VectorIndex,
        catalogue: Catalogue,
        publisher: RequestPublisher,
        writer: Writer,
        index_writer: Writer,
        cot_policy: CotPolicy,
        history_length: int,
        item_wait_s: float = 60.0,
    ):
        self.topic = topic
        self.repository = repository
        self.index = index
        self.catalogue = catalogue
        self.publisher = publisher
        self.writer = writer
        self.index_writer = index_writer
        self.cot_policy = cot_policy
        self.history_length = history_length
        self.item_wait_s = item_wait_s

    async def process(self, records: Sequence[SourceRecord], histories: HistoryStore) -> None:
        policy = self.writer.policy
        consumed = decode_records(InteractionEvent, records, policy)
        EVENTS.labels(topic=self.topic, outcome="dead_lettered").inc(len(records) - len(consumed))
        observe_freshness("ingested", (c.event.ts for c in consumed))
        # The interactions need nothing else: store them while the samples are decided and built on this thread.
        storing = asyncio.ensure_future(self.writer.each_good(
            "store interactions",
            consumed,
            lambda batch: self.repository.upsert_interactions([c.event for c in batch]),
            lambda c: c.record,
        ))
        try:
            samples, merged_histories = await self._samples(consumed, histories)
        finally:
            stored = await storing  # never leave the write running behind an exception
        observe_freshness("stored", (c.event.ts for c in stored))
        if len(stored) < len(consumed):
            stored_events = {id(c.event) for c in stored}
            samples = [s for s in samples if id(s.event) in stored_events]
        samples = await self._store_and_index(samples)
        observe_freshness("retrievable", (s.event.ts for s in samples))
        if samples:
            await self.writer.call("publish cot requests", lambda: self.publisher.publish([s.request for s in samples]))
            for s in samples:
                COT_DECISIONS.labels(reason=s.request.reason).inc()
        await self.writer.flush_dead_letters()
        for user_id, (history, partition) in merged_histories.items():
            histories.put(user_id, history, partition)
        EVENTS.labels(topic=self.topic, outcome="ok").inc(len(consumed))

    async def _store_and_index(self, samples: list[Sample]) -> list[Sample]:
        """Steps 4-5: the pending samples in PostgreSQL and the vector index, concurrently; returns those in both."""
        stored, indexed = await asyncio.gather(
            self.writer.each_good(
                "store pending cot samples", samples,
                lambda batch: self.repository.upsert_cot_samples([s.request for s in batch]), lambda s: s.record,
            ),
            self.index_writer.each_good(
                "index pending samples", samples, lambda batch: self.index.upsert([s.point for s in batch]),
                lambda s: s.record,
            ),
        )
        if len(stored) == len(indexed) == len(samples):
            return samples
        stored_ids = {s.request.request_id for s in stored}
        orphans = [s.request.request_id for s in indexed if s.request.request_id not in stored_ids]
        if orphans:
            await self.index_writer.call("unindex refused samples", lambda: self.index.delete(orphans))
        indexed_ids = {s.request.request_id for s in indexed}
        return [s for s in stored if s.request.request_id in indexed_ids]

    async def _samples(
        self, consumed: list[Consumed[InteractionEvent]], histories: HistoryStore
    ) -> tuple[list[Sample], dict[str, tuple[list[HistoryItem], int]]]:
        """The samples that get a CoT, and each user's merged history (with its partition) to store once written."""
        policy = self.writer.policy
        targets = await self._known_items({c.event.item_id for c in consumed})
        # One merge per user, then each of the user's new interactions in time order.
        by_user: dict[str, list[tuple[Consumed[InteractionEvent], HistoryItem]]] = defaultdict(list)
        for entry in consumed:
            event = entry.event
            by_user[event.user_id].append(
                (entry, HistoryItem(epoch_ms(event.ts), event.interaction_id, event.item_id, event.label))
            )
        merged_histories: dict[str, tuple[list[HistoryItem], int]] = {}
        decided: list[tuple[Consumed[InteractionEvent], HistoryItem, CotReason, list[HistoryItem]]] = []
        for user_id, entries in by_user.items():
            merged = merge(histories.get(user_id), (item for _, item in entries))
            merged_histories[user_id] = (latest(merged, self.history_length), entries[0][0].record.partition)
            for entry, item in entries:
                target = targets.get(item.item_id)
                if target is None:
                    policy(entry.record, "processing_failed",
                           f"item {item.item_id!r} is not in the catalogue after {self.item_wait_s:g} s: "
                           "interaction stored, no CoT decision made")
                    continue
                reason = self.cot_policy.reason(item.interaction_id, item.ts_ms, target.created_ms)
                if reason is not None:
                    decided.append((entry, item, reason, before(merged, item, self.history_length)))

        past_items = await self._items_of(h.item_id for _, _, _, past in decided for h in past)
        requested_at = datetime.now(timezone.utc)
        samples: list[Sample] = []
        for entry, item, reason, past in decided:
            try:
                known_past = [(h, past_items[h.item_id]) for h in past if h.item_id in past_items]
                samples.append(build_sample(entry, item, reason, targets[item.item_id], known_past, requested_at))
            except Exception as exc:  # one sample that cannot be built must not hold back the batch
                policy(entry.record, "processing_failed", f"building the CoT request: {type(exc).__name__}: {exc}")
        return samples, merged_histories

    async def _known_items(self, item_ids: set[str]) -> dict[str, CatalogueItem]:
        """The catalogue items of `item_ids`, waiting up to `item_wait_s` for those not known yet."""
        found = self.catalogue.cached(item_ids)
        missing = item_ids - found.keys()
        deadline = time.monotonic() + self.item_wait_s
        waited = False
        while missing:
            found.update(await self.writer.call("read items", partial(self.catalogue.lookup, set(missing))))
            missing -= found.keys()
            if not missing or time.monotonic() >= deadline:
                break
            if not waited:
                log.info("waiting for %d items not in the catalogue yet (e.g. %s)", len(missing), next(iter(missing)))
                waited = True
            await asyncio.sleep(ITEM_POLL_S)
        return found

    async def _items_of(self, item_ids: Iterable[str]) -> dict[str, CatalogueItem]:
        """Catalogue items of a history: from the cache, or PostgreSQL after a restart; no waiting."""
        wanted = set(item_ids)
        found = self.catalogue.cached(wanted)
        if len(found) < len(wanted):
            found.update(await self.writer.call("read items", lambda: self.catalogue.lookup(wanted - found.keys())))
        return found
