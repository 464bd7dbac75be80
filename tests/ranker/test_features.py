"""The feature pipeline: cold starts, history encoding, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmcf.samples import history_vector
from ranker.features import HISTORY_LENGTH, FeatureSpace, NewItem, gather_examples


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    return v / np.linalg.norm(v)


def space() -> FeatureSpace:
    return FeatureSpace.build(["u1", "u2"], ["a", "b", "c"], np.stack([unit(1), unit(2), unit(3)]),
                              [("drama", "war"), ("drama",), ()])


def test_known_ids_map_to_their_rows_and_unknown_ones_to_zero() -> None:
    encoded = space().encode_samples(["u2", "stranger"], ["b", "brand-new"], [["a", "c"], []],
                                     new_items={"brand-new": NewItem(unit(9), ("war", "unheard-of"))})

    assert encoded["user"].tolist() == [2, 0]
    assert encoded["item"].tolist() == [2, 0]
    np.testing.assert_allclose(encoded["item_text"][1], unit(9))  # a new item is scored by its text
    assert encoded["item_tags"][1].tolist()[:2] == [2, 0]  # "war" known (index 2), "unheard-of" dropped
    assert encoded["item_tags"][0].tolist()[:1] == [1]  # "drama" is the most frequent tag
    assert encoded["history"][0].tolist()[:3] == [1, 3, 0]
    assert encoded["history_mask"].sum(axis=1).tolist() == [2.0, 0.0]
    np.testing.assert_allclose(encoded["history_text"][0], history_vector(np.stack([unit(1), unit(3)])), atol=1e-6)
    assert not encoded["history_text"][1].any()
    assert all(v.shape[0] == 2 for v in encoded.values())


def test_history_keeps_the_last_twenty_oldest_first() -> None:
    history = ["a", "b", "c"] * 10  # 30 entries
    encoded = space().encode_samples(["u1"], ["a"], [history])

    assert encoded["history"].shape == (1, HISTORY_LENGTH)
    assert encoded["history"][0].tolist() == [[1, 2, 3][i % 3] for i in range(10, 30)]
    assert encoded["history_mask"].sum() == HISTORY_LENGTH


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    original = space()
    original.save(tmp_path)
    loaded = FeatureSpace.load(tmp_path)

    args = (["u1", "x"], ["c", "a"], [["b"], ["a", "zzz"]])
    for name, value in original.encode_samples(*args).items():
        np.testing.assert_array_equal(value, loaded.encode_samples(*args)[name])


def test_empty_slots_gather_zeros() -> None:
    pool = space().encode_examples([])
    gathered = gather_examples(pool, np.full((3, 4), -1))

    assert gathered["ex_present"].shape == (3, 4) and not gathered["ex_present"].any()
    assert gathered["ex_cot"].shape == (3, 4, 384)
    assert gathered["ex_history"].shape == (3, 4, HISTORY_LENGTH)
