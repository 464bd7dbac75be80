"""Training data over a corpus: the time-ordered splits, each row's history and text vectors (`Samples`), the feature
space a model is built on, and the model's sample inputs for corpus rows. Independent of any CoT pool or model.

`Samples.text_vectors` is where a corpus sample's retrieval vectors come from: h = the normalised mean of its history
items' text embeddings, t = its target item's (`llmcf.samples` states the formula; the stream worker computes the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmcf.embeddings import EMBEDDING_DIMENSION
from llmcf.errors import UserFacingError
from llmcf.samples import history_vectors
from llmcf.settings import Settings
from ranker.data import Corpus, EmbeddingCache, database_corpus, embedding_cache_path, movielens_corpus, user_histories
from ranker.features import HISTORY_LENGTH, MAX_TAGS, FeatureSpace, history_label_codes

SPLIT = (0.8, 0.1, 0.1)


@dataclass
class Split:
    """Rows of the corpus for one split, their retrieved example slots (into the run's example records)."""

    name: str
    rows: np.ndarray
    slots: np.ndarray | None = None


def load_corpus(dataset: str | None, settings: Settings) -> Corpus:
    """MovieLens straight from its package (`dataset`), or the pipeline's database when `dataset` is None."""
    if dataset is not None:
        return movielens_corpus(dataset)
    from storage.repository import Repository

    with Repository.from_settings(settings) as repository:
        return database_corpus(repository)


@dataclass
class Samples:
    """A corpus with what every model over it needs: each row's history (item codes, -1 padded) and its labels, and
    every item's text embedding (row = code + 1; row 0 = zeros). Independent of any feature space."""

    corpus: Corpus
    histories: np.ndarray
    history_labels: np.ndarray
    item_text: np.ndarray

    @classmethod
    def of(cls, corpus: Corpus, cache_dir: Path) -> Samples:
        histories, history_labels = user_histories(corpus, HISTORY_LENGTH)
        return cls(corpus, histories, history_labels, item_vectors(corpus, cache_dir))

    def text_vectors(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(history_text, item_text) of rows: h = the normalised mean of the history items' texts, t = the target's."""
        history_text = history_vectors(self.item_text, self.histories[rows] + 1)  # -1 padding -> 0, the zero row
        return history_text, self.item_text[self.corpus.item[rows] + 1]


def time_split(corpus: Corpus, max_train_samples: int | None, max_eval_samples: int | None, seed: int,
               rows: np.ndarray | None = None) -> tuple[Split, Split, Split]:
    """Train / validation / test by time (`SPLIT`) over `rows` (default: the whole corpus, which is time-ordered)."""
    rows = np.arange(len(corpus)) if rows is None else rows
    n = len(rows)
    train_end, valid_end = int(n * SPLIT[0]), int(n * (SPLIT[0] + SPLIT[1]))
    rng = np.random.default_rng(seed)
    train_rows = rows[:train_end]
    if max_train_samples is not None:
        train_rows = train_rows[-max_train_samples:]

    def evaluation(low: int, high: int) -> np.ndarray:
        chosen = rows[low:high]
        if max_eval_samples is not None and len(chosen) > max_eval_samples:
            chosen = np.sort(rng.choice(chosen, max_eval_samples, replace=False))
        return chosen

    splits = Split("train", train_rows), Split("valid", evaluation(train_end, valid_end)), Split("test", evaluation(valid_end, n))
    for split in splits:
        require_both_labels(corpus, split)
    return splits


class NotEnoughData(UserFacingError):
    """A split has no rows or a single label: nothing can be learnt or measured on it yet."""


def require_both_labels(corpus: Corpus, split: Split) -> None:
    if len(split.rows) == 0 or len(np.unique(corpus.label[split.rows])) < 2:
        raise NotEnoughData(f"the {split.name} split has no rows or a single label: use more data")


def item_vectors(corpus: Corpus, cache_dir: Path) -> np.ndarray:
    """(n_items + 1, 384): row c + 1 = item c's text embedding (the stored one when the worker stored it); row 0 = zeros."""
    table = np.zeros((len(corpus.item_ids) + 1, EMBEDDING_DIMENSION), dtype=np.float32)
    to_embed = [c for c in range(len(corpus.item_ids)) if c not in corpus.stored_item_vectors]
    for code, vector in corpus.stored_item_vectors.items():
        table[code + 1] = vector
    if to_embed:
        table[np.asarray(to_embed) + 1] = EmbeddingCache(embedding_cache_path(cache_dir, "items")).embed(
            [corpus.item_texts[c] for c in to_embed]
        )
    return table


def build_feature_space(samples: Samples, train_rows: np.ndarray) -> FeatureSpace:
    """A vocabulary of the users of `train_rows` (with their demographics where the corpus has them) and the items
    they and their histories show."""
    corpus = samples.corpus
    users = np.unique(corpus.user[train_rows])
    seen = np.unique(np.concatenate([corpus.item[train_rows], samples.histories[train_rows].ravel()]))
    items = seen[seen >= 0]
    return FeatureSpace.build(
        [corpus.user_ids[u] for u in users.tolist()],
        [corpus.item_ids[i] for i in items.tolist()],
        samples.item_text[items + 1],
        [corpus.item_tags[i] for i in items.tolist()],
        user_profiles=[corpus.user_tags[u] for u in users.tolist()] if corpus.user_tags else (),
    )


@dataclass
class Catalogue:
    """Every corpus item as one feature space sees it: text (row = code + 1), tags in the space's vocabulary, and its
    index in the space (0 for items the space lacks: scored as cold-start items, by their text, as serving does);
    and every corpus user's index and user tags in the space (a user the space lacks by the demographics the corpus
    holds, as serving scores one whose profile a request gives)."""

    text: np.ndarray
    tags: np.ndarray
    to_space: np.ndarray
    user_to_space: np.ndarray
    user_tags: np.ndarray

    @classmethod
    def of(cls, samples: Samples, space: FeatureSpace) -> Catalogue:
        corpus = samples.corpus
        to_space = np.zeros(len(corpus.item_ids) + 1, dtype=np.int64)
        to_space[1:] = space.item_index(corpus.item_ids)
        tag_index = {t: i + 1 for i, t in enumerate(space.tags)}
        tags = np.zeros((len(corpus.item_ids) + 1, MAX_TAGS), dtype=np.int64)
        for code, item_tags in enumerate(corpus.item_tags):
            known = [tag_index[t] for t in dict.fromkeys(item_tags) if t in tag_index][:MAX_TAGS]
            tags[code + 1, : len(known)] = known
        profiles = dict(zip(corpus.user_ids, corpus.user_tags, strict=True)) if corpus.user_tags else None
        return cls(samples.item_text, tags, to_space, space.user_index(corpus.user_ids),
                   space.user_tag_index(corpus.user_ids, profiles))


def sample_arrays(samples: Samples, catalogue: Catalogue, space: FeatureSpace, rows: np.ndarray) -> dict[str, np.ndarray]:
    """`SAMPLE_INPUTS` for corpus rows; the same numbers `FeatureSpace.encode_samples` gives for these ids with the
    catalogue's texts and tags supplied for the items the vocabulary lacks and the corpus's profiles for its users."""
    corpus = samples.corpus
    codes = corpus.item[rows] + 1
    history_codes = samples.histories[rows] + 1
    history_text, item_text = samples.text_vectors(rows)
    return {
        "user": catalogue.user_to_space[corpus.user[rows]],
        "user_tags": catalogue.user_tags[corpus.user[rows]],
        "item": catalogue.to_space[codes],
        "item_tags": catalogue.tags[codes],
        "item_text": item_text,
        "history": catalogue.to_space[history_codes] * (history_codes > 0),
        "history_mask": (history_codes > 0).astype(np.float32),
        "history_label": history_label_codes(samples.history_labels[rows], history_codes > 0),
        "history_text": history_text,
    }
