"""Growing a trained ranker to new users, items and tags, and fine-tuning it: known ids keep their index and their
learnt rows, new ones get fresh rows, and the grown model scores what the parent knew exactly as the parent did."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ranker.data import Corpus, user_histories
from ranker.dataset import Samples, Split, build_feature_space
from ranker.export import torch_scores
from ranker.features import gather_examples
from ranker.fitting import Batches
from ranker.model import ModelConfig, RankerModel
from ranker.options import FitOptions
from ranker.updates.finetune import extend_model, extend_space, fine_tune

OLD_ROWS = 600


def corpus() -> Samples:
    """40 users, 30 items; items 20-29 and users 30-39 appear only after row OLD_ROWS, items 20-29 with a new tag.
    Labels follow a per-user taste for even/odd items, so there is something to learn."""
    rng = np.random.default_rng(3)
    n = 1_000
    user = np.concatenate([rng.integers(0, 30, OLD_ROWS), rng.integers(0, 40, n - OLD_ROWS)])
    item = np.concatenate([rng.integers(0, 20, OLD_ROWS), rng.integers(0, 30, n - OLD_ROWS)])
    label = ((user + item) % 2 == 0).astype(np.int64) ^ (rng.random(n) < 0.1)
    tags = [("drama",) if i % 2 else ("comedy", "war") for i in range(20)] + [("new-genre", "drama")] * 10
    text = rng.standard_normal((31, 384)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    text[0] = 0
    data = Corpus("synthetic", [f"u{u}" for u in range(40)], [f"i{i}" for i in range(30)], [f"item {i}" for i in range(30)],
                  tags, user.astype(np.int64), item.astype(np.int64), label.astype(np.int64), np.arange(n, dtype=np.int64) * 1000)
    histories, history_labels = user_histories(data, 20)
    return Samples(data, histories, history_labels, text)


@pytest.fixture(scope="module")
def parent() -> tuple[Samples, RankerModel, object]:
    samples = corpus()
    space = build_feature_space(samples, np.arange(OLD_ROWS))
    torch.manual_seed(0)
    model = RankerModel(ModelConfig("deepfm", True, space.n_users, space.n_items, space.n_tags))
    return samples, model, space


def test_the_space_grows_by_appending_and_known_ids_keep_their_rows(parent) -> None:
    samples, _, space = parent
    grown = extend_space(space, samples, np.arange(OLD_ROWS, 1_000))

    assert grown.user_ids[: len(space.user_ids)] == space.user_ids
    assert grown.item_ids[: len(space.item_ids)] == space.item_ids
    assert grown.tags[: len(space.tags)] == space.tags and grown.tags[len(space.tags) :] == ["new-genre"]
    assert set(grown.user_ids) == {f"u{u}" for u in range(40)} and set(grown.item_ids) == {f"i{i}" for i in range(30)}
    np.testing.assert_array_equal(grown.item_text[: space.n_items], space.item_text)
    np.testing.assert_array_equal(grown.item_tags[: space.n_items], space.item_tags)
    new_item = grown.item_index(["i25"])[0]
    np.testing.assert_array_equal(grown.item_text[new_item], samples.item_text[25 + 1])
    assert [grown.tags[t - 1] for t in grown.item_tags[new_item] if t] == ["new-genre", "drama"]


def test_the_grown_model_keeps_every_learnt_row_and_scores_known_ids_as_the_parent(parent) -> None:
    samples, model, space = parent
    grown_space = extend_space(space, samples, np.arange(OLD_ROWS, 1_000))
    grown = extend_model(model, grown_space)

    for table in ("fields.user.weight", "fields.item.weight", "fields.tag.weight", "backbone.item_bias.weight"):
        old, new = model.state_dict()[table], grown.state_dict()[table]
        assert new.shape[0] > old.shape[0]
        torch.testing.assert_close(new[: old.shape[0]], old, rtol=0, atol=0)
    assert grown.state_dict()["fields.user.weight"][space.n_users :].abs().sum() > 0  # fresh rows, not zeros
    assert grown.state_dict()["backbone.user_bias.weight"][space.n_users :].abs().sum() == 0

    known_rows = np.arange(OLD_ROWS)
    inputs = Batches(samples, space, [], with_examples=False).arrays(Split("old", known_rows), np.arange(OLD_ROWS))
    inputs |= gather_examples(space.encode_examples([]), np.full((OLD_ROWS, 4), -1))
    grown_inputs = Batches(samples, grown_space, [], with_examples=False).arrays(Split("old", known_rows), np.arange(OLD_ROWS))
    grown_inputs |= gather_examples(grown_space.encode_examples([]), np.full((OLD_ROWS, 4), -1))
    for name in ("user", "item", "item_tags", "history"):
        np.testing.assert_array_equal(inputs[name], grown_inputs[name])
    np.testing.assert_allclose(torch_scores(grown, grown_inputs), torch_scores(model, inputs), rtol=0, atol=1e-6)


def test_fine_tuning_learns_the_new_rows_and_leaves_the_parent_alone(parent) -> None:
    samples, model, space = parent
    before = copy.deepcopy(model.state_dict())
    train_split, valid_split = Split("train", np.arange(OLD_ROWS, 900)), Split("valid", np.arange(900, 1_000))
    for split in (train_split, valid_split):
        split.slots = np.full((len(split.rows), 4), -1, dtype=np.int64)
    tuned = fine_tune(model, space, samples, [], train_split, valid_split,
                      FitOptions(max_epochs=2, patience=1, batch_size=128, learning_rate=1e-2, seed=0), lambda _line: None)

    assert (tuned.new_users, tuned.new_items, tuned.new_tags) == (10, 10, 1)
    assert 1 <= len(tuned.history) <= 2
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)
    new_rows = tuned.model.state_dict()["fields.user.weight"][space.n_users :]
    torch.manual_seed(0)  # as fine_tune seeds the new rows' initialisation
    fresh = extend_model(model, tuned.space).state_dict()["fields.user.weight"][space.n_users :]
    assert not torch.allclose(new_rows, fresh)  # trained, not just initialised
