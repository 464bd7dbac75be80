"""The PostgreSQL COPY road of the stream worker's two hot writes (interactions with their users, pending CoT samples):
session-local staging tables, binary `COPY FROM STDIN`, and the set-based upserts that collapse, order and write the
staged batch in the server, with the same semantics as the repository's generic statements.

Only for PostgreSQL through psycopg 3; psycopg's errors are raised as their `sqlalchemy.exc` counterparts, like every
other statement of the repository.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from storage.rows import REQUEST_FIELDS, InteractionRow, PendingSampleRow

# One staging table per session (temporary), emptied at every commit, `ord` numbering rows in copy order so that
# DISTINCT ON keeps the first row among equal versions, like `storage.statements.latest_per_key`.
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
_UPSERT_INTERACTIONS = (
    f"INSERT INTO interactions ({', '.join(_INTERACTION_COLUMNS)}) "
    f"SELECT {', '.join('%(stored_at)s' if c == 'stored_at' else c for c in _INTERACTION_COLUMNS)} "
    f"FROM ({_LATEST_INTERACTIONS}) AS batch ORDER BY interaction_id "
    f"ON CONFLICT (interaction_id) DO UPDATE SET "
    f"{_set_excluded(c for c in _INTERACTION_COLUMNS if c != 'interaction_id')} "
    f"WHERE interactions.version < excluded.version"
)
_MERGE_USERS = (
    "INSERT INTO users (user_id, first_seen_at, last_seen_at, interactions, version) "
    f"SELECT user_id, min(ts), max(ts), 0, max(version) FROM ({_LATEST_INTERACTIONS}) AS batch "
    "GROUP BY user_id ORDER BY user_id "
    "ON CONFLICT (user_id) DO UPDATE SET first_seen_at = LEAST(users.first_seen_at, excluded.first_seen_at), "
    "last_seen_at = GREATEST(users.last_seen_at, excluded.last_seen_at), version = GREATEST(users.version, excluded.version)"
)
_RECOUNT_USERS = (
    "UPDATE users SET interactions = (SELECT count(*) FROM interactions WHERE interactions.user_id = users.user_id) "
    f"WHERE users.user_id IN (SELECT user_id FROM {_INTERACTIONS_IN})"
)
_UPSERT_PENDING_SAMPLES = (
    "INSERT INTO cot_samples (sample_id, user_id, item_id, label, ts, history, reason, status, stored_at, version) "
    "SELECT DISTINCT ON (sample_id) sample_id, user_id, item_id, label, ts, history::json, reason, 'pending', "
    f"%(stored_at)s, version FROM {_PENDING_SAMPLES_IN} ORDER BY sample_id, version DESC, ord "
    f"ON CONFLICT (sample_id) DO UPDATE SET {_set_excluded(REQUEST_FIELDS)} "
    "WHERE cot_samples.version < excluded.version"
)
_STAGING_READY = "llmcf_staging_ready"


def copy_interactions(conn: Connection, rows: Sequence[InteractionRow], stored_at: datetime) -> None:
    """Upsert `rows` and merge their users, in one transaction of `conn` (which must have none open)."""
    _ensure_staging(conn)
    with conn.begin():
        _copy_rows(conn, _INTERACTIONS_IN, (row[:-1] for row in rows))  # all but stored_at, which the upsert sets
        _pipeline(conn, [(_UPSERT_INTERACTIONS, {"stored_at": stored_at}), (_MERGE_USERS, None), (_RECOUNT_USERS, None)])


def copy_pending_samples(conn: Connection, rows: Sequence[PendingSampleRow], stored_at: datetime) -> None:
    """Upsert the request half of `rows`, in one transaction of `conn` (which must have none open)."""
    _ensure_staging(conn)
    with conn.begin():
        _copy_rows(conn, _PENDING_SAMPLES_IN, (
            (r.sample_id, r.user_id, r.item_id, r.label, r.ts, orjson.dumps(r.history_json()).decode(), r.reason,
             r.version)
            for r in rows
        ))
        conn.exec_driver_sql(_UPSERT_PENDING_SAMPLES, {"stored_at": stored_at})


def _ensure_staging(conn: Connection) -> None:
    """Create this session's staging tables once per database connection, committed on their own: a table created
    inside a batch's transaction would vanish with that transaction's rollback."""
    info = conn.connection.info
    if not info.get(_STAGING_READY):
        for statement in _STAGING_DDL:
            conn.exec_driver_sql(statement)
        conn.commit()
        info[_STAGING_READY] = True


def _driver(conn: Connection) -> Any:
    """The psycopg connection under `conn`; a checked-out connection always has one."""
    driver = conn.connection.driver_connection
    assert driver is not None, "a checked-out connection has a driver connection"
    return driver


def _pipeline(conn: Connection, statements: Sequence[tuple[str, Mapping[str, Any] | None]]) -> None:
    """Run `statements` in this transaction in one round trip (psycopg's pipeline mode), errors raised like
    `_copy_rows`'s."""
    import psycopg

    driver = _driver(conn)
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
        with _driver(conn).cursor() as cursor, cursor.copy(statement) as copy:
            copy.set_types([kind for _, kind in columns])
            for row in rows:
                copy.write_row(row)
    except psycopg.Error as exc:
        raise DBAPIError.instance(statement, None, exc, psycopg.Error) from exc
