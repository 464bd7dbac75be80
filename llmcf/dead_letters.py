"""The one way every consumer handles bad input: decode, and send what does not decode to `dead-letters` with the reason.

A consumer wraps each consumed record in a `SourceRecord`, calls `decode_batch()` with its `DeadLetterPolicy`, and gets
back only the valid events. Rejected records are sent whole (value and key, base64) with topic, partition, offset, the
reason and a message naming each bad field, so they can be inspected and replayed.

Delivery contract (at-least-once): call `policy.flush()` before committing the source offsets of a batch. If `flush()`
raises, do not commit: the batch is consumed again and its bad records are dead-lettered again (duplicates in
`dead-letters` are acceptable; losses are not).
"""

from __future__ import annotations

import base64
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, TypeVar

from llmcf.events import DeadLetter, DeadLetterReason, Event, EventError, decode
from llmcf.metrics import DEAD_LETTERS

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)


@dataclass(frozen=True)
class SourceRecord:
    """A consumed record, independent of the client library that consumed it."""

    value: bytes | None
    key: bytes | None
    topic: str
    partition: int
    offset: int


class DeadLetterSink(ABC):
    """Where dead letters are written."""

    @abstractmethod
    def send(self, letter: DeadLetter) -> None:
        """Queue one dead letter for delivery; may return before it is durable."""

    @abstractmethod
    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until every queued letter is durable; raise `DeadLetterDeliveryError` if any could not be."""


class DeadLetterDeliveryError(RuntimeError):
    """Dead letters could not be delivered: the consumer must not commit the offsets of the records behind them."""


class KafkaDeadLetterSink(DeadLetterSink):
    """Writes to the `dead-letters` topic with an idempotent confluent-kafka producer, keyed by source topic."""

    def __init__(self, producer_config: dict, topic: str):
        from confluent_kafka import Producer

        self._producer = Producer(producer_config)
        self._topic = topic
        self._failures: list[str] = []

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            self._failures.append(str(err))

    def send(self, letter: DeadLetter) -> None:
        self._producer.produce(
            self._topic, key=letter.topic.encode(), value=letter.to_bytes(), on_delivery=self._on_delivery
        )
        self._producer.poll(0)

    def flush(self, timeout_s: float = 30.0) -> None:
        undelivered = self._producer.flush(timeout_s)
        failures, self._failures = self._failures, []
        if undelivered or failures:
            raise DeadLetterDeliveryError(
                f"{undelivered} dead letters still queued after {timeout_s:.0f}s, {len(failures)} failed"
                + (f" (first error: {failures[0]})" if failures else "")
            )


class DeadLetterPolicy:
    """The error policy of a consumer: called with a record and the reason it cannot be used."""

    def __init__(self, sink: DeadLetterSink, consumer: str):
        self.sink = sink
        self.consumer = consumer

    def __call__(self, record: SourceRecord, reason: DeadLetterReason, error: str) -> DeadLetter:
        letter = DeadLetter(
            original=base64.b64encode(record.value or b"").decode(),
            key=base64.b64encode(record.key).decode() if record.key is not None else None,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason,
            error=error,
            consumer=self.consumer,
            failed_at=datetime.now(timezone.utc),
        )
        self.sink.send(letter)
        DEAD_LETTERS.labels(topic=record.topic, reason=reason).inc()
        log.warning("dead-lettered %s[%d]@%d: %s: %s", record.topic, record.partition, record.offset, reason, error)
        return letter

    def flush(self, timeout_s: float = 30.0) -> None:
        """Make every dead letter durable; see the module's delivery contract."""
        self.sink.flush(timeout_s)


def decode_batch(model: type[E], records: Iterable[SourceRecord], policy: DeadLetterPolicy) -> list[E]:
    """The valid events among `records`, in order; every invalid one is handed to `policy`."""
    events = []
    for record in records:
        try:
            events.append(decode(model, record.value))
        except EventError as exc:
            policy(record, exc.reason, str(exc))
    return events
