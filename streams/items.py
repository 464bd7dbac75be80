"""The `items` batch processor: validate, persist, embed each new item once, and make it known to the catalogue.

Lifecycle of one batch (`ItemBatchProcessor.process`):
1. decode through the dead-letter policy (bad records go to `dead-letters`);
2. upsert the latest version of each item into PostgreSQL (one statement);
3. embed the items that have no embedding yet ("title; text; tags", MiniLM, in chunks so interactions waiting for an
   item are released early), store the embeddings in PostgreSQL, then add the items to the in-process catalogue;
4. flush the dead letters; return. Only then does Faust ack the batch, and offsets are committed after the ack.
If a write fails, it is retried until it succeeds (see `streams.batch`); a crash before step 4 means the batch is
consumed again, which is harmless: every write is an idempotent upsert and an item is never embedded twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from llmcf.dead_letters import SourceRecord
from llmcf.embeddings import TextEmbedder
from llmcf.events import ItemEvent, ItemSnapshot, epoch_ms
from llmcf.metrics import EVENTS
from storage.repository import Repository
from streams.batch import Writer, store_latest
from streams.catalogue import Catalogue, CatalogueItem
from streams.processor import BatchProcessor

EMBED_CHUNK = 256


def item_text(item: ItemEvent) -> str:
    """The text embedded for an item: "title; text; tags" (LLM-CF embeds "title; brand; category")."""
    return f"{item.title}; {item.text}; {', '.join(item.tags)}"


def catalogue_item(item: ItemEvent, vector: np.ndarray) -> CatalogueItem:
    return CatalogueItem(
        snapshot=ItemSnapshot.model_construct(item_id=item.item_id, title=item.title, text=item.text, tags=item.tags),
        created_ms=epoch_ms(item.created_at),
        version=item.version,
        vector=vector,
    )


@dataclass(eq=False)
class ItemBatchProcessor(BatchProcessor):
    """Processes one consumed batch of `items` records; see the module docstring for the lifecycle."""

    topic: str
    repository: Repository
    catalogue: Catalogue
    embedder: TextEmbedder
    writer: Writer

    async def process(self, records: Sequence[SourceRecord]) -> None:
        consumed, stored = await store_latest(self.writer, self.topic, ItemEvent, records, "store items",
                                              lambda item: item.item_id, lambda item: item.version,
                                              self.repository.upsert_items)
        await self._make_known([c.event for c in stored])
        EVENTS.labels(topic=self.topic, outcome="ok").inc(len(consumed))
        await self.writer.flush_dead_letters()

    async def _make_known(self, items: list[ItemEvent]) -> None:
        """Cache every stored item with its embedding, embedding only items that never had one."""
        cached = self.catalogue.cached(item.item_id for item in items)
        for item in items:
            if item.item_id in cached:  # a new version of a known item: new snapshot, same vector
                self.catalogue.add(catalogue_item(item, cached[item.item_id].vector))
        unknown = [item for item in items if item.item_id not in cached]
        if not unknown:
            return
        stored = await self.writer.call(
            "read item embeddings", lambda: self.repository.get_item_embeddings(i.item_id for i in unknown)
        )
        to_embed = []
        for item in unknown:
            if item.item_id in stored:
                self.catalogue.add(catalogue_item(item, stored[item.item_id]))
            else:
                to_embed.append(item)
        for start in range(0, len(to_embed), EMBED_CHUNK):
            chunk = to_embed[start : start + EMBED_CHUNK]
            vectors = await self.writer.call("embed items", partial(self.embedder.embed, [item_text(i) for i in chunk]))
            embeddings = {item.item_id: vector for item, vector in zip(chunk, vectors, strict=True)}
            await self.writer.call(
                "store item embeddings",
                partial(self.repository.upsert_item_embeddings, embeddings, model=self.embedder.model_name),
            )
            for item in chunk:
                self.catalogue.add(catalogue_item(item, embeddings[item.item_id]))
