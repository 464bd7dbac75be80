"""Training data for the ranker: labelled interactions in time order with their histories, from MovieLens (offline
runs) or from the pipeline's database, plus the on-disk embedding cache that makes a second run fast.

A `Corpus` is the catalogue (item ids, texts, tags) and the interactions as parallel arrays of catalogue codes, sorted
by event time. Histories are the user's previous `length` interactions (any label), oldest first: exactly what the stream
worker keeps per user and indexes with each sample.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from llmcf.embeddings import EMBEDDING_DIMENSION, MODEL_NAME, TextEmbedder
from llmcf.events import epoch_ms
from llmcf.files import staged_file


@dataclass
class Corpus:
    """Items and time-ordered interactions. `user`/`item` are codes into `user_ids`/`item_ids`; `user_tags[u]` are
    user u's demographic tokens (`llmcf.movielens.read_user_profiles`), or `user_tags` is empty when none are known."""

    source: str
    user_ids: list[str]
    item_ids: list[str]
    item_texts: list[str]
    item_tags: list[tuple[str, ...]]
    user: np.ndarray
    item: np.ndarray
    label: np.ndarray
    ts_ms: np.ndarray
    user_tags: list[tuple[str, ...]] = field(default_factory=list)
    stored_cot: dict[tuple[int, int, int], tuple[str, np.ndarray | None]] = field(default_factory=dict)
    """(user code, item code, ts_ms) -> (sample id, CoT embedding or None while pending): the database's CoT pool."""
    stored_item_vectors: dict[int, np.ndarray] = field(default_factory=dict)
    """item code -> the text embedding the stream worker stored (used instead of embedding the text again)."""

    def __len__(self) -> int:
        return len(self.label)

    def sample_key(self, row: int) -> str:
        """The sample's id in the example index: the stored CoT request id when there is one, else one derived from
        its content (so the same sample keeps its key across runs)."""
        stored = self.stored_cot.get((int(self.user[row]), int(self.item[row]), int(self.ts_ms[row])))
        if stored is not None:
            return stored[0]
        return f"{self.source}:{self.user_ids[self.user[row]]}:{self.item_ids[self.item[row]]}:{self.ts_ms[row]}"


def movielens_corpus(dataset: str) -> Corpus:
    """MovieLens as the replay publishes it: item text "title (year); genres", tags = genres, label = rating >= 4; and
    the users' demographics the dataset ships (which the replay does not publish)."""
    from llmcf import movielens

    ratings = movielens.load(dataset)
    texts, tags = [], []
    for movie in ratings.movies:
        event = movie.to_event(created_at=_EPOCH)
        texts.append(item_text(event.title, event.text, event.tags))
        tags.append(tuple(event.tags))
    return Corpus(
        source=dataset,
        user_ids=list(ratings.user_ids),
        item_ids=[m.item_id for m in ratings.movies],
        item_texts=texts,
        item_tags=tags,
        user=ratings.user_codes.astype(np.int64),
        item=ratings.item_codes.astype(np.int64),
        label=(ratings.ratings >= movielens.POSITIVE_RATING).astype(np.int64),
        ts_ms=ratings.seconds.astype(np.int64) * 1000,
        user_tags=[ratings.user_profiles.get(u, ()) for u in ratings.user_ids] if ratings.user_profiles else [],
    )


def database_corpus(repository: object) -> Corpus:
    """Interactions, items and CoT samples from the storage API (`storage.repository.Repository`)."""
    from storage.repository import Repository

    assert isinstance(repository, Repository)
    user_code: dict[str, int] = {}
    item_code: dict[str, int] = {}
    users, items, labels, times = [], [], [], []
    for row in repository.iter_interactions():
        users.append(user_code.setdefault(row.user_id, len(user_code)))
        items.append(item_code.setdefault(row.item_id, len(item_code)))
        labels.append(row.label)
        times.append(epoch_ms(row.ts))
    if not labels:
        raise ValueError("the database holds no interactions to train on (replay some, or use --dataset)")
    stored = repository.get_items(item_code)
    item_ids = list(item_code)
    texts = [item_text(stored[i].title, stored[i].text, stored[i].tags) if i in stored else i for i in item_ids]
    tags = [tuple(stored[i].tags) if i in stored else () for i in item_ids]
    stored_cot: dict[tuple[int, int, int], tuple[str, np.ndarray | None]] = {}
    for sample in repository.iter_cot_samples():
        if sample.user_id in user_code and sample.item_id in item_code:
            cot = sample.cot_vector() if sample.status == "generated" else None
            stored_cot[(user_code[sample.user_id], item_code[sample.item_id], epoch_ms(sample.ts))] = (sample.sample_id, cot)
    vectors = repository.get_item_embeddings(item_ids)
    return Corpus(
        source="database",
        user_ids=list(user_code),
        item_ids=item_ids,
        item_texts=texts,
        item_tags=tags,
        user=np.asarray(users, dtype=np.int64),
        item=np.asarray(items, dtype=np.int64),
        label=np.asarray(labels, dtype=np.int64),
        ts_ms=np.asarray(times, dtype=np.int64),
        stored_cot=stored_cot,
        stored_item_vectors={item_code[i]: v for i, v in vectors.items() if v.shape == (EMBEDDING_DIMENSION,)},
    )


def user_histories(corpus: Corpus, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, length) item codes of each row's previous interactions by the same user, oldest first, -1 padded at the
    end, and their labels. Rows are in time order, so "previous" is by event time (file order on ties)."""
    n = len(corpus)
    order = np.argsort(corpus.user, kind="stable")  # per user, still in time order
    sorted_users = corpus.user[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_users)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    position = np.arange(n) - group_start  # how many earlier rows this user has
    count = np.minimum(position, length)
    items = np.full((n, length), -1, dtype=np.int64)
    labels = np.zeros((n, length), dtype=np.int64)
    sorted_items, sorted_labels = corpus.item[order], corpus.label[order]
    for j in range(length):
        valid = j < count
        source = np.arange(n) - count + j
        items[order[valid], j] = sorted_items[source[valid]]
        labels[order[valid], j] = sorted_labels[source[valid]]
    return items, labels


class EmbeddingCache:
    """Text -> MiniLM embedding, kept on disk by the text's sha256, so repeated runs embed nothing twice."""

    def __init__(self, path: Path, embedder: TextEmbedder | None = None) -> None:
        self.path = path
        self._embedder = embedder
        self._vectors: dict[str, np.ndarray] = {}
        if path.is_file():
            self._vectors = self._stored()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        digests = [_digest(t) for t in texts]
        missing = sorted({d: t for d, t in zip(digests, texts, strict=False) if d not in self._vectors}.items())
        if missing:
            if self._embedder is None:
                self._embedder = TextEmbedder.load()
            vectors = self._embedder.embed([t for _, t in missing])
            self._vectors.update(zip((d for d, _ in missing), vectors, strict=False))
            self._save()
        if not texts:
            return np.zeros((0, EMBEDDING_DIMENSION), dtype=np.float32)
        return np.stack([self._vectors[d] for d in digests]).astype(np.float32)

    def _stored(self) -> dict[str, np.ndarray]:
        stored = np.load(self.path)
        return dict(zip(stored["digests"].tolist(), stored["vectors"], strict=False))

    def _save(self) -> None:
        if self.path.is_file():  # keep what another process (a parallel `llmcf evaluate`) added since we loaded
            self._vectors = {**self._stored(), **self._vectors}
        save_npz(self.path, digests=np.array(list(self._vectors)), vectors=np.stack(list(self._vectors.values())))


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write `path` whole or not at all, also when several processes write it at once (the last one wins): each
    stages its own file (named by its pid) and renames it over `path`."""
    with staged_file(path) as staging:
        np.savez(staging, allow_pickle=False, **arrays)  # numeric and string arrays only, as `np.load` reads them


def embedding_cache_path(cache_dir: Path, kind: str) -> Path:
    return cache_dir / f"{kind}-{MODEL_NAME}.npz"


def fingerprint(*parts: object) -> str:
    """A short stable hash of JSON-able parts and numpy arrays (cache keys)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            digest.update(np.ascontiguousarray(part).tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def item_text(title: str, text: str, tags: Sequence[str]) -> str:
    """The text embedded for an item, "title; text; tags": the stream worker embeds exactly this (streams/items.py), so
    offline vectors match the ones in the live index."""
    return f"{title}; {text}; {', '.join(tags)}"


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)  # MovieLens item text does not depend on the creation time
