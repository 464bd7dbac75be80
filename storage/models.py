"""The SQL schema: one declarative model per table, portable to PostgreSQL and SQLite.

This module is the schema's single description in Python; `migrations/versions/` creates exactly this (a test compares
them). Every table that the pipeline writes from events has a `version` column (event time in epoch milliseconds):
the repository's upserts only replace a row with a strictly higher version, so re-delivered and out-of-order events
converge to the same rows. Timestamps are always timezone-aware UTC in Python, on both backends.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    Index,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ID_LENGTH = 128  # llmcf.events.Id
COT_STATUSES = ("pending", "generated")
COT_REASONS = ("sampled", "cold_start")
MODEL_STATUSES = ("candidate", "serving", "retired", "rejected")


class UTCDateTime(TypeDecorator[datetime]):
    """`timestamptz` on PostgreSQL; on SQLite (which has no time zones) naive UTC text, read back as aware UTC.

    Naive datetimes are refused on the way in: a naive value's meaning depends on the machine that wrote it.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: storage needs timezone-aware timestamps")
        value = value.astimezone(timezone.utc)
        # SQLite compares timestamps as text: one zone and one format keep that ordering right.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    # Deterministic constraint and index names, so migrations can name what they create and later drop it.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }

    if TYPE_CHECKING:
        # SQLAlchemy types `__table__` as any FromClause (a model may map a join); every model here maps one Table.
        __table__: ClassVar[Table]


class Item(Base):
    """An item as the platforms last described it (`ItemEvent`); version = updated_at (or created_at) in ms."""

    __tablename__ = "items"

    item_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    title: Mapped[str] = mapped_column(String(512))
    text: Mapped[str] = mapped_column(Text)
    tags: Mapped[list[Any]]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime | None]
    version: Mapped[int] = mapped_column(BigInteger)
    stored_at: Mapped[datetime]


class User(Base):
    """A user as seen through interactions: first and last interaction time and how many distinct interactions.

    Derived, never published: every interaction batch merges into it (min first_seen, max last_seen) and recounts
    `interactions` from the interactions table, so a re-delivered interaction cannot be counted twice.
    """

    __tablename__ = "users"

    user_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    first_seen_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    interactions: Mapped[int] = mapped_column(BigInteger)
    version: Mapped[int] = mapped_column(BigInteger)


class Interaction(Base):
    """One user action on one item (`InteractionEvent`), keyed by its deterministic interaction id."""

    __tablename__ = "interactions"
    __table_args__ = (
        Index(None, "user_id", "ts"),
        Index(None, "item_id", "ts"),
        Index(None, "ts"),
    )

    interaction_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    item_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    kind: Mapped[str] = mapped_column(String(16))
    label: Mapped[int] = mapped_column(SmallInteger)
    value: Mapped[float | None] = mapped_column(Float)
    ts: Mapped[datetime]
    version: Mapped[int] = mapped_column(BigInteger)
    stored_at: Mapped[datetime]


class CotSample(Base):
    """A labelled sample chosen for chain-of-thought generation, keyed by the deterministic CoT request id.

    Two writers fill it, in either order: the request (`CotRequest`: history, reason; status 'pending') and the
    result (`CotResult`: cot_text, backend, model, generated_at; status 'generated'). `version` is the request's
    `requested_at` in ms, 0 while only the result has arrived (history and reason are then NULL). A request never
    touches the CoT fields or the status, so 'generated' can not be undone by a re-delivered request.
    """

    __tablename__ = "cot_samples"
    __table_args__ = (
        CheckConstraint(_one_of("status", COT_STATUSES), name="status"),
        CheckConstraint(f"reason IS NULL OR {_one_of('reason', COT_REASONS)}", name="reason"),
        Index(None, "user_id", "ts"),
        Index(None, "stored_at"),  # the ranker's pool sync reads the changes since its horizon
        Index(None, "cot_stored_at"),
    )

    sample_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    item_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    label: Mapped[int] = mapped_column(SmallInteger)
    ts: Mapped[datetime]
    history: Mapped[list[Any] | None]
    reason: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    cot_text: Mapped[str | None] = mapped_column(Text)
    backend: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(256))
    stored_at: Mapped[datetime]
    generated_at: Mapped[datetime | None]
    cot_stored_at: Mapped[datetime | None]
    version: Mapped[int] = mapped_column(BigInteger)
    cot_embedding: Mapped[bytes | None] = mapped_column(LargeBinary)
    """The CoT's sentence embedding as little-endian float32 bytes (filled with the CoT)."""


class ItemEmbedding(Base):
    """An item's text embedding ("title; text; tags"), computed once per item by the stream worker.

    `embedding` is little-endian float32 bytes of `dimension` components, from the sentence encoder named by `model`.
    """

    __tablename__ = "item_embeddings"

    item_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    model: Mapped[str] = mapped_column(String(256))
    dimension: Mapped[int] = mapped_column(SmallInteger)
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    stored_at: Mapped[datetime]


class ModelVersion(Base):
    """A trained ranker artifact and its life: candidate → serving → retired (replaced), or rejected."""

    __tablename__ = "model_versions"
    __table_args__ = (
        CheckConstraint(_one_of("status", MODEL_STATUSES), name="status"),
        Index(None, "kind", "status", "created_at"),
    )

    version_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    created_at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(64))
    parent_version: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    metrics: Mapped[dict[str, Any]]
    artifact_path: Mapped[str] = mapped_column(Text)
    checksum: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    notes: Mapped[str | None] = mapped_column(Text)


TABLES = (
    Item.__table__,
    User.__table__,
    Interaction.__table__,
    CotSample.__table__,
    ModelVersion.__table__,
    ItemEmbedding.__table__,
)
