"""The server backend: a Qdrant collection through qdrant-client, for production and for several processes at once.

`QdrantServerIndex.connect(url, api_key, ...)` talks to a Qdrant server; tests pass `QdrantClient(":memory:")` (the
client's local mode) to the constructor. Local mode is a pure-Python brute-force engine: correct, but it warns past
20,000 points and each query scans every point, so it is for tests only.

Every write is sent with `wait=True`: when `upsert`/`delete` returns, the server has applied it to its write-ahead log
and it is visible to every client. The server flushes and builds HNSW in the background, so `flush()` and `optimize()`
have nothing to do here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

from storage import vectors

_SCHEMA: dict[vectors.PayloadKind, models.PayloadSchemaType] = {
    "keyword": models.PayloadSchemaType.KEYWORD,
    "integer": models.PayloadSchemaType.INTEGER,
    "float": models.PayloadSchemaType.FLOAT,
    "bool": models.PayloadSchemaType.BOOL,
}


class QdrantServerIndex(vectors.VectorIndex):
    """A Qdrant collection of `dim`-d cosine vectors, created on first use with the declared payload indexes.

    An existing collection must have a single unnamed cosine vector of `dim` components, else ValueError. The index
    closes the client it was given on `close()`.
    """

    def __init__(
        self,
        client: QdrantClient,
        collection: str,
        dim: int,
        indexed_fields: Sequence[vectors.PayloadField] = vectors.COT_EXAMPLE_FIELDS,
    ) -> None:
        super().__init__(dim)
        self.client = client
        self.collection = collection
        self._ensure_collection(indexed_fields)

    @classmethod
    def connect(
        cls,
        url: str,
        api_key: str | None,
        collection: str,
        dim: int,
        indexed_fields: Sequence[vectors.PayloadField] = vectors.COT_EXAMPLE_FIELDS,
    ) -> QdrantServerIndex:
        return cls(QdrantClient(url=url, api_key=api_key), collection, dim, indexed_fields)

    def _ensure_collection(self, indexed_fields: Sequence[vectors.PayloadField]) -> None:
        if not self.client.collection_exists(self.collection):
            self.client.create_collection(
                self.collection,
                vectors_config=models.VectorParams(size=self.dim, distance=models.Distance.COSINE),
            )
        else:
            params = self.client.get_collection(self.collection).config.params.vectors
            if not isinstance(params, models.VectorParams):
                raise vectors.VectorIndexError(f"collection {self.collection!r} uses named vectors; expected one unnamed vector")
            if params.size != self.dim or params.distance != models.Distance.COSINE:
                raise ValueError(
                    f"collection {self.collection!r} holds {params.size}-d {params.distance.value} vectors; "
                    f"expected {self.dim}-d Cosine"
                )
        with warnings.catch_warnings():
            # Local mode (tests) ignores payload indexes and says so on every call; a server creates them idempotently.
            warnings.filterwarnings("ignore", message="Payload indexes have no effect in the local Qdrant")
            for payload_field in indexed_fields:
                self.client.create_payload_index(
                    self.collection, payload_field.name, _SCHEMA[payload_field.kind], wait=True
                )

    def _upsert(self, ids: list[str], vectors: np.ndarray, payloads: list[dict[str, Any]]) -> None:
        self.client.upsert(
            self.collection,
            points=models.Batch(ids=list(ids), vectors=vectors.tolist(), payloads=payloads),
            wait=True,
        )

    def _search(
        self, queries: np.ndarray, k: int, filters: list[vectors.Filter | None], with_payload: vectors.WithPayload, with_vectors: bool
    ) -> list[list[vectors.Hit]]:
        requests = [
            models.QueryRequest(
                query=q, limit=k, filter=_qdrant_filter(f), with_payload=with_payload, with_vector=with_vectors
            )
            for q, f in zip(queries.tolist(), filters, strict=True)
        ]
        responses = self.client.query_batch_points(self.collection, requests=requests)
        return [
            [vectors.hit_from_stored(p.score, p.payload, p.vector if with_vectors else None) for p in response.points]
            for response in responses
        ]

    def _set_payload(self, payloads: dict[str, dict[str, Any]]) -> None:
        # One request for the whole batch; the server refuses updates naming missing points, so keep only those present.
        present = {str(p.id) for p in self.client.retrieve(self.collection, list(payloads), with_payload=False)}
        operations = [
            models.SetPayloadOperation(set_payload=models.SetPayload(payload=payload, points=[point]))
            for point, payload in payloads.items()
            if point in present
        ]
        if operations:
            self.client.batch_update_points(self.collection, operations, wait=True)

    def _get_payloads(self, ids: list[str], with_payload: vectors.WithPayload) -> list[dict[str, Any]]:
        records = self.client.retrieve(self.collection, ids=ids, with_payload=with_payload, with_vectors=False)
        return [dict(record.payload or {}) for record in records]

    def _delete(self, ids: list[str]) -> None:
        self.client.delete(self.collection, points_selector=models.PointIdsList(points=list(ids)), wait=True)

    def _count(self, filter: vectors.Filter | None) -> int:
        return self.client.count(self.collection, count_filter=_qdrant_filter(filter), exact=True).count

    def _close(self) -> None:
        self.client.close()


def _qdrant_filter(filter: vectors.Filter | None) -> models.Filter | None:
    if filter is None:
        return None
    return models.Filter(
        must=[_qdrant_condition(c) for c in filter.must] or None,
        must_not=[_qdrant_condition(c) for c in filter.must_not] or None,
    )


def _qdrant_condition(condition: vectors.Condition) -> models.FieldCondition | models.Filter:
    if isinstance(condition, vectors.Match):
        return models.FieldCondition(key=condition.key, match=models.MatchValue(value=condition.value))
    if isinstance(condition, vectors.AllOf):
        return models.Filter(must=[_qdrant_condition(c) for c in condition.conditions])
    return models.FieldCondition(
        key=condition.key,
        range=models.Range(gt=condition.gt, gte=condition.gte, lt=condition.lt, lte=condition.lte),
    )

