"""The similarity rows of retrieval targets (`ranker.retrieval`): one target's similarity to every pool item and the
items best-first (`Neighbours`), kept per target in a bounded, thread-safe cache (`NeighbourCache`).

A row depends only on the target vector and the pool's item table, so many queries and requests share it. When items
join the pool the cached row is extended by merging the new items into its order instead of sorting again; a row of
an older pool generation (item codes renumbered) is void and computed afresh.
"""

from __future__ import annotations

import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ranker.sample_pool import PoolView


@dataclass
class Neighbours:
    """A target's similarity to each pool item (`sims`, by item code) and the item codes best-first (`order`,
    ties by code); valid for the first `n_items` items of the pool's item table."""

    sims: np.ndarray
    order: np.ndarray
    generation: int
    sorted_sims: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.sorted_sims = self.sims[self.order]

    @property
    def n_items(self) -> int:
        return len(self.sims)


class NeighbourCache:
    """Similarity rows by target, the `size` most recently used kept. Thread-safe: entries are replaced whole, and a
    row computed outside the lock replaces the cached one only if that one is not newer."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[str, Neighbours] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, view: PoolView, item: str, target: np.ndarray) -> Neighbours:
        """The target's similarity row over the view's items, from the cache (extended for items added since). The key
        holds the target vector's hash too: an unknown item scored as zeros until its embedding is stored changes."""
        key = f"{item}\x1f{zlib.crc32(np.ascontiguousarray(target, dtype=np.float32).tobytes())}"
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None:
                self._entries.move_to_end(key)
        n_items = view.n_items
        if cached is not None and cached.generation != view.generation:
            cached = None
        if cached is not None and cached.n_items == n_items:
            return cached
        if cached is not None and cached.n_items < n_items:
            # Items joined the pool since: merge theirs into the cached order (new codes are the largest, so among
            # equal similarities they go after the old ones, as a full sort would put them) instead of sorting again.
            tail = (view.item_vectors[cached.n_items : n_items] @ target).astype(np.float32)
            tail_order = np.lexsort((np.arange(len(tail)), -tail))
            at = np.searchsorted(-cached.sorted_sims, -tail[tail_order], side="right")
            order = np.insert(cached.order, at, tail_order + cached.n_items)
            entry = Neighbours(np.concatenate([cached.sims, tail]), order, view.generation)
        else:
            sims = (view.item_vectors[:n_items] @ target).astype(np.float32)
            entry = Neighbours(sims, np.lexsort((np.arange(n_items), -sims)), view.generation)
        with self._lock:
            current = self._entries.get(key)
            if current is None or current.generation != view.generation or current.n_items <= n_items:
                self._entries[key] = entry
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return entry

    def __len__(self) -> int:
        return len(self._entries)
