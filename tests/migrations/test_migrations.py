"""The migrations build exactly the schema storage/models.py describes, and can be undone and redone, on both
backends."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

import migrations
from storage.engine import make_engine
from storage.models import Base

EXPECTED_TABLES = {"items", "users", "interactions", "cot_samples", "model_versions", "item_embeddings"}
HEAD = "0003"


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_round_trip(database_url: str) -> None:
    assert migrations.current(database_url) is None
    assert _tables(database_url) == set()

    migrations.upgrade(database_url)
    assert migrations.current(database_url) == HEAD
    assert _tables(database_url) == EXPECTED_TABLES

    migrations.downgrade(database_url, "base")
    assert migrations.current(database_url) is None
    assert _tables(database_url) == set()

    migrations.upgrade(database_url, "head")
    assert migrations.current(database_url) == HEAD
    assert _tables(database_url) == EXPECTED_TABLES


def test_upgrade_twice_is_a_no_op(database_url: str) -> None:
    migrations.upgrade(database_url)
    migrations.upgrade(database_url)
    assert migrations.current(database_url) == HEAD


def test_migrated_schema_matches_models(database_url: str) -> None:
    migrations.upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            differences = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_indexes_exist(database_url: str) -> None:
    migrations.upgrade(database_url)
    engine = make_engine(database_url)
    try:
        indexes = {tuple(ix["column_names"]) for ix in inspect(engine).get_indexes("interactions")}
        sample_indexes = {tuple(ix["column_names"]) for ix in inspect(engine).get_indexes("cot_samples")}
    finally:
        engine.dispose()
    assert {("user_id", "ts"), ("item_id", "ts")} <= indexes
    assert {("stored_at",), ("cot_stored_at",)} <= sample_indexes  # the ranker's pool sync


def test_sqlite_parent_directory_is_created(tmp_path: Path) -> None:
    database = tmp_path / "not" / "yet" / "there.db"
    migrations.upgrade(f"sqlite:///{database}")
    assert database.is_file()
    assert migrations.current(f"sqlite:///{database}") == HEAD


def test_cli_db_commands(tmp_path: Path, capsys) -> None:
    from llmcf.cli import main

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert main(["db", "upgrade", "--database-url", url]) == 0
    assert f"database revision: {HEAD}" in capsys.readouterr().out
    assert main(["db", "downgrade", "base", "--database-url", url]) == 0
    assert "database revision: empty" in capsys.readouterr().out
    assert main(["db", "current", "--database-url", url]) == 0
    assert "database revision: empty" in capsys.readouterr().out
