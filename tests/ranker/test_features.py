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


def profiled() -> FeatureSpace:
    return FeatureSpace.build(["u1", "u2"], ["a"], np.stack([unit(1)]), [()],
                              user_profiles=[("gender:F", "age:25"), ("gender:M", "age:25")])


def test_user_tags_come_from_the_vocabulary_or_the_profile_given_for_an_unknown_user() -> None:
    space = profiled()
    assert space.user_tags == ["age:25", "gender:F", "gender:M"] and space.n_user_tags == 4
    encoded = space.encode_samples(["u1", "stranger", "nobody"], ["a"] * 3, [[]] * 3,
                                   user_profiles={"stranger": ("gender:M", "occupation:unheard-of"), "u1": ("gender:M",)})
    assert encoded["user_tags"].tolist() == [[2, 1, 0], [3, 0, 0], [0, 0, 0]]  # a known user keeps its own profile
    assert space.encode_examples([]).user_tags.shape == (0, 3)


def test_a_space_without_profiles_has_no_user_tags_and_old_saved_spaces_load_without_them(tmp_path: Path) -> None:
    assert space().n_user_tags == 0 and not space().encode_samples(["u1"], ["a"], [[]])["user_tags"].any()
    profiled().save(tmp_path)
    loaded = FeatureSpace.load(tmp_path)
    np.testing.assert_array_equal(loaded.user_tag_rows, profiled().user_tag_rows)
    assert loaded.user_tags == profiled().user_tags
    import json

    meta = json.loads((tmp_path / "features.json").read_text())  # as written before user tags existed
    del meta["user_tags"]
    (tmp_path / "features.json").write_text(json.dumps(meta))
    arrays = dict(np.load(tmp_path / "features.npz"))
    del arrays["user_tag_rows"]
    np.savez(tmp_path / "features.npz", **arrays)
    assert FeatureSpace.load(tmp_path).n_user_tags == 0


def test_history_labels_are_coded_liked_not_liked_or_unknown_and_must_match_the_history() -> None:
    import pytest

    encoded = space().encode_samples(["u1", "u2"], ["a", "b"], [["a", "b", "c"], ["c"]], history_labels=[[1, 0, 1], None])
    assert encoded["history_label"][:, :4].tolist() == [[2, 1, 2, 0], [0, 0, 0, 0]]  # 0: padding or not given
    long = ["a", "b"] * 15  # the last 20 entries' labels, aligned with their items
    encoded = space().encode_samples(["u1"], ["a"], [long], history_labels=[[i % 2 for i in range(30)]])
    assert encoded["history_label"][0].tolist() == [[1, 2][i % 2] for i in range(10, 30)]
    encoded = space().encode_samples(["u1"], ["a"], [["a", "b", "c"]], history_labels=[[1, None, 0]])
    assert encoded["history_label"][0, :3].tolist() == [2, 0, 1]  # one entry's label unknown
    with pytest.raises(ValueError, match="3 items and 2 labels"):
        space().encode_samples(["u1"], ["a"], [["a", "b", "c"]], history_labels=[[1, 0]])
    assert not gather_examples(space().encode_examples([]), np.full((2, 4), -1))["ex_history_label"].any()
