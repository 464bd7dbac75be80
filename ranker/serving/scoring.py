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
4. ICT models only: the exact 2+2 examples of every candidate from the in-memory pool (`ranker.retrieval`, one
   history shared by all candidates: `top_rows_for_history`), on one snapshot of the pool, their inputs gathered from
   the version's encoded examples (`ranker.serving.examples`). The queries' event time is `QUERY_TS_MS`, after every
   stored sample: every example is from the user's past, as now would give, and the slot shuffle (seeded by user, item
   and time) does not change from one millisecond to the next, so the same request against the same pool gets the
   same scores.
5. One ONNX run over all candidates: the query scorer over the examples' cached tokens (a split artifact), else the
   full graph over their inputs.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ranker.features import FeatureSpace, NewItem
from ranker.retrieval import LATEST_SEQ, ExactRetriever, seed_of, shuffle_slots
from ranker.sample_pool import SamplePool
from ranker.serving.examples import EncodedExamples
from ranker.serving.models import ModelBundle
from storage.repository import Repository

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
    examples: dict[str, int] = field(default_factory=dict)  # in-context examples used, by CoT: llm, template, pending


def encode_request(space: FeatureSpace, user_id: str, candidates: Sequence[str], history: Sequence[str],
                   new_items: Mapping[str, NewItem] | None = None, history_labels: Sequence[int | None] | None = None
                   ) -> dict[str, np.ndarray]:
    """The sample inputs of one request: one row per candidate; the history part is the same for every candidate, so
    it is encoded once and broadcast."""
    count = len(candidates)
    inputs = space.encode_samples([user_id] * count, list(candidates), [()] * count, new_items)
    own = space.encode_samples([user_id], [candidates[0]], [history], new_items, history_labels=[history_labels])
    for name in ("history", "history_mask", "history_label", "history_text"):
        inputs[name] = np.repeat(own[name], count, axis=0)
    return inputs


class Scorer:
    """Turns requests into scores; thread-safe (the retriever and the encodings are, sessions and the repository too)."""

    def __init__(self, repository: Repository, pool: SamplePool | None, history_length: int,
                 new_item_cache_size: int = 100_000) -> None:
        self.repository = repository
        self.history_length = history_length
        self.pool = pool
        self.retriever = ExactRetriever(pool) if pool is not None else None
        self.new_item_cache_size = new_item_cache_size
        self._new_item_cache: OrderedDict[str, tuple[float, NewItem]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._encoded: OrderedDict[str, EncodedExamples] = OrderedDict()

    def prepare(self, bundle: ModelBundle) -> None:
        """Encode the pool's examples for a version about to be served (the model holder calls it before the swap)."""
        if bundle.ict and self.pool is not None:
            self.examples_of(bundle).extend(self.pool.view)

    def examples_of(self, bundle: ModelBundle) -> EncodedExamples:
        with self._cache_lock:
            encoded = self._encoded.get(bundle.version_id)
            if encoded is None:
                encoded = self._encoded[bundle.version_id] = EncodedExamples(bundle)
                while len(self._encoded) > 2:  # the serving version and the one being swapped in
                    self._encoded.popitem(last=False)
            return encoded

    def history_of(self, user_id: str) -> tuple[list[str], list[int]]:
        """The user's stored history: item ids and labels, oldest first."""
        rows = self.repository.user_history(user_id, limit=self.history_length)
        return [row.item_id for row in rows], [int(row.label) for row in rows]

    def score(self, bundle: ModelBundle, user_id: str, candidates: Sequence[str], history: Sequence[str] | None,
              history_labels: Sequence[int | None] | None = None, now_ms: int | None = None) -> RankResult:
        """`history` (and its 0/1 `history_labels`, None where unknown) replaces the stored history when given."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        labels: Sequence[int | None] | None
        if history is not None:
            recent = list(history)[-self.history_length:]
            labels = list(history_labels)[-self.history_length:] if history_labels is not None else None
        else:
            recent, labels = self.history_of(user_id)
        space = bundle.space
        mentioned = list(dict.fromkeys([*candidates, *recent]))
        unknown = [i for i, index in zip(mentioned, space.item_index(mentioned).tolist(), strict=True) if index == 0]
        new_items = self._new_items(unknown)
        items = encode_request(space, user_id, candidates, recent, new_items, labels)

        example_age_s, retrieval_s, examples = None, 0.0, {}
        if bundle.ict:
            started = time.perf_counter()
            if self.retriever is None or self.pool is None:
                raise RuntimeError(f"model {bundle.version_id} needs in-context examples but the server has no example pool")
            view = self.pool.view
            rows = self.retriever.top_rows_for_history(view, view.user_code(user_id), QUERY_TS_MS, LATEST_SEQ,
                                                       items["history_text"][0], list(candidates), items["item_text"])
            slots = shuffle_slots(rows, [seed_of(user_id, item, QUERY_TS_MS) for item in candidates])
            encoded = self.examples_of(bundle)
            if bundle.split:
                tokens, present = encoded.tokens(view, slots)
            else:
                items.update(encoded.gather(view, slots))
            used = slots[slots >= 0]
            if len(used):
                example_age_s = max(0.0, (now_ms - int(view.ts[used].max())) / 1000.0)
                generated, by_llm = view.generated[used], view.by_llm[used]  # the flag first, as the encoder reads
                llm = int(np.count_nonzero(generated & by_llm))
                examples = {"llm": llm, "template": int(np.count_nonzero(generated)) - llm,
                            "pending": int(len(used) - np.count_nonzero(generated))}
            retrieval_s = time.perf_counter() - started
        started = time.perf_counter()
        scores = bundle.run_with_tokens(items, tokens, present) if bundle.ict and bundle.split else bundle.run(items)
        cold = set(unknown)
        return RankResult(
            version_id=bundle.version_id, kind=bundle.kind, scores=scores, example_age_s=example_age_s,
            cold_user=bool(space.user_index([user_id])[0] == 0),
            cold_items=[i for i in dict.fromkeys(candidates) if i in cold],
            retrieval_s=retrieval_s, model_s=time.perf_counter() - started, examples=examples,
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
