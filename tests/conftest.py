"""Shared fixtures: a real Tansu broker, a real PostgreSQL and `llmcf` subprocesses, started by the suite (see
tests/fixtures/)."""

pytest_plugins = ["tests.fixtures.kafka", "tests.fixtures.postgres", "tests.fixtures.processes"]
