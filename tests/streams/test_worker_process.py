"""`llmcf worker` as a subprocess on the real broker, PostgreSQL and a Qdrant Edge shard, fed a replayed MovieLens-100k
window with malformed records mixed in: everything expected is stored exactly once, including after a kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Producer
from sqlalchemy import select

from llmcf import movielens
from llmcf.events import DeadLetter, InteractionEvent, ItemEvent, decode, epoch_ms
from llmcf.kafka import producer_config, read_to_end
from llmcf.replay import ReplayOptions, replay
from llmcf.samples import SAMPLE_DIMENSION
from llmcf.settings import Settings
from llmcf.topics import Topics
from storage.models import CotSample, Interaction
from storage.repository import Repository
from storage.vectors import Filter, Match
from storage.vectors.edge import EdgeIndex
from streams.decisions import CotPolicy, cot_request_id
from tests.fixtures.kafka import free_port

LIMIT = 3000
CAUGHT_UP_TIMEOUT_S = 150.0
MALFORMED = {
    b"not json at all": "undecodable",
    b'{"user_id": "u1", "item_id": "i1", "kind": "rating", "label": "1", "ts": "1997-09-20T03:05:10Z"}': "invalid",
    b'{"user_id": "u1"}': "invalid",
}


@dataclass(frozen=True)
class Expected:
    interaction_ids: set[str]
    request_ids: set[str]


def expected_window(settings: Settings) -> Expected:
    """What the worker must store for the replayed window, computed with the worker's own decision function."""
    window = list(movielens.events("ml-100k", limit=LIMIT))
    created = {e.item_id: epoch_ms(e.created_at) for e in window if isinstance(e, ItemEvent)}
    policy = CotPolicy.from_settings(settings)
    interactions = [e for e in window if isinstance(e, InteractionEvent)]
    requests = {
        cot_request_id(e.interaction_id)
        for e in interactions
        if policy.reason(e.interaction_id, epoch_ms(e.ts), created[e.item_id]) is not None
    }
    return Expected({e.interaction_id for e in interactions}, requests)


class Worker:
    """One `llmcf worker` subprocess, logging to a file the assertions can show."""

    def __init__(self, settings: Settings, database_url: str, log_path: Path, *args: str):
        self.metrics_port = free_port()
        env = {name: value for name, value in os.environ.items() if not name.startswith(("LLMCF_", "KAFKA_", "QDRANT_"))}
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers or "",
            LLMCF_TOPIC_PREFIX=settings.topic_prefix,
            LLMCF_HOME=str(settings.home),
            DATABASE_URL=database_url,
            LLMCF_METRICS_PORT=str(self.metrics_port),
        )
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llmcf.cli", "worker", *args], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for a clean exit."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no flush, no commit, no goodbye
        self.process.wait(10)
        self._log.close()

    def ensure_stopped(self) -> None:
        if self.process.poll() is None:
            self.kill()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.ensure_stopped()


def publish_malformed(settings: Settings) -> None:
    producer = Producer(producer_config(settings, settings.kafka_bootstrap_servers or ""))
    for value in MALFORMED:
        producer.produce(Topics.from_settings(settings).interactions, key=b"u1", value=value)
    assert producer.flush(30) == 0


def wait_until_caught_up(repository: Repository, expected: Expected, worker: Worker) -> None:
    deadline = time.monotonic() + CAUGHT_UP_TIMEOUT_S
    while True:
        counts = repository.counts()
        if counts["interactions"] == len(expected.interaction_ids) and counts["cot_samples"] == len(expected.request_ids):
            return
        assert worker.process.poll() is None, f"worker exited with {worker.process.returncode}:\n{worker.log_tail()}"
        assert time.monotonic() < deadline, f"not caught up after {CAUGHT_UP_TIMEOUT_S:.0f} s: {counts}\n{worker.log_tail()}"
        time.sleep(0.5)


def assert_stored_exactly_once(settings: Settings, repository: Repository, expected: Expected) -> Counter[str]:
    """Assert every expected row, point and request is there once; return how often each request was published."""
    with repository.engine.connect() as conn:
        interaction_ids = conn.execute(select(Interaction.__table__.c.interaction_id)).scalars().all()
        samples = conn.execute(select(CotSample.__table__.c.sample_id, CotSample.__table__.c.status)).all()
    assert len(interaction_ids) == len(set(interaction_ids)) and set(interaction_ids) == expected.interaction_ids
    assert {sample_id for sample_id, _ in samples} == expected.request_ids
    assert {status for _, status in samples} == {"pending"}

    topics = Topics.from_settings(settings)
    published = Counter(m.key().decode() for m in read_to_end(settings, settings.kafka_bootstrap_servers, topics.cot_requests))
    assert set(published) == expected.request_ids

    letters = [decode(DeadLetter, m.value()) for m in read_to_end(settings, settings.kafka_bootstrap_servers, topics.dead_letters)]
    assert {(letter.original_bytes(), letter.reason) for letter in letters} == set(MALFORMED.items())

    with EdgeIndex(settings.home / "qdrant" / settings.qdrant_collection, SAMPLE_DIMENSION) as index:
        assert index.count() == len(expected.request_ids)
        assert index.count(Filter(must=[Match("status", "pending")])) == len(expected.request_ids)
    return published


def test_worker_stores_every_expected_sample_once_and_dead_letters_malformed_records(
    kafka_settings: Settings, pg_database_url: str, tmp_path: Path, workers: list[Worker]
) -> None:
    expected = expected_window(kafka_settings)
    assert 0 < len(expected.request_ids) < LIMIT
    publish_malformed(kafka_settings)
    replay(kafka_settings, ReplayOptions(limit=LIMIT, progress=False))

    worker = Worker(kafka_settings, pg_database_url, tmp_path / "worker.log")
    workers.append(worker)
    with Repository.from_url(pg_database_url) as repository:
        wait_until_caught_up(repository, expected, worker)
        time.sleep(2 * 1.0 + 5.0)  # let a commit interval and a lag report pass before reading the metrics
        metrics = worker.metrics()
        assert worker.stop() == 0, worker.log_tail()
        published = assert_stored_exactly_once(kafka_settings, repository, expected)
    assert max(published.values()) == 1, "a clean run publishes each request once"
    for stage in ("ingested", "stored", "retrievable"):
        assert f'llmcf_freshness_seconds_count{{stage="{stage}"}}' in metrics
    assert 'llmcf_dead_letters_total{reason="invalid"' in metrics
    assert "llmcf_consumer_lag_records{" in metrics


def test_worker_killed_mid_stream_loses_and_duplicates_nothing_after_restart(
    kafka_settings: Settings, pg_database_url: str, tmp_path: Path, workers: list[Worker]
) -> None:
    expected = expected_window(kafka_settings)
    publish_malformed(kafka_settings)
    log_path = tmp_path / "worker.log"
    # Small batches, so that the kill lands between commits with work on both sides of it.
    first = Worker(kafka_settings, pg_database_url, log_path, "--batch-size", "100")
    workers.append(first)
    replay(kafka_settings, ReplayOptions(limit=LIMIT, progress=False))
    with Repository.from_url(pg_database_url) as repository:
        deadline = time.monotonic() + CAUGHT_UP_TIMEOUT_S
        while repository.counts()["interactions"] < LIMIT // 4:
            assert first.process.poll() is None, first.log_tail()
            assert time.monotonic() < deadline, first.log_tail()
            time.sleep(0.05)
        first.kill()
        stored_at_kill = repository.counts()["interactions"]
        assert stored_at_kill < LIMIT, "the kill came too late to test anything"

        second = Worker(kafka_settings, pg_database_url, log_path, "--batch-size", "100")
        workers.append(second)
        wait_until_caught_up(repository, expected, second)
        assert second.stop() == 0, second.log_tail()
        assert_stored_exactly_once(kafka_settings, repository, expected)
