"""The `interactions` batch processor: validate, persist, keep histories, decide and queue chains of thought.

Lifecycle of one batch (`InteractionBatchProcessor.process`), in this order:
1. decode through the dead-letter policy (`streams.decoding`: straight into storage rows); observe `ingested`
   freshness; start the PostgreSQL upsert of the interactions (and users) on the writer thread, where it runs while
   steps 2-3 run on the event loop (on PostgreSQL a binary COPY: the thread mostly waits on its socket, GIL released);
2. wait (bounded) until the batch's target items are known to the catalogue (the `items` topic is consumed by another
   agent, possibly behind); an interaction whose item is still unknown after `item_wait_s` is stored, but its sample is
   dead-lettered (`processing_failed`) instead of decided;
3. merge each user's new interactions into their history (once per user per batch) and decide, per interaction, whether
   its sample gets a CoT (`llmcf.cot_policy`); build the batch's requests (history = the user's items *before* each),
   pending rows and retrieval vectors together (`streams.requests`);
4. at once, on the index thread: the vector index upserts the samples as pending points, key = request id (the
   index holds the GIL, so it overlaps best with PostgreSQL, which mostly waits on its socket);
5. once the interactions are stored (`stored` freshness), PostgreSQL upserts the samples of the stored interactions
   as 'pending' CoT samples; once both writes are done, a sample is requested only if its interaction, its row and
   its point were all written (`retrievable` freshness): a sample is a retrievable in-context example before any LLM
   has seen it. A point whose interaction or row was refused is removed from the index again;
6. publish the requests to `cot-requests` and flush the producer;
7. flush the dead letters, then write the merged histories to the table, and return.
Only after the body returns does Faust ack the batch; it flushes the table's changelog before it commits the offsets.
Every step on the event loop works on plain tuples (`InteractionRow`, `HistoryItem`, `Sample`), never on pydantic
models: the loop is shared with Faust, whose own per-event work is the worker's floor (bench/worker.py).

If any write fails it is retried until it succeeds (`streams.batch`), so no step waiting for it happens before it.
If the process dies anywhere before the commit, the batch is consumed again: PostgreSQL and the index upsert by
deterministic ids (same rows, same points), the history merge ignores interactions it already holds, and the requests
are published again under the same request ids (duplicates on `cot-requests` are possible by at-least-once design;
the generator pool and storage dedupe by request id).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial

import numpy as np

from llmcf.cot_policy import CotPolicy, CotReason
from llmcf.dead_letters import SourceRecord
from llmcf.metrics import EVENTS
from storage.repository import Repository
from storage.vectors import VectorIndex
from streams.batch import Writer, count_dead_lettered
from streams.catalogue import Catalogue, CatalogueItem
from streams.decoding import Received, decode_interactions
from streams.history import HistoryItem, HistoryStore, before, latest, merge
from streams.metrics import COT_DECISIONS, observe_freshness_ms
from streams.processor import BatchProcessor
from streams.publisher import RequestPublisher
from streams.requests import Decided, Sample, build_samples

log = logging.getLogger(__name__)

ITEM_POLL_S = 0.25


def event_times_ms(rows: Iterable[Received | Sample]) -> np.ndarray:
    return np.fromiter((r.row.version for r in rows), dtype=np.int64)


@dataclass(eq=False)
class InteractionBatchProcessor(BatchProcessor):
    """Processes one consumed batch of `interactions` records; see the module docstring for the lifecycle."""

    topic: str
    repository: Repository
    index: VectorIndex
    catalogue: Catalogue
    histories: HistoryStore
    publisher: RequestPublisher
    writer: Writer
    index_writer: Writer
    cot_policy: CotPolicy
    history_length: int
    item_wait_s: float

    async def process(self, records: Sequence[SourceRecord]) -> None:
        received = decode_interactions(records, self.writer.policy)
        count_dead_lettered(self.topic, records, received)
        observe_freshness_ms("ingested", event_times_ms(received))
        # The interactions need nothing else: store them while the samples are decided, built and indexed.
        storing = asyncio.ensure_future(self.writer.each_good(
            "store interactions",
            received,
            lambda batch: self.repository.upsert_interaction_rows([r.row for r in batch]),
            lambda r: r.record,
        ))
        try:
            samples, merged_histories = await self._samples(received)
        except BaseException:
            await storing  # never leave a write running behind an exception
            raise
        indexing = asyncio.ensure_future(self.index_writer.each_good(
            "index pending samples", samples, lambda batch: self.index.upsert([s.point for s in batch]), lambda s: s.record,
        ))
        try:
            stored = await storing
            observe_freshness_ms("stored", event_times_ms(stored))
            if len(stored) < len(received):
                stored_rows = {id(r.row) for r in stored}
                samples = [s for s in samples if id(s.row) in stored_rows]
            samples = await self.writer.each_good(
                "store pending cot samples", samples,
                lambda batch: self.repository.upsert_pending_samples([s.pending for s in batch]), lambda s: s.record,
            )
        finally:
            indexed = await indexing
        samples = await self._indexed(samples, indexed)
        observe_freshness_ms("retrievable", event_times_ms(samples))
        if samples:
            await self.writer.call(
                "publish cot requests", lambda: self.publisher.publish([(s.request_id, s.request) for s in samples])
            )
            for reason, count in Counter(s.reason for s in samples).items():
                COT_DECISIONS.labels(reason=reason).inc(count)
        await self.writer.flush_dead_letters()
        for user_id, (history, partition) in merged_histories.items():
            self.histories.put(user_id, history, partition)
        EVENTS.labels(topic=self.topic, outcome="ok").inc(len(received))

    async def _indexed(self, stored: list[Sample], indexed: list[Sample]) -> list[Sample]:
        """The stored samples that were indexed too; points without a stored sample are removed from the index."""
        stored_ids = {s.request_id for s in stored}
        orphans = [s.request_id for s in indexed if s.request_id not in stored_ids]
        if orphans:
            await self.index_writer.call("unindex refused samples", lambda: self.index.delete(orphans))
        if len(indexed) - len(orphans) == len(stored):
            return stored
        indexed_ids = {s.request_id for s in indexed}
        return [s for s in stored if s.request_id in indexed_ids]

    async def _samples(self, received: list[Received]) -> tuple[list[Sample], dict[str, tuple[list[HistoryItem], int]]]:
        """The samples that get a CoT, and each user's merged history (with its partition) to store once written."""
        policy = self.writer.policy
        targets = await self._known_items({r.row.item_id for r in received})
        # One merge per user, then each of the user's new interactions in time order.
        by_user: dict[str, list[tuple[Received, HistoryItem]]] = defaultdict(list)
        for entry in received:
            row = entry.row
            by_user[row.user_id].append((entry, HistoryItem(row.version, row.interaction_id, row.item_id, row.label)))
        merged_histories: dict[str, tuple[list[HistoryItem], int]] = {}
        decided: list[tuple[Received, CotReason, CatalogueItem, list[HistoryItem]]] = []
        for user_id, entries in by_user.items():
            merged = merge(self.histories.get(user_id), (item for _, item in entries))
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
                    decided.append((entry, reason, target, before(merged, item, self.history_length)))

        wanted = {h.item_id for *_, past in decided for h in past}
        known = await self._items_of(wanted)
        if len(known) < len(wanted):  # items of a history not stored (any more): the sample's history skips them
            decided = [(entry, reason, target, [h for h in past if h.item_id in known])
                       for entry, reason, target, past in decided]
        return build_samples(
            [Decided(entry.record, entry.row, reason, target, past) for entry, reason, target, past in decided],
            self.catalogue, datetime.now(timezone.utc),
            lambda record, error: policy(record, "processing_failed", f"building the CoT request: {error}"),
        ), merged_histories

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
