"""In-context examples for corpus rows (training, evaluation, update rounds), through the serving engine.

`sample_pool` puts a CoT pool into a `SamplePool` exactly as the server's sync does for stored samples (h and t from
the item text embeddings, `seq` = the corpus row: the stream order), and `retrieve_rows` asks the engine for every row
at once, grouped by target item, with each row as its own query: its user, event time and corpus row, so it never
retrieves itself nor a later sample of its user. `retrieve_examples` does both for a run's splits and caches the
result on disk (raw records and slots), keyed by the pool's and the rows' fingerprint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from llmcf.embeddings import EMBEDDING_DIMENSION, MODEL_NAME
from llmcf.samples import decode_history, encode_history
from ranker.cot_pool import CotPool
from ranker.data import fingerprint, save_npz
from ranker.dataset import Samples, Split
from ranker.retrieval import ExactRetriever, seed_of, shuffle_slots
from ranker.sample_pool import ExampleRecord, PoolSample, PoolView, SamplePool

ENGINE = "exact-1"  # part of the cache key: results of another engine are never reused
QUERY_CHUNK = 100_000


def pool_samples(samples: Samples, pool: CotPool) -> list[PoolSample]:
    """The pool's rows as engine samples: keys as the worker stores them, h and t from the item texts."""
    corpus = samples.corpus
    history_text, item_text = samples.text_vectors(pool.rows)
    return [
        PoolSample(
            key=corpus.sample_key(row), user_id=corpus.user_ids[corpus.user[row]], item_id=corpus.item_ids[corpus.item[row]],
            label=int(corpus.label[row]), ts_ms=int(corpus.ts_ms[row]), seq=row, history_vector=history_text[i],
            target_vector=item_text[i], history=tuple(corpus.item_ids[c] for c in samples.histories[row].tolist() if c >= 0),
            cot=cot,
        )
        for i, (row, cot) in enumerate(zip(pool.rows.tolist(), pool.cots, strict=True))
    ]


def sample_pool(samples: Samples, pool: CotPool) -> SamplePool:
    result = SamplePool(capacity=max(1024, len(pool.rows)))
    result.add(pool_samples(samples, pool))
    return result


def retrieve_rows(retriever: ExactRetriever, view: PoolView, samples: Samples, rows: np.ndarray,
                  progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(len(rows), 4) shuffled slots of `view` rows (-1 = none) for corpus rows, each row its own query."""
    corpus = samples.corpus
    user_code = np.array([view.user_code(u) for u in corpus.user_ids], dtype=np.int64)
    slots = np.full((len(rows), 4), -1, dtype=np.int64)
    for start in range(0, len(rows), QUERY_CHUNK):
        chunk = rows[start : start + QUERY_CHUNK]
        history_text, item_text = samples.text_vectors(chunk)
        items = [corpus.item_ids[c] for c in corpus.item[chunk].tolist()]
        top = retriever.top_rows(view, user_code[corpus.user[chunk]], items, item_text, history_text, corpus.ts_ms[chunk],
                                 chunk.astype(np.int64))
        seeds = [seed_of(corpus.user_ids[u], item, ts) for u, item, ts in
                 zip(corpus.user[chunk].tolist(), items, corpus.ts_ms[chunk].tolist(), strict=True)]
        slots[start : start + len(chunk)] = shuffle_slots(top, seeds)
        if progress is not None:
            progress(start + len(chunk))
    return slots


def retrieve_examples(samples: Samples, pool: CotPool, splits: Sequence[Split], cache_dir: Path,
                      step: Callable[[str], None], cache: bool = True) -> list[ExampleRecord]:
    """K examples for every row of `splits` (sets each split's `slots`) from `pool`; returns the records the slots point
    into (the pool's samples, in pool order). With `cache`, the result is kept under `cache_dir/retrieval/`."""
    corpus = samples.corpus
    keys = [corpus.sample_key(r) for r in pool.rows.tolist()]
    # Retrieval reads the pool's rows (history, item, user, time), never its CoTs: the key leaves them out, and the
    # records always carry the CoTs of `pool`, so pools that differ by their CoTs alone share the same examples.
    pool_id = fingerprint(keys, MODEL_NAME, ENGINE)
    cached = cache_dir / "retrieval" / f"{fingerprint(pool_id, *[s.rows for s in splits])}.npz"
    if cache and cached.is_file():
        records, slots = _load_retrieval(cached)
        for split in splits:
            split.slots = slots[split.name]
        step(f"in-context examples: loaded from cache {cached.name}")
        return with_cots(records, dict(zip(keys, pool.cots, strict=True)))

    engine = sample_pool(samples, pool)
    view = engine.view
    retriever = ExactRetriever(engine)
    total = sum(len(s.rows) for s in splits)
    step(f"in-context examples: {total:,} samples against a pool of {view.n:,} (exact)")
    started = time.perf_counter()
    done = 0
    last_print = [started]

    def progress(count: int) -> None:
        now = time.perf_counter()
        if now - last_print[0] >= 10 or done + count == total:
            last_print[0] = now
            rate = (done + count) / max(now - started, 1e-9)
            step(f"  {done + count:,}/{total:,} samples, {rate:,.0f}/s, eta {(total - done - count) / max(rate, 1e-9):.0f} s")

    for split in splits:
        split.slots = retrieve_rows(retriever, view, samples, split.rows, progress)
        done += len(split.rows)
    elapsed = time.perf_counter() - started
    filled = np.mean(np.concatenate([s.slots for s in splits if s.slots is not None]) >= 0) if total else 0.0
    step(f"in-context examples: {total:,} samples in {elapsed:.1f} s ({elapsed / max(total, 1) * 1e6:.0f} us/sample, "
         f"{retriever.rows_scored / max(total, 1):,.0f} pool rows scored per sample), {filled:.1%} slots filled")
    records = view.records(range(view.n))
    if cache:
        _save_retrieval(cached, records, {s.name: s.slots for s in splits if s.slots is not None})
    return records


def with_cots(records: list[ExampleRecord], cots: dict[str, np.ndarray | None]) -> list[ExampleRecord]:
    """`records` with the CoT (and `generated`) of each key in `cots`."""
    return [replace(r, cot=cots[r.key], generated=cots[r.key] is not None) for r in records]


def _save_retrieval(path: Path, records: list[ExampleRecord], slots: dict[str, np.ndarray]) -> None:
    cot = np.zeros((len(records), EMBEDDING_DIMENSION), dtype=np.float32)
    has_cot = np.zeros(len(records), dtype=bool)
    for i, record in enumerate(records):
        if record.cot is not None:
            cot[i], has_cot[i] = record.cot, True
    empty = np.zeros((0, EMBEDDING_DIMENSION), dtype=np.float32)
    save_npz(  # atomic: a crash leaves no cache entry or a whole one
        path,
        keys=np.array([r.key for r in records], dtype=str), users=np.array([r.user_id for r in records], dtype=str),
        items=np.array([r.item_id for r in records], dtype=str), labels=np.array([r.label for r in records], dtype=np.int64),
        ts=np.array([r.ts_ms for r in records], dtype=np.int64), generated=np.array([r.generated for r in records], dtype=bool),
        histories=np.array([encode_history(list(r.history)) for r in records], dtype=str),
        history_vectors=np.stack([r.history_vector for r in records]) if records else empty,
        target_vectors=np.stack([r.target_vector for r in records]) if records else empty,
        cot=cot, has_cot=has_cot, split_names=np.array(list(slots), dtype=str), **{f"slots_{k}": v for k, v in slots.items()},
    )


def _load_retrieval(path: Path) -> tuple[list[ExampleRecord], dict[str, np.ndarray]]:
    stored = np.load(path)
    records = [
        ExampleRecord(key=str(key), user_id=str(user), item_id=str(item), label=int(label), ts_ms=int(ts),
                      history_vector=hv, target_vector=tv, generated=bool(generated), history=decode_history(str(history)),
                      cot=cot if has_cot else None)
        for key, user, item, label, ts, hv, tv, generated, history, cot, has_cot in zip(
            stored["keys"], stored["users"], stored["items"], stored["labels"], stored["ts"], stored["history_vectors"],
            stored["target_vectors"], stored["generated"], stored["histories"], stored["cot"], stored["has_cot"], strict=True)
    ]
    return records, {str(name): stored[f"slots_{name}"] for name in stored["split_names"]}
