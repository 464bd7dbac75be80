"""What one model version needs of the pool's samples, computed once per sample and version.

- The vocabulary-dependent example inputs (user, user tags, item, tags, history item indices and mask), by the training code's own
  encoder (`FeatureSpace.encode_examples`), so serving cannot encode an example differently from training.
- For a split artifact (`ranker.export`: example encoder + query scorer), each sample's three tokens, by the example
  encoder: a request then gathers 4 x 3 tokens per candidate and runs only the query scorer. A token row remembers
  whether the sample's CoT had landed when it was encoded; a sample whose CoT has landed since is re-encoded when a
  request uses it (only its CoT token changes).

The rest of an example's inputs is read from the pool at request time: its text vectors, label and CoT. Rows are
encoded when the pool has grown since the last request (a few per request while samples stream in); the whole pool
is encoded by `extend` before a new version is swapped in (`Scorer.prepare`, called by the model holder).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from ranker.features import EXAMPLE_INPUTS, EXAMPLE_ROW_INPUTS, absent_as_zeros
from ranker.sample_pool import PoolView

if TYPE_CHECKING:
    from ranker.serving.models import ModelBundle

_ENCODE_CHUNK = 20_000
_VOCABULARY_FIELDS = ("ex_user", "ex_user_tags", "ex_item", "ex_item_tags", "ex_history", "ex_history_mask")
# The pool keeps no labels of its samples' histories: unknown, as in training (`ranker.features.gather_examples`).


class EncodedExamples:
    """One version's encoding of a pool's rows [0, n) for one pool generation (a compaction renumbers the rows)."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.space = bundle.space
        self.encoder = bundle.encode_examples if bundle.split else None
        self.token_dim = bundle.config.ict_dim
        self.generation: int | None = None
        self.n = 0
        self._lock = threading.Lock()
        self._arrays: dict[str, np.ndarray] = {}
        self._tokens = np.zeros((0, 0, 0), dtype=np.float32)
        self._tokens_ready = np.zeros(0, dtype=bool)  # the CoT had landed when the row's tokens were encoded

    def extend(self, view: PoolView) -> None:
        """Encode the rows of `view` not encoded yet (all of them after a compaction)."""
        if self.generation == view.generation and self.n >= view.n:
            return
        with self._lock:
            if self.generation != view.generation:
                self.generation, self.n, self._arrays = view.generation, 0, {}
                self._tokens, self._tokens_ready = np.zeros((0, 0, 0), dtype=np.float32), np.zeros(0, dtype=bool)
            for start in range(self.n, view.n, _ENCODE_CHUNK):
                rows = np.arange(start, min(view.n, start + _ENCODE_CHUNK))
                encoded = self.space.encode_examples(view.records(rows.tolist()))
                fresh = dict(zip(_VOCABULARY_FIELDS, (encoded.user, encoded.user_tags, encoded.item, encoded.item_tags,
                                                      encoded.history, encoded.history_mask), strict=True))
                self._arrays = {name: np.concatenate([self._arrays[name], part]) if name in self._arrays else part
                                for name, part in fresh.items()}
                if self.encoder is not None:
                    inputs, ready = self._row_inputs(view, rows)
                    tokens = self.encoder(inputs)
                    self._tokens = np.concatenate([self._tokens, tokens]) if len(self._tokens) else tokens
                    self._tokens_ready = np.concatenate([self._tokens_ready, ready])
                self.n = int(rows[-1]) + 1

    def _row_inputs(self, view: PoolView, rows: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """`EXAMPLE_ROW_INPUTS` of encoded pool rows, and whether each one's CoT had landed."""
        ready = view.generated[rows]  # read before the CoT: a CoT is written before its flag
        inputs = {name: self._arrays[name][rows] for name in _VOCABULARY_FIELDS}
        inputs |= {
            "ex_item_text": view.item_vectors[view.item[rows]], "ex_history_text": view.history[rows],
            "ex_cot": np.where(ready[:, None], view.cot[rows], np.float32(0)),
            "ex_label": view.label[rows].astype(np.int64), "ex_cot_ready": ready.astype(np.float32),
            "ex_history_label": np.zeros_like(inputs["ex_history"]),
        }
        return {spec.name: np.ascontiguousarray(inputs[spec.name]) for spec in EXAMPLE_ROW_INPUTS}, ready

    def gather(self, view: PoolView, slots: np.ndarray) -> dict[str, np.ndarray]:
        """The `EXAMPLE_INPUTS` arrays for (B, K) slots of `view` rows (-1 = no example: zeros, `ex_present` 0): the
        full graph's example inputs."""
        self.extend(view)
        present = slots >= 0
        if view.n == 0:
            return {spec.name: np.zeros(slots.shape + tuple(int(s) for s in spec.shape[1:]), dtype=spec.dtype)
                    for spec in EXAMPLE_INPUTS}
        rows = np.where(present, slots, 0)
        inputs, _ = self._row_inputs(view, rows.ravel())
        fields = {name: values.reshape(*rows.shape, *values.shape[1:]) for name, values in inputs.items()}
        return absent_as_zeros(fields, present)  # absent slots as in training (`gather_examples`)

    def tokens(self, view: PoolView, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, K, 3, d) example tokens for (B, K) slots of `view` rows (zeros where absent) and `ex_present` (B, K):
        the query scorer's example inputs. Needs a split artifact."""
        if self.encoder is None:
            raise ValueError("this model version has no example encoder (exported before the split)")
        self.extend(view)
        present = slots >= 0
        used = np.unique(slots[present])
        stale = used[view.generated[used] != self._tokens_ready[used]]
        if len(stale):  # CoTs landed since these rows were encoded
            with self._lock:
                inputs, ready = self._row_inputs(view, stale)
                self._tokens[stale] = self.encoder(inputs)
                self._tokens_ready[stale] = ready
        if not len(self._tokens):
            return np.zeros((*slots.shape, 3, self.token_dim), dtype=np.float32), present.astype(np.float32)
        tokens = self._tokens[np.where(present, slots, 0)]
        tokens[~present] = 0.0
        return tokens, present.astype(np.float32)
