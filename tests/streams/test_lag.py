"""`LagReporter`: the offsets and lag of the worker's assigned partitions, as metrics and for the delivery repair."""

from __future__ import annotations

import asyncio

from faust.types import TP
from prometheus_client import REGISTRY

from streams.lag import LagReporter, PartitionOffsets

GROUP = "test-lag-worker"


class Consumer:
    def __init__(self, assigned: set[TP], highwaters: dict[TP, int | None]):
        self.assigned = assigned
        self.highwaters = highwaters

    def assignment(self) -> set[TP]:
        return self.assigned

    def highwater(self, tp: TP) -> int | None:
        return self.highwaters[tp]


def gauge(name: str, topic: str, partition: int) -> float | None:
    return REGISTRY.get_sample_value(name, {"group": GROUP, "topic": topic, "partition": str(partition)})


def test_offsets_and_lag_of_the_assigned_partitions_of_the_consumed_topics_are_reported() -> None:
    a0, a1, changelog = TP("lag-a", 0), TP("lag-a", 1), TP("test-lag-worker-history-changelog", 0)
    consumer = Consumer({a1, a0, changelog}, {a0: 120, a1: None, changelog: 7})
    asked: list[list[tuple[str, int]]] = []

    def committed(partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        asked.append(partitions)
        return {("lag-a", 0): 100}

    offsets = asyncio.run(LagReporter(lambda: consumer, committed, GROUP, {"lag-a"}).report())
    assert asked == [[("lag-a", 0), ("lag-a", 1)]], "sorted, the changelog left out"
    assert offsets == PartitionOffsets({("lag-a", 0): 100}, {("lag-a", 0): 120, ("lag-a", 1): None})
    assert (gauge("llmcf_consumer_committed_offset", "lag-a", 0), gauge("llmcf_partition_end_offset", "lag-a", 0),
            gauge("llmcf_consumer_lag_records", "lag-a", 0)) == (100, 120, 20)
    # Never committed: reported at 0; not fetched yet: no end and no lag.
    assert gauge("llmcf_consumer_committed_offset", "lag-a", 1) == 0
    assert gauge("llmcf_partition_end_offset", "lag-a", 1) is None and gauge("llmcf_consumer_lag_records", "lag-a", 1) is None


def test_nothing_is_reported_while_no_consumed_partition_is_assigned() -> None:
    consumer = Consumer({TP("other", 0)}, {TP("other", 0): 5})

    def committed(partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        raise AssertionError("the broker is not asked")

    assert asyncio.run(LagReporter(lambda: consumer, committed, GROUP, {"lag-b"}).report()) is None
