"""Property-based fuzzing of a running `llmcf worker`: valid and mutated records on `items` and `interactions`
(testkit/fuzz.py draws them), on the real broker and PostgreSQL.

The properties, per drawn example: the worker stays up; every bad record has exactly one dead letter naming its
topic, partition and offset, with the expected reason and its bytes; every good record is stored exactly once, field for
field, with exactly the CoT samples the decision function calls for. Bounded and deterministic for CI: derandomized,
a few examples of 60-90 records each, no shrinking (a failure names the record; hypothesis prints the example).
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings

from llmcf.settings import Settings
from storage.repository import Repository
from testkit.fuzz import (
    Spec,
    base_item_ids,
    check,
    materialize,
    publish,
    publish_base_catalogue,
    specs,
    wait_until_committed,
)
from testkit.processes import ProcessStarter, wait_while_running

BASE_ITEMS = 8
EXAMPLES = 3
RECORDS_PER_EXAMPLE = (60, 90)
STARTUP_TIMEOUT_S = 180.0
EXAMPLE_TIMEOUT_S = 120.0
ITEM_WAIT_S = "1"  # how long an interaction waits for an item that never comes before its decision is dead-lettered


def test_fuzzed_records_are_stored_once_or_dead_lettered_once_and_the_worker_stays_up(
    kafka_settings: Settings, pg_database_url: str, tmp_path: Path, llmcf_processes: ProcessStarter
) -> None:
    publish_base_catalogue(kafka_settings, BASE_ITEMS)
    worker = llmcf_processes.start("worker", kafka_settings, tmp_path / "worker.log", "--item-wait", ITEM_WAIT_S,
                                   database_url=pg_database_url)
    namespaces = (f"fz{n}:" for n in itertools.count())
    dead_lettered: Counter[str] = Counter()
    published = stored = 0
    with Repository.from_url(pg_database_url) as repository:
        wait_while_running(lambda: repository.counts()["item_embeddings"] == BASE_ITEMS, [worker], STARTUP_TIMEOUT_S,
                           "the worker to load the base catalogue")

        @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
        @given(specs(base_item_ids(BASE_ITEMS), *RECORDS_PER_EXAMPLE))
        def worker_accounts_for_every_record(drawn: list[Spec]) -> None:
            nonlocal published, stored
            namespace = next(namespaces)
            cases = materialize(drawn, namespace)
            publish(kafka_settings, cases)
            wait_until_committed(kafka_settings, worker, EXAMPLE_TIMEOUT_S)
            dead_lettered.update(check(kafka_settings, repository, cases, namespace))
            worker.assert_running()
            published += len(cases)
            stored += sum(case.stored for case in cases)

        worker_accounts_for_every_record()

    metrics = worker.metrics()
    assert worker.stop() == 0, worker.log_tail()
    assert published >= EXAMPLES * RECORDS_PER_EXAMPLE[0] and stored and dead_lettered["invalid"] and dead_lettered["undecodable"]
    assert dead_lettered["processing_failed"], "no example tried a record that only storage refuses"
    for reason, count in dead_lettered.items():
        totals = [line for line in metrics.splitlines() if line.startswith("llmcf_dead_letters_total{") and f'reason="{reason}"' in line]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in totals) == count, (reason, totals)
