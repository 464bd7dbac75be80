"""Upsert throughput of `storage.repository.Repository` on SQLite and PostgreSQL: rows/s per batch size.

Run from the repository root: `python -m bench.sql_upsert [--rows 10000] [--batch 500 2000 10000]`. PostgreSQL is
`DATABASE_URL` when that is a PostgreSQL URL (a scratch database is created and dropped there), else a throwaway
`TemporaryPostgres`. Each measurement starts from an empty, migrated database and writes `--rows` interactions
(spread over 1% as many users) as fresh inserts, then the same events again (a re-delivery: conflicts that change
nothing), then `--rows` items.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import migrations
from llmcf.events import InteractionEvent, ItemEvent
from llmcf.infra.postgres import TemporaryPostgres
from storage.engine import normalize_database_url
from storage.repository import Repository

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def interactions(count: int) -> list[InteractionEvent]:
    users = max(1, count // 100)
    return [
        InteractionEvent(
            user_id=f"u{n % users}", item_id=f"i{n % 3000}", kind="rating", label=n % 2, value=float(n % 5 + 1),
            ts=T0 + timedelta(seconds=n),
        )
        for n in range(count)
    ]


def items(count: int) -> list[ItemEvent]:
    return [
        ItemEvent(item_id=f"i{n}", title=f"Movie {n}", text="A film.", tags=["drama", "1990s"], created_at=T0)
        for n in range(count)
    ]


@contextmanager
def postgres_server_url() -> Iterator[str]:
    external = os.environ.get("DATABASE_URL", "")
    if external and make_url(external).drivername.split("+")[0] in {"postgres", "postgresql"}:
        yield normalize_database_url(external).render_as_string(hide_password=False)
        return
    with TemporaryPostgres() as server:
        yield server.url


@contextmanager
def scratch_database(backend: str, postgres_url: str, workdir: Path) -> Iterator[str]:
    if backend == "sqlite":
        path = workdir / f"{uuid.uuid4().hex}.db"
        yield f"sqlite:///{path}"
        return
    name = f"bench_{uuid.uuid4().hex[:12]}"  # ours, not input: safe to put in DDL
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def rate(write: Callable[[Sequence], int], events: Sequence, batch: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(events), batch):
        write(events[start : start + batch])
    return len(events) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--batch", type=int, nargs="+", default=[500, 2_000, 10_000])
    args = parser.parse_args()

    interaction_events, item_events = interactions(args.rows), items(args.rows)
    print(f"{'backend':<11} {'batch':>6} {'interactions new':>17} {'re-delivered':>13} {'items new':>10}   (rows/s)")
    with postgres_server_url() as postgres_url, tempfile.TemporaryDirectory() as workdir:
        for backend in ("sqlite", "postgresql"):
            for batch in args.batch:
                with scratch_database(backend, postgres_url, Path(workdir)) as url:
                    migrations.upgrade(url)
                    with Repository.from_url(url) as repo:
                        fresh = rate(repo.upsert_interactions, interaction_events, batch)
                        again = rate(repo.upsert_interactions, interaction_events, batch)
                        item_rate = rate(repo.upsert_items, item_events, batch)
                        assert repo.counts()["interactions"] == args.rows
                print(f"{backend:<11} {batch:>6} {fresh:>17,.0f} {again:>13,.0f} {item_rate:>10,.0f}")


if __name__ == "__main__":
    main()
