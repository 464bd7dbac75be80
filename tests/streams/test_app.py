"""`OrderedBatches`: batches are processed one at a time in hand-over order, and their messages become committable (the
consumer's final ack) only once processed, whatever Faust acks when the agent body returns. Real Faust messages."""

from __future__ import annotations

import asyncio

from faust.types import TP
from faust.types.tuples import ConsumerMessage

from llmcf.dead_letters import SourceRecord
from streams.app import OrderedBatches
from streams.stalls import StallGuard


class RecordingConsumer:
    """What Faust's consumer sees of acks: the final ack of each message."""

    def __init__(self) -> None:
        self.acked: list[int] = []

    def ack(self, message: ConsumerMessage) -> bool:
        self.acked.append(message.offset)
        return True


class Event:
    """Faust's `Event.ack` on one message: `message.ack(app.consumer)`."""

    def __init__(self, offset: int, consumer: RecordingConsumer):
        self.message = ConsumerMessage("interactions", 0, offset, 0.0, 0, [], b"u", b"{}", None, 1, 2, TP("interactions", 0))
        self.message.incref()  # Faust's conductor: one reference per channel delivered to
        self._consumer = consumer

    def ack(self) -> bool:
        return self.message.ack(self._consumer)


def test_messages_are_committable_only_once_processed_and_batches_run_in_order() -> None:
    async def scenario() -> None:
        consumer = RecordingConsumer()
        started: list[list[int]] = []
        release = asyncio.Event()

        async def process(records: list[SourceRecord]) -> None:
            started.append([r.offset for r in records])
            await release.wait()

        batches = OrderedBatches("interactions", process, StallGuard())
        first = [Event(o, consumer) for o in (0, 1)]
        second = [Event(o, consumer) for o in (2, 3)]
        await batches.hand_over(first)
        for event in first:
            event.ack()  # what take_events does when the agent body returns
        await batches.hand_over(second)
        for event in second:
            event.ack()
        await asyncio.sleep(0.05)
        assert started == [[0, 1]], "the second batch waits for the first"
        assert consumer.acked == [], "nothing is committable before it is processed"

        release.set()
        await asyncio.wait_for(batches.drain(), timeout=5)
        assert started == [[0, 1], [2, 3]]
        assert consumer.acked == [0, 1, 2, 3]

    asyncio.run(scenario())
