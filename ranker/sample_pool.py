"""The example pool in memory: CoT samples in contiguous arrays, published as immutable snapshots.

`SamplePool` holds the samples (history vector h, item, label, user, event time and stream order, CoT) in contiguous
arrays, plus each item's rows (positives first) and a contiguous block of their history vectors. Writers (`add`,
`compact`) publish an immutable `PoolView` after each change by swapping one reference, so a reader (a
request) works on one consistent snapshot while samples keep arriving. Rows only ever append until `compact` (the
retention policy) rebuilds the arrays. `ranker.retrieval` searches it; `ranker.examples` (training) and
`ranker.serving.pool` (the server's sync) fill it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from llmcf.embeddings import EMBEDDING_DIMENSION


@dataclass(frozen=True)
class ExampleRecord:
    """A pool sample as the model encodes it: ids, label, event time, its two text embeddings, whether its CoT is
    generated, its history item ids and its CoT embedding (None while pending)."""

    key: str
    user_id: str
    item_id: str
    label: int
    ts_ms: int
    history_vector: np.ndarray
    target_vector: np.ndarray
    generated: bool
    history: tuple[str, ...] = ()
    cot: np.ndarray | None = None


@dataclass(frozen=True)
class PoolView:
    """An immutable snapshot of the pool: rows [0, n) of the arrays (later rows may be written by the pool after this
    view was taken; nothing below n ever changes except a pending CoT landing, written before its `generated` flag)."""

    n: int
    keys: list[str]
    history: np.ndarray  # (cap, D) float32 history vectors h
    item: np.ndarray  # (cap,) int64 code into item_ids / item_vectors
    label: np.ndarray  # (cap,) int8
    user: np.ndarray  # (cap,) int64 code into user_ids
    ts: np.ndarray  # (cap,) int64 event time, epoch ms
    seq: np.ndarray  # (cap,) int64 order among samples of the same event time
    generated: np.ndarray  # (cap,) bool
    by_llm: np.ndarray  # (cap,) bool: the CoT was written by a language model (not the template fallback)
    cot: np.ndarray  # (cap, D) float32, zeros while pending
    histories: list[tuple[str, ...]]
    item_ids: list[str]
    item_vectors: np.ndarray  # (item cap, D) float32 target vectors t
    item_rows: list[np.ndarray]  # per item code: its rows (< n), positives first
    item_history: list[np.ndarray]  # per item code: its rows' history vectors, contiguous, in `item_rows` order
    item_positives: np.ndarray  # per item code: how many of its rows (the first ones) are positives
    user_ids: list[str]
    user_codes: dict[str, int]
    max_history_norm: float
    generation: int

    @property
    def n_items(self) -> int:
        return len(self.item_rows)

    def user_code(self, user_id: str) -> int:
        return self.user_codes.get(user_id, -1)

    def record(self, row: int) -> ExampleRecord:
        generated = bool(self.generated[row])
        return ExampleRecord(
            key=self.keys[row], user_id=self.user_ids[int(self.user[row])], item_id=self.item_ids[int(self.item[row])],
            label=int(self.label[row]), ts_ms=int(self.ts[row]), history_vector=self.history[row],
            target_vector=self.item_vectors[int(self.item[row])], generated=generated, history=self.histories[row],
            cot=self.cot[row].copy() if generated else None,
        )

    def records(self, rows: Sequence[int]) -> list[ExampleRecord]:
        return [self.record(int(r)) for r in rows]

    @cached_property
    def by_item(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows grouped by item (CSR: flat rows, each item's start and count), built once per view."""
        counts = np.array([len(rows) for rows in self.item_rows], dtype=np.int64)
        flat = np.concatenate(self.item_rows) if self.item_rows else np.zeros(0, dtype=np.int64)
        return flat, np.cumsum(counts) - counts, counts

    @cached_property
    def label_counts(self) -> np.ndarray:
        """(items, 2): each item's rows of label 0 and of label 1."""
        counts = self.by_item[2]
        return np.stack([counts - self.item_positives, self.item_positives], axis=1)

    def rows_of(self, items: np.ndarray) -> np.ndarray:
        """The rows of these item codes, item by item."""
        flat, starts, counts = self.by_item
        lengths = counts[items]
        total = int(lengths.sum())
        if total == 0:
            return np.zeros(0, dtype=np.int64)
        offsets = np.repeat(starts[items] - (np.cumsum(lengths) - lengths), lengths)
        return flat[offsets + np.arange(total)]


@dataclass
class PoolSample:
    """One sample to add: `seq` orders it among samples of the same event time (the stream order)."""

    key: str
    user_id: str
    item_id: str
    label: int
    ts_ms: int
    seq: int
    history_vector: np.ndarray
    target_vector: np.ndarray
    history: tuple[str, ...] = ()
    cot: np.ndarray | None = None
    cot_by_llm: bool = False  # the CoT (when there is one) was written by a language model, not the template fallback


class SamplePool:
    """The example pool in memory: contiguous arrays, appended to by one writer at a time (a lock), read through
    `view` snapshots without locking. A key added again updates its CoT (pending -> generated) and nothing else: a
    stored sample's content never changes, only its CoT arrives. An item's target vector is the one it first came
    with (an item's text embedding is written once)."""

    def __init__(self, dim: int = EMBEDDING_DIMENSION, capacity: int = 1024) -> None:
        self.dim = dim
        self._lock = threading.Lock()
        self._generation = -1
        self._reset(capacity)
        self.view = self._publish()

    def _reset(self, capacity: int) -> None:
        """Empty arrays and vocabularies (new objects: views taken before keep the old ones)."""
        dim = self.dim
        self._generation += 1  # item codes are renumbered: cached similarity rows of older generations are void
        self._cap = max(1, capacity)
        self._history = np.zeros((self._cap, dim), dtype=np.float32)
        self._cot = np.zeros((self._cap, dim), dtype=np.float32)
        self._item = np.zeros(self._cap, dtype=np.int64)
        self._label = np.zeros(self._cap, dtype=np.int8)
        self._user = np.zeros(self._cap, dtype=np.int64)
        self._ts = np.zeros(self._cap, dtype=np.int64)
        self._seq = np.zeros(self._cap, dtype=np.int64)
        self._generated = np.zeros(self._cap, dtype=bool)
        self._by_llm = np.zeros(self._cap, dtype=bool)
        self._keys: list[str] = []
        self._row_of: dict[str, int] = {}
        self._histories: list[tuple[str, ...]] = []
        self._item_ids: list[str] = []
        self._item_code: dict[str, int] = {}
        self._item_vectors = np.zeros((16, dim), dtype=np.float32)
        self._item_rows: list[np.ndarray] = []
        self._item_history: list[np.ndarray] = []
        self._item_positives = np.zeros(16, dtype=np.int64)
        self._user_ids: list[str] = []
        self._user_code: dict[str, int] = {}
        self._max_norm = 0.0

    def __len__(self) -> int:
        return self.view.n

    def __contains__(self, key: str) -> bool:
        return key in self._row_of

    def add(self, samples: Sequence[PoolSample]) -> int:
        """Append the new samples, fill in the CoTs of known ones; publishes a new view. Returns the rows appended."""
        if not samples:
            return 0
        with self._lock:
            fresh: dict[str, PoolSample] = {}
            landed: dict[str, PoolSample] = {}
            for sample in samples:
                if sample.key in self._row_of:
                    if sample.cot is not None:
                        landed[sample.key] = sample
                elif sample.key in fresh:
                    if sample.cot is not None:
                        fresh[sample.key].cot, fresh[sample.key].cot_by_llm = sample.cot, sample.cot_by_llm
                else:
                    fresh[sample.key] = sample
            self._set_cots(landed)
            self._append(list(fresh.values()))
            self.view = self._publish()
            return len(fresh)

    def _set_cots(self, landed: dict[str, PoolSample]) -> int:
        count = 0
        for key, sample in landed.items():
            row = self._row_of.get(key)
            if row is not None:
                self._cot[row] = sample.cot  # written before the flag: a reader that sees the flag sees the CoT
                self._by_llm[row] = sample.cot_by_llm
                self._generated[row] = True
                count += 1
        return count

    def _append(self, samples: list[PoolSample]) -> None:
        if not samples:
            return
        start, count = len(self._keys), len(samples)
        self._grow(start + count)
        end = start + count
        self._history[start:end] = np.stack([s.history_vector for s in samples])
        self._label[start:end] = [s.label for s in samples]
        self._ts[start:end] = [s.ts_ms for s in samples]
        self._seq[start:end] = [s.seq for s in samples]
        self._user[start:end] = [self._code(self._user_code, self._user_ids, s.user_id) for s in samples]
        items = np.array([self._item_for(s) for s in samples], dtype=np.int64)
        self._item[start:end] = items
        for offset, sample in enumerate(samples):
            if sample.cot is not None:
                self._cot[start + offset] = sample.cot
                self._by_llm[start + offset] = sample.cot_by_llm
                self._generated[start + offset] = True
            self._keys.append(sample.key)
            self._row_of[sample.key] = start + offset
            self._histories.append(tuple(sample.history))
        order = np.argsort(items, kind="stable")
        codes, first = np.unique(items[order], return_index=True)
        for code, rows in zip(codes.tolist(), np.split(order + start, first[1:]), strict=True):
            rows = np.concatenate([self._item_rows[code], rows])
            rows = rows[np.argsort(-self._label[rows], kind="stable")]  # positives first: two contiguous groups
            self._item_rows[code] = rows
            self._item_history[code] = self._history[rows]  # contiguous: a request's history term needs no gather
            self._item_positives[code] = int(self._label[rows].sum())
        norms = np.linalg.norm(self._history[start:end], axis=1)
        self._max_norm = max(self._max_norm, float(norms.max()))

    def _item_for(self, sample: PoolSample) -> int:
        code = self._item_code.get(sample.item_id)
        if code is None:
            code = self._code(self._item_code, self._item_ids, sample.item_id)
            if code >= len(self._item_vectors):
                grown = np.zeros((2 * len(self._item_vectors), self.dim), dtype=np.float32)
                grown[: len(self._item_vectors)] = self._item_vectors
                self._item_vectors = grown
            self._item_vectors[code] = sample.target_vector
            self._item_rows.append(np.zeros(0, dtype=np.int64))
            self._item_history.append(np.zeros((0, self.dim), dtype=np.float32))
            if code >= len(self._item_positives):
                self._item_positives = np.concatenate([self._item_positives, np.zeros_like(self._item_positives)])
        return code

    @staticmethod
    def _code(codes: dict[str, int], names: list[str], name: str) -> int:
        code = codes.get(name)
        if code is None:
            code = codes[name] = len(names)
            names.append(name)
        return code

    def _grow(self, needed: int) -> None:
        """New arrays when full (old views keep the old ones): readers never see a row move."""
        if needed <= self._cap:
            return
        cap = max(needed, 2 * self._cap)
        for name in ("_history", "_cot", "_item", "_label", "_user", "_ts", "_seq", "_generated", "_by_llm"):
            old = getattr(self, name)
            new = np.zeros((cap, *old.shape[1:]), dtype=old.dtype)
            new[: len(self._keys)] = old[: len(self._keys)]
            setattr(self, name, new)
        self._cap = cap

    def _publish(self) -> PoolView:
        return PoolView(
            n=len(self._keys), keys=self._keys, history=self._history, item=self._item, label=self._label,
            user=self._user, ts=self._ts, seq=self._seq, generated=self._generated, by_llm=self._by_llm,
            cot=self._cot,
            # Append-only lists and dicts are shared (a view reads only the codes and rows it had); the per-item row
            # arrays are replaced when they grow, so the list of them is copied.
            histories=self._histories, item_ids=self._item_ids, item_vectors=self._item_vectors,
            item_rows=list(self._item_rows), item_history=list(self._item_history),
            item_positives=self._item_positives[: len(self._item_rows)].copy(), user_ids=self._user_ids,
            user_codes=self._user_code,
            max_history_norm=self._max_norm, generation=self._generation,
        )

    def compact(self, keep: int) -> int:
        """Retention: keep the newest `keep` samples by stream order (event time, then seq), drop the rest, rebuild the
        arrays (new ones: views taken before keep theirs). Returns how many were dropped."""
        with self._lock:
            view = self.view
            if view.n <= keep:
                return 0
            order = np.lexsort((view.seq[: view.n], view.ts[: view.n]))
            kept = np.sort(order[view.n - keep:])
            samples = [
                PoolSample(view.keys[r], view.user_ids[int(view.user[r])], view.item_ids[int(view.item[r])],
                           int(view.label[r]), int(view.ts[r]), int(view.seq[r]), view.history[r].copy(),
                           view.item_vectors[int(view.item[r])].copy(), view.histories[r],
                           view.cot[r].copy() if view.generated[r] else None, bool(view.by_llm[r]))
                for r in kept.tolist()
            ]
            dropped = view.n - keep
            self._reset(max(1024, keep))
            self._append(samples)
            self.view = self._publish()
            return dropped
