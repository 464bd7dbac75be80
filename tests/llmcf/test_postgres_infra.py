"""`llmcf.infra.postgres.TemporaryPostgres`: a real server that starts, survives a restart with its data, and
vanishes."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from llmcf.errors import UserFacingError
from llmcf.infra import postgres
from llmcf.infra.postgres import TemporaryPostgres
from storage.engine import make_engine


def test_start_restart_stop() -> None:
    server = TemporaryPostgres(database="drill")
    with server:
        assert server.url == f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/drill"
        engine = make_engine(server.url)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE kept (n int)"))
            conn.execute(text("INSERT INTO kept VALUES (7)"))

        server.restart()
        # The pool's connections died with the old server; pre-ping replaces them instead of failing.
        with engine.connect() as conn:
            assert conn.execute(text("SELECT n FROM kept")).scalar_one() == 7
        engine.dispose()
        root = server.data_dir.parent
        assert root.is_dir()
    assert not root.exists()
    server.stop()  # a second stop is harmless


def test_missing_binaries_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(postgres.shutil, "which", lambda name: None)
    with pytest.raises(UserFacingError, match=r"apt-get install postgresql-15.*DATABASE_URL"):
        TemporaryPostgres().start()
