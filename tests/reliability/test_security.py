"""Security properties: no credential ever reaches a log, `/metrics` or `llmcf config`; all SQL goes through bound
parameters, checked in the source and by hostile ids round-tripping through the repository.

Credentials are marker values no code could print by accident. The worker runs at DEBUG with a password in
DATABASE_URL (the throwaway server trusts every local connection, so any password is accepted and the URL is really
used), a SASL password and a Qdrant API key set (the embedded broker speaks PLAINTEXT and the embedded index needs no
key: both are configured, neither can be exercised against a server here), and rides out a PostgreSQL outage so that
its error paths log too. The generator runs at DEBUG with the OpenAI backend against a real HTTP server on 127.0.0.1,
which checks that the API key was sent: the key is used, and still never logged.
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

import migrations
from llmcf.events import CotRequest, InteractionEvent, ItemEvent, ItemSnapshot
from llmcf.infra.postgres import TemporaryPostgres
from llmcf.replay import ReplayOptions, replay
from llmcf.settings import Settings
from storage.repository import Repository
from testkit.processes import ProcessStarter, child_environment, wait_while_running
from testkit.windows import expected_window
from tests.generators import NOW
from tests.generators.pool_support import ChatCompletionsServer, publish_requests, read_results
from tests.streams.test_worker_process import publish_malformed

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
SQL_SOURCES = ("storage", "migrations")
MARKERS = {name: f"{name.lower().replace('_', '')}{uuid.uuid4().hex}" for name in (
    "DATABASE_PASSWORD", "KAFKA_SASL_PASSWORD", "QDRANT_API_KEY", "LLMCF_OPENAI_API_KEY", "LLMCF_API_TOKEN",
)}
SECRET_ENV = {name: value for name, value in MARKERS.items() if name != "DATABASE_PASSWORD"}


def with_password(url: str) -> str:
    return make_url(url).set(password=MARKERS["DATABASE_PASSWORD"]).render_as_string(hide_password=False)


def assert_no_marker(text: str, where: str) -> None:
    leaked = [name for name, marker in MARKERS.items() if marker in text]
    assert not leaked, f"{where} shows the value of {', '.join(leaked)}"


def secret_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, log_level="DEBUG", kafka_sasl_username="llmcf",
                               kafka_sasl_password=MARKERS["KAFKA_SASL_PASSWORD"])


# ---- no credentials in output ---------------------------------------------------------------------------------------


def test_llmcf_config_masks_every_secret(kafka_settings: Settings, postgres_url: str) -> None:
    env = child_environment(secret_settings(kafka_settings), with_password(postgres_url), 0) | SECRET_ENV
    outputs = {}
    for args in (("config",), ("config", "--catalogue")):
        shown = subprocess.run([sys.executable, "-m", "llmcf.cli", *args], env=env, capture_output=True, text=True,
                               timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert_no_marker(shown.stdout + shown.stderr, f"`llmcf {' '.join(args)}`")
        outputs[args] = shown.stdout
    values = dict((line.split(None, 1) + [""])[:2] for line in outputs[("config",)].splitlines() if line.strip())
    for name in ("kafka_sasl_password", "qdrant_api_key", "openai_api_key", "api_token"):
        assert values[name].strip() == "***", f"{name} is shown as {values[name]!r}, not masked"
    assert "***" in values["database_url"], "the database password is neither shown nor marked as hidden"


def postgres_is_down(server: TemporaryPostgres) -> bool:
    try:
        psycopg.connect(host="127.0.0.1", port=server.port, user="postgres", dbname="postgres", connect_timeout=1).close()
    except psycopg.OperationalError:
        return True
    return False


def test_the_worker_at_debug_level_never_logs_a_credential_even_through_a_database_outage(
    kafka_settings: Settings, postgres_server: TemporaryPostgres, pg_database_url: str, tmp_path: Path,
    llmcf_processes: ProcessStarter,
) -> None:
    settings = secret_settings(kafka_settings)
    log_path = tmp_path / "worker.log"
    worker = llmcf_processes.start("worker", settings, log_path, database_url=with_password(pg_database_url),
                                   extra_env=SECRET_ENV)
    publish_malformed(settings)
    replay(settings, ReplayOptions(limit=100, progress=False))
    with Repository.from_url(pg_database_url) as repository:
        first = len(expected_window(settings, 100).interaction_ids)
        wait_while_running(lambda: repository.counts()["interactions"] == first, [worker], 180, "the first window")

        # Records arrive while the server is down: the worker's write errors (and their retries) are logged.
        outage = threading.Thread(target=postgres_server.restart, kwargs={"downtime_s": 3.0})
        outage.start()
        try:
            wait_while_running(lambda: postgres_is_down(postgres_server), [worker], 30, "PostgreSQL to stop", 0.05)
            replay(settings, ReplayOptions(limit=300, progress=False))
            wait_while_running(lambda: "failed (attempt" in log_path.read_text(errors="replace"), [worker], 30,
                               "the worker to log a failed write")
        finally:
            outage.join()
        expected = len(expected_window(settings, 300).interaction_ids)
        wait_while_running(lambda: repository.counts()["interactions"] == expected, [worker], 180, "the second window")
    metrics = worker.metrics()
    assert worker.stop() == 0, worker.log_tail()
    log = log_path.read_text(errors="replace")
    assert " DEBUG " in log, "the worker did not log at DEBUG level"
    assert "dead-lettered" in log
    assert_no_marker(log, "the worker's log")
    assert_no_marker(metrics, "the worker's /metrics")


class KeyCheckingServer(ChatCompletionsServer):
    """The OpenAI-compatible test server, also recording the Authorization header of every request."""

    def __init__(self) -> None:
        self.authorizations: list[str | None] = []
        super().__init__()

    def _handler(self):
        base, server = super()._handler(), self

        class Recording(base):
            def do_POST(self) -> None:
                server.authorizations.append(self.headers.get("Authorization"))
                super().do_POST()

        return Recording


def test_the_generator_at_debug_level_sends_its_api_key_but_never_logs_it(
    kafka_settings: Settings, postgres_url: str, tmp_path: Path, llmcf_processes: ProcessStarter
) -> None:
    settings = secret_settings(kafka_settings)
    ids = publish_requests(settings, 6, prefix="sec")
    log_path = tmp_path / "generate.log"
    with KeyCheckingServer() as server:
        generator = llmcf_processes.start(
            "generate", settings, log_path, "--backend", "openai", "--openai-base-url", server.url, "--model",
            "served-model", "--device", "cpu", database_url=with_password(postgres_url), extra_env=SECRET_ENV,
        )
        wait_while_running(lambda: {r.request_id for r in read_results(settings)} == set(ids), [generator], 180,
                           "a result for every request")
        metrics = generator.metrics()
        assert generator.stop(60) == 0, generator.log_tail()
    assert server.authorizations and set(server.authorizations) == {f"Bearer {MARKERS['LLMCF_OPENAI_API_KEY']}"}
    log = log_path.read_text(errors="replace")
    assert " DEBUG " in log, "the generator did not log at DEBUG level"
    assert_no_marker(log, "the generator's log")
    assert_no_marker(metrics, "the generator's /metrics")


# ---- SQL through bound parameters only ------------------------------------------------------------------------------

SQL_CALLS = {"text", "exec_driver_sql", "execute", "executemany", "executescript"}


def _module_names(tree: ast.Module) -> set[str]:
    """Names bound at module level (constants, functions, imports): fixed when the module is imported, before any
    input exists, so SQL composed from them alone (identifiers, column lists) carries no data."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def _composed_from_constants(node: ast.expr, constants: set[str]) -> bool:
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Name):
        return node.id in constants
    if isinstance(node, ast.JoinedStr):
        return all(_composed_from_constants(v.value, constants) for v in node.values if isinstance(v, ast.FormattedValue))
    if isinstance(node, ast.BinOp):
        return _composed_from_constants(node.left, constants) and _composed_from_constants(node.right, constants)
    return False


def _built_by_formatting(node: ast.expr, constants: set[str]) -> str | None:
    """How `node` splices run-time values into a string (f-string, %, +, .format), or None."""
    how = None
    if isinstance(node, ast.JoinedStr) and any(isinstance(v, ast.FormattedValue) for v in node.values):
        how = "an f-string"
    elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.Add)):
        how = "% formatting" if isinstance(node.op, ast.Mod) else "concatenation"
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("format", "format_map"):
        receiver = node.func.value
        composer = receiver.func if isinstance(receiver, ast.Call) else None
        if getattr(composer, "attr", getattr(composer, "id", None)) == "SQL":  # psycopg.sql: quotes what it splices
            return None
        return ".format()"
    return how if how and not _composed_from_constants(node, constants) else None


class _SqlFormattingFinder(ast.NodeVisitor):
    """Visits SQL-executing calls in their innermost function, knowing which names are local to it."""

    def __init__(self, module_names: set[str], filename: str):
        self.module_names = module_names
        self.filename = filename
        self.scopes: list[tuple[set[str], dict[str, list[ast.expr]]]] = [(set(), {})]
        self.findings: list[str] = []

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        local_names = {a.arg for a in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]}
        local_names.update(a.arg for a in (node.args.vararg, node.args.kwarg) if a is not None)
        assignments: dict[str, list[ast.expr]] = {}
        for inner in ast.walk(node):
            if isinstance(inner, ast.Assign):
                for target in inner.targets:
                    for name in (n for n in ast.walk(target) if isinstance(n, ast.Name)):
                        local_names.add(name.id)
                        assignments.setdefault(name.id, []).append(inner.value)
            elif isinstance(inner, (ast.For, ast.comprehension, ast.With, ast.AugAssign, ast.AnnAssign)):
                targets = [inner.target] if hasattr(inner, "target") else [i.optional_vars for i in inner.items]
                local_names.update(n.id for t in targets if t is not None for n in ast.walk(t) if isinstance(n, ast.Name))
        self.scopes.append((local_names, assignments))
        self.generic_visit(node)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if name in SQL_CALLS and node.args:
            local_names, assignments = self.scopes[-1]
            constants = self.module_names - local_names
            statement = node.args[0]
            candidates = assignments.get(statement.id, []) if isinstance(statement, ast.Name) else [statement]
            for candidate in candidates:
                how = _built_by_formatting(candidate, constants)
                if how:
                    self.findings.append(f"{self.filename}:{node.lineno}: {name}(...) gets SQL built by {how}")
        self.generic_visit(node)


def formatted_sql(source: str, filename: str = "<source>") -> list[str]:
    """`file:line: call(...) gets SQL built by X` for every SQL-executing call whose statement splices run-time values
    in by string formatting, directly or through a local variable. SQL composed only of module-level constants (at
    import time, or from them) is allowed: it holds identifiers the code chose, never data."""
    tree = ast.parse(source, filename)
    finder = _SqlFormattingFinder(_module_names(tree), filename)
    finder.visit(tree)
    return sorted(set(finder.findings))


@pytest.mark.parametrize("snippet", [
    'def f(conn, item_id):\n    conn.execute(text(f"SELECT * FROM items WHERE item_id = \'{item_id}\'"))',
    'def f(conn, item_id):\n    conn.execute(text("SELECT * FROM items WHERE item_id = \'%s\'" % item_id))',
    'def f(conn, item_id):\n    conn.exec_driver_sql("DELETE FROM items WHERE item_id = \'" + item_id + "\'")',
    'def f(cursor, column):\n    cursor.execute("SELECT {}".format(column))',
    'def f(conn, item_id):\n    query = f"SELECT * FROM items WHERE item_id = {item_id}"\n    conn.execute(text(query))',
    'def f(conn, event):\n    conn.exec_driver_sql(f"INSERT INTO items VALUES (\'{event.item_id}\')")',
    'TABLE = "items"\ndef f(conn, TABLE):\n    conn.exec_driver_sql(f"DELETE FROM {TABLE}")',  # a parameter shadows it
    'op.execute("UPDATE items SET title = \'%s\'" % title)',
])
def test_the_sql_check_catches_statements_built_from_run_time_values(snippet: str) -> None:
    assert formatted_sql(snippet), f"not caught: {snippet}"


@pytest.mark.parametrize("snippet", [
    'def f(conn, item_id):\n    conn.execute(text("SELECT * FROM items WHERE item_id = :item_id"), {"item_id": item_id})',
    'def f(conn, item_id):\n    conn.execute(select(table).where(table.c.item_id == item_id))',
    'TIMEOUT_MS = 10_000\ndef f(cursor):\n    cursor.execute(f"PRAGMA busy_timeout={TIMEOUT_MS}")',
    'COLUMNS = ("a", "b")\n_SQL = f"SELECT {\', \'.join(COLUMNS)} FROM t WHERE a = %(a)s"\n'
    'def f(conn, a):\n    conn.exec_driver_sql(_SQL, {"a": a})',
    'def f(admin, name):\n    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))',
])
def test_the_sql_check_accepts_bound_parameters_and_code_owned_identifiers(snippet: str) -> None:
    assert formatted_sql(snippet) == []


def test_storage_and_migrations_never_build_sql_from_strings() -> None:
    files = sorted(path for package in SQL_SOURCES for path in (REPOSITORY_ROOT / package).rglob("*.py"))
    assert any(path.name == "repository.py" for path in files) and any("versions" in path.parts for path in files)
    findings = [f for path in files for f in formatted_sql(path.read_text(), str(path.relative_to(REPOSITORY_ROOT)))]
    assert findings == [], "SQL built by string formatting (use bound parameters):\n" + "\n".join(findings)


HOSTILE_IDS = [
    "'); DROP TABLE items;--",
    "Robert'); DROP TABLE interactions; --",
    "\" OR \"1\"=\"1",
    "' OR '1'='1' --",
    "%s %(item_id)s {0} {item_id}",
    ":item_id ? $1 $$x$$",
    "back\\slash\\'; SELECT pg_sleep(5); --",
    "E'\\x27' || chr(39)",
    "%",
    "_",
    "*/ /* -- # ;",
    "quote’s “smart” ‘ones’",
]


def test_ids_full_of_sql_metacharacters_round_trip_through_the_repository(database_url: str) -> None:
    migrations.upgrade(database_url)
    items = [ItemEvent(item_id=i, title=f"title {i}", text=f"text {i}", tags=[i[:64]], created_at=NOW) for i in HOSTILE_IDS]
    interactions = [
        InteractionEvent(user_id=f"u{i}", item_id=i, kind="click", label=1, ts=NOW, event_id=f"e{i}") for i in HOSTILE_IDS
    ]
    requests = [
        CotRequest(request_id=f"r{i}", user_id=f"u{i}", item_id=i, label=1, ts=NOW, requested_at=NOW,
                   target=ItemSnapshot(item_id=i, title=f"title {i}"))
        for i in HOSTILE_IDS
    ]
    with Repository.from_url(database_url) as repository:
        assert repository.upsert_items(items) == len(HOSTILE_IDS)
        assert repository.upsert_interactions(interactions) == len(HOSTILE_IDS)
        assert repository.upsert_cot_samples(requests) == len(HOSTILE_IDS)

        stored_items = repository.get_items(HOSTILE_IDS)
        assert set(stored_items) == set(HOSTILE_IDS)
        for item in items:
            stored = stored_items[item.item_id]
            assert (stored.title, stored.text, stored.tags) == (item.title, item.text, item.tags)
        assert set(repository.get_users(f"u{i}" for i in HOSTILE_IDS)) == {f"u{i}" for i in HOSTILE_IDS}
        assert set(repository.get_cot_samples(r.request_id for r in requests)) == {r.request_id for r in requests}
        for i in HOSTILE_IDS:
            (history,) = repository.user_history(f"u{i}")
            assert (history.interaction_id, history.item_id) == (f"e{i}", i)
        # Wildcards and near misses match nothing but themselves: ids are compared, never pattern-matched or spliced.
        assert set(repository.get_items(["%", "_", "' OR '1'='1", "*"])) == {"%", "_"}
        counts = repository.counts()
        assert (counts["items"], counts["interactions"], counts["users"], counts["cot_samples"]) == (len(HOSTILE_IDS),) * 4
