"""Fine-tuning a trained ranker on newer data: the vocabulary grows, nothing already learnt is thrown away.

- `extend_space`: the parent's FeatureSpace with the new users, items and tags appended. Known ids keep their index,
  their item text embedding and their tag row, so every index the parent model knows still means the same thing.
- `extend_model`: a model of the grown sizes whose parameters are the parent's; the new rows of the embedding and bias
  tables are initialised as a fresh model initialises them (embeddings N(0, 0.05), biases 0).
- `fine_tune`: both, then `ranker.fitting.fit` (Adam, early stopping on the validation rows) from the parent's weights.

`llmcf update` and the streaming evaluation (`llmcf evaluate --streaming`) both call `fine_tune`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from ranker.dataset import Samples, Split
from ranker.features import MAX_TAGS, FeatureSpace
from ranker.fitting import Batches, fit
from ranker.model import RankerModel
from ranker.options import FitOptions
from ranker.sample_pool import ExampleRecord


@dataclass
class FineTuned:
    model: RankerModel
    space: FeatureSpace
    batches: Batches
    history: list[dict[str, float]]
    new_users: int
    new_items: int
    new_tags: int


def extend_space(space: FeatureSpace, samples: Samples, rows: np.ndarray) -> FeatureSpace:
    """`space` plus the users of `rows` and the items of `rows` and their histories that it lacks (in order of first
    appearance), and the tags of those items it lacks; the new users' tags are in the space's user-tag vocabulary."""
    corpus = samples.corpus
    known_users, known_items = set(space.user_ids), set(space.item_ids)
    users = list(dict.fromkeys(corpus.user_ids[u] for u in corpus.user[rows].tolist()))
    new_users = [u for u in users if u not in known_users]
    codes = np.concatenate([corpus.item[rows][:, None], samples.histories[rows]], axis=1).ravel()
    item_codes = [c for c in dict.fromkeys(codes.tolist()) if c >= 0 and corpus.item_ids[c] not in known_items]
    new_items = [corpus.item_ids[c] for c in item_codes]
    known_tags = set(space.tags)
    new_tags = [t for t in dict.fromkeys(t for c in item_codes for t in corpus.item_tags[c]) if t not in known_tags]
    tags = space.tags + new_tags
    tag_index = {t: i + 1 for i, t in enumerate(tags)}
    new_tag_rows = np.zeros((len(item_codes), MAX_TAGS), dtype=np.int64)
    for row, code in enumerate(item_codes):
        known = [tag_index[t] for t in dict.fromkeys(corpus.item_tags[code])][:MAX_TAGS]
        new_tag_rows[row, : len(known)] = known
    new_text = samples.item_text[np.asarray(item_codes, dtype=np.int64) + 1]
    # New users get their demographics in the space's user-tag vocabulary (kept as is: the model's table does not grow).
    profiles = dict(zip(corpus.user_ids, corpus.user_tags, strict=True)) if corpus.user_tags else {}
    return FeatureSpace(
        space.user_ids + new_users,
        space.item_ids + new_items,
        tags,
        np.concatenate([space.item_text, new_text.reshape(-1, space.item_text.shape[1])]),
        np.concatenate([space.item_tags, new_tag_rows]),
        space.history_length,
        space.user_tags,
        np.concatenate([space.user_tag_rows, space.user_tag_index(new_users, profiles)]),
    )


def extend_model(model: RankerModel, space: FeatureSpace) -> RankerModel:
    """A copy of `model` sized for `space` (a superset of the model's own, as `extend_space` makes): every parameter
    is the parent's; tables indexed by user, item or tag get fresh rows for the new ids."""
    config = replace(model.config, n_users=space.n_users, n_items=space.n_items, n_tags=space.n_tags)
    grown = RankerModel(config)
    state = grown.state_dict()
    for name, parent in model.state_dict().items():
        target = state[name]
        if target.shape == parent.shape:
            state[name] = parent.clone()
        elif target.dim() == parent.dim() and target.shape[1:] == parent.shape[1:] and target.shape[0] > parent.shape[0]:
            target[: parent.shape[0]] = parent
        else:
            raise ValueError(f"{name}: cannot grow {tuple(parent.shape)} to {tuple(target.shape)}")
    grown.load_state_dict(state)
    return grown


def fine_tune(parent: RankerModel, parent_space: FeatureSpace, samples: Samples, records: Sequence[ExampleRecord],
              train_split: Split, valid_split: Split, options: FitOptions, step: Callable[[str], None]) -> FineTuned:
    """Grow the space and the model to the training rows, then fit from the parent's weights. The parent is left
    untouched. `records` are the retrieved examples the splits' slots point into."""
    space = extend_space(parent_space, samples, train_split.rows)
    torch.manual_seed(options.seed)  # the new rows' initialisation
    model = extend_model(parent, space)
    added = (space.n_users - parent_space.n_users, space.n_items - parent_space.n_items, space.n_tags - parent_space.n_tags)
    step(f"fine-tuning from the parent: +{added[0]:,} users, +{added[1]:,} items, +{added[2]} tags "
         f"({space.n_users - 1:,} / {space.n_items - 1:,} / {space.n_tags - 1} now)")
    batches = Batches(samples, space, records, with_examples=model.config.ict)
    history = fit(model, batches, train_split, valid_split, options, step)
    return FineTuned(model, space, batches, history, *added)
