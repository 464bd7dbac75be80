"""The storage API every stage uses: batch upserts from events, and the reads the stages need. No SQL elsewhere.

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
  DESC` statement collapses, orders and upserts it in the server. SQLAlchemy's per-row processing, which held the GIL
  for ~60 us per interaction, is gone; errors are raised as the same `sqlalchemy.exc` classes.
- Two tables merge instead of replacing: `users` (see `upsert_interactions`) and `cot_samples`, whose request and
  result halves are versioned separately (see `upsert_cot_samples` and `complete_cot_samples`).
- All values travel as bound parameters. Timestamps must be timezone-aware and come back as UTC.
- A database that goes away mid-call (a PostgreSQL restart) makes that call raise `sqlalchemy.exc.OperationalError`
  with nothing written; pooled connections are checked before use, so the caller's retry reconnects.
- The schema comes from `migrations.upgrade(url)`; the repository never creates tables.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, NamedTuple, TypeVar

import numpy as np
import orjson
from sqlalchemy import Engine, Table, and_, case, create_engine, event, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.expression import ColumnElement

from llmcf.events import CotRequest, CotResult, InteractionEvent, ItemEvent, epoch_ms
from storage.models import MODEL_STATUSES, TABLES, CotSample, Interaction, Item, ItemEmbedding, ModelVersion, User

if TYPE_CHECKING:
    from llmcf.settings import Settings

ModelStatus = Literal["candidate", "serving", "retired", "rejected"]
R = TypeVar("R")
SQLITE_BUSY_TIMEOUT_MS = 10_000
# SQLite (before 3.32) allows 999 bound parameters per statement; IN lists are sent in chunks below that.
_IN_LIST_CHUNK = 500
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def normalize_database_url(url: str | URL) -> URL:
    """Parse a database URL and pin PostgreSQL to the psycopg 3 driver (`postgres://` and `postgresql://` included)."""
    parsed = make_url(url)
    if parsed.drivername in {"postgres", "postgresql"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in {"postgresql", "sqlite"}:
        raise ValueError(
            f"unsupported database {parsed.render_as_string(hide_password=True)}: use PostgreSQL or SQLite"
        )
    return parsed


def make_engine(url: str | URL) -> Engine:
    """An engine tuned for the pipeline: pre-ping on PostgreSQL (a restarted server costs one retry, not a crash),
    WAL and a busy timeout on SQLite (readers never block the writer; writers wait instead of failing). The SQLite
    file's directory is created if missing."""
    parsed = normalize_database_url(url)
    if parsed.get_backend_name() == "postgresql":
        return create_engine(
            parsed, pool_size=5, max_overflow=5, pool_pre_ping=True, pool_recycle=1800, pool_timeout=30
        )
    if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps the file consistent
        cursor.close()

    return engine


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
class StoredInteraction:
    interaction_id: str
    user_id: str
    item_id: str
    kind: str
    label: int
    value: float | None
    ts: datetime
    version: int
    stored_at: datetime


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


def vector_to_bytes(vector: np.ndarray | Sequence[float]) -> bytes:
    """Little-endian float32 bytes: the storage form of every embedding, the same on every machine."""
    return np.asarray(vector, dtype="<f4").tobytes()


def vector_from_bytes(data: bytes) -> np.ndarray:
    """The float32 array stored by `vector_to_bytes` (native byte order, writable)."""
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


@dataclass(frozen=True)
class ModelVersionRecord:
    """A trained ranker artifact; `checksum` is the artifact's sha256 in hex."""

    version_id: str
    kind: str
    artifact_path: str
    checksum: str
    created_at: datetime
    metrics: dict[str, Any] = field(default_factory=dict)
    parent_version: str | None = None
    status: ModelStatus = "candidate"
    notes: str | None = None

    def __post_init__(self) -> None:
        if not _SHA256_HEX.fullmatch(self.checksum):
            raise ValueError(f"checksum must be a lowercase sha256 hex digest, got {self.checksum!r}")
        if self.status not in MODEL_STATUSES:
            raise ValueError(f"status must be one of {MODEL_STATUSES}, got {self.status!r}")


class ModelVersionConflict(ValueError):
    """A version id was recorded again with a different artifact: ids must name one artifact forever."""


def _latest_per_key(rows: Iterable[dict[str, Any]], key: str, version: str = "version") -> list[dict[str, Any]]:
    """Collapse rows sharing a key to the one with the highest version (the first one on ties), in key order."""
    kept: dict[str, dict[str, Any]] = {}
    for row in rows:
        current = kept.get(row[key])
        if current is None or row[version] > current[version]:
            kept[row[key]] = row
    return [kept[k] for k in sorted(kept)]


def _chunks(values: Sequence[str], size: int = _IN_LIST_CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _now() -> datetime:
    return datetime.now(timezone.utc)


class InteractionRow(NamedTuple):
    """An interaction as stored, without the event model: what the stream worker decodes into, with the id and the
    version (event time in ms) computed once."""

    interaction_id: str
    user_id: str
    item_id: str
    kind: str
    label: int
    value: float | None
    ts: datetime
    version: int

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


def _history_json(history: Sequence[tuple[str, int]]) -> list[dict[str, Any]]:
    return [{"item_id": item_id, "label": label} for item_id, label in history]


def _require_aware(rows: Sequence[InteractionRow] | Sequence[PendingSampleRow]) -> None:
    """The `UTCDateTime` rule, checked before anything is written (the COPY road bypasses column types)."""
    for row in rows:
        if row.ts.tzinfo is None or row.ts.utcoffset() is None:
            raise ValueError(f"naive datetime {row.ts!r}: storage needs timezone-aware timestamps")


# PostgreSQL staging tables of the COPY road: one per session (temporary), emptied at every commit, `ord` numbering
# rows in copy order so that DISTINCT ON keeps the first row among equal versions, like `_latest_per_key`.
_INTERACTIONS_IN = "llmcf_interactions_in"
_PENDING_SAMPLES_IN = "llmcf_pending_samples_in"
_STAGING_COLUMNS = {
    _INTERACTIONS_IN: (
        ("interaction_id", "text"), ("user_id", "text"), ("item_id", "text"), ("kind", "text"), ("label", "int2"),
        ("value", "float8"), ("ts", "timestamptz"), ("version", "int8"),
    ),
    _PENDING_SAMPLES_IN: (
        ("sample_id", "text"), ("user_id", "text"), ("item_id", "text"), ("label", "int2"), ("ts", "timestamptz"),
        ("history", "text"), ("reason", "text"), ("version", "int8"),
    ),
}
_STAGING_DDL = tuple(
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {name} (ord bigint GENERATED ALWAYS AS IDENTITY, "
    + ", ".join(f"{column} {kind}" for column, kind in columns)
    + ") ON COMMIT DELETE ROWS"
    for name, columns in _STAGING_COLUMNS.items()
)


def _set_excluded(columns: Iterable[str]) -> str:
    return ", ".join(f"{column} = excluded.{column}" for column in columns)


_INTERACTION_COLUMNS = (*(name for name, _ in _STAGING_COLUMNS[_INTERACTIONS_IN]), "stored_at")
_LATEST_INTERACTIONS = (
    f"SELECT DISTINCT ON (interaction_id) * FROM {_INTERACTIONS_IN} ORDER BY interaction_id, version DESC, ord"
)
_PG_UPSERT_INTERACTIONS = (
    f"INSERT INTO interactions ({', '.join(_INTERACTION_COLUMNS)}) "
    f"SELECT {', '.join('%(stored_at)s' if c == 'stored_at' else c for c in _INTERACTION_COLUMNS)} "
    f"FROM ({_LATEST_INTERACTIONS}) AS batch ORDER BY interaction_id "
    f"ON CONFLICT (interaction_id) DO UPDATE SET "
    f"{_set_excluded(c for c in _INTERACTION_COLUMNS if c != 'interaction_id')} "
    f"WHERE interactions.version < excluded.version"
)
_PG_MERGE_USERS = (
    "INSERT INTO users (user_id, first_seen_at, last_seen_at, interactions, version) "
    f"SELECT user_id, min(ts), max(ts), 0, max(version) FROM ({_LATEST_INTERACTIONS}) AS batch "
    "GROUP BY user_id ORDER BY user_id "
    "ON CONFLICT (user_id) DO UPDATE SET first_seen_at = LEAST(users.first_seen_at, excluded.first_seen_at), "
    "last_seen_at = GREATEST(users.last_seen_at, excluded.last_seen_at), version = GREATEST(users.version, excluded.version)"
)
_PG_RECOUNT_USERS = (
    "UPDATE users SET interactions = (SELECT count(*) FROM interactions WHERE interactions.user_id = users.user_id) "
    f"WHERE users.user_id IN (SELECT user_id FROM {_INTERACTIONS_IN})"
)
_REQUEST_FIELDS = ("user_id", "item_id", "label", "ts", "history", "reason", "stored_at", "version")
_PG_UPSERT_PENDING_SAMPLES = (
    "INSERT INTO cot_samples (sample_id, user_id, item_id, label, ts, history, reason, status, stored_at, version) "
    "SELECT DISTINCT ON (sample_id) sample_id, user_id, item_id, label, ts, history::json, reason, 'pending', "
    f"%(stored_at)s, version FROM {_PENDING_SAMPLES_IN} ORDER BY sample_id, version DESC, ord "
    f"ON CONFLICT (sample_id) DO UPDATE SET {_set_excluded(_REQUEST_FIELDS)} "
    "WHERE cot_samples.version < excluded.version"
)
_STAGING_READY = "llmcf_staging_ready"


def _ensure_staging(conn: Connection) -> None:
    """Create this session's staging tables once per database connection, committed on their own: a table created
    inside a batch's transaction would vanish with that transaction's rollback."""
    info = conn.connection.info
    if not info.get(_STAGING_READY):
        for statement in _STAGING_DDL:
            conn.exec_driver_sql(statement)
        conn.commit()
        info[_STAGING_READY] = True


def _pipeline(conn: Connection, statements: Sequence[tuple[str, Mapping[str, Any] | None]]) -> None:
    """Run `statements` in this transaction in one round trip (psycopg's pipeline mode), errors raised like
    `_copy_rows`'s."""
    import psycopg

    driver = conn.connection.driver_connection
    try:
        with driver.cursor() as cursor, driver.pipeline():
            for statement, parameters in statements:
                cursor.execute(statement, parameters)
    except psycopg.Error as exc:
        raise DBAPIError.instance("; ".join(s for s, _ in statements), None, exc, psycopg.Error) from exc


def _copy_rows(conn: Connection, staging: str, rows: Iterable[Sequence[Any]]) -> None:
    """Binary COPY of `rows` (tuples in `_STAGING_COLUMNS` order) into a staging table, in this transaction.

    psycopg's own errors are raised as their `sqlalchemy.exc` counterparts (DataError for a NUL in a string,
    OperationalError for a lost server), like every other statement of the repository."""
    import psycopg

    columns = _STAGING_COLUMNS[staging]
    statement = f"COPY {staging} ({', '.join(name for name, _ in columns)}) FROM STDIN (FORMAT BINARY)"
    try:
        with conn.connection.driver_connection.cursor() as cursor, cursor.copy(statement) as copy:
            copy.set_types([kind for _, kind in columns])
            for row in rows:
                copy.write_row(row)
    except psycopg.Error as exc:
        raise DBAPIError.instance(statement, None, exc, psycopg.Error) from exc


class Repository:
    """Batch upserts and reads over one engine. Thread-safe (the engine pools connections); `close()` releases them."""

    def __init__(self, engine: Engine):
        self.engine = engine
        dialect = engine.dialect.name
        self._insert: Callable[[Table], Any] = postgresql.insert if dialect == "postgresql" else sqlite.insert
        # The COPY road needs psycopg 3 (the driver `normalize_database_url` picks); any other driver takes the other.
        self._copy_road = dialect == "postgresql" and engine.dialect.driver == "psycopg"

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
        rows = _latest_per_key(
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
                self._upsert_newer(conn, Item.__table__, "item_id", rows)
        return len(rows)

    def upsert_interactions(self, interactions: Sequence[InteractionEvent]) -> int:
        """Store interactions and merge them into `users`, in one transaction. Returns distinct interactions.

        Users keep the earliest first_seen_at and latest last_seen_at ever seen; their `interactions` count is
        recounted from the interactions table for the users in the batch, so re-deliveries never inflate it.
        """
        return self.upsert_interaction_rows([InteractionRow.from_event(event) for event in interactions])

    def upsert_interaction_rows(self, interactions: Sequence[InteractionRow]) -> int:
        """`upsert_interactions` for rows decoded without the event model (the stream worker's hot path)."""
        if not interactions:
            return 0
        _require_aware(interactions)
        stored_at = _now()
        if self._copy_road:
            with self.engine.connect() as conn:
                _ensure_staging(conn)
                with conn.begin():
                    _copy_rows(conn, _INTERACTIONS_IN, interactions)
                    _pipeline(conn, [(_PG_UPSERT_INTERACTIONS, {"stored_at": stored_at}), (_PG_MERGE_USERS, None),
                                     (_PG_RECOUNT_USERS, None)])
            return len({row.interaction_id for row in interactions})
        rows = _latest_per_key(({**row._asdict(), "stored_at": stored_at} for row in interactions), key="interaction_id")
        users: dict[str, dict[str, Any]] = {}
        for row in rows:
            user = users.setdefault(
                row["user_id"],
                {"user_id": row["user_id"], "first_seen_at": row["ts"], "last_seen_at": row["ts"],
                 "interactions": 0, "version": row["version"]},
            )
            user["first_seen_at"] = min(user["first_seen_at"], row["ts"])
            user["last_seen_at"] = max(user["last_seen_at"], row["ts"])
            user["version"] = max(user["version"], row["version"])
        user_rows = [users[k] for k in sorted(users)]
        with self.engine.begin() as conn:
            self._upsert_newer(conn, Interaction.__table__, "interaction_id", rows)
            self._merge_users(conn, user_rows)
        return len(rows)

    def upsert_cot_samples(self, requests: Sequence[CotRequest]) -> int:
        """Store CoT requests as samples (status 'pending' when new). Returns distinct samples.

        Only the request's own fields (user, item, label, ts, history, reason) are written, and only by a later
        `requested_at` than the one stored; status and CoT fields are never touched, so a sample that is already
        'generated' stays generated whatever order requests and results arrive in.
        """
        return self.upsert_pending_samples([PendingSampleRow.from_request(request) for request in requests])

    def upsert_pending_samples(self, samples: Sequence[PendingSampleRow]) -> int:
        """`upsert_cot_samples` for rows built without the `CotRequest` model (the stream worker's hot path)."""
        if not samples:
            return 0
        _require_aware(samples)
        stored_at = _now()
        if self._copy_road:
            with self.engine.connect() as conn:
                _ensure_staging(conn)
                with conn.begin():
                    _copy_rows(conn, _PENDING_SAMPLES_IN, (
                        (r.sample_id, r.user_id, r.item_id, r.label, r.ts, orjson.dumps(_history_json(r.history)).decode(),
                         r.reason, r.version)
                        for r in samples
                    ))
                    conn.exec_driver_sql(_PG_UPSERT_PENDING_SAMPLES, {"stored_at": stored_at})
            return len({row.sample_id for row in samples})
        rows = _latest_per_key(
            (
                {**row._asdict(), "history": _history_json(row.history), "status": "pending", "stored_at": stored_at}
                for row in samples
            ),
            key="sample_id",
        )
        table = CotSample.__table__
        stmt = self._insert(table)
        stmt = stmt.on_conflict_do_update(
            index_elements=["sample_id"],
            set_={name: stmt.excluded[name] for name in _REQUEST_FIELDS},
            where=table.c.version < stmt.excluded.version,
        )
        with self.engine.begin() as conn:
            conn.execute(stmt, rows)
        return len(rows)

    def complete_cot_samples(self, results: Sequence[CotResult]) -> int:
        """Fill samples' CoT from generator results and mark them 'generated'. Returns distinct samples.

        A result for a sample whose request is not stored yet creates the row (history and reason NULL, version 0)
        for the request to complete later. A stored CoT is replaced only by a later `generated_at`, so a re-delivered
        result changes nothing, `cot_stored_at` included.
        """
        stored_at = _now()
        rows = _latest_per_key(
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
            for chunk in _chunks(sorted(set(item_ids))):
                for item_id, data in conn.execute(
                    select(table.c.item_id, table.c.embedding).where(table.c.item_id.in_(chunk))
                ):
                    found[item_id] = vector_from_bytes(data)
        return found

    def record_model_version(self, version: ModelVersionRecord) -> None:
        """Register a trained artifact. Recording the same version again is a no-op (a retried trainer step);
        recording its id with a different checksum raises `ModelVersionConflict` and writes nothing."""
        table = ModelVersion.__table__
        row = {
            "version_id": version.version_id,
            "created_at": version.created_at,
            "kind": version.kind,
            "parent_version": version.parent_version,
            "metrics": version.metrics,
            "artifact_path": version.artifact_path,
            "checksum": version.checksum,
            "status": version.status,
            "notes": version.notes,
        }
        with self.engine.begin() as conn:
            conn.execute(self._insert(table).on_conflict_do_nothing(index_elements=["version_id"]), [row])
            stored = conn.execute(
                select(table.c.checksum).where(table.c.version_id == version.version_id)
            ).scalar_one()
            if stored != version.checksum:
                raise ModelVersionConflict(
                    f"model version {version.version_id!r} is already recorded with checksum {stored}, "
                    f"not {version.checksum}"
                )

    def set_model_status(self, version_id: str, status: ModelStatus, notes: str | None = None) -> None:
        """Move a version to `status` (and replace its notes when given). Promoting one to 'serving' retires the
        version of the same kind that was serving, in the same transaction: at most one serves per kind."""
        if status not in MODEL_STATUSES:
            raise ValueError(f"status must be one of {MODEL_STATUSES}, got {status!r}")
        table = ModelVersion.__table__
        with self.engine.begin() as conn:
            kind = conn.execute(select(table.c.kind).where(table.c.version_id == version_id)).scalar_one_or_none()
            if kind is None:
                raise KeyError(f"no model version {version_id!r}")
            if status == "serving":
                conn.execute(
                    update(table)
                    .where(table.c.kind == kind, table.c.status == "serving", table.c.version_id != version_id)
                    .values(status="retired")
                )
            values: dict[str, Any] = {"status": status}
            if notes is not None:
                values["notes"] = notes
            conn.execute(update(table).where(table.c.version_id == version_id).values(**values))

    # ---- reads --------------------------------------------------------------------------------------------------

    def latest_model_version(self, kind: str, status: ModelStatus = "serving") -> ModelVersionRecord | None:
        """The most recently created version of `kind` in `status`, or None."""
        table = ModelVersion.__table__
        with self.engine.connect() as conn:
            row = conn.execute(
                select(table)
                .where(table.c.kind == kind, table.c.status == status)
                .order_by(table.c.created_at.desc(), table.c.version_id.desc())
                .limit(1)
            ).mappings().first()
        return None if row is None else ModelVersionRecord(**row)

    def get_model_version(self, version_id: str) -> ModelVersionRecord | None:
        """The version `version_id` whatever its status, or None."""
        table = ModelVersion.__table__
        with self.engine.connect() as conn:
            row = conn.execute(select(table).where(table.c.version_id == version_id)).mappings().first()
        return None if row is None else ModelVersionRecord(**row)

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
    ) -> list[StoredInteraction]:
        """The user's `limit` latest interactions strictly before `before` (all, when None), oldest first."""
        table = Interaction.__table__
        query = select(table).where(table.c.user_id == user_id)
        if before is not None:
            query = query.where(table.c.ts < before)
        query = query.order_by(table.c.ts.desc(), table.c.interaction_id.desc()).limit(limit)
        with self.engine.connect() as conn:
            rows = [StoredInteraction(**row) for row in conn.execute(query).mappings()]
        rows.reverse()
        return rows

    def iter_interactions(
        self, start: datetime | None = None, end: datetime | None = None, batch_size: int = 5_000
    ) -> Iterator[StoredInteraction]:
        """Every interaction with start <= ts < end, ordered by (ts, interaction_id), read `batch_size` rows per
        query (keyset pagination: no transaction or cursor stays open between batches, so a long training read
        never holds back writers). Rows written behind the read position during iteration are not seen."""
        return self._iter_by_time(Interaction.__table__, "interaction_id", StoredInteraction, start, end, batch_size)

    def _iter_by_time(
        self, table: Table, id_column: str, row_type: type[R], start: datetime | None, end: datetime | None,
        batch_size: int,
    ) -> Iterator[R]:
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

    # ---- statements ---------------------------------------------------------------------------------------------

    def _upsert_newer(self, conn: Connection, table: Table, key: str, rows: list[dict[str, Any]]) -> None:
        """Insert rows; replace a stored row only where the incoming version is strictly higher."""
        stmt = self._insert(table)
        stmt = stmt.on_conflict_do_update(
            index_elements=[key],
            set_={column.name: stmt.excluded[column.name] for column in table.columns if column.name != key},
            where=table.c.version < stmt.excluded.version,
        )
        conn.execute(stmt, rows)

    def _merge_users(self, conn: Connection, user_rows: list[dict[str, Any]]) -> None:
        table = User.__table__
        stmt = self._insert(table)
        incoming = stmt.excluded

        def earliest(stored: ColumnElement[Any], new: ColumnElement[Any]) -> ColumnElement[Any]:
            return case((new < stored, new), else_=stored)

        def latest(stored: ColumnElement[Any], new: ColumnElement[Any]) -> ColumnElement[Any]:
            return case((new > stored, new), else_=stored)

        stmt = stmt.on_conflict_do_update(
            index_elements=["user_id"],
            set_={
                "first_seen_at": earliest(table.c.first_seen_at, incoming.first_seen_at),
                "last_seen_at": latest(table.c.last_seen_at, incoming.last_seen_at),
                "version": latest(table.c.version, incoming.version),
            },
        )
        conn.execute(stmt, user_rows)
        # Recount rather than increment: the count is then right however often an interaction is delivered.
        interactions = Interaction.__table__
        recount = (
            select(func.count())
            .where(interactions.c.user_id == table.c.user_id)
            .scalar_subquery()
        )
        user_ids = [row["user_id"] for row in user_rows]
        for chunk in _chunks(user_ids):
            conn.execute(update(table).where(table.c.user_id.in_(chunk)).values(interactions=recount))

    def _get_by_ids(self, table: Table, key: str, ids: Iterable[str], build: Callable[..., Any]) -> list[Any]:
        wanted = sorted(set(ids))
        found = []
        with self.engine.connect() as conn:
            for chunk in _chunks(wanted):
                rows = conn.execute(select(table).where(table.c[key].in_(chunk))).mappings()
                found.extend(build(**row) for row in rows)
        return found
