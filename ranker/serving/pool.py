"""The server's example pool: every stored CoT sample in memory (`ranker.retrieval.SamplePool`), fed from the storage
API by a sync thread. The vector index (Qdrant server or Edge) stays the workers' system of record for the samples;
nothing on the request path searches it.

Sync (`PoolSync.sync`, every `LLMCF_RANKER_POOL_SYNC_S` on a daemon thread, the first time at once):
- reads the CoT samples stored or completed since its horizon (`Repository.cot_samples_changed_since`, served by the
  `stored_at` and `cot_stored_at` indexes), turns each new one into a pool sample exactly as training does for a
  corpus row (`pool_samples_from_storage`: h from its stored history's item embeddings, t = its item's embedding) and
  fills in the CoT embedding of samples whose CoT has landed;
- the horizon: a row's stored time is taken before its transaction commits, so a row can become visible after a sync
  that read past its time. Each sync therefore reads every change after its horizon and skips the rows it applied
  unchanged; once a sync has read, the horizon moves up to the newest change a sync at least `OVERLAP` earlier had
  seen (everything up to it had committed before this read: a commit never takes that long, and the writers' clocks
  agree to well within it). While samples arrive, a sync reads the last ~OVERLAP seconds of them again; once they
  stop, the horizon catches up and a sync reads nothing.
- retention: at most `LLMCF_RANKER_POOL_MAX_SAMPLES` samples are kept; beyond, the oldest by event time are dropped in
  one compaction down to 90% of the bound (`SamplePool.compact`). They stay stored; only retrieval forgets them.
- a sample whose target item has no stored embedding is skipped (the worker embeds an item before it stores samples
  of it, so this is a sample the worker has not indexed either); a history item without one is left out of h.
- a failed sync (database away) is logged, counted and retried at the next tick; the pool keeps serving what it has,
  and `reachable()` turns False once the last successful sync is older than `STALE_AFTER_SYNCS` intervals.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone

import numpy as np

from llmcf.events import is_llm_backend
from llmcf.samples import history_vectors
from ranker.sample_pool import PoolSample, SamplePool
from ranker.serving.metrics import POOL_SAMPLES, POOL_SYNC_FAILURES, POOL_SYNC_LAG
from storage.repository import Repository
from storage.rows import StoredCotSample

log = logging.getLogger(__name__)

OVERLAP = timedelta(seconds=5)
STALE_AFTER_SYNCS = 10
RETAIN_AFTER_COMPACTION = 0.9


def sample_seq(sample_id: str) -> int:
    """A stored sample's place among samples of the same event time: a stable hash of its id (ties only)."""
    return zlib.crc32(sample_id.encode())


def pool_samples_from_storage(samples: Sequence[StoredCotSample],
                              item_vectors: Mapping[str, np.ndarray]) -> list[PoolSample | None]:
    """Pool samples of stored CoT samples (None where one cannot be built: no request history stored yet, or no
    embedding for its target item). h is `llmcf.samples.history_vectors` over the history items that have one."""
    row_of = {item_id: row for row, item_id in enumerate(item_vectors, start=1)}
    indexable = [s for s in samples if s.history is not None and s.item_id in row_of]
    if not indexable:
        return [None] * len(samples)
    table = np.zeros((len(row_of) + 1, next(iter(item_vectors.values())).shape[0]), dtype=np.float32)
    for item_id, row in row_of.items():
        table[row] = item_vectors[item_id]
    histories = [[entry["item_id"] for entry in s.history or () if entry["item_id"] in row_of] for s in indexable]
    codes = np.zeros((len(indexable), max(1, max(map(len, histories)))), dtype=np.intp)
    for i, history in enumerate(histories):
        codes[i, : len(history)] = [row_of[item] for item in history]
    h = history_vectors(table, codes)
    built: dict[str, PoolSample] = {}
    for i, (sample, history) in enumerate(zip(indexable, histories, strict=True)):
        cot = sample.cot_vector() if sample.status == "generated" else None
        built[sample.sample_id] = PoolSample(
            key=sample.sample_id, user_id=sample.user_id, item_id=sample.item_id, label=int(sample.label),
            ts_ms=int(sample.ts.timestamp() * 1000), seq=sample_seq(sample.sample_id), history_vector=h[i],
            target_vector=table[row_of[sample.item_id]], history=tuple(history), cot=cot,
            cot_by_llm=cot is not None and is_llm_backend(sample.backend))
    return [built.get(s.sample_id) for s in samples]


class PoolSync:
    """The server's `SamplePool` and the thread that keeps it in step with storage (module docstring)."""

    def __init__(self, repository: Repository, sync_s: float = 1.0, max_samples: int = 500_000, batch_size: int = 2_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.repository = repository
        self.sync_s = sync_s
        self.max_samples = max_samples
        self.batch_size = batch_size
        self.pool = SamplePool()
        self.horizon: datetime | None = None  # every change before it has been read
        self.newest: datetime | None = None  # the newest change read so far
        self.skipped_samples = 0
        self.last_success: float | None = None
        self.last_error: str | None = None
        self._clock = clock
        self._seen: deque[tuple[float, datetime | None]] = deque()  # (sync start, newest change read by then)
        self._applied: dict[str, tuple[tuple[int, datetime | None], datetime]] = {}
        self._item_vectors: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Sync on a daemon thread, the first time at once (`reachable()` is False until that first sync is done)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ranker-pool-sync", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        self.sync()
        while not self._stop.wait(self.sync_s):
            self.sync()

    def sync(self) -> int:
        """One sync step; returns the samples added or completed. Never raises (module docstring)."""
        with self._lock:
            try:
                changed = self._sync()
            except Exception as exc:
                POOL_SYNC_FAILURES.inc()
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("example pool sync failed (retried in %.1f s): %s", self.sync_s, self.last_error)
                return 0
            self.last_success = self._clock()
            self.last_error = None
            POOL_SAMPLES.set(len(self.pool))
            return changed

    def _sync(self) -> int:
        started = self._clock()
        self._seen.append((started, self.newest))
        while len(self._seen) > 1 and started - self._seen[1][0] >= OVERLAP.total_seconds():
            self._seen.popleft()
        # Every change up to what a sync OVERLAP ago had seen has committed by now, so once THIS read is done it has
        # been read: the next sync may start after it (not this one, which has still to read the late commits).
        settled = self._seen[0][1] if started - self._seen[0][0] >= OVERLAP.total_seconds() else None
        changed = 0
        batch: list[StoredCotSample] = []
        # Strictly after the horizon (timestamps are stored to the microsecond): every change at it was read already.
        since = None if self.horizon is None else self.horizon + timedelta(microseconds=1)
        for sample in self.repository.cot_samples_changed_since(since, batch_size=self.batch_size):
            at = _changed_at(sample)
            self.newest = at if self.newest is None else max(self.newest, at)
            applied = self._applied.get(sample.sample_id)
            if applied is not None and applied[0] == (sample.version, sample.generated_at):
                continue  # read again in the overlap, unchanged since it was applied
            batch.append(sample)
            if len(batch) >= self.batch_size:
                changed += self._apply(batch)
                batch = []
        changed += self._apply(batch)
        if settled is not None and (self.horizon is None or settled > self.horizon):
            self.horizon = settled
        if self.horizon is not None:  # rows changed before the horizon are never read again
            self._applied = {k: v for k, v in self._applied.items() if v[1] > self.horizon}
        if len(self.pool) > self.max_samples:
            dropped = self.pool.compact(int(self.max_samples * RETAIN_AFTER_COMPACTION))
            log.info("example pool over %d samples: dropped the %d oldest by event time", self.max_samples, dropped)
        return changed

    def _apply(self, samples: list[StoredCotSample]) -> int:
        if not samples:
            return 0
        needed = {s.item_id for s in samples} | {e["item_id"] for s in samples for e in (s.history or [])}
        missing = [item for item in needed if item not in self._item_vectors]
        if missing:  # an item's embedding is written once: kept for the process's life
            self._item_vectors.update(self.repository.get_item_embeddings(missing))
        vectors = {item: self._item_vectors[item] for item in needed if item in self._item_vectors}
        built = pool_samples_from_storage(samples, vectors)
        ready = [p for p in built if p is not None]
        self.skipped_samples += len(built) - len(ready)
        self.pool.add(ready)
        now = datetime.now(timezone.utc)
        for sample in samples:
            at = _changed_at(sample)
            self._applied[sample.sample_id] = ((sample.version, sample.generated_at), at)
            POOL_SYNC_LAG.observe(max(0.0, (now - at).total_seconds()))
        return len(ready)

    def reachable(self) -> tuple[bool, str]:
        if self.last_success is None:
            return False, f"example pool not synced yet: {self.last_error or 'first sync running'}"
        age = self._clock() - self.last_success
        if age > STALE_AFTER_SYNCS * max(self.sync_s, 1.0):
            return False, f"example pool last synced {age:.0f} s ago: {self.last_error or 'sync thread stalled'}"
        return True, ""

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None


def _changed_at(sample: StoredCotSample) -> datetime:
    return max(sample.stored_at, sample.cot_stored_at or sample.stored_at)
