"""The storage API every stage uses (`Repository`): batch upserts from events, and the reads the stages need. No SQL
outside this package. The facade owns items, users, interactions, CoT samples and item embeddings; engines come from
`storage.engine`, row types from `storage.rows`, the PostgreSQL COPY road from `storage.bulk`, and model versions from
`storage.registry` (which the facade delegates to).

Contracts, for every method:
- One call is one transaction. If it raises, nothing of that call was written; retrying the same batch is safe.
- Writes are idempotent upserts keyed by a deterministic id and versioned by event time: a row is replaced only by a
  strictly higher `version`, so the same event twice gives one row and an older event never overwrites a newer one,
  whatever order Kafka delivers them in. At equal versions the row first stored wins.
- Each batch is one `INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE <stored>.version < excluded.version` statement,
  executed for all rows at once (executemany); keys repeated inside a batch are collapsed first (highest version kept),
  because PostgreSQL refuses a statement that touches one row twice. Rows go in key order, so two concurrent batches
  lock shared rows in the same order and cannot deadlock each other.
- The stream worker's two hot writes (interactions with their users, pending CoT samples) take a faster road on
  PostgreSQL with the same semantics: the batch is copied (binary `COPY FROM STDIN`, rows formatted by psycopg's C
  code) into a session-local staging table, then one `INSERT ... SELECT DISTINCT ON (key) ... ORDER BY key, version
  DESC` statement collapses, orders and upserts it in the server (`storage.bulk`). SQLAlchemy's per-row processing,
  which held the GIL for every row, is gone; errors are raised as the same `sqlalchemy.exc` classes.
- Two tables merge instead of replacing: `users` (see `upsert_interactions`) and `cot_samples`, whose request and
  result halves are versioned separately (see `upsert_cot_samples` and `complete_cot_samples`).
- All values travel as bound parameters. Timestamps must be timezone-aware and come back as UTC.
- A database that goes away mid-call (a PostgreSQL restart) makes that call raise `sqlalchemy.exc.OperationalError`
  with nothing written; pooled connections are checked before use, so the caller's retry reconnects.
- The schema comes from `migrations.upgrade(url)`; the repository never creates tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Protocol, TypeVar

import numpy as np
from sqlalchemy import Connection, Engine, Table, and_, case, func, or_, select
from sqlalchemy.engine import URL

from llmcf.events import CotRequest, CotResult, InteractionEvent, ItemEvent
from storage import bulk
from storage.engine import dialect_insert, make_engine
from storage.models import TABLES, CotSample, Interaction, Item, ItemEmbedding, User
from storage.registry import ModelRegistry, ModelStatus, ModelVersionRecord
from storage.rows import (
    REQUEST_FIELDS,
    InteractionRow,
    PendingSampleRow,
    StoredCotSample,
    StoredItem,
    StoredUser,
    vector_from_bytes,
    vector_to_bytes,
)
from storage.statements import in_chunks, latest_per_key, merge_users, upsert_newer, users_of

if TYPE_CHECKING:
    from llmcf.settings import Settings


class _Timed(Protocol):
    """A row read back in time order (`InteractionRow`, `StoredCotSample`)."""

    @property
    def ts(self) -> datetime: ...


R = TypeVar("R")
Timed = TypeVar("Timed", bound=_Timed)
Row = TypeVar("Row", InteractionRow, PendingSampleRow)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _require_aware(rows: Sequence[_Timed]) -> None:
    """The `UTCDateTime` rule, checked before anything is written (the COPY road bypasses column types)."""
    for row in rows:
        if row.ts.tzinfo is None or row.ts.utcoffset() is None:
            raise ValueError(f"naive datetime {row.ts!r}: storage needs timezone-aware timestamps")


class Repository:
    """Batch upserts and reads over one engine. Thread-safe (the engine pools connections); `close()` releases them."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._insert = dialect_insert(engine)
        # The COPY road needs psycopg 3 (the driver `normalize_database_url` picks); any other driver takes the other.
        self._copy_road = engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
        self.models = ModelRegistry(engine)

    @classmethod
    def from_url(cls, url: str | URL) -> "Repository":
        return cls(make_engine(url))

    @classmethod
    def from_settings(cls, settings: "Settings") -> "Repository":
        return cls.from_url(settings.database_url)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Repository":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Repository({self.engine.url.render_as_string(hide_password=True)})"

    # ---- writes -------------------------------------------------------------------------------------------------

    def upsert_items(self, items: Sequence[ItemEvent]) -> int:
        """Store items; a row is replaced only by a later `updated_at` (or `created_at`). Returns distinct items."""
        stored_at = _now()
        rows = latest_per_key(
            (
                {
                    "item_id": item.item_id,
                    "title": item.title,
                    "text": item.text,
                    "tags": list(item.tags),
                    "created_at": item.created_at,
                    "updated_at": item.updated_at,
                    "version": item.version,
                    "stored_at": stored_at,
                }
                for item in items
            ),
            key="item_id",
        )
        if rows:
            with self.engine.begin() as conn:
                upsert_newer(conn, self._insert, Item.__table__, "item_id", rows)
        return len(rows)

    def upsert_interactions(self, interactions: Sequence[InteractionEvent]) -> int:
        """Store interactions and merge them into `users`, in one transaction. Returns distinct interactions.

        Users keep the earliest first_seen_at and latest last_seen_at ever seen; their `interactions` count is
        recounted from the interactions table for the users in the batch, so re-deliveries never inflate it.
        """
        return self.upsert_interaction_rows([InteractionRow.from_event(event) for event in interactions])

    def upsert_interaction_rows(self, interactions: Sequence[InteractionRow]) -> int:
        """`upsert_interactions` for rows decoded without the event model (the stream worker's hot path)."""

        def write(conn: Connection, rows: list[dict[str, Any]]) -> None:
            upsert_newer(conn, self._insert, Interaction.__table__, "interaction_id", rows)
            merge_users(conn, self._insert, users_of(rows))

        return self._upsert_batch(interactions, "interaction_id", bulk.copy_interactions, InteractionRow._asdict, write)

    def upsert_cot_samples(self, requests: Sequence[CotRequest]) -> int:
        """Store CoT requests as samples (status 'pending' when new). Returns distinct samples.

        Only the request's own fields (user, item, label, ts, history, reason) are written, and only by a later
        `requested_at` than the one stored; status and CoT fields are never touched, so a sample that is already
        'generated' stays generated whatever order requests and results arrive in.
        """
        return self.upsert_pending_samples([PendingSampleRow.from_request(request) for request in requests])

    def upsert_pending_samples(self, samples: Sequence[PendingSampleRow]) -> int:
        """`upsert_cot_samples` for rows built without the `CotRequest` model (the stream worker's hot path)."""

        def write(conn: Connection, rows: list[dict[str, Any]]) -> None:
            table = CotSample.__table__
            stmt = self._insert(table)
            stmt = stmt.on_conflict_do_update(
                index_elements=["sample_id"],
                set_={name: stmt.excluded[name] for name in REQUEST_FIELDS},
                where=table.c.version < stmt.excluded.version,
            )
            conn.execute(stmt, rows)

        def as_dict(row: PendingSampleRow) -> dict[str, Any]:
            return {**row._asdict(), "history": row.history_json(), "status": "pending"}

        return self._upsert_batch(samples, "sample_id", bulk.copy_pending_samples, as_dict, write)

    def _upsert_batch(
        self, batch: Sequence[Row], key: str, copy: Callable[[Connection, Sequence[Row], datetime], None],
        as_dict: Callable[[Row], dict[str, Any]], write: Callable[[Connection, list[dict[str, Any]]], None],
    ) -> int:
        """The worker's two roads for a batch, both stamping one `stored_at`: binary COPY through staging tables on
        PostgreSQL with psycopg (`copy`), else the latest row per `key` in one upsert statement (`write`). Returns the
        distinct keys."""
        if not batch:
            return 0
        _require_aware(batch)
        stored_at = _now()
        if self._copy_road:
            with self.engine.connect() as conn:
                copy(conn, batch, stored_at)
            return len({getattr(row, key) for row in batch})
        rows = latest_per_key(({**as_dict(row), "stored_at": stored_at} for row in batch), key=key)
        with self.engine.begin() as conn:
            write(conn, rows)
        return len(rows)

    def complete_cot_samples(self, results: Sequence[CotResult]) -> int:
        """Fill samples' CoT from generator results and mark them 'generated'. Returns distinct samples.

        A result for a sample whose request is not stored yet creates the row (history and reason NULL, version 0)
        for the request to complete later. A stored CoT is replaced only by a later `generated_at`, so a re-delivered
        result changes nothing, `cot_stored_at` included.
        """
        stored_at = _now()
        rows = latest_per_key(
            (
                {
                    "sample_id": result.request_id,
                    "user_id": result.user_id,
                    "item_id": result.item_id,
                    "label": result.label,
                    "ts": result.ts,
                    "history": None,
                    "reason": None,
                    "status": "generated",
                    "cot_text": result.cot_text,
                    "backend": result.backend,
                    "model": result.model,
                    "stored_at": stored_at,
                    "generated_at": result.generated_at,
                    "cot_stored_at": stored_at,
                    "version": 0,
                    "cot_embedding": vector_to_bytes(result.cot_embedding),
                }
                for result in results
            ),
            key="sample_id",
            version="generated_at",
        )
        if rows:
            table = CotSample.__table__
            stmt = self._insert(table)
            cot_fields = ("status", "cot_text", "cot_embedding", "backend", "model", "generated_at", "cot_stored_at")
            stmt = stmt.on_conflict_do_update(
                index_elements=["sample_id"],
                set_={name: stmt.excluded[name] for name in cot_fields},
                where=or_(table.c.generated_at.is_(None), table.c.generated_at < stmt.excluded.generated_at),
            )
            with self.engine.begin() as conn:
                conn.execute(stmt, rows)
        return len(rows)

    def upsert_item_embeddings(self, embeddings: Mapping[str, np.ndarray], model: str) -> int:
        """Store item embeddings (one row per item, float32 bytes) made by the encoder `model`. Returns rows written.

        An item's embedding is written once: a stored one is kept (the worker embeds each item once; re-delivered
        items change nothing), so every sample ever indexed was built from the same item vector.
        """
        stored_at = _now()
        rows = [
            {
                "item_id": item_id,
                "model": model,
                "dimension": int(np.asarray(embeddings[item_id]).shape[0]),
                "embedding": vector_to_bytes(embeddings[item_id]),
                "stored_at": stored_at,
            }
            for item_id in sorted(embeddings)
        ]
        if rows:
            stmt = self._insert(ItemEmbedding.__table__).on_conflict_do_nothing(index_elements=["item_id"])
            with self.engine.begin() as conn:
                conn.execute(stmt, rows)
        return len(rows)

    def get_item_embeddings(self, item_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """The stored embeddings among `item_ids` as float32 arrays, by id (missing ids are simply absent)."""
        table = ItemEmbedding.__table__
        found: dict[str, np.ndarray] = {}
        with self.engine.connect() as conn:
            for chunk in in_chunks(sorted(set(item_ids))):
                for item_id, data in conn.execute(
                    select(table.c.item_id, table.c.embedding).where(table.c.item_id.in_(chunk))
                ):
                    found[item_id] = vector_from_bytes(data)
        return found

    # ---- model versions (the registry's, kept here so that callers hold one storage object) ---------------------

    def record_model_version(self, version: ModelVersionRecord) -> None:
        """See `ModelRegistry.record`."""
        self.models.record(version)

    def set_model_status(self, version_id: str, status: ModelStatus, notes: str | None = None) -> None:
        """See `ModelRegistry.set_status`."""
        self.models.set_status(version_id, status, notes)

    def latest_model_version(self, kind: str, status: ModelStatus = "serving") -> ModelVersionRecord | None:
        """See `ModelRegistry.latest`."""
        return self.models.latest(kind, status)

    def get_model_version(self, version_id: str) -> ModelVersionRecord | None:
        """See `ModelRegistry.get`."""
        return self.models.get(version_id)

    # ---- reads --------------------------------------------------------------------------------------------------

    def get_items(self, item_ids: Iterable[str]) -> dict[str, StoredItem]:
        """The stored items among `item_ids`, by id (missing ids are simply absent)."""
        return {row.item_id: row for row in self._get_by_ids(Item.__table__, "item_id", item_ids, StoredItem)}

    def get_users(self, user_ids: Iterable[str]) -> dict[str, StoredUser]:
        return {row.user_id: row for row in self._get_by_ids(User.__table__, "user_id", user_ids, StoredUser)}

    def get_cot_samples(self, sample_ids: Iterable[str]) -> dict[str, StoredCotSample]:
        return {
            row.sample_id: row
            for row in self._get_by_ids(CotSample.__table__, "sample_id", sample_ids, StoredCotSample)
        }

    def iter_cot_samples(
        self, start: datetime | None = None, end: datetime | None = None, batch_size: int = 5_000
    ) -> Iterator[StoredCotSample]:
        """Every CoT sample (pending and generated) with start <= ts < end, ordered by (ts, sample_id), paged like
        `iter_interactions` (the ranker's training pool)."""
        return self._iter_by_time(CotSample.__table__, "sample_id", StoredCotSample, start, end, batch_size)

    def cot_samples_changed_since(self, moment: datetime | None, batch_size: int = 5_000) -> Iterator[StoredCotSample]:
        """CoT samples stored (request) or completed (result) at or after `moment` (all, when None), ordered by their
        latest change (the later of `stored_at` and `cot_stored_at`, then sample_id), keyset-paginated like
        `iter_interactions`. For replicas of the example pool: `stored_at` is taken before the writing transaction
        commits, so a follower must re-read with some overlap behind its cursor (re-applying a row is harmless)."""
        table = CotSample.__table__
        changed = case(
            (and_(table.c.cot_stored_at.is_not(None), table.c.cot_stored_at > table.c.stored_at), table.c.cot_stored_at),
            else_=table.c.stored_at,
        )
        position: tuple[datetime, str] | None = None
        while True:
            query = select(table)
            if moment is not None:
                query = query.where(or_(table.c.stored_at >= moment, table.c.cot_stored_at >= moment))
            if position is not None:
                last_changed, last_id = position
                query = query.where(or_(changed > last_changed, and_(changed == last_changed, table.c.sample_id > last_id)))
            query = query.order_by(changed, table.c.sample_id).limit(batch_size)
            with self.engine.connect() as conn:
                batch = [StoredCotSample(**row) for row in conn.execute(query).mappings()]
            yield from batch
            if len(batch) < batch_size:
                return
            last = batch[-1]
            position = (max(last.stored_at, last.cot_stored_at or last.stored_at), last.sample_id)

    def user_history(
        self, user_id: str, limit: int = 20, before: datetime | None = None
    ) -> list[InteractionRow]:
        """The user's `limit` latest interactions strictly before `before` (all, when None), oldest first."""
        table = Interaction.__table__
        query = select(table).where(table.c.user_id == user_id)
        if before is not None:
            query = query.where(table.c.ts < before)
        query = query.order_by(table.c.ts.desc(), table.c.interaction_id.desc()).limit(limit)
        with self.engine.connect() as conn:
            rows = [InteractionRow(**row) for row in conn.execute(query).mappings()]
        rows.reverse()
        return rows

    def iter_interactions(
        self, start: datetime | None = None, end: datetime | None = None, batch_size: int = 5_000
    ) -> Iterator[InteractionRow]:
        """Every interaction with start <= ts < end, ordered by (ts, interaction_id), read `batch_size` rows per
        query (keyset pagination: no transaction or cursor stays open between batches, so a long training read
        never holds back writers). Rows written behind the read position during iteration are not seen."""
        return self._iter_by_time(Interaction.__table__, "interaction_id", InteractionRow, start, end, batch_size)

    def _iter_by_time(
        self, table: Table, id_column: str, row_type: type[Timed], start: datetime | None, end: datetime | None,
        batch_size: int,
    ) -> Iterator[Timed]:
        """Rows of `table` with start <= ts < end, ordered by (ts, id), one keyset-paginated query per batch."""
        row_id = table.c[id_column]
        position: tuple[datetime, str] | None = None
        while True:
            query = select(table)
            if start is not None:
                query = query.where(table.c.ts >= start)
            if end is not None:
                query = query.where(table.c.ts < end)
            if position is not None:
                last_ts, last_id = position
                query = query.where(or_(table.c.ts > last_ts, and_(table.c.ts == last_ts, row_id > last_id)))
            query = query.order_by(table.c.ts, row_id).limit(batch_size)
            with self.engine.connect() as conn:
                batch = [row_type(**row) for row in conn.execute(query).mappings()]
            yield from batch
            if len(batch) < batch_size:
                return
            position = (batch[-1].ts, getattr(batch[-1], id_column))

    def counts(self) -> dict[str, int]:
        """Rows per table, by table name."""
        with self.engine.connect() as conn:
            return {
                table.name: conn.execute(select(func.count()).select_from(table)).scalar_one() for table in TABLES
            }

    def cot_sample_statuses(self) -> dict[str, int]:
        """CoT samples per status ('pending', 'generated')."""
        table = CotSample.__table__
        with self.engine.connect() as conn:
            return dict(conn.execute(select(table.c.status, func.count()).group_by(table.c.status)).all())

    def sample_user_and_items(self, n_items: int) -> tuple[str | None, list[str]]:
        """The most active user and the `n_items` most interacted items (for a demo ranking); (None, []) if empty."""
        interactions = Interaction.__table__
        with self.engine.connect() as conn:
            user = conn.execute(select(interactions.c.user_id).group_by(interactions.c.user_id)
                                .order_by(func.count().desc(), interactions.c.user_id).limit(1)).scalar()
            items = conn.execute(select(interactions.c.item_id).group_by(interactions.c.item_id)
                                 .order_by(func.count().desc(), interactions.c.item_id).limit(n_items)).scalars().all()
        return user, list(items)

    # ---- helpers -----------------------------------------------------------------------------------------------------

    def _get_by_ids(self, table: Table, key: str, ids: Iterable[str], build: Callable[..., R]) -> list[R]:
        wanted = sorted(set(ids))
        found: list[R] = []
        with self.engine.connect() as conn:
            for chunk in in_chunks(wanted):
                rows = conn.execute(select(table).where(table.c[key].in_(chunk))).mappings()
                found.extend(build(**row) for row in rows)
        return found
