"""`llmcf worker` as a subprocess on the real broker, PostgreSQL and a Qdrant Edge shard, fed a replayed MovieLens-100k
window with malformed records mixed in: everything expected is stored exactly once, including after a kill -9."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from confluent_kafka import Producer
from sqlalchemy import select

from llmcf.events import DeadLetter, decode
from llmcf.kafka import producer_config, read_to_end
from llmcf.replay import ReplayOptions, replay
from llmcf.samples import SAMPLE_DIMENSION
from llmcf.settings import Settings
from llmcf.topics import Topics
from storage.models import CotSample, Interaction
from storage.repository import Repository
from storage.vectors import Filter, Match
from storage.vectors.edge import EdgeIndex
from streams.app import app_id
from streams.stalls import STALL_PATIENCE_S
from testkit.kafka import commits_and_ends, partitions_behind
from testkit.processes import LlmcfProcess, ProcessStarter, wait_while_running
from testkit.windows import Expected, expected_window

LIMIT = 3000
CAUGHT_UP_TIMEOUT_S = 300.0  # generous: a loaded 2-core machine has been seen to need more than 150 s
MALFORMED = {
    b"not json at all": "undecodable",
    b'{"user_id": "u1", "item_id": "i1", "kind": "rating", "label": "1", "ts": "1997-09-20T03:05:10Z"}': "invalid",
    b'{"user_id": "u1"}': "invalid",
}


def publish_malformed(settings: Settings) -> None:
    producer = Producer(producer_config(settings, settings.kafka_bootstrap_servers or ""))
    for value in MALFORMED:
        producer.produce(Topics.from_settings(settings).interactions, key=b"u1", value=value)
    assert producer.flush(30) == 0


def wait_until_caught_up(repository: Repository, expected: Expected, worker: LlmcfProcess) -> None:
    def caught_up() -> bool:
        counts = repository.counts()
        return counts["interactions"] == len(expected.interaction_ids) and counts["cot_samples"] == len(
            expected.request_ids
        )

    def diagnose() -> str:
        counts = repository.counts()
        progress = [line for line in worker.metrics().splitlines()
                    if line.startswith(("llmcf_consumer_", "llmcf_partition_end_offset", "llmcf_events_total"))]
        return (f"stored {counts['interactions']}/{len(expected.interaction_ids)} interactions, "
                f"{counts['cot_samples']}/{len(expected.request_ids)} samples\n" + "\n".join(progress))

    wait_while_running(caught_up, [worker], CAUGHT_UP_TIMEOUT_S, "the worker to store the whole window",
                       diagnose=diagnose)


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
    kafka_settings: Settings, pg_database_url: str, tmp_path: Path, llmcf_processes: ProcessStarter
) -> None:
    expected = expected_window(kafka_settings, LIMIT)
    assert 0 < len(expected.request_ids) < LIMIT
    publish_malformed(kafka_settings)
    replay(kafka_settings, ReplayOptions(limit=LIMIT, progress=False))

    worker = llmcf_processes.start("worker", kafka_settings, tmp_path / "worker.log", database_url=pg_database_url)
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
    kafka_settings: Settings, pg_database_url: str, tmp_path: Path, llmcf_processes: ProcessStarter
) -> None:
    expected = expected_window(kafka_settings, LIMIT)
    publish_malformed(kafka_settings)
    log_path = tmp_path / "worker.log"
    # Small batches, so that the kill lands between commits with work on both sides of it.
    first = llmcf_processes.start("worker", kafka_settings, log_path, "--batch-size", "100", database_url=pg_database_url)
    replay(kafka_settings, ReplayOptions(limit=LIMIT, progress=False))
    with Repository.from_url(pg_database_url) as repository:
        wait_while_running(lambda: repository.counts()["interactions"] >= LIMIT // 4, [first], CAUGHT_UP_TIMEOUT_S,
                           "a quarter of the window to be stored", interval_s=0.05)
        first.kill()
        stored_at_kill = repository.counts()["interactions"]
        assert stored_at_kill < LIMIT, "the kill came too late to test anything"

        second = llmcf_processes.start("worker", kafka_settings, log_path, "--batch-size", "100",
                                       database_url=pg_database_url)
        wait_until_caught_up(repository, expected, second)
        assert second.stop() == 0, second.log_tail()
        assert_stored_exactly_once(kafka_settings, repository, expected)


def republish_in_a_transaction(settings: Settings, records: list[tuple[bytes | None, bytes | None]], name: str) -> None:
    """As a transactional upstream would: each partition written gets a transaction marker after its records."""
    producer = Producer(producer_config(settings, settings.kafka_bootstrap_servers or "")
                        | {"transactional.id": f"{settings.topic_prefix}{name}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    for key, value in records:
        producer.produce(Topics.from_settings(settings).interactions, key=key, value=value)
    producer.commit_transaction(30)


def test_transaction_markers_never_hold_the_commit_back(
    kafka_settings: Settings, pg_database_url: str, tmp_path: Path, llmcf_processes: ProcessStarter
) -> None:
    """The exact commit rule (streams.commits) waits on offsets that hold no record: a marker between fetched records
    counts as a gap at once, and one at the committed offset after a restart is found by asking the broker."""
    limit = 300
    expected = expected_window(kafka_settings, limit)
    replay(kafka_settings, ReplayOptions(limit=limit, progress=False))
    topic = Topics.from_settings(kafka_settings).interactions
    group = app_id(kafka_settings)

    def wait_committed(worker: LlmcfProcess, within_s: float, what: str) -> None:
        wait_while_running(lambda: partitions_behind(kafka_settings, group, topic) == {}, [worker], within_s, what,
                           diagnose=lambda: f"behind: {partitions_behind(kafka_settings, group, topic)}")

    log_path = tmp_path / "worker.log"
    worker = llmcf_processes.start("worker", kafka_settings, log_path, database_url=pg_database_url)
    with Repository.from_url(pg_database_url) as repository:
        wait_until_caught_up(repository, expected, worker)
        wait_committed(worker, 30, "the replayed window to be committed")
        records = [(m.key(), m.value()) for m in read_to_end(kafka_settings, kafka_settings.kafka_bootstrap_servers,
                                                                topic)]
        republish_in_a_transaction(kafka_settings, records, "first")
        wait_committed(worker, 20, "the first transaction to be committed (a marker at the committed offset)")
        republish_in_a_transaction(kafka_settings, records, "second")
        # Fetched after the commit landed on the first transaction's marker: Faust's own gap started past it.
        wait_committed(worker, STALL_PATIENCE_S - 5, "the second transaction to be committed, well within the "
                       "stall guard's patience")
        assert worker.stop() == 0, worker.log_tail()

        republish_in_a_transaction(kafka_settings, records, "third")
        worker = llmcf_processes.start("worker", kafka_settings, log_path, database_url=pg_database_url)
        # Restarted at the second transaction's marker: only the broker can tell it from a dropped record. A partition
        # whose records Faust drops around the restart waits for the stall guard, which acts once the whole topic has
        # been idle for its patience: on a busy machine the other partitions alone took 76 s after a restart, which
        # left the repair too little of a 120 s wait (CI, 2026-12-05), hence the room.
        wait_committed(worker, 3 * STALL_PATIENCE_S + 150, "the third transaction to be committed after a restart")
        assert "hold no record (transaction markers or compacted records)" in log_path.read_text()
        # Its markers trail their partitions, with nothing after them to show a gap: the stall guard passes them too,
        # so no lag of one stays behind.
        wait_while_running(
            lambda: all(committed == end + 1 for committed, end in commits_and_ends(kafka_settings, group, topic).values()),
            [worker], STALL_PATIENCE_S + 60, "the commit to pass the trailing markers",
            diagnose=lambda: f"(committed, end by records): {commits_and_ends(kafka_settings, group, topic)}")
        assert worker.stop() == 0, worker.log_tail()
        assert repository.counts()["interactions"] == len(expected.interaction_ids)
