"""`DeliveryRepair`: which offset ranges the worker reads from the broker, what it processes and acknowledges, and what
it hands back, against a consumer and a broker that follow the real ones' contracts (the end-to-end check is the kill -9
test in test_worker_process.py)."""

from __future__ import annotations

import asyncio

from faust.types import TP

from llmcf.dead_letters import SourceRecord
from streams.repair import DeliveryRepair
from streams.stalls import StallGuard

TOPIC = "interactions"
TP0 = TP(TOPIC, 0)


class Broker:
    """A partition's records by offset; offsets missing from it hold none (transaction markers)."""

    def __init__(self, offsets: list[int], available: bool = True):
        self.offsets = offsets
        self.available = available
        self.reads: list[tuple[int, int]] = []

    def read(self, topic: str, partition: int, start: int, end: int) -> list[SourceRecord] | None:
        self.reads.append((start, end))
        if not self.available:
            return None
        return [SourceRecord(value=b"{}", key=b"u", topic=topic, partition=partition, offset=o)
                for o in self.offsets if start <= o < end]


class Consumer:
    """The parts of `ExactCommitConsumer` the repair uses, as plain bookkeeping."""

    def __init__(self, gaps: dict[TP, list[tuple[int, int]]] | None = None, acked: list[int] | None = None):
        self.gaps = gaps or {}
        self.acked = sorted(acked or [])
        self.acknowledged: list[tuple[TP, int, int]] = []
        self.returned: list[tuple[TP, int, int]] = []
        self.assigned = {TP0}

    def assignment(self) -> set[TP]:
        return self.assigned

    def highwater(self, tp: TP) -> int | None:
        return 100

    def take_gaps(self) -> dict[TP, list[tuple[int, int]]]:
        taken, self.gaps = self.gaps, {}
        return taken

    def return_gap(self, tp: TP, start: int, end: int) -> None:
        self.returned.append((tp, start, end))

    def first_acknowledged_after(self, tp: TP, offset: int) -> int | None:
        return min((o for o in self.acked if o > offset), default=None)

    def acknowledge(self, tp: TP, start: int, end: int) -> None:
        self.acknowledged.append((tp, start, end))


def repair_with(consumer: Consumer, broker: Broker, guard: StallGuard | None = None
                ) -> tuple[DeliveryRepair, list[list[int]]]:
    processed: list[list[int]] = []

    async def process(topic: str, records: list[SourceRecord]) -> None:
        assert topic == TOPIC
        processed.append([r.offset for r in records])

    return DeliveryRepair(lambda: consumer, broker.read, process, guard or StallGuard(), {TOPIC}), processed


def test_a_gap_that_holds_records_is_processed_then_acknowledged() -> None:
    consumer = Consumer(gaps={TP0: [(10, 25)]})
    repair, processed = repair_with(consumer, Broker(list(range(100))))
    asyncio.run(repair.run({(TOPIC, 0): 10}, {(TOPIC, 0): 100}, now=0.0))
    assert processed == [list(range(10, 25))]
    assert consumer.acknowledged == [(TP0, 10, 25)]


def test_a_gap_of_transaction_markers_is_acknowledged_without_processing() -> None:
    consumer = Consumer(gaps={TP0: [(10, 11), (20, 21)]})
    broker = Broker([o for o in range(100) if o not in (10, 20)])
    repair, processed = repair_with(consumer, broker)
    asyncio.run(repair.run({(TOPIC, 0): 10}, {(TOPIC, 0): 100}, now=0.0))
    assert processed == [] and broker.reads == [(10, 11), (20, 21)]
    assert consumer.acknowledged == [(TP0, 10, 11), (TP0, 20, 21)]


def test_a_gap_the_broker_did_not_deliver_is_handed_back_unless_revoked() -> None:
    consumer = Consumer(gaps={TP0: [(10, 25)]})
    repair, processed = repair_with(consumer, Broker(list(range(100)), available=False))
    asyncio.run(repair.run({(TOPIC, 0): 10}, {(TOPIC, 0): 100}, now=0.0))
    assert processed == [] and consumer.acknowledged == [] and consumer.returned == [(TP0, 10, 25)]

    consumer = Consumer(gaps={TP0: [(10, 25)]})
    consumer.assigned = set()
    repair, _ = repair_with(consumer, Broker(list(range(100)), available=False))
    asyncio.run(repair.run({}, {}, now=0.0))
    assert consumer.returned == []


def test_a_range_of_a_partition_revoked_while_it_was_processed_is_not_acknowledged() -> None:
    consumer = Consumer(gaps={TP0: [(10, 25)]})
    broker = Broker(list(range(100)))
    processed: list[int] = []

    async def process(topic: str, records: list[SourceRecord]) -> None:
        processed.extend(r.offset for r in records)
        consumer.assigned = set()  # a rebalance while the batch ran

    repair = DeliveryRepair(lambda: consumer, broker.read, process, StallGuard(), {TOPIC})
    asyncio.run(repair.run({(TOPIC, 0): 10}, {(TOPIC, 0): 100}, now=0.0))
    assert processed == list(range(10, 25)) and consumer.acknowledged == []


def test_gaps_of_other_topics_are_ignored() -> None:
    consumer = Consumer(gaps={TP("llmcf-worker-history-changelog", 0): [(3, 5)]})
    broker = Broker(list(range(100)))
    repair, processed = repair_with(consumer, broker)
    asyncio.run(repair.run({}, {}, now=0.0))
    assert broker.reads == [] and consumer.acknowledged == []


def test_a_stalled_commit_is_repaired_up_to_the_next_acknowledged_offset_after_the_patience() -> None:
    guard = StallGuard(patience_s=30.0)
    guard.taken(TOPIC)
    guard.processed(TOPIC, [SourceRecord(value=b"{}", key=b"u", topic=TOPIC, partition=0, offset=40)], now=0.0)
    consumer = Consumer(acked=[40, 41])
    repair, processed = repair_with(consumer, Broker(list(range(100))), guard)
    committed, ends = {(TOPIC, 0): 30}, {(TOPIC, 0): 42}
    asyncio.run(repair.run(committed, ends, now=0.0))  # first seen standing still
    asyncio.run(repair.run(committed, ends, now=29.0))
    assert processed == []
    asyncio.run(repair.run(committed, ends, now=31.0))
    assert processed == [list(range(30, 40))] and consumer.acknowledged == [(TP0, 30, 40)]
