"""Database migrations: Alembic, configured in code (no alembic.ini), applied by `llmcf db upgrade|downgrade|current`.

The revisions in `versions/` are the only thing that creates or changes tables; `storage/models.py` describes the same
schema for the code (tests/migrations checks that the two agree). Every function takes a database URL, opens its own
engine, runs in one transaction (PostgreSQL rolls a failed migration back whole; SQLite's DDL is transactional too)
and closes the engine.

A new revision: write `versions/NNNN_what.py` from `script.py.mako` by hand, or autogenerate a draft against a
database at head:

    from alembic import command
    from migrations import alembic_config
    from storage.engine import make_engine
    with make_engine(url).begin() as conn:
        command.revision(alembic_config(conn), message="what", autogenerate=True, rev_id="0002")
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection

from storage.engine import make_engine

SCRIPT_LOCATION = Path(__file__).resolve().parent


def alembic_config(connection: Connection) -> Config:
    """An Alembic `Config` pointing at this package, with `connection` handed to env.py."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.attributes["connection"] = connection
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Apply revisions up to `revision` (creating the SQLite file and its directory if missing)."""
    with _transaction(url) as connection:
        command.upgrade(alembic_config(connection), revision)


def downgrade(url: str, revision: str) -> None:
    """Revert revisions down to `revision` ("-1" = one step, "base" = drop everything)."""
    with _transaction(url) as connection:
        command.downgrade(alembic_config(connection), revision)


def current(url: str) -> str | None:
    """The database's revision, or None when no migration has been applied."""
    with _transaction(url) as connection:
        return MigrationContext.configure(connection).get_current_revision()


@contextmanager
def _transaction(url: str) -> Iterator[Connection]:
    """One transaction on a fresh engine for `url`, disposed of afterwards."""
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            yield connection
    finally:
        engine.dispose()
