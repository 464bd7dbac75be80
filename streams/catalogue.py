"""The worker's view of the item catalogue: each item's snapshot (for prompts), creation time (for cold start) and
text embedding (for sample vectors), cached in process with PostgreSQL behind it.

An item is *known* once both its row and its embedding are stored. The items agent of this process adds items to the
cache as it stores them; an item stored by another worker (items are partitioned by item id) is read from PostgreSQL
on a miss and cached. Methods that touch the database are blocking: call them from an executor thread.

The embeddings also live as rows of one matrix (`vectors`, `row_of`; row 0 is all zeros), so a batch's sample vectors
are computed with a few numpy calls instead of a stack per sample; `history_json` maps (item id, label) to the item's JSON as a history
entry of a CoT request.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from llmcf.embeddings import EMBEDDING_DIMENSION
from llmcf.events import HistoryEntry, ItemSnapshot, epoch_ms
from storage.repository import Repository

_INITIAL_ROWS = 1024


@dataclass(frozen=True)
class CatalogueItem:
    """A known item. `target_json` and `history_json` are its JSON forms inside a CoT request (the `target`, and a
    `history` entry with label 0 and 1), serialised once: a busy item appears in thousands of requests."""

    snapshot: ItemSnapshot
    created_ms: int
    version: int
    vector: np.ndarray
    target_json: bytes = field(init=False, repr=False, compare=False)
    history_json: tuple[bytes, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        snapshot = self.snapshot
        entries = tuple(
            HistoryEntry.model_construct(
                item_id=snapshot.item_id, title=snapshot.title, text=snapshot.text, tags=snapshot.tags, label=label
            ).model_dump_json().encode()
            for label in (0, 1)
        )
        object.__setattr__(self, "target_json", snapshot.model_dump_json().encode())
        object.__setattr__(self, "history_json", entries)


class Catalogue:
    """Known items by id; a dict read from several threads (dict operations are atomic under the GIL). Writers hold a
    lock; an item's vector row is written before the item is published, so a reader that found an item finds its row
    in any later `vectors` (the matrix is replaced, never shrunk, when it grows)."""

    def __init__(self, repository: Repository):
        self.repository = repository
        self._items: dict[str, CatalogueItem] = {}
        self.row_of: dict[str, int] = {}
        self.history_json: dict[tuple[str, int], bytes] = {}
        self.vectors = np.zeros((_INITIAL_ROWS, EMBEDDING_DIMENSION), dtype=np.float32)
        self._lock = threading.Lock()

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: CatalogueItem) -> None:
        """Cache `item` unless a newer version of it is cached already."""
        item_id = item.snapshot.item_id
        with self._lock:
            current = self._items.get(item_id)
            if current is not None and item.version <= current.version:
                return
            row = self.row_of.get(item_id)
            if row is None:
                row = len(self.row_of) + 1  # row 0 stays zeros: the padding row of `streams.requests.sample_vectors`
                if row == len(self.vectors):
                    self.vectors = np.concatenate([self.vectors, np.zeros_like(self.vectors)])
            self.vectors[row] = item.vector
            self.row_of[item_id] = row
            self.history_json[item_id, 0], self.history_json[item_id, 1] = item.history_json
            self._items[item_id] = item

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
