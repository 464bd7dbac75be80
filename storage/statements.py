"""The repository's portable write statements (SQLAlchemy Core, PostgreSQL and SQLite alike): collapsing a batch to
the newest row per key, the version-guarded upsert, the merge of interactions into `users`, and IN lists cut to what
SQLite accepts. The PostgreSQL COPY road (`storage.bulk`) computes the same results in the server."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Callable

from sqlalchemy import Table, case, func, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import ColumnElement

from storage.models import Interaction, User

Insert = Callable[[Table], Any]  # the backend's `insert` (see `storage.engine.dialect_insert`)
# SQLite (before 3.32) allows 999 bound parameters per statement; IN lists are sent in chunks below that.
IN_LIST_CHUNK = 500


def latest_per_key(rows: Iterable[dict[str, Any]], key: str, version: str = "version") -> list[dict[str, Any]]:
    """Collapse rows sharing a key to the one with the highest version (the first one on ties), in key order.

    PostgreSQL refuses a statement that touches one row twice, and key order makes concurrent batches lock shared rows
    in the same order (no deadlock)."""
    kept: dict[str, dict[str, Any]] = {}
    for row in rows:
        current = kept.get(row[key])
        if current is None or row[version] > current[version]:
            kept[row[key]] = row
    return [kept[k] for k in sorted(kept)]


def in_chunks(values: Sequence[str], size: int = IN_LIST_CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def upsert_newer(conn: Connection, insert: Insert, table: Table, key: str, rows: list[dict[str, Any]]) -> None:
    """Insert rows; replace a stored row only where the incoming version is strictly higher."""
    stmt = insert(table)
    stmt = stmt.on_conflict_do_update(
        index_elements=[key],
        set_={column.name: stmt.excluded[column.name] for column in table.columns if column.name != key},
        where=table.c.version < stmt.excluded.version,
    )
    conn.execute(stmt, rows)


def users_of(interaction_rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One `users` row per user of the (collapsed) interactions: their earliest and latest ts and highest version, the
    count left for `merge_users` to recount; in user order."""
    users: dict[str, dict[str, Any]] = {}
    for row in interaction_rows:
        user = users.setdefault(
            row["user_id"],
            {"user_id": row["user_id"], "first_seen_at": row["ts"], "last_seen_at": row["ts"],
             "interactions": 0, "version": row["version"]},
        )
        user["first_seen_at"] = min(user["first_seen_at"], row["ts"])
        user["last_seen_at"] = max(user["last_seen_at"], row["ts"])
        user["version"] = max(user["version"], row["version"])
    return [users[k] for k in sorted(users)]


def _earliest(stored: ColumnElement[Any], new: ColumnElement[Any]) -> ColumnElement[Any]:
    return case((new < stored, new), else_=stored)


def _latest(stored: ColumnElement[Any], new: ColumnElement[Any]) -> ColumnElement[Any]:
    return case((new > stored, new), else_=stored)


def merge_users(conn: Connection, insert: Insert, user_rows: list[dict[str, Any]]) -> None:
    """Merge `user_rows` into `users` (earliest first seen, latest last seen, highest version), then recount their
    interactions. Run after the interactions are written, in the same transaction."""
    table = User.__table__
    stmt = insert(table)
    incoming = stmt.excluded
    stmt = stmt.on_conflict_do_update(
        index_elements=["user_id"],
        set_={
            "first_seen_at": _earliest(table.c.first_seen_at, incoming.first_seen_at),
            "last_seen_at": _latest(table.c.last_seen_at, incoming.last_seen_at),
            "version": _latest(table.c.version, incoming.version),
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
    for chunk in in_chunks(user_ids):
        conn.execute(update(table).where(table.c.user_id.in_(chunk)).values(interactions=recount))
