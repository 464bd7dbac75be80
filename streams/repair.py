"""Delivery repair: the offset ranges the worker's Faust consumer may never have delivered, read from the broker,
processed, and acknowledged, so that the exact commit rule (`streams.commits`) can pass them.

Two kinds of range, both found by `DeliveryRepair.run` at every lag report:
- gaps: ranges Faust reported as holding no record between two records it delivered (`ExactCommitConsumer.take_gaps`);
  after a rebalance they can hold records that were never processed, so each is verified at once;
- stalls: a committed offset that stood still behind processed records for the guard's patience (`streams.stalls`),
  from there up to the next acknowledged offset (or the partition's end).
For each range, the records the broker holds are processed like a batch (`process`, which takes the topic's batch
lock: the processors are idempotent, so a record processed twice changes nothing) and the whole range is acknowledged,
offsets without records (transaction markers, compacted records) included. A range the broker did not deliver in time
is handed back and tried at the next report; one of a partition revoked meanwhile is dropped (its new owner consumes
from the committed offset).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from faust.types import TP

from llmcf.dead_letters import SourceRecord
from streams.metrics import REPAIRED_RANGES
from streams.stalls import Partition, StallGuard

log = logging.getLogger(__name__)


class RepairableConsumer(Protocol):
    """What the repair needs of the worker's consumer (`streams.commits.ExactCommitConsumer`)."""

    def assignment(self) -> set[TP]: ...
    def highwater(self, tp: TP) -> int | None: ...
    def take_gaps(self) -> dict[TP, list[tuple[int, int]]]: ...
    def return_gap(self, tp: TP, start: int, end: int) -> None: ...
    def first_acknowledged_after(self, tp: TP, offset: int) -> int | None: ...
    def acknowledge(self, tp: TP, start: int, end: int) -> None: ...


RangeReader = Callable[[str, int, int, int], "list[SourceRecord] | None"]
"""(topic, partition, start, end) -> the records at offsets start..end-1, or None if the broker did not deliver them
in time (`streams.probe.OffsetProbe.read`); called on a worker thread."""


class DeliveryRepair:
    """Verifies Faust's gaps and resolves stalled commits of the `topics` the worker consumes."""

    def __init__(self, consumer: Callable[[], RepairableConsumer], read: RangeReader,
                 process: Callable[[str, list[SourceRecord]], Awaitable[None]], stall_guard: StallGuard,
                 topics: set[str]):
        # `consumer` is called when needed: Faust builds its consumer once the worker runs, on the worker's loop.
        self._consumer = consumer
        self.read = read
        self.process = process
        self.stall_guard = stall_guard
        self.topics = topics

    async def run(self, committed: Mapping[Partition, int], ends: Mapping[Partition, int | None],
                  now: float | None = None) -> None:
        """One round: every gap handed out since the last, then every stalled partition (`StallGuard.stalled` with
        the group's `committed` offsets and the assigned partitions' `ends`)."""
        consumer = self._consumer()
        for tp, ranges in consumer.take_gaps().items():
            if tp.topic not in self.topics:
                continue
            for start, end in ranges:
                if not await self.repair(tp, start, end, "gap", "reported by Faust as holding no record") \
                        and tp in consumer.assignment():
                    consumer.return_gap(tp, start, end)
        stalled = self.stall_guard.stalled(committed, ends, time.monotonic() if now is None else now)
        for (topic, partition), offset in stalled.items():
            tp = TP(topic, partition)
            until = consumer.first_acknowledged_after(tp, offset) or consumer.highwater(tp)
            if until is not None and until > offset:
                await self.repair(tp, offset, until, "stall", f"committed at offset {offset} for "
                                  f"{self.stall_guard.patience_s:.0f} s with later records processed, or waiting while "
                                  "its agent is idle")

    async def repair(self, tp: TP, start: int, end: int, cause: str, why: str) -> bool:
        """Read offsets `start` to `end - 1` of `tp` from the broker, process their records, acknowledge the range.
        False if the broker did not deliver them (the caller tries again later)."""
        records = await asyncio.get_running_loop().run_in_executor(None, self.read, tp.topic, tp.partition, start, end)
        if records is None:
            log.warning("%s[%d]: could not read offsets %d to %d (%s); trying again later",
                        tp.topic, tp.partition, start, end - 1, why)
            return False
        if records:
            log.warning("%s[%d]: offsets %d to %d %s (Faust drops records around a rebalance): processing their %d "
                        "records again", tp.topic, tp.partition, start, end - 1, why, len(records))
            REPAIRED_RANGES.labels(topic=tp.topic, cause=cause).inc()
            await self.process(tp.topic, records)
        else:
            log.info("%s[%d]: offsets %d to %d hold no record (transaction markers or compacted records): committing "
                     "past them", tp.topic, tp.partition, start, end - 1)
        consumer = self._consumer()
        if tp in consumer.assignment():  # else revoked meanwhile: its new owner consumes from the committed offset
            consumer.acknowledge(tp, start, end)
        return True
