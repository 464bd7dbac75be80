"""The vector index of in-context CoT examples: one small interface, one module per backend.

Backends: `qdrant_server` (a Qdrant server through qdrant-client, for production and multi-process deployments) and `edge`
(the Qdrant engine in-process through qdrant-edge-py, on disk under `$LLMCF_HOME`). `open_vector_index(settings, dim)` picks
one from the settings. Users: the stream worker upserts samples (pending CoT, then filled) and the ranker runs batch top-k
with the label and no-leak filters.

Contracts every backend keeps:
- Identity: a point is addressed by its sample `key`; the engine id is `llmcf.events.point_id(key)`. Upserting a key again
  replaces the point (vector and whole payload), so at-least-once redelivery is harmless. Within one `upsert` call the last
  point of a repeated key wins.
- Distance: cosine. The index normalises (Qdrant's cosine metric normalises stored and query vectors), so callers may pass
  raw embeddings; scores are cosine similarities in [-1, 1], highest first. Zero and non-finite vectors are refused.
- Visibility: when `upsert` or `delete` returns, the change is visible to `search` and `count` from this index object
  (read-your-writes). Other processes see it per backend (server: at once; edge: only one process may open a shard).
- Durability: when `upsert` or `delete` returns, the change is in the engine's write-ahead log and survives a crash of this
  process; `flush()` additionally writes segments so the log can be truncated and the next open is fast.
- Dimension: every vector must have `dim` components; anything else raises `ValueError` naming expected and got.
- Payload: the payload keeps JSON values; the field `key` is reserved (the index stores the sample key there).
  `set_payload` merges fields into existing points without resending their vectors; keys without a point are ignored.
- Lifecycle: use as a context manager or call `close()` (idempotent); any call after `close()` raises `VectorIndexClosed`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np

from llmcf.events import point_id

if TYPE_CHECKING:
    from llmcf.settings import Settings

KEY_FIELD = "key"
"""Payload field holding the sample key: point ids are one-way UUIDs, so the key must travel in the payload."""

Scalar = Union[str, int, bool]
Number = Union[int, float]


@dataclass(frozen=True)
class Point:
    """One sample to index: its key (the idempotency key), its embedding and a JSON payload."""

    key: str
    vector: np.ndarray | Sequence[float]
    payload: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    """One search result: the sample key, its cosine similarity to the query and its payload (without `key`).

    `vector` is the stored vector (float32, as the engine keeps it: normalised for cosine) when the search asked for
    `with_vectors`, else None: callers that re-rank hits by a similarity of their own need it.
    """

    key: str
    score: float
    payload: dict[str, Any]
    vector: np.ndarray | None = None


@dataclass(frozen=True)
class Match:
    """Equality on a keyword, integer or bool payload field."""

    key: str
    value: Scalar


@dataclass(frozen=True)
class Range:
    """Bounds on a numeric payload field (e.g. `ts`, event time in epoch ms); unset bounds are open."""

    key: str
    gt: Number | None = None
    gte: Number | None = None
    lt: Number | None = None
    lte: Number | None = None

    def __post_init__(self) -> None:
        if self.gt is None and self.gte is None and self.lt is None and self.lte is None:
            raise ValueError(f"Range on {self.key!r} has no bound")


@dataclass(frozen=True)
class AllOf:
    """A group of conditions that hold together; inside `must_not` it excludes points matching all of them at once."""

    conditions: tuple[Condition, ...]

    def __init__(self, conditions: Sequence[Condition]) -> None:
        if not conditions:
            raise ValueError("AllOf needs at least one condition")
        object.__setattr__(self, "conditions", tuple(conditions))


Condition = Union[Match, Range, AllOf]


def all_of(*conditions: Condition) -> AllOf:
    """`all_of(Match("user_id", u), Range("ts", gt=t))`: the group form used inside `must_not`."""
    return AllOf(conditions)


@dataclass(frozen=True)
class Filter:
    """Points must satisfy every `must` condition and none of the `must_not` conditions.

    The LLM-CF no-leak retrieval of positives for a sample of user `u` at time `t`:
        Filter(must=[Match("label", 1)], must_not=[all_of(Match("user_id", u), Range("ts", gt=t))])
    keeps other users' examples and `u`'s own earlier ones, and drops `u`'s later ones.
    """

    must: tuple[Condition, ...] = ()
    must_not: tuple[Condition, ...] = ()

    def __init__(self, must: Sequence[Condition] = (), must_not: Sequence[Condition] = ()) -> None:
        object.__setattr__(self, "must", tuple(must))
        object.__setattr__(self, "must_not", tuple(must_not))


PayloadKind = Literal["keyword", "integer", "float", "bool"]


@dataclass(frozen=True)
class PayloadField:
    """A payload field the backend should index for fast filtering (where the backend supports payload indexes)."""

    name: str
    kind: PayloadKind


COT_EXAMPLE_FIELDS: tuple[PayloadField, ...] = (
    PayloadField("user_id", "keyword"),
    PayloadField("label", "integer"),
    PayloadField("ts", "integer"),
    PayloadField("status", "keyword"),
)
"""The fields LLM-CF retrieval filters on: label halves, the no-leak user/time group, and pending vs. filled CoT."""


class VectorIndexError(RuntimeError):
    """The vector index cannot do what was asked (not a caller's input error: those are `ValueError`)."""


class VectorIndexClosed(VectorIndexError):
    """The index was used after `close()`."""


class VectorIndexInUse(VectorIndexError):
    """An embedded shard is already open, in this process or another; only one owner per shard directory."""


FilterArg = Union[Filter, Sequence[Union[Filter, None]], None]
# Which payload the backends return, in Qdrant's form: True = all of it, else these fields (always with `key`).
WithPayload = Union[bool, list[str]]


def _with_payload(payload_fields: Sequence[str] | None) -> WithPayload:
    return True if payload_fields is None else [*payload_fields, KEY_FIELD]


class VectorIndex(ABC):
    """Top-k cosine search over samples keyed by a string, with payload filters.

    Public methods validate input (dimensions, keys, finite non-zero vectors) and then call the backend's hooks
    (`_upsert`, `_search`, `_delete`, `_count`, `_close`), which receive clean data: a float32 (n, dim) array, point ids
    and payloads that already carry `key`.
    """

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"dimension must be positive, got {dim}")
        self.dim = dim
        self._closed = False

    def upsert(self, points: Sequence[Point]) -> None:
        """Insert or replace points by key; visible to search and durable (WAL) when this returns."""
        self._check_open()
        latest = {p.key: p for p in points}  # last occurrence of a repeated key wins, as in one engine batch
        if not latest:
            return
        for key, p in latest.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"point key must be a non-empty string, got {key!r}")
            if KEY_FIELD in p.payload and p.payload[KEY_FIELD] != key:
                raise ValueError(f"payload field {KEY_FIELD!r} is reserved for the point key ({key!r})")
        vectors = self._as_matrix([p.vector for p in latest.values()], what="point vector")
        ids = [point_id(key) for key in latest]
        payloads = [{**p.payload, KEY_FIELD: key} for key, p in latest.items()]
        self._upsert(ids, vectors, payloads)

    def search(
        self,
        vectors: np.ndarray | Sequence[Sequence[float]],
        k: int,
        filter: FilterArg = None,
        with_vectors: bool = False,
        payload_fields: Sequence[str] | None = None,
    ) -> list[list[Hit]]:
        """Top-k nearest samples for each of B query vectors, best first: B lists of at most k hits.

        `filter` is one `Filter` for every query, or a sequence of B filters (or None) matched to the queries by position:
        the no-leak condition depends on each query's own user and time. `with_vectors` fills each hit's `vector` with
        the stored (normalised) vector. `payload_fields` limits the returned payload to those fields (None = all):
        converting large payload values (an embedding) costs more than the search itself.
        """
        self._check_open()
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = self._as_matrix(vectors, what="query vector")
        if filter is None or isinstance(filter, Filter):
            filters: list[Filter | None] = [filter] * len(queries)
        else:
            filters = list(filter)
            if len(filters) != len(queries):
                raise ValueError(f"got {len(filters)} filters for {len(queries)} query vectors")
        if len(queries) == 0:
            return []
        return self._search(queries, k, filters, _with_payload(payload_fields), with_vectors)

    def get_payloads(self, keys: Sequence[str], payload_fields: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """The payloads (without `key`) of the points with these keys, by key; unknown keys are absent.
        `payload_fields` limits each payload to those fields (None = all)."""
        self._check_open()
        if not keys:
            return {}
        found = {}
        for payload in self._get_payloads([point_id(key) for key in keys], _with_payload(payload_fields)):
            hit = hit_from_stored(0.0, payload)
            found[hit.key] = hit.payload
        return found

    def set_payload(self, updates: Mapping[str, Mapping[str, Any]]) -> None:
        """Merge payload fields into existing points, by key (vectors and other fields unchanged); keys without a
        point are ignored. Visible and durable on return, like `upsert`. Used to fill a pending sample's CoT."""
        self._check_open()
        for key, fields in updates.items():
            if KEY_FIELD in fields:
                raise ValueError(f"payload field {KEY_FIELD!r} is reserved for the point key ({key!r})")
        if updates:
            self._set_payload({point_id(key): dict(fields) for key, fields in updates.items()})

    def delete(self, keys: Sequence[str]) -> None:
        """Remove the points of these keys; unknown keys are ignored."""
        self._check_open()
        if keys:
            self._delete([point_id(key) for key in keys])

    def count(self, filter: Filter | None = None) -> int:
        """Exact number of points, optionally only those matching `filter`."""
        self._check_open()
        return self._count(filter)

    def flush(self) -> None:
        """Persist everything written so far beyond the write-ahead log (a no-op where the engine does it itself)."""
        self._check_open()

    def optimize(self) -> None:
        """Build search indexes (HNSW) for what was written so far, where the backend leaves that to the caller.

        Blocking (the Edge shard freezes the whole Python process for minutes per 100k points). Search works and is exact
        without it; after it, large segments are searched by HNSW (approximate, much faster).
        """
        self._check_open()

    def close(self) -> None:
        """Flush and release the backend (files, locks, connections). Idempotent."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> VectorIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @abstractmethod
    def _upsert(self, ids: list[str], vectors: np.ndarray, payloads: list[dict[str, Any]]) -> None: ...

    @abstractmethod
    def _search(
        self, queries: np.ndarray, k: int, filters: list[Filter | None], with_payload: WithPayload, with_vectors: bool
    ) -> list[list[Hit]]:
        """B lists of at most k hits for the (B, dim) float32 `queries`, each query filtered by its own filter."""

    @abstractmethod
    def _get_payloads(self, ids: list[str], with_payload: WithPayload) -> list[dict[str, Any]]:
        """The stored payloads (with `key`) of the points among `ids` that exist, in any order."""

    @abstractmethod
    def _set_payload(self, payloads: dict[str, dict[str, Any]]) -> None:
        """Merge each payload into the point of that id; ids without a point must be ignored."""

    @abstractmethod
    def _delete(self, ids: list[str]) -> None: ...

    @abstractmethod
    def _count(self, filter: Filter | None) -> int: ...

    @abstractmethod
    def _close(self) -> None: ...

    def _check_open(self) -> None:
        if self._closed:
            raise VectorIndexClosed(f"{type(self).__name__} is closed")

    def _as_matrix(self, vectors: np.ndarray | Sequence[Any], what: str) -> np.ndarray:
        """A float32 (n, dim) array, or ValueError naming the expected and the actual dimension."""
        if isinstance(vectors, np.ndarray):
            matrix = vectors.astype(np.float32, copy=False)
        elif len(vectors) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        else:
            rows = [np.asarray(v, dtype=np.float32) for v in vectors]
            for row in rows:
                if row.ndim != 1 or row.shape[0] != self.dim:
                    raise ValueError(f"{what} dimension mismatch: index expects {self.dim}, got {_shape(row)}")
            matrix = np.stack(rows)
        if matrix.ndim != 2:
            raise ValueError(f"{what}s must be a 2-D array (n, {self.dim}), got shape {matrix.shape}")
        if matrix.shape[1] != self.dim:
            raise ValueError(f"{what} dimension mismatch: index expects {self.dim}, got {matrix.shape[1]}")
        if not np.isfinite(matrix).all():
            raise ValueError(f"{what} has NaN or infinite components")
        norms = np.linalg.norm(matrix, axis=1)
        if (norms == 0).any():
            raise ValueError(f"{what} is all zeros: cosine similarity is undefined for it")
        return matrix


def hit_from_stored(score: float, stored_payload: Mapping[str, Any] | None, vector: object = None) -> Hit:
    """A `Hit` from an engine's scored point: the key comes out of the payload it travelled in. `vector` is the point's
    vector as the engine returns it (typed there as any of dense, multi, named or sparse), None when not asked for."""
    payload = dict(stored_payload or {})
    return Hit(key=payload.pop(KEY_FIELD), score=score, payload=payload, vector=_dense_vector(vector))


def _dense_vector(vector: object) -> np.ndarray | None:
    """The one unnamed dense vector every point of this index holds (the index creates no other kind)."""
    if vector is None:
        return None
    if not isinstance(vector, list):
        raise TypeError(f"expected one dense vector per point, got {type(vector).__name__}")
    return np.asarray(vector, dtype=np.float32)


def _shape(row: np.ndarray) -> str:
    return str(row.shape[0]) if row.ndim == 1 else f"shape {row.shape}"


def open_vector_index(
    settings: Settings, dim: int, indexed_fields: Sequence[PayloadField] = COT_EXAMPLE_FIELDS
) -> VectorIndex:
    """The index the settings point at: a Qdrant server when `QDRANT_URL` is set, else the embedded Edge shard
    under `$LLMCF_HOME/qdrant/<collection>` (created on first open)."""
    if settings.qdrant_url:
        from storage.vectors.qdrant_server import QdrantServerIndex

        return QdrantServerIndex.connect(
            settings.qdrant_url, settings.qdrant_api_key, settings.qdrant_collection, dim, indexed_fields
        )
    from storage.vectors.edge import EdgeIndex

    return EdgeIndex(settings.home / "qdrant" / settings.qdrant_collection, dim, indexed_fields)


__all__ = [
    "COT_EXAMPLE_FIELDS",
    "KEY_FIELD",
    "AllOf",
    "Condition",
    "Filter",
    "Hit",
    "Match",
    "PayloadField",
    "Point",
    "Range",
    "VectorIndex",
    "VectorIndexClosed",
    "VectorIndexError",
    "VectorIndexInUse",
    "all_of",
    "open_vector_index",
]
