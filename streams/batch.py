"""What every batch processor shares: decoding with the dead-letter policy, and writes that do not give up.

The error policy, in one place:
- A record that does not decode or validate is dead-lettered by `decode_batch` (reasons `undecodable`, `invalid`).
- A write that fails for a transient reason (database restart, broker away, index busy) is retried with capped
  exponential backoff until it succeeds; each failure is logged and counted (`llmcf_worker_write_failures_total`). The
  batch is never acknowledged with unwritten data: Faust acks a `take_events` batch when the body returns, even if it
  raised, so the body must not return or raise before its writes are durable.
- A write refused because of the data itself (`ValueError`, SQL data or integrity errors) is retried record by
  record, and each record still refused is dead-lettered with reason `processing_failed`; the others go on.
- A `TypeError` is a bug, never the data's fault (what decodes and validates has the contract's types): it is raised
  at once, neither retried in place nor dead-lettered, so the batch fails loudly (`streams.delivery` logs it with its
  traceback and processes the batch again).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from functools import partial
from typing import Any, Generic, NamedTuple, TypeVar

from sqlalchemy.exc import DataError, IntegrityError

from llmcf.dead_letters import DeadLetterPolicy, SourceRecord, decode_batch
from llmcf.events import Event
from llmcf.metrics import EVENTS
from llmcf.retries import backoff_s
from streams.metrics import WRITE_FAILURES

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)
T = TypeVar("T")
U = TypeVar("U")

RETRY_FIRST_DELAY_S = 0.1
RETRY_MAX_DELAY_S = 5.0
DATA_ERRORS: tuple[type[BaseException], ...] = (ValueError, DataError, IntegrityError)
"""Errors that say the data is wrong, not the system: retrying the same records would fail the same way."""
BUG_ERRORS: tuple[type[BaseException], ...] = (TypeError,)
"""Errors that say the code is wrong: retrying would fail the same way, and no record is to blame."""


class Consumed(NamedTuple, Generic[E]):
    """A valid event with the record it came from (for a later `processing_failed` dead letter)."""

    record: SourceRecord
    event: E


def decode_records(model: type[E], records: Iterable[SourceRecord], policy: DeadLetterPolicy) -> list[Consumed[E]]:
    """`decode_batch`, keeping each valid event's source record."""
    consumed = []
    for record in records:
        for event in decode_batch(model, (record,), policy):
            consumed.append(Consumed(record, event))
    return consumed


def latest_per_key(consumed: Iterable[Consumed[E]], key: Callable[[E], str], version: Callable[[E], Any]
                   ) -> list[Consumed[E]]:
    """One entry per key: the highest `version` (the first of equals), in order of each key's first appearance. A batch
    may carry several versions of one row; storage keeps the newest anyway, so writing the others is wasted work."""
    latest: dict[str, Consumed[E]] = {}
    for entry in consumed:
        current = latest.get(key(entry.event))
        if current is None or version(entry.event) > version(current.event):
            latest[key(entry.event)] = entry
    return list(latest.values())


class Writer:
    """Runs blocking writes on one executor thread (the event loop keeps consuming) and retries them until done."""

    def __init__(self, executor: Executor, policy: DeadLetterPolicy):
        self.executor = executor
        self.policy = policy

    async def call(self, step: str, operation: Callable[[], T]) -> T:
        """`operation()` on the executor, retried with capped backoff until it returns; data errors and bugs are
        raised."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                return await loop.run_in_executor(self.executor, operation)
            except (*DATA_ERRORS, *BUG_ERRORS):
                raise
            except Exception as exc:
                attempt += 1
                WRITE_FAILURES.labels(step=step).inc()
                delay = backoff_s(attempt, RETRY_FIRST_DELAY_S, RETRY_MAX_DELAY_S)
                log.warning("%s failed (attempt %d), retrying in %.1f s: %s", step, attempt, delay, exc)
                await asyncio.sleep(delay)

    async def each_good(
        self,
        step: str,
        units: Sequence[U],
        write: Callable[[Sequence[U]], object],
        record_of: Callable[[U], SourceRecord],
    ) -> list[U]:
        """Write `units` in one call; if the data is refused, one by one, dead-lettering each refused unit's record.
        Returns the units written."""
        if not units:
            return []
        try:
            await self.call(step, lambda: write(units))
            return list(units)
        except DATA_ERRORS as exc:
            log.warning("%s refused a batch of %d (%s): writing it record by record", step, len(units), exc)
        written = []
        for unit in units:
            try:
                await self.call(step, partial(write, [unit]))
                written.append(unit)
            except DATA_ERRORS as exc:
                WRITE_FAILURES.labels(step=step).inc()
                self.policy(record_of(unit), "processing_failed", f"{step}: {type(exc).__name__}: {exc}")
        return written

    async def flush_dead_letters(self) -> None:
        """Make this batch's dead letters durable before its offsets can be committed."""
        await self.call("dead-letters", self.policy.flush)


async def store_latest(writer: Writer, topic: str, model: type[E], records: Sequence[SourceRecord], step: str,
                       key: Callable[[E], str], version: Callable[[E], Any], store: Callable[[list[E]], object]
                       ) -> tuple[list[Consumed[E]], list[Consumed[E]]]:
    """The items' and the results' first step: decode `records` as `model` (bad ones dead-lettered and counted on
    `topic`), then `store` the newest version per `key`, good records one by one if the data is refused. Returns the
    decoded entries and the stored ones."""
    consumed = decode_records(model, records, writer.policy)
    count_dead_lettered(topic, records, consumed)
    stored = await writer.each_good(step, latest_per_key(consumed, key, version),
                                    lambda batch: store([c.event for c in batch]), lambda c: c.record)
    return consumed, stored


def count_dead_lettered(topic: str, records: Sequence[SourceRecord], decoded: Sequence[object]) -> None:
    EVENTS.labels(topic=topic, outcome="dead_lettered").inc(len(records) - len(decoded))
