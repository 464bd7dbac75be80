"""What one model version needs of the pool's samples, computed once per sample and version: the vocabulary-dependent
example inputs (user, item, tags, history item indices and mask), by the training code's own encoder
(`FeatureSpace.encode_examples`, so serving cannot encode an example differently from training).

The rest of an example's inputs is read from the pool at request time, where it may change: its text vectors, its
label, and its CoT embedding with `ex_cot_ready` (a pending CoT lands without a new version). Rows are encoded when
the pool has grown since the last request (a few per request while samples stream in); a whole pool is encoded by
`prepare`, which the model holder calls before it swaps a new version in (`ModelHolder(prepare=...)`).
"""

from __future__ import annotations

import threading

import numpy as np

from ranker.features import EXAMPLE_INPUTS, FeatureSpace, absent_as_zeros
from ranker.retrieval import PoolView

_ENCODE_CHUNK = 20_000


class EncodedExamples:
    """One version's encoding of a pool's rows [0, n) for one pool generation (a compaction renumbers the rows)."""

    def __init__(self, space: FeatureSpace) -> None:
        self.space = space
        self.generation: int | None = None
        self.n = 0
        self._lock = threading.Lock()
        self._arrays: dict[str, np.ndarray] = {}

    def extend(self, view: PoolView) -> None:
        """Encode the rows of `view` not encoded yet (all of them after a compaction)."""
        if self.generation == view.generation and self.n >= view.n:
            return
        with self._lock:
            if self.generation != view.generation:
                self.generation, self.n, self._arrays = view.generation, 0, {}
            for start in range(self.n, view.n, _ENCODE_CHUNK):
                rows = range(start, min(view.n, start + _ENCODE_CHUNK))
                encoded = self.space.encode_examples(view.records(rows))
                fresh = {"ex_user": encoded.user, "ex_item": encoded.item, "ex_item_tags": encoded.item_tags,
                         "ex_history": encoded.history, "ex_history_mask": encoded.history_mask}
                self._arrays = {name: np.concatenate([self._arrays[name], part]) if name in self._arrays else part
                                for name, part in fresh.items()}
                self.n = rows.stop

    def gather(self, view: PoolView, slots: np.ndarray) -> dict[str, np.ndarray]:
        """The `EXAMPLE_INPUTS` arrays for (B, K) slots of `view` rows (-1 = no example: zeros, `ex_present` 0)."""
        self.extend(view)
        present = slots >= 0
        rows = np.where(present, slots, 0)
        if view.n == 0:
            return {spec.name: np.zeros(slots.shape + tuple(int(s) for s in spec.shape[1:]), dtype=spec.dtype)
                    for spec in EXAMPLE_INPUTS}
        arrays = self._arrays
        ready = view.generated[rows]  # read before the CoT: a CoT is written before its flag
        fields = {
            "ex_user": arrays["ex_user"][rows], "ex_item": arrays["ex_item"][rows],
            "ex_item_tags": arrays["ex_item_tags"][rows], "ex_item_text": view.item_vectors[view.item[rows]],
            "ex_history": arrays["ex_history"][rows], "ex_history_mask": arrays["ex_history_mask"][rows],
            "ex_history_text": view.history[rows], "ex_cot": np.where(ready[..., None], view.cot[rows], np.float32(0)),
            "ex_label": view.label[rows].astype(np.int64), "ex_cot_ready": ready.astype(np.float32),
        }
        return absent_as_zeros(fields, present)  # absent slots as in training (`gather_examples`)
