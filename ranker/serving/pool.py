"""Where the server retrieves in-context examples from: the shared Qdrant collection, or a replica the ranker owns.

- `QDRANT_URL` set: `SharedPool` queries the collection the stream workers write, directly (fresh at once).
- Embedded defaults: the stream worker owns the Qdrant Edge shard (one process per shard, flock'ed), so `ReplicaPool`
  keeps the ranker's OWN shard under `$LLMCF_HOME/ranker-index/<collection>` and syncs it from the storage API every
  `LLMCF_RANKER_POOL_SYNC_S`: it reads the CoT samples stored or completed since its cursor
  (`Repository.cot_samples_changed_since`, re-reading `OVERLAP` behind the cursor because a row's stored time is taken
  before its transaction commits), rebuilds each sample's point exactly as the worker builds it (`sample_points`: the
  worker's `streams.requests.sample_vectors` over the stored item embeddings, the same payload fields) and upserts
  them (idempotent).
  The cursor is kept in `cursor.json` beside the shard once the points are durable, so a restart resumes.

Replica lifecycle: `start()` starts a daemon thread that syncs at once (everything, or from the saved cursor), then
every interval; `reachable()` is False until that first sync is done. If a sync fails (database away) it is logged,
counted and retried at the next tick; the replica keeps serving what it has, and `reachable()` turns False once the
last successful sync is older than `STALE_AFTER_SYNCS` intervals. A sample whose target item has no stored embedding
is skipped (the worker indexes only samples of items it has embedded, so this is one the worker has not indexed).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from llmcf.embeddings import EMBEDDING_DIMENSION
from llmcf.events import epoch_ms
from llmcf.samples import SAMPLE_DIMENSION, encode_history
from llmcf.settings import Settings
from ranker.serving.metrics import POOL_SYNC_FAILURES, POOL_SYNC_LAG
from storage.repository import Repository, StoredCotSample
from storage.vectors import Point, VectorIndex, open_vector_index
from streams.requests import sample_vectors

log = logging.getLogger(__name__)

OVERLAP = timedelta(seconds=5)
STALE_AFTER_SYNCS = 10
CURSOR_FILE = "cursor.json"


def sample_points(samples: Sequence[StoredCotSample], item_vectors: Mapping[str, np.ndarray]) -> list[Point | None]:
    """The vector-index points of stored CoT samples, as the stream worker indexes them (`streams.requests`: its
    `sample_vectors` and payload, then `streams.results` once generated); None for a sample that cannot be indexed
    (no request stored yet, or no embedding for its target item)."""
    row_of = {item_id: row for row, item_id in enumerate(item_vectors, start=1)}
    matrix = np.zeros((len(row_of) + 1, EMBEDDING_DIMENSION), dtype=np.float32)  # row 0: the padding row
    for item_id, row in row_of.items():
        matrix[row] = item_vectors[item_id]
    indexable = [s for s in samples if s.history is not None and s.item_id in row_of]
    histories = [[entry["item_id"] for entry in s.history or () if entry["item_id"] in row_of] for s in indexable]
    vectors = sample_vectors(matrix, [row_of[s.item_id] for s in indexable],
                             [[row_of[i] for i in history] for history in histories])
    points: dict[str, Point] = {}
    for sample, history, vector in zip(indexable, histories, vectors, strict=True):
        payload: dict[str, object] = {
            "user_id": sample.user_id,
            "item_id": sample.item_id,
            "label": sample.label,
            "ts": epoch_ms(sample.ts),
            "status": sample.status,
            "history": encode_history(history),
        }
        cot = sample.cot_vector() if sample.status == "generated" else None
        if cot is not None:
            payload["cot_embedding"] = [float(x) for x in cot]
        points[sample.sample_id] = Point(key=sample.sample_id, vector=vector, payload=payload)
    return [points.get(s.sample_id) for s in samples]


class ExampleSource:
    """The index the retriever searches, and whether it can be used now."""

    index: VectorIndex

    def start(self) -> None:
        """Make the index usable (first sync where there is one)."""

    def reachable(self) -> tuple[bool, str]:
        """(True, "") when retrieval can run, else (False, why)."""
        raise NotImplementedError

    def close(self) -> None:
        self.index.close()


class SharedPool(ExampleSource):
    """The stream workers' collection on a Qdrant server (`QDRANT_URL`)."""

    def __init__(self, settings: Settings) -> None:
        self.index = open_vector_index(settings, SAMPLE_DIMENSION)

    def reachable(self) -> tuple[bool, str]:
        try:
            self.index.count()
        except Exception as exc:
            return False, f"example pool (Qdrant server) unreachable: {type(exc).__name__}: {exc}"
        return True, ""


class ReplicaPool(ExampleSource):
    """The ranker's own Qdrant Edge shard, synced from the stored CoT samples (module docstring)."""

    def __init__(self, repository: Repository, path: Path, sync_s: float = 1.0, batch_size: int = 2_000) -> None:
        from storage.vectors.edge import EdgeIndex

        self.repository = repository
        self.path = path
        self.sync_s = sync_s
        self.batch_size = batch_size
        self.index = EdgeIndex(path, SAMPLE_DIMENSION)
        self.cursor: datetime | None = self._load_cursor()
        self.synced_samples = 0
        self.skipped_samples = 0
        self.last_success: float | None = None
        self.last_error: str | None = None
        # sample id -> ((version, generated_at), changed at) of what was applied, to skip rows re-read in the overlap
        self._applied: dict[str, tuple[tuple[int, datetime | None], datetime]] = {}
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
        """One sync step; returns the points upserted. Never raises (see the module docstring)."""
        with self._lock:
            try:
                written = self._sync()
            except Exception as exc:
                POOL_SYNC_FAILURES.inc()
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("example replica sync failed (retried in %.1f s): %s", self.sync_s, self.last_error)
                return 0
            self.last_success = time.monotonic()
            self.last_error = None
            if self.cursor is not None:
                POOL_SYNC_LAG.set(max(0.0, time.time() - self.cursor.timestamp()))
            return written

    def _sync(self) -> int:
        since = None if self.cursor is None else self.cursor - OVERLAP
        written = 0
        batch: list[StoredCotSample] = []
        newest = self.cursor
        for sample in self.repository.cot_samples_changed_since(since, batch_size=self.batch_size):
            changed_at = _changed_at(sample)
            newest = changed_at if newest is None else max(newest, changed_at)
            applied = self._applied.get(sample.sample_id)
            if applied is not None and applied[0] == (sample.version, sample.generated_at):
                continue  # re-read in the overlap, unchanged since it was applied
            batch.append(sample)
            if len(batch) >= self.batch_size:
                written += self._apply(batch)
                batch = []
        written += self._apply(batch)
        if newest is not None and newest != self.cursor:
            self.cursor = newest
            self._save_cursor()
        if self.cursor is not None:  # only rows changed inside the overlap window can be read again
            horizon = self.cursor - OVERLAP
            self._applied = {k: v for k, v in self._applied.items() if v[1] >= horizon}
        return written

    def _apply(self, samples: list[StoredCotSample]) -> int:
        if not samples:
            return 0
        item_ids = {s.item_id for s in samples} | {e["item_id"] for s in samples for e in (s.history or [])}
        vectors = self.repository.get_item_embeddings(item_ids)
        built = sample_points(samples, vectors)
        points = [p for p in built if p is not None]
        self.skipped_samples += len(built) - len(points)
        self.index.upsert(points)
        for sample in samples:
            self._applied[sample.sample_id] = ((sample.version, sample.generated_at), _changed_at(sample))
        self.synced_samples += len(points)
        return len(points)

    def reachable(self) -> tuple[bool, str]:
        if self.last_success is None:
            return False, f"example replica not synced yet: {self.last_error or 'first sync running'}"
        age = time.monotonic() - self.last_success
        if age > STALE_AFTER_SYNCS * max(self.sync_s, 1.0):
            return False, f"example replica last synced {age:.0f} s ago: {self.last_error or 'sync thread stalled'}"
        return True, ""

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._lock:
            self.index.close()

    def _load_cursor(self) -> datetime | None:
        path = self.path.with_name(self.path.name + "." + CURSOR_FILE)
        if not path.is_file():
            return None
        try:
            return datetime.fromisoformat(json.loads(path.read_text())["cursor"]).astimezone(timezone.utc)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable replica cursor %s: syncing everything again", path)
            return None

    def _save_cursor(self) -> None:
        # Written after the points it covers are in the shard's write-ahead log: a crash re-syncs, never skips.
        path = self.path.with_name(self.path.name + "." + CURSOR_FILE)
        staging = path.with_suffix(".tmp")
        staging.write_text(json.dumps({"cursor": self.cursor.isoformat() if self.cursor else None}))
        staging.replace(path)


def open_example_source(settings: Settings, repository: Repository, replica_path: Path | None = None) -> ExampleSource:
    """`SharedPool` when `QDRANT_URL` is set, else a `ReplicaPool` at `replica_path` (default
    `$LLMCF_HOME/ranker-index/<collection>`)."""
    if settings.qdrant_url:
        return SharedPool(settings)
    path = replica_path or settings.home / "ranker-index" / settings.qdrant_collection
    path.parent.mkdir(parents=True, exist_ok=True)
    return ReplicaPool(repository, path, settings.ranker_pool_sync_s)


def _changed_at(sample: StoredCotSample) -> datetime:
    return max(sample.stored_at, sample.cot_stored_at or sample.stored_at)
