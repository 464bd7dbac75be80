"""The embedded backend: a Qdrant Edge shard (qdrant-edge-py), the Qdrant engine running inside this process, on disk.

What the engine does and does not do (qdrant-edge-py 0.9, measured; see bench/vector_index.py):
- One owner per shard directory. The engine holds an exclusive lock on its write-ahead log, and there is no read-only
  follower in the Python binding, so a second open, in this process or another, fails. We take our own `flock` on a
  sibling `<shard>.lock` file first, to fail early with `VectorIndexInUse` naming the holder's pid. Deployments where
  several processes need the index (stream worker writes, ranker reads) set `QDRANT_URL` and use the server backend, or
  keep the shard inside one process.
- Updates go to the write-ahead log before `update()` returns and are visible to the next query at once. A process that
  dies without `flush()`/`close()` loses nothing that returned: the next open replays the log. The lock is released by
  the kernel when the process dies, so a crashed owner never blocks the restart.
- Nothing runs in the background: no timed flush, no optimizer thread. New points land in plain (unindexed) segments and
  search scans them exactly: at 100k x 384-d, top-4 takes ~18-21 ms per query on 2 cores. `optimize()` merges segments and
  builds HNSW for those above the indexing threshold (~10 MB of vectors): 254 s for 100k x 384-d on 2 cores, after which
  top-4 takes ~1.3-1.9 ms with recall@4 >= 0.99 on clustered data. Call it after bulk loads, or when the process can
  afford the pause.
- Every call holds the GIL until it returns: during `optimize()` the whole Python process is frozen (no other thread,
  no asyncio loop, no Kafka heartbeat written in Python), and a large batch query freezes it for its duration.
- Conversion from Python dominates upserts (~30 us per point for a 7-field payload, ~15 us for a 384-d vector; the engine
  itself ~35 us): ~8-10k points/s with realistic payloads. Keep payloads to the fields search filters on or returns.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
from qdrant_edge import (
    CountRequest,
    Distance,
    EdgeConfig,
    EdgeShard,
    EdgeVectorParams,
    FieldCondition,
    MatchValue,
    PayloadSchemaType,
    Query,
    QueryBatchRequest,
    QueryRequest,
    RangeFloat,
    UpdateOperation,
)
from qdrant_edge import Filter as EdgeFilter
from qdrant_edge import Point as EdgePoint

from storage import vectors

_SCHEMA: dict[vectors.PayloadKind, PayloadSchemaType] = {
    "keyword": PayloadSchemaType.Keyword,
    "integer": PayloadSchemaType.Integer,
    "float": PayloadSchemaType.Float,
    "bool": PayloadSchemaType.Bool,
}


class EdgeIndex(vectors.VectorIndex):
    """A Qdrant Edge shard in `path`, created on first open with cosine distance and the declared payload indexes.

    Opening an existing shard checks that its vectors have `dim` components (ValueError otherwise) and adds any
    payload index not yet there. The object owns the shard until `close()`.
    """

    def __init__(self, path: Path, dim: int, indexed_fields: Sequence[vectors.PayloadField] = vectors.COT_EXAMPLE_FIELDS) -> None:
        super().__init__(dim)
        self.path = Path(path)
        self._lock_fd = _acquire_lock(self.path)
        try:
            self._shard = _open_shard(self.path, dim)
            present = self._shard.info().payload_schema
            for payload_field in indexed_fields:
                if payload_field.name not in present:
                    self._shard.update(
                        UpdateOperation.create_field_index(payload_field.name, _SCHEMA[payload_field.kind])
                    )
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _upsert(self, ids: list[str], vectors: np.ndarray, payloads: list[dict[str, Any]]) -> None:
        points = [EdgePoint(id=i, vector=v, payload=p) for i, v, p in zip(ids, vectors.tolist(), payloads, strict=True)]
        self._shard.update(UpdateOperation.upsert_points(points))

    def _search(
        self, queries: np.ndarray, k: int, filters: list[vectors.Filter | None], with_payload: vectors.WithPayload, with_vectors: bool
    ) -> list[list[vectors.Hit]]:
        requests = [
            QueryRequest(
                limit=k, query=Query.Nearest(q), filter=_edge_filter(f), with_payload=with_payload,
                with_vector=with_vectors,
            )
            for q, f in zip(queries.tolist(), filters, strict=True)
        ]
        results = self._shard.query_batch(QueryBatchRequest(requests))
        return [
            [vectors.hit_from_stored(p.score, p.payload, p.vector if with_vectors else None) for p in points] for points in results
        ]

    def _get_payloads(self, ids: list[str], with_payload: vectors.WithPayload) -> list[dict[str, Any]]:
        point_ids: list[int | UUID | str] = list(ids)
        return [dict(record.payload or {}) for record in self._shard.retrieve(point_ids, with_payload, False)]

    def _set_payload(self, payloads: dict[str, dict[str, Any]]) -> None:
        # The engine fails a payload update naming a missing point, so look the points up first (one call), then
        # send one update per point: each point gets its own payload.
        present = {str(p.id) for p in self._shard.retrieve(list(payloads), False, False)}
        for point, payload in payloads.items():
            if point in present:
                self._shard.update(UpdateOperation.set_payload([point], payload))

    def _delete(self, ids: list[str]) -> None:
        point_ids: list[int | UUID | str] = list(ids)
        self._shard.update(UpdateOperation.delete_points(point_ids))

    def _count(self, filter: vectors.Filter | None) -> int:
        return self._shard.count(CountRequest(exact=True, filter=_edge_filter(filter)))

    def flush(self) -> None:
        """Write segments to disk, so the write-ahead log need not be replayed on the next open."""
        super().flush()
        self._shard.flush()

    def optimize(self) -> None:
        """Merge segments and build HNSW for those above the indexing threshold; blocks until the optimizers are done.

        Costly and holding the GIL throughout: 254 s for 100k x 384-d points on 2 cores (bench/vector_index.py).
        """
        super().optimize()
        self._shard.optimize()

    def _close(self) -> None:
        try:
            self._shard.flush()
            self._shard.close()
        finally:
            os.close(self._lock_fd)


def _acquire_lock(path: Path) -> int:
    """An exclusive, non-blocking flock on `<path>.lock` holding our pid; released by close() or process death."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise vectors.VectorIndexInUse(
            f"Qdrant Edge shard {path} is already open (lock {lock_path} held by pid {holder}). One process may own "
            f"a shard at a time, and only one index object in it: share that object, or set QDRANT_URL to use a server."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _open_shard(path: Path, dim: int) -> EdgeShard:
    config = EdgeConfig(vectors=EdgeVectorParams(size=dim, distance=Distance.Cosine))
    if not (path / "edge_config.json").exists():
        return EdgeShard.create(str(path), config)
    try:
        return EdgeShard.load(str(path), config)
    except Exception as exc:  # the binding raises a bare Exception; an incompatible config is the caller's error
        if "incompatible" in str(exc).lower():
            raise ValueError(f"Qdrant Edge shard {path} does not hold {dim}-d cosine vectors: {exc}") from None
        raise


def _edge_filter(filter: vectors.Filter | None) -> EdgeFilter | None:
    if filter is None:
        return None
    return EdgeFilter(
        must=[_edge_condition(c) for c in filter.must] or None,
        must_not=[_edge_condition(c) for c in filter.must_not] or None,
    )


def _edge_condition(condition: vectors.Condition) -> FieldCondition | EdgeFilter:
    if isinstance(condition, vectors.Match):
        return FieldCondition(key=condition.key, match=MatchValue(condition.value))
    if isinstance(condition, vectors.AllOf):
        return EdgeFilter(must=[_edge_condition(c) for c in condition.conditions])
    return FieldCondition(
        key=condition.key,
        range=RangeFloat(gt=condition.gt, gte=condition.gte, lt=condition.lt, lte=condition.lte),
    )

