"""Delivery of consumed batches to their processors, in the order that lets Faust commit a batch's offsets only once
the batch is durable, whether its topic's agent took it or the delivery repair read it from the broker.

The commit order of one batch (`BatchDelivery`):
1. The topic's agent takes a batch (`take_events`); the stall guard counts it as in hand (`StallGuard.taken`).
2. The batch waits for its topic's lock: one batch of a topic at a time, since a batch merges histories and catalogue
   entries that the next one reads.
3. The topic's processor (`streams.processor.BatchProcessor`) processes it until PostgreSQL, the vector index, the
   `cot-requests` producer and the dead letters have all confirmed it (`until_processed`). This step never gives up
   and never raises, because Faust acks a batch once its agent moves on, even if it raised: an unexpected error
   processes the whole (idempotent) batch again after a pause, and a shutdown lets the batch in hand finish first.
4. The lock is released; the stall guard learns which offsets the batch processed (`StallGuard.processed`); the agent
   goes back to Faust for its next batch, and Faust acks this one.
5. Every `broker_commit_interval`, Faust flushes its own producer (the history table's changelog), then commits each
   partition's gap-free run of acked offsets that starts at its committed offset (`streams.commits`).
6. At each lag report, the delivery repair (`streams.repair`) reads from the broker the ranges Faust may never have
   delivered, processes their records through steps 2 and 3 (`BatchDelivery.process_again`) and acknowledges each
   range, so that step 5 can pass it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import Protocol

import faust

from llmcf.dead_letters import SourceRecord
from llmcf.retries import backoff_s
from streams.batch import RETRY_MAX_DELAY_S
from streams.metrics import BATCH_RECORDS, BATCH_SECONDS, WRITE_FAILURES
from streams.processor import BatchProcessor
from streams.stalls import StallGuard

log = logging.getLogger(__name__)


class BatchStream(Protocol):
    """The part of a Faust agent's stream the delivery uses (`faust.Stream.take_events`)."""

    def take_events(self, max_: int, within: float) -> AsyncIterator[Sequence[faust.EventT]]: ...


def source_records(events: Sequence[faust.EventT]) -> list[SourceRecord]:
    """The consumed records of a batch, byte for byte, independent of Faust."""
    return [
        SourceRecord(
            value=e.message.value, key=e.message.key, topic=e.message.topic,
            partition=e.message.partition, offset=e.message.offset,
        )
        for e in events
    ]


async def until_processed(topic: str, process: Callable[[], Awaitable[None]]) -> None:
    """Run `process()` until it completes. Unexpected errors process the batch again (its writes are idempotent); a
    cancellation (shutdown) waits for the batch in hand to finish first, since Faust acks it on the way out."""
    failures = 0
    while True:
        with BATCH_SECONDS.labels(topic=topic).time():
            task = asyncio.ensure_future(process())
            try:
                await asyncio.shield(task)
                return
            except asyncio.CancelledError:
                log.info("stopping: finishing the %s batch in hand first", topic)
                await task
                raise
            except Exception:
                failures += 1
                delay = backoff_s(failures, 1.0, RETRY_MAX_DELAY_S)
                WRITE_FAILURES.labels(step=f"{topic} batch").inc()
                log.exception("processing a %s batch failed; processing it again in %.0f s", topic, delay)
        await asyncio.sleep(delay)


class BatchDelivery:
    """Hands every batch of the processors' topics to its processor, in the commit order of the module docstring."""

    def __init__(self, processors: Iterable[BatchProcessor], stall_guard: StallGuard, batch_size: int,
                 batch_within_s: float):
        self.processors = {processor.topic: processor for processor in processors}
        self.stall_guard = stall_guard
        self.batch_size = batch_size
        self.batch_within_s = batch_within_s
        self._locks = {topic: asyncio.Lock() for topic in self.processors}

    @property
    def topics(self) -> set[str]:
        """The topics delivered, one processor each."""
        return set(self.processors)

    async def consume(self, stream: BatchStream, topic: str) -> None:
        """The body of `topic`'s agent: every batch taken from `stream`, delivered (steps 1 to 4)."""
        async for events in stream.take_events(self.batch_size, within=self.batch_within_s):
            await self.deliver(topic, source_records(events))

    async def deliver(self, topic: str, records: list[SourceRecord]) -> None:
        """Steps 1 to 4 for a batch the agent of `topic` took: returns once it is processed."""
        BATCH_RECORDS.labels(topic=topic).observe(len(records))
        self.stall_guard.taken(topic)
        await self._process(topic, records)
        self.stall_guard.processed(topic, records, time.monotonic())

    async def process_again(self, topic: str, records: list[SourceRecord]) -> None:
        """Steps 2 and 3 for records of `topic` that the delivery repair read from the broker (a range Faust never
        delivered), in turn with the batches the agent takes."""
        await self._process(topic, records)

    async def _process(self, topic: str, records: list[SourceRecord]) -> None:
        async with self._locks[topic]:
            await until_processed(topic, partial(self.processors[topic].process, records))
