"""`llmcf replay`: play the platforms' part by publishing a MovieLens window to the `items` and `interactions` topics.

Events go out in event-time order through one idempotent producer (key = user_id for interactions, item_id for
items), so each key's records are in time order within its partition. The Kafka record timestamp is left to the
producer (publish time): stamping 1998 times on records would make a real cluster's time-based retention delete them
at once; freshness is measured from the event's own timestamp in the payload.

Lifecycle: `replay()` returns only after `flush()` has confirmed every record, and raises `UserFacingError` if any
delivery failed (it stops publishing at the first failure) or records were still undelivered when the flush timed
out. Ctrl-C stops publishing, flushes what was already handed to the producer, and returns a summary marked
`interrupted`.

Resuming: `skip` starts after the window's first `skip` events; `on_checkpoint(position)` is called after a flush has
confirmed every event before `position` (every `checkpoint_every` events and at the end), so a caller that records the
last position it was given and passes it back as `skip` loses nothing; it may publish up to `checkpoint_every` events
twice, which the consumers' idempotent upserts absorb (restamped events keep their original identity, see `_restamp`).
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

from confluent_kafka import KafkaError, Message, Producer
from tqdm import tqdm

from llmcf import kafka, movielens
from llmcf.errors import UserFacingError
from llmcf.events import InteractionEvent, ItemEvent
from llmcf.settings import Settings
from llmcf.topics import Topics

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 120.0
PROGRESS_EVERY = 1000


@dataclass(frozen=True)
class ReplayOptions:
    """What to publish and how fast. `rate` is events (items + interactions) per second; None = as fast as possible."""

    dataset: str = "ml-100k"
    limit: int | None = None
    rate: float | None = None
    start: datetime | None = None
    end: datetime | None = None
    timestamps: Literal["original", "now"] = "original"
    progress: bool = True
    skip: int = 0
    checkpoint_every: int = 1_000
    on_checkpoint: Callable[[int], None] | None = None
    should_stop: Callable[[], bool] | None = None
    """Polled before each event: True ends the replay like Ctrl-C does (for callers that run it on a thread)."""


@dataclass
class ReplaySummary:
    """What a replay published; `render()` is the CLI's report."""

    options: ReplayOptions
    bootstrap: str
    topics: list[str]
    interactions: int = 0
    items: int = 0
    positives: int = 0
    first_event_at: datetime | None = None
    last_event_at: datetime | None = None
    duration_s: float = 0.0
    interrupted: bool = False
    failures: list[str] = field(default_factory=list)

    @property
    def events(self) -> int:
        return self.interactions + self.items

    @property
    def events_per_s(self) -> float:
        return self.events / self.duration_s if self.duration_s > 0 else 0.0

    def render(self) -> str:
        o = self.options
        window = f"[{_when(o.start) or 'beginning'}, {_when(o.end) or 'end'})"
        if o.limit is not None:
            window += f", first {o.limit:,} interactions"
        share = f"{self.positives / self.interactions:.1%}" if self.interactions else "n/a"
        lines = [
            f"replay {o.dataset} {window}{' - INTERRUPTED, partial' if self.interrupted else ''}",
            f"  published     {self.interactions:,} interactions ({share} positive), {self.items:,} items",
            f"  event time    {_when(self.first_event_at) or '-'} .. {_when(self.last_event_at) or '-'}"
            f" ({o.timestamps} timestamps)",
            f"  took          {self.duration_s:.2f} s, {self.events_per_s:,.0f} events/s"
            + (f" (rate limit {o.rate:,.0f}/s)" if o.rate else ""),
            f"  to            {self.bootstrap}: {', '.join(self.topics)}",
        ]
        return "\n".join(lines)


class TokenBucket:
    """Paces callers to `rate` per second on average, with bursts of at most `rate` x 50 ms.

    `wait(sleep)` blocks, through the caller's `sleep` (the producer's `poll`, so delivery callbacks keep being served),
    until one token is available. Oversleeping is paid back by the accumulated tokens, so the long-run rate stays
    accurate even at tens of thousands per second where each sleep is coarser than one event's interval.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.capacity = max(1.0, rate * 0.05)
        self.tokens = 1.0
        self.clock = clock
        self.updated = clock()

    def wait(self, sleep: Callable[[float], object]) -> None:
        while True:
            now = self.clock()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return
            sleep((1.0 - self.tokens) / self.rate)


class _Deliveries:
    """Counts delivery reports; the callback runs inside `Producer.poll/flush` on this thread."""

    def __init__(self) -> None:
        self.delivered = 0
        self.failed = 0
        self.first_error: KafkaError | None = None

    def __call__(self, error: KafkaError | None, message: Message) -> None:
        if error is None:
            self.delivered += 1
            return
        self.failed += 1
        if self.first_error is None:
            self.first_error = error
            log.error("delivery to %s failed: %s", message.topic(), error.str())


def replay(settings: Settings, options: ReplayOptions) -> ReplaySummary:
    """Publish the window described by `options`; see the module docstring for the delivery contract."""
    bootstrap = kafka.resolve_bootstrap(settings)
    topics = Topics.from_settings(settings)
    kafka.ensure_topics(settings, bootstrap)
    log.info("loading MovieLens %s", options.dataset)
    window = movielens.events(options.dataset, options.start, options.end, options.limit)
    summary = ReplaySummary(options, bootstrap, [topics.items, topics.interactions])
    if len(window) == 0:
        log.warning("the window selects no ratings of %s: nothing to publish", options.dataset)
        return summary

    producer = Producer(kafka.producer_config(settings, bootstrap, "llmcf-replay"))
    deliveries = _Deliveries()
    bucket = TokenBucket(options.rate) if options.rate else None
    bar = tqdm(
        total=len(window), initial=min(options.skip, len(window)), unit="ev", unit_scale=True,
        desc=f"replay {options.dataset}", file=sys.stderr,
        disable=not options.progress, mininterval=0.5, smoothing=0.1,
    )
    last_stamp = datetime.min.replace(tzinfo=timezone.utc)
    unreported = 0
    started = time.monotonic()
    position = options.skip
    try:
        for event in itertools.islice(window, options.skip, None):
            if deliveries.failed:
                break
            if options.should_stop and options.should_stop():
                summary.interrupted = True
                break
            if bucket:
                bucket.wait(producer.poll)
            if options.timestamps == "now":
                # Wall clocks can step back; never let a later event carry an earlier stamp.
                last_stamp = max(last_stamp, datetime.now(timezone.utc))
                event = _restamp(event, last_stamp)
            if isinstance(event, InteractionEvent):
                _produce(producer, topics.interactions, event.user_id, event.to_bytes(), deliveries)
                summary.interactions += 1
                summary.positives += event.label
                moment = event.ts
            else:
                _produce(producer, topics.items, event.item_id, event.to_bytes(), deliveries)
                summary.items += 1
                moment = event.created_at
            summary.first_event_at = summary.first_event_at or moment
            summary.last_event_at = moment
            position += 1
            unreported += 1
            if unreported == PROGRESS_EVERY:
                bar.update(unreported)
                unreported = 0
            if options.on_checkpoint and (position - options.skip) % options.checkpoint_every == 0:
                _checkpoint(producer, deliveries, position, options.on_checkpoint)
    except KeyboardInterrupt:
        summary.interrupted = True
        log.warning("interrupted: flushing the %d events already handed to the producer", summary.events)
    finally:
        bar.update(unreported)
        bar.close()
    undelivered = producer.flush(FLUSH_TIMEOUT_S)
    summary.duration_s = time.monotonic() - started
    if options.on_checkpoint and not undelivered and not deliveries.failed:
        options.on_checkpoint(position)

    if deliveries.failed:
        first_error = deliveries.first_error.str() if deliveries.first_error else "unknown"
        raise UserFacingError(
            f"{deliveries.failed} of {summary.events} events were not delivered to {bootstrap} "
            f"(first error: {first_error}); publishing stopped"
        )
    if undelivered:
        raise UserFacingError(
            f"{undelivered} of {summary.events} events were still undelivered after {FLUSH_TIMEOUT_S:g} s: "
            f"is the broker at {bootstrap} still up (`llmcf infra status`)?"
        )
    return summary


def _produce(producer: Producer, topic: str, key: str, value: bytes, deliveries: _Deliveries) -> None:
    """Hand one record to the producer, waiting (and serving callbacks) while its local queue is full."""
    while True:
        try:
            producer.produce(topic, value=value, key=key.encode(), on_delivery=deliveries)
            break
        except BufferError:
            producer.poll(0.05)
    producer.poll(0)


def _checkpoint(producer: Producer, deliveries: _Deliveries, position: int, on_checkpoint: Callable[[int], None]) -> None:
    """Report `position` only once every earlier event is confirmed; a failed delivery reports nothing."""
    if producer.flush(FLUSH_TIMEOUT_S) == 0 and not deliveries.failed:
        on_checkpoint(position)


def _restamp(event: ItemEvent | InteractionEvent, moment: datetime) -> ItemEvent | InteractionEvent:
    """The event at publish time. An interaction keeps the id it had at its original time, so publishing the same
    rating again (a resumed replay) is the same event to every consumer, not a new one."""
    if isinstance(event, InteractionEvent):
        return event.model_copy(update={"ts": moment, "event_id": event.interaction_id})
    return event.model_copy(update={"created_at": moment})


def _when(moment: datetime | None) -> str | None:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z") if moment else None
