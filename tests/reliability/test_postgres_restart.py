"""A PostgreSQL restart in the middle of ingest, under a running `llmcf worker` (real broker, real server, Qdrant Edge).

Designed behaviour: the worker does not exit on a lost connection. Every write runs through `streams.batch.Writer`,
which retries a failing write with capped exponential backoff (each failure counted in
`llmcf_worker_write_failures_total`) and never acks the batch before its writes are durable; the engine pre-pings
pooled connections, so the first attempt after the server is back reconnects. A restart therefore costs a pause, not
a process, and the window ends up stored exactly once: no interaction or CoT sample lost, none doubled, the malformed
records dead-lettered once.
"""

from __future__ import annotations

import time
from pathlib import Path

from llmcf.infra.postgres import TemporaryPostgres
from llmcf.replay import ReplayOptions, replay
from llmcf.settings import Settings
from storage.repository import Repository
from testkit.processes import ProcessStarter, wait_while_running
from testkit.windows import expected_window
from tests.streams.test_worker_process import (
    CAUGHT_UP_TIMEOUT_S,
    LIMIT,
    assert_stored_exactly_once,
    publish_malformed,
    wait_until_caught_up,
)

DOWNTIME_S = 3.0


def write_failures(metrics: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("llmcf_worker_write_failures_total{")
    )


def test_a_postgres_restart_mid_ingest_is_ridden_out_and_loses_or_doubles_nothing(
    kafka_settings: Settings, postgres_server: TemporaryPostgres, pg_database_url: str, tmp_path: Path,
    llmcf_processes: ProcessStarter,
) -> None:
    expected = expected_window(kafka_settings, LIMIT)
    publish_malformed(kafka_settings)
    # Small batches: the window takes many batches, so the outage lands between and inside them.
    worker = llmcf_processes.start("worker", kafka_settings, tmp_path / "worker.log", "--batch-size", "100",
                                   database_url=pg_database_url)
    replay(kafka_settings, ReplayOptions(limit=LIMIT, progress=False))
    with Repository.from_url(pg_database_url) as repository:
        wait_while_running(lambda: repository.counts()["interactions"] >= LIMIT // 4, [worker], CAUGHT_UP_TIMEOUT_S,
                           "a quarter of the window to be stored", interval_s=0.05)
        stored_before = repository.counts()["interactions"]
        postgres_server.restart(downtime_s=DOWNTIME_S)
        assert stored_before < LIMIT, "the restart came too late to test anything"
        worker.assert_running()

        wait_until_caught_up(repository, expected, worker)
        time.sleep(2 * 1.0)  # a commit interval or two, so the stop below has nothing left to re-do
        metrics = worker.metrics()
        assert worker.stop() == 0, worker.log_tail()
        assert write_failures(metrics) > 0, "the worker never noticed the outage: the restart missed the ingest"
        assert_stored_exactly_once(kafka_settings, repository, expected)
