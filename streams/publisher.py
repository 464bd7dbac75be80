"""Publishing CoT requests: an idempotent confluent-kafka producer, keyed by request id, flushed once per batch. The
requests arrive already serialised (`streams.requests` builds their JSON)."""

from __future__ import annotations

from collections.abc import Sequence

from confluent_kafka import KafkaError, Message, Producer

FLUSH_TIMEOUT_S = 30.0


class PublishError(RuntimeError):
    """Some requests of a batch were not delivered: the batch must be retried (its offsets not committed)."""


class RequestPublisher:
    """Sends a batch of CoT requests to `cot-requests` and returns only once every one is acknowledged. Blocking."""

    def __init__(self, producer_config: dict[str, object], topic: str):
        self._producer = Producer(producer_config)
        self.topic = topic
        self._errors: list[KafkaError] = []

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._errors.append(error)

    def publish(self, requests: Sequence[tuple[str, bytes]]) -> None:
        """Produce every (request id, request JSON) with the id as key, and flush; `PublishError` if any was not
        delivered. A retried batch may publish a request twice: consumers dedupe by request id (at-least-once)."""
        producer = self._producer
        for request_id, value in requests:
            while True:
                try:
                    producer.produce(self.topic, key=request_id.encode(), value=value, on_delivery=self._on_delivery)
                    break
                except BufferError:  # local queue full: serve delivery reports until there is room
                    producer.poll(0.05)
        undelivered = producer.flush(FLUSH_TIMEOUT_S)
        errors, self._errors = self._errors, []
        if undelivered or errors:
            raise PublishError(
                f"{undelivered} CoT requests still queued after {FLUSH_TIMEOUT_S:.0f} s, {len(errors)} failed"
                + (f" (first error: {errors[0].str()})" if errors else "")
            )

    def close(self) -> None:
        self._producer.flush(FLUSH_TIMEOUT_S)
