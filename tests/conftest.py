"""Shared fixtures: a real Tansu broker and a real PostgreSQL, started by the suite (see tests/fixtures/)."""

pytest_plugins = ["tests.fixtures.kafka", "tests.fixtures.postgres"]
