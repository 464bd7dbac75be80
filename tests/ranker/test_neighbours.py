"""The similarity-row cache of the retrieval engine (`ranker.neighbours.NeighbourCache`): rows best-first with ties by
item code, reused while the pool's items are unchanged, extended by merging when items join (the order a full sort
gives), recomputed for a new pool generation, keyed by the target vector, and bounded."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

from ranker.neighbours import NeighbourCache
from ranker.sample_pool import PoolSample, SamplePool

DIM = 8


def view(item_vectors: np.ndarray, generation: int = 0) -> Any:
    """The part of a `PoolView` the cache reads."""
    return SimpleNamespace(item_vectors=item_vectors, n_items=len(item_vectors), generation=generation)


def test_a_row_holds_every_items_similarity_and_orders_them_best_first_ties_by_code() -> None:
    items = np.array([[0, 1], [1, 0], [0, 1], [1, 1]], dtype=np.float32)
    row = NeighbourCache(10).get(view(items), "t", np.array([0, 1], dtype=np.float32))
    np.testing.assert_array_equal(row.sims, [1, 0, 1, 1])
    assert row.order.tolist() == [0, 2, 3, 1] and row.n_items == 4
    np.testing.assert_array_equal(row.sorted_sims, [1, 1, 1, 0])


def test_a_row_is_reused_while_the_items_are_the_same_and_recomputed_for_a_new_generation() -> None:
    cache = NeighbourCache(10)
    target = np.array([1, 0], dtype=np.float32)
    first = cache.get(view(np.eye(2, dtype=np.float32)), "t", target)
    assert cache.get(view(np.eye(2, dtype=np.float32)), "t", target) is first
    renumbered = cache.get(view(np.eye(2, dtype=np.float32)[::-1].copy(), generation=1), "t", target)
    assert renumbered is not first and renumbered.order.tolist() == [1, 0] and renumbered.generation == 1
    assert cache.get(view(np.eye(2, dtype=np.float32)[::-1].copy(), generation=1), "t", target) is renumbered


def test_the_same_item_with_another_target_vector_has_its_own_row() -> None:
    cache = NeighbourCache(10)
    items = np.eye(2, dtype=np.float32)
    unknown = cache.get(view(items), "t", np.zeros(2, dtype=np.float32))  # an item scored as zeros until embedded
    embedded = cache.get(view(items), "t", np.array([0, 1], dtype=np.float32))
    assert unknown.sims.tolist() == [0, 0] and embedded.sims.tolist() == [0, 1] and len(cache) == 2


def test_the_cache_keeps_the_most_recently_used_rows() -> None:
    cache = NeighbourCache(2)
    items = np.eye(3, dtype=np.float32)
    rows = {name: cache.get(view(items), name, items[n]) for n, name in enumerate("abc")}
    assert len(cache) == 2
    assert cache.get(view(items), "c", items[2]) is rows["c"] and cache.get(view(items), "b", items[1]) is rows["b"]
    assert cache.get(view(items), "a", items[0]) is not rows["a"]  # evicted, computed again


def test_a_cached_order_extended_with_new_items_is_the_order_a_full_sort_gives() -> None:
    rng = np.random.default_rng(17)
    grid = (rng.integers(-1, 2, (60, DIM)) / 4).astype(np.float32)  # few distinct similarities: ties between items
    samples = [PoolSample(f"s{n}", "u", f"i{n}", n % 2, n, n, grid[n], grid[n]) for n in range(60)]
    pool = SamplePool(dim=DIM, capacity=4)
    pool.add(samples[:20])
    cache = NeighbourCache(10)
    target = grid[5]
    cache.get(pool.view, "i5", target)
    for end in (35, 60):
        pool.add(samples[20:end])
        extended = cache.get(pool.view, "i5", target)
        fresh = NeighbourCache(10).get(pool.view, "i5", target)
        assert extended.n_items == pool.view.n_items
        np.testing.assert_array_equal(extended.order, fresh.order)
        np.testing.assert_array_equal(extended.sims, fresh.sims)
