"""Row shapes: what the repository returns (`InteractionRow` and the `Stored*` classes, mirroring their tables column
for column), what the stream worker hands it without the event models (`InteractionRow`, `PendingSampleRow`), and the
byte form of an embedding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np

from llmcf.events import CotRequest, InteractionEvent, epoch_ms

# The request half of a `cot_samples` row: what a (newer) request may rewrite; status and the CoT are the result's.
REQUEST_FIELDS = ("user_id", "item_id", "label", "ts", "history", "reason", "stored_at", "version")


def vector_to_bytes(vector: np.ndarray | Sequence[float]) -> bytes:
    """Little-endian float32 bytes: the storage form of every embedding, the same on every machine."""
    return np.asarray(vector, dtype="<f4").tobytes()


def vector_from_bytes(data: bytes) -> np.ndarray:
    """The float32 array stored by `vector_to_bytes` (native byte order, writable)."""
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


@dataclass(frozen=True)
class StoredItem:
    """An `items` row as read back (the `Stored*` classes mirror their tables column for column)."""

    item_id: str
    title: str
    text: str
    tags: list[str]
    created_at: datetime
    updated_at: datetime | None
    version: int
    stored_at: datetime


@dataclass(frozen=True)
class StoredUser:
    user_id: str
    first_seen_at: datetime
    last_seen_at: datetime
    interactions: int
    version: int


@dataclass(frozen=True)
class StoredCotSample:
    sample_id: str
    user_id: str
    item_id: str
    label: int
    ts: datetime
    history: list[dict[str, Any]] | None
    reason: str | None
    status: str
    cot_text: str | None
    backend: str | None
    model: str | None
    stored_at: datetime
    generated_at: datetime | None
    cot_stored_at: datetime | None
    version: int
    cot_embedding: bytes | None = None

    def cot_vector(self) -> np.ndarray | None:
        """The CoT embedding as a float32 array, or None while the CoT is pending."""
        return None if self.cot_embedding is None else vector_from_bytes(self.cot_embedding)


class InteractionRow(NamedTuple):
    """A row of `interactions`, without the event model: what the stream worker decodes into (the id and the version,
    event time in ms, computed once; `stored_at` None until the repository stores it) and what the repository reads
    back. A plain tuple: the worker's hot path builds one per record."""

    interaction_id: str
    user_id: str
    item_id: str
    kind: str
    label: int
    value: float | None
    ts: datetime
    version: int
    stored_at: datetime | None = None

    @classmethod
    def from_event(cls, event: InteractionEvent) -> "InteractionRow":
        return cls(event.interaction_id, event.user_id, event.item_id, event.kind, event.label, event.value, event.ts,
                   event.version)


class PendingSampleRow(NamedTuple):
    """The request half of a CoT sample, without the `CotRequest` model: `history` is the (item id, label) of each
    history entry, oldest first; `version` is `requested_at` in epoch ms."""

    sample_id: str
    user_id: str
    item_id: str
    label: int
    ts: datetime
    history: Sequence[tuple[str, int]]
    reason: str
    version: int

    @classmethod
    def from_request(cls, request: CotRequest) -> "PendingSampleRow":
        return cls(request.request_id, request.user_id, request.item_id, request.label, request.ts,
                   [(h.item_id, h.label) for h in request.history], request.reason, epoch_ms(request.requested_at))

    def history_json(self) -> list[dict[str, Any]]:
        """`history` as the `cot_samples.history` column stores it."""
        return [{"item_id": item_id, "label": label} for item_id, label in self.history]
