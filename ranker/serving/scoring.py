"""Scoring one `/v1/rank` request with one `ModelBundle`: history, cold starts, in-context examples, ONNX.

Steps (all blocking: the app runs them on its scoring threads):
1. History: the request's, else the user's last `history_length` stored interactions (`Repository.user_history`).
2. Cold starts: candidates and history items the model's vocabulary lacks are looked up in storage (text embedding
   and tags) and scored as new items (`ranker.features.NewItem`: index 0, their own text); without a stored embedding
   they are scored as the unknown item. A user outside the vocabulary gets the unknown user row. Never an error.
   Found items are cached for `NEW_ITEM_TTL_S` (an item's embedding is written once, so only its tags can change);
   items not found are asked for again on the next request, as they may be stored any moment.
3. Features: `FeatureSpace.encode_samples` (the training pipeline's encoding); the history part is the same for every
   candidate, so it is encoded once and broadcast.
4. ICT models only: one batched `ExampleRetriever.retrieve` for all candidates, encoded and gathered into the example
   inputs; the retriever is shared and not thread-safe, so it runs under a lock (its item cache is what makes it
   cheap). The queries' event time is `QUERY_TS_MS`, after every stored sample: every example is from the user's past,
   as now would give, and the slot shuffle (seeded by user, item and time) does not change from one millisecond to
   the next, so the same request against the same pool gets the same scores.
5. One ONNX run over all candidates.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ranker.features import NewItem, gather_examples
from ranker.retrieval import ExampleQuery, ExampleRetriever
from ranker.serving.models import ModelBundle
from storage.repository import Repository
from storage.vectors import VectorIndex

NEW_ITEM_TTL_S = 300.0
QUERY_TS_MS = 9_999_999_999_999  # 2286-11-20: later than any sample's event time


@dataclass(frozen=True)
class RankResult:
    """Scores in candidate order and what the response reports about them."""

    version_id: str
    kind: str
    scores: np.ndarray
    example_age_s: float | None
    cold_user: bool
    cold_items: list[str]
    retrieval_s: float
    model_s: float


class Scorer:
    """Turns requests into scores; thread-safe (the retriever is locked, sessions and the repository are safe)."""

    def __init__(self, repository: Repository, index: VectorIndex | None, history_length: int,
                 retriever: ExampleRetriever | None = None, new_item_cache_size: int = 100_000) -> None:
        self.repository = repository
        self.history_length = history_length
        self.retriever = retriever if retriever is not None else (ExampleRetriever(index) if index is not None else None)
        self.new_item_cache_size = new_item_cache_size
        self._retrieval_lock = threading.Lock()
        self._new_item_cache: OrderedDict[str, tuple[float, NewItem]] = OrderedDict()
        self._cache_lock = threading.Lock()

    def history_of(self, user_id: str) -> list[str]:
        return [row.item_id for row in self.repository.user_history(user_id, limit=self.history_length)]

    def score(self, bundle: ModelBundle, user_id: str, candidates: Sequence[str], history: Sequence[str] | None,
              now_ms: int | None = None) -> RankResult:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        recent = list(history)[-self.history_length:] if history is not None else self.history_of(user_id)
        space = bundle.space
        mentioned = list(dict.fromkeys([*candidates, *recent]))
        unknown = [i for i, index in zip(mentioned, space.item_index(mentioned).tolist(), strict=True) if index == 0]
        new_items = self._new_items(unknown)
        count = len(candidates)
        items = space.encode_samples([user_id] * count, list(candidates), [()] * count, new_items)
        own = space.encode_samples([user_id], [candidates[0]], [recent], new_items)
        for name in ("history", "history_mask", "history_text"):
            items[name] = np.repeat(own[name], count, axis=0)

        example_age_s, retrieval_s = None, 0.0
        if bundle.ict:
            started = time.perf_counter()
            if self.retriever is None:
                raise RuntimeError(f"model {bundle.version_id} needs in-context examples but the server has no example pool")
            queries = [ExampleQuery(user_id, item, QUERY_TS_MS, items["history_text"][0], items["item_text"][row])
                       for row, item in enumerate(candidates)]
            with self._retrieval_lock:
                found = self.retriever.retrieve(queries)
            items.update(gather_examples(space.encode_examples(found.records), found.slots))
            example_age_s = found.freshest_age_s(now_ms)
            retrieval_s = time.perf_counter() - started
        started = time.perf_counter()
        scores = bundle.run(items)
        cold = set(unknown)
        return RankResult(
            version_id=bundle.version_id, kind=bundle.kind, scores=scores, example_age_s=example_age_s,
            cold_user=bool(space.user_index([user_id])[0] == 0),
            cold_items=[i for i in dict.fromkeys(candidates) if i in cold],
            retrieval_s=retrieval_s, model_s=time.perf_counter() - started,
        )

    def _new_items(self, item_ids: list[str]) -> dict[str, NewItem]:
        now = time.monotonic()
        found: dict[str, NewItem] = {}
        with self._cache_lock:
            for item_id in item_ids:
                cached = self._new_item_cache.get(item_id)
                if cached is not None and now - cached[0] < NEW_ITEM_TTL_S:
                    found[item_id] = cached[1]
        missing = [i for i in item_ids if i not in found]
        if not missing:
            return found
        vectors = self.repository.get_item_embeddings(missing)
        stored = self.repository.get_items(missing)
        fetched = {
            item_id: NewItem(vectors.get(item_id), tuple(stored[item_id].tags) if item_id in stored else ())
            for item_id in missing if item_id in vectors or item_id in stored
        }
        with self._cache_lock:
            for item_id, item in fetched.items():
                if item.text_vector is not None:  # complete: worth keeping
                    self._new_item_cache[item_id] = (now, item)
                    self._new_item_cache.move_to_end(item_id)
            while len(self._new_item_cache) > self.new_item_cache_size:
                self._new_item_cache.popitem(last=False)
        return found | fetched
