"""`BatchDelivery`: the commit order of the worker's batches (streams/delivery.py), with processors, a stream and a
stall guard that follow the real ones' contracts (the end-to-end check is the kill -9 test in test_worker_process.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from types import SimpleNamespace

import pytest

from llmcf.dead_letters import SourceRecord
from streams.delivery import BatchDelivery

ITEMS, INTERACTIONS = "items", "interactions"


def records(topic: str, offsets: range) -> list[SourceRecord]:
    return [SourceRecord(value=b"{}", key=b"u", topic=topic, partition=0, offset=o) for o in offsets]


class Processor:
    """Records what it processed; `gate`, when set, holds each batch until it is opened; `failures` fail first."""

    def __init__(self, topic: str, failures: list[Exception] | None = None):
        self.topic = topic
        self.failures = failures or []
        self.started: list[list[int]] = []
        self.done: list[list[int]] = []
        self.gate: asyncio.Event | None = None

    async def process(self, batch: Sequence[SourceRecord]) -> None:
        self.started.append([r.offset for r in batch])
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)
        self.done.append([r.offset for r in batch])


class Guard:
    """The calls a `StallGuard` receives."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, list[int]]] = []

    def taken(self, topic: str) -> None:
        self.calls.append(("taken", topic, []))

    def processed(self, topic: str, batch: Sequence[SourceRecord], now: float) -> None:
        self.calls.append(("processed", topic, [r.offset for r in batch]))


class Stream:
    """A Faust stream's `take_events`: the given batches of events, then the end of the stream."""

    def __init__(self, batches: list[list[SourceRecord]]):
        self.batches = batches
        self.taken_with: list[tuple[int, float]] = []

    async def take_events(self, max_: int, within: float) -> AsyncIterator[list[SimpleNamespace]]:
        self.taken_with.append((max_, within))
        for batch in self.batches:
            yield [SimpleNamespace(message=SimpleNamespace(value=r.value, key=r.key, topic=r.topic,
                                                           partition=r.partition, offset=r.offset)) for r in batch]


def delivery(*processors: Processor) -> tuple[BatchDelivery, Guard]:
    guard = Guard()
    return BatchDelivery(processors, guard, batch_size=100, batch_within_s=0.2), guard


def test_each_batch_an_agent_takes_goes_to_its_topics_processor_between_taken_and_processed() -> None:
    items, interactions = Processor(ITEMS), Processor(INTERACTIONS)
    deliver, guard = delivery(items, interactions)
    stream = Stream([records(INTERACTIONS, range(0, 3)), records(INTERACTIONS, range(3, 5))])
    asyncio.run(deliver.consume(stream, INTERACTIONS))
    assert stream.taken_with == [(100, 0.2)]
    assert interactions.done == [[0, 1, 2], [3, 4]] and items.started == []
    assert guard.calls == [("taken", INTERACTIONS, []), ("processed", INTERACTIONS, [0, 1, 2]),
                           ("taken", INTERACTIONS, []), ("processed", INTERACTIONS, [3, 4])]
    assert deliver.topics == {ITEMS, INTERACTIONS}


def test_records_the_repair_read_wait_for_the_batch_in_hand_and_leave_the_stall_guard_alone() -> None:
    interactions, items = Processor(INTERACTIONS), Processor(ITEMS)
    deliver, guard = delivery(interactions, items)

    async def scenario() -> None:
        interactions.gate = asyncio.Event()
        taken = asyncio.ensure_future(deliver.deliver(INTERACTIONS, records(INTERACTIONS, range(10, 20))))
        await asyncio.sleep(0)
        repaired = asyncio.ensure_future(deliver.process_again(INTERACTIONS, records(INTERACTIONS, range(0, 10))))
        await deliver.process_again(ITEMS, records(ITEMS, range(0, 2)))  # another topic does not wait
        for _ in range(5):
            await asyncio.sleep(0)
        assert interactions.started == [list(range(10, 20))], "one batch of a topic at a time"
        interactions.gate.set()
        await asyncio.gather(taken, repaired)

    asyncio.run(scenario())
    assert interactions.done == [list(range(10, 20)), list(range(0, 10))] and items.done == [[0, 1]]
    assert guard.calls == [("taken", INTERACTIONS, []), ("processed", INTERACTIONS, list(range(10, 20)))]


def test_a_batch_that_fails_is_processed_again_whole_until_it_succeeds() -> None:
    processor = Processor(ITEMS, failures=[TypeError("a bug, fixed by the next deployment")])
    deliver, guard = delivery(processor)
    asyncio.run(deliver.deliver(ITEMS, records(ITEMS, range(0, 3))))
    assert processor.started == [[0, 1, 2], [0, 1, 2]] and processor.done == [[0, 1, 2]]
    assert guard.calls[-1] == ("processed", ITEMS, [0, 1, 2])


def test_a_shutdown_lets_the_batch_in_hand_finish_before_the_agent_stops() -> None:
    processor = Processor(ITEMS)
    deliver, guard = delivery(processor)

    async def scenario() -> None:
        processor.gate = asyncio.Event()
        agent = asyncio.ensure_future(deliver.deliver(ITEMS, records(ITEMS, range(0, 3))))
        await asyncio.sleep(0)
        agent.cancel()
        await asyncio.sleep(0)
        assert not agent.done(), "the batch in hand is still being processed"
        processor.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await agent

    asyncio.run(scenario())
    assert processor.done == [[0, 1, 2]]
    assert guard.calls == [("taken", ITEMS, [])], "a cancelled agent does not report the batch as processed"
