"""Database engines: URL normalisation, one engine per backend (PostgreSQL pool, SQLite pragmas), and the backend's
INSERT construct (the one that knows `ON CONFLICT`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from sqlalchemy import Engine, Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url

SQLITE_BUSY_TIMEOUT_MS = 10_000


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


def dialect_insert(engine: Engine) -> Callable[[Table], Any]:
    """The `insert` of the engine's backend: the generic one has no `on_conflict_do_update`."""
    return postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
