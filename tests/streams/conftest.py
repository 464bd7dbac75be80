"""Fixtures of the stream worker's tests: a fresh PostgreSQL database per test, migrated."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import migrations


@pytest.fixture
def pg_database_url(postgres_url: str) -> Iterator[str]:
    """An empty, migrated PostgreSQL database of this test's own on the session server, dropped afterwards."""
    server_url = make_url(postgres_url)
    name = f"worker_{uuid.uuid4().hex[:16]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = server_url.set(database=name).render_as_string(hide_password=False)
        migrations.upgrade(url)
        yield url
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
