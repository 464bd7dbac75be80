"""The event contracts: what platforms publish and what the stages pass to each other over Kafka.

Every record is one JSON object; every model carries `schema_version`. Validation is strict about types (a string where
an integer belongs is an error, never coerced) and tolerant about extra fields (ignored), so producers can add fields
before consumers know them. `decode()` turns raw bytes into a model or raises `EventError` whose message names each
offending field; the dead-letter helper (`llmcf.dead_letters`) records that message.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from datetime import datetime, timezone
from typing import Annotated, Final, Literal, TypeVar

from pydantic import (
    AliasChoices,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationError,
)

from llmcf.backend_names import NOT_LLM_BACKENDS, CotBackendName

SCHEMA_VERSION: Final = 1

Id = Annotated[str, StringConstraints(min_length=1, max_length=128, strip_whitespace=False)]
Label = Annotated[int, Strict(), Field(ge=0, le=1)]
"""0 or 1 as a JSON integer: `true` and `1.0` are rejected (a Literal[0, 1] would let them through, since True == 1)."""
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


def _rfc3339(value: object) -> object:
    """Accept only ISO 8601 / RFC 3339 text: pydantic alone would read "2020" as 2020 seconds after the epoch."""
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("expected an RFC 3339 timestamp such as 2024-05-01T12:00:00Z") from None
    return value


Timestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339)]
InteractionKind = Literal["impression", "view", "click", "like", "share", "comment", "rating", "skip"]


def is_llm_backend(backend: str | None) -> bool:
    """Whether a CoT written by `backend` (a `CotResult.backend`; None: no CoT yet) is a language model's."""
    return backend is not None and backend not in NOT_LLM_BACKENDS


class Event(BaseModel):
    """Base of every record on the pipeline's topics."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class ItemEvent(Event):
    """A new or updated item (topic `items`, key = item_id). A later `updated_at` supersedes an earlier one."""

    item_id: Id
    title: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    text: Annotated[str, StringConstraints(max_length=8192)] = Field(
        default="", validation_alias=AliasChoices("text", "description")
    )
    tags: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=64)]], Field(max_length=64)] = []
    created_at: Timestamp
    updated_at: Timestamp | None = None

    @property
    def version(self) -> int:
        """Event-time version in milliseconds: storage keeps the row with the highest."""
        return epoch_ms(self.updated_at or self.created_at)


class InteractionEvent(Event):
    """One user action on one item (topic `interactions`, key = user_id). `label` 1 = positive feedback."""

    user_id: Id
    item_id: Id
    kind: InteractionKind
    label: Label
    value: FiniteFloat | None = None
    ts: Timestamp
    event_id: Id | None = None

    @property
    def interaction_id(self) -> str:
        """The platform's event id, or one derived from the event's content, so a re-delivery maps to the same row."""
        return self.event_id or deterministic_id("interaction", self.user_id, self.item_id, self.kind, epoch_ms(self.ts))

    @property
    def version(self) -> int:
        return epoch_ms(self.ts)


class ItemSnapshot(BaseModel):
    """The item fields a CoT prompt needs, copied into requests so generators never read the database."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    item_id: Id
    title: str
    text: str = ""
    tags: list[str] = []


class HistoryEntry(ItemSnapshot):
    """An item from the user's history, with the label the user gave it."""

    label: Label


class CotRequest(Event):
    """Ask the generator pool for a chain of thought on one labelled sample (topic `cot-requests`, key = request_id)."""

    request_id: Id
    user_id: Id
    item_id: Id
    label: Label
    ts: Timestamp
    target: ItemSnapshot
    history: Annotated[list[HistoryEntry], Field(max_length=200)] = []
    reason: Literal["sampled", "cold_start"] = "sampled"
    requested_at: Timestamp


class CotResult(Event):
    """A generated chain of thought and its embedding (topic `cot-results`, key = request_id)."""

    request_id: Id
    user_id: Id
    item_id: Id
    label: Label
    ts: Timestamp
    cot_text: Annotated[str, StringConstraints(min_length=1, max_length=16384)]
    cot_embedding: Annotated[list[float], Field(min_length=1, max_length=4096)]
    backend: CotBackendName
    model: str
    generated_at: Timestamp
    prompt_tokens: int = 0
    completion_tokens: int = 0


DeadLetterReason = Literal["undecodable", "invalid", "processing_failed", "retries_exhausted"]


class DeadLetter(Event):
    """A record a consumer could not use, kept whole with the reason (topic `dead-letters`, key = source topic)."""

    original: str = Field(description="The record's value, base64-encoded, byte for byte as consumed.")
    key: str | None = Field(default=None, description="The record's key, base64-encoded.")
    topic: str
    partition: int
    offset: int
    reason: DeadLetterReason
    error: str
    consumer: str
    failed_at: Timestamp

    def original_bytes(self) -> bytes:
        return base64.b64decode(self.original)


CONTRACTS: dict[str, type[Event]] = {
    "items": ItemEvent,
    "interactions": InteractionEvent,
    "cot-requests": CotRequest,
    "cot-results": CotResult,
    "dead-letters": DeadLetter,
}


class EventError(ValueError):
    """A record that is not a valid event; `reason` is a dead-letter reason, the message names each bad field."""

    def __init__(self, reason: DeadLetterReason, message: str):
        super().__init__(message)
        self.reason: DeadLetterReason = reason


E = TypeVar("E", bound=Event)


def decode(model: type[E], raw: bytes | None) -> E:
    """Parse and validate one record's value; raise `EventError` naming what is wrong."""
    if raw is None:
        raise EventError("undecodable", "record has no value (tombstone)")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] in {"json_invalid", "json_type"} for e in errors):
            raise EventError("undecodable", f"not a JSON object: {errors[0]['msg']}") from None
        raise EventError("invalid", f"{model.__name__}: {describe_errors(errors)}") from None


def describe_errors(errors: list) -> str:
    """One line per field: `field.path: what is wrong (got value)`."""
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err["loc"]) or "record"
        got = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(got, dict) else f" (got {_short(got)})"
        parts.append(f"{where}: {err['msg']}{shown}")
    return "; ".join(parts)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def from_epoch_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def deterministic_id(*parts: object) -> str:
    """A stable id from content: the same parts always give the same id, in every process."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()
    return digest[:32]


def point_id(key: str) -> str:
    """The vector index's point id (a UUID, as Qdrant requires) for a sample key."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"llmcf:{key}"))
