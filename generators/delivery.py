"""Making a batch's output durable: `ResultPublisher` publishes the `CotResult`s on cot-results with the idempotent
producer and flushes them together with the batch's dead letters (`BatchDeadLetters`), retrying the whole publication,
or raises `PoolFailure` so that the batch is never committed undelivered."""

from __future__ import annotations

import logging
from collections.abc import Callable

from confluent_kafka import KafkaError, Message, Producer

from generators.config import PoolConfig, PoolFailure
from llmcf.dead_letters import DeadLetterDeliveryError, DeadLetterPolicy, DeadLetterSink, SourceRecord
from llmcf.events import CotResult, DeadLetter, DeadLetterReason
from llmcf.retries import backoff_s

log = logging.getLogger(__name__)
_MAX_RETRY_WAIT_S = 30.0  # however many attempts failed, a retry waits no longer than this


class BatchDeadLetters(DeadLetterPolicy):
    """The pool's error policy: dead-letters a record like `DeadLetterPolicy` and keeps the letters of the current
    batch, so that a failed flush can send them again before the batch is committed."""

    def __init__(self, sink: DeadLetterSink, consumer: str):
        super().__init__(sink, consumer)
        self.batch_letters: list[DeadLetter] = []

    def __call__(self, record: SourceRecord, reason: DeadLetterReason, error: str) -> DeadLetter:
        letter = super().__call__(record, reason, error)
        self.batch_letters.append(letter)
        return letter

    def resend(self) -> None:
        for letter in self.batch_letters:
            self.sink.send(letter)


class ResultPublisher:
    """Publishes results on `topic` through `producer` (idempotent, key = request_id). `sleep(seconds)` waits between
    attempts (the generation thread's, which gives up at shutdown)."""

    def __init__(self, producer: Producer, topic: str, config: PoolConfig, sleep: Callable[[float], None]):
        self._producer = producer
        self._topic = topic
        self._config = config
        self._sleep = sleep
        self._errors: list[str] = []

    def deliver(self, results: list[CotResult], dead_letters: BatchDeadLetters) -> None:
        """Publish the results and make them and the batch's dead letters durable, or raise `PoolFailure`.

        A failed attempt sends everything again: the copies that did arrive are duplicates with the same key, which
        the idempotent consumers of both topics absorb."""
        attempts = self._config.publish_attempts
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                dead_letters.resend()
            problem = self._publish(results, dead_letters)
            if problem is None:
                return
            log.warning("delivery attempt %d/%d failed: %s", attempt, attempts, problem)
            self._sleep(backoff_s(attempt, self._config.retry_backoff_s, _MAX_RETRY_WAIT_S))
        raise PoolFailure(f"results could not be delivered after {attempts} attempts")

    def _publish(self, results: list[CotResult], dead_letters: BatchDeadLetters) -> str | None:
        """One attempt: produce every result, flush both producers; what went wrong, or None."""
        timeout = self._config.flush_timeout_s
        self._errors = []
        for result in results:
            self._producer.produce(self._topic, key=result.request_id.encode(), value=result.to_bytes(),
                                   on_delivery=self._on_delivery)
            self._producer.poll(0)
        undelivered = self._producer.flush(timeout)
        problem = None
        if undelivered or self._errors:
            problem = (f"{undelivered} results undelivered after {timeout:.0f} s, "
                       f"{len(self._errors)} failed" + (f" ({self._errors[0]})" if self._errors else ""))
        try:
            dead_letters.flush(timeout)
        except DeadLetterDeliveryError as exc:
            problem = f"{problem}; {exc}" if problem else str(exc)
        return problem

    def _on_delivery(self, err: KafkaError | None, _message: Message) -> None:
        if err is not None:
            self._errors.append(err.str())
