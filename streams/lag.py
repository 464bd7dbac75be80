"""Lag reporting: at every lag report, the consumer lag, committed and end offsets of each partition the worker is
assigned, as metrics; the same offsets are what the delivery repair (`streams.repair`) works from."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Set
from typing import NamedTuple, Protocol

from faust.types import TP

from llmcf.metrics import COMMITTED_OFFSET, CONSUMER_LAG, END_OFFSET
from streams.stalls import Partition

LAG_INTERVAL_S = 5.0


class AssignedConsumer(Protocol):
    """What lag reporting needs of the worker's Faust consumer."""

    def assignment(self) -> Set[TP]: ...
    def highwater(self, tp: TP) -> int | None: ...


CommittedReader = Callable[[list[Partition]], dict[Partition, int]]
"""The group's committed offsets of the given partitions, those it never committed left out
(`streams.probe.OffsetProbe.committed`); blocking, called on a worker thread."""


class PartitionOffsets(NamedTuple):
    """The assigned partitions' committed offsets (the group's; absent where it never committed one) and end offsets
    (as last fetched; None until the first fetch of that partition)."""

    committed: dict[Partition, int]
    ends: dict[Partition, int | None]


class LagReporter:
    """Reads and publishes the offsets of the assigned partitions of `topics`."""

    def __init__(self, consumer: Callable[[], AssignedConsumer], committed: CommittedReader, group: str,
                 topics: Set[str]):
        # `consumer` is called when needed: Faust builds its consumer once the worker runs, on the worker's loop.
        self._consumer = consumer
        self._committed = committed
        self.group = group
        self.topics = topics

    async def report(self) -> PartitionOffsets | None:
        """Set the lag, committed and end offset gauges of every assigned partition and return those offsets; None
        while no partition of `topics` is assigned."""
        consumer = self._consumer()
        assigned = sorted((tp.topic, tp.partition) for tp in consumer.assignment() if tp.topic in self.topics)
        if not assigned:
            return None
        committed = await asyncio.get_running_loop().run_in_executor(None, self._committed, assigned)
        ends = {(topic, partition): consumer.highwater(TP(topic, partition)) for topic, partition in assigned}
        for (topic, partition), end in ends.items():
            labels = {"group": self.group, "topic": topic, "partition": str(partition)}
            position = committed.get((topic, partition), 0)
            COMMITTED_OFFSET.labels(**labels).set(position)
            if end is not None:
                END_OFFSET.labels(**labels).set(end)
                CONSUMER_LAG.labels(**labels).set(max(0, end - position))
        return PartitionOffsets(committed, ends)
