"""The worker's view of the item catalogue: each item's snapshot (for prompts), creation time (for cold start) and
text embedding (for sample vectors), cached in process with PostgreSQL behind it.

An item is *known* once both its row and its embedding are stored. The items agent of this process adds items to the
cache as it stores them; an item stored by another worker (items are partitioned by item id) is read from PostgreSQL
on a miss and cached. Methods that touch the database are blocking: call them from an executor thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from llmcf.events import HistoryEntry, ItemSnapshot, epoch_ms
from storage.repository import Repository


@dataclass(frozen=True)
class CatalogueItem:
    """A known item. `as_history` holds its two `HistoryEntry` forms (label 0 and 1), built once: a busy item appears
    in thousands of requests' histories, and building the entry per request was the worker's largest per-sample cost."""

    snapshot: ItemSnapshot
    created_ms: int
    version: int
    vector: np.ndarray
    as_history: tuple[HistoryEntry, HistoryEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        snapshot = self.snapshot
        entries = tuple(
            HistoryEntry.model_construct(
                item_id=snapshot.item_id, title=snapshot.title, text=snapshot.text, tags=snapshot.tags, label=label
            )
            for label in (0, 1)
        )
        object.__setattr__(self, "as_history", entries)


class Catalogue:
    """Known items by id; a dict read from several threads (dict operations are atomic under the GIL)."""

    def __init__(self, repository: Repository):
        self.repository = repository
        self._items: dict[str, CatalogueItem] = {}

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: CatalogueItem) -> None:
        """Cache `item` unless a newer version of it is cached already."""
        current = self._items.get(item.snapshot.item_id)
        if current is None or item.version > current.version:
            self._items[item.snapshot.item_id] = item

    def cached(self, item_ids: Iterable[str]) -> dict[str, CatalogueItem]:
        """The cached items among `item_ids` (no database access: safe on the event loop)."""
        items = self._items
        return {item_id: items[item_id] for item_id in item_ids if item_id in items}

    def lookup(self, item_ids: Iterable[str]) -> dict[str, CatalogueItem]:
        """The known items among `item_ids`: from the cache, else from PostgreSQL (then cached). Blocking."""
        wanted = set(item_ids)
        found = self.cached(wanted)
        missing = wanted - found.keys()
        if missing:
            rows = self.repository.get_items(missing)
            vectors = self.repository.get_item_embeddings(rows.keys())
            for item_id, vector in vectors.items():
                row = rows[item_id]
                item = CatalogueItem(
                    snapshot=ItemSnapshot.model_construct(
                        item_id=row.item_id, title=row.title, text=row.text, tags=list(row.tags)
                    ),
                    created_ms=epoch_ms(row.created_at),
                    version=row.version,
                    vector=vector,
                )
                self.add(item)
                found[item_id] = item
        return found
