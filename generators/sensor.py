"""The pool's instrumentation: `PoolSensor` turns what the pool's threads report (hooks named `on_*`, called where the
event happens) into Prometheus samples, so the business code holds no metric calls (faust's sensors do the same).

It owns every metric call of the pool: its own (`generators.metrics`) and the shared ones it feeds (`llmcf.metrics`:
records consumed by outcome, freshness, committed and end offsets, consumer lag). Hooks run on the thread that calls
them; each is labelled below with the thread that does."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from generators import metrics
from generators.backlog import SkipReason
from llmcf.events import CotResult
from llmcf.metrics import COMMITTED_OFFSET, CONSUMER_LAG, END_OFFSET, EVENTS, observe_freshness

SKIP_OUTCOMES: dict[SkipReason, str] = {"ttl": "skipped_ttl", "backlog_full": "skipped_backlog",
                                        "duplicate": "skipped_duplicate"}


class PoolSensor:
    """The metrics of one pool member: `backend` labels its CoT counts, `group` and `topic` its partition gauges."""

    def __init__(self, backend: str, group: str, topic: str):
        self.backend = backend
        self.group = group
        self.topic = topic

    # ---- polling thread --------------------------------------------------------------------------------------------

    def on_request_skipped(self, reason: SkipReason) -> None:
        """A request left the backlog without being generated (it was consumed fine)."""
        EVENTS.labels(topic=self.topic, outcome="ok").inc()
        metrics.COTS.labels(backend=self.backend, outcome=SKIP_OUTCOMES[reason]).inc()

    def on_paused(self) -> None:
        metrics.PAUSES.labels(reason="backend_saturated").inc()
        metrics.PAUSED.set(1)

    def on_resumed(self) -> None:
        metrics.PAUSED.set(0)

    def on_work_sampled(self, waiting: int, backlog: int) -> None:
        """The queue depth (consumed, unfinished) and the backlog's size, sampled periodically."""
        metrics.QUEUE_DEPTH.set(waiting)
        metrics.BACKLOG.set(backlog)

    def on_committed(self, partition: int, offset: int) -> None:
        COMMITTED_OFFSET.labels(group=self.group, topic=self.topic, partition=str(partition)).set(offset)

    def on_partition_offsets(self, partition: int, end: int, committed: int | None) -> None:
        """A partition's end offset and, once its committed offset is known, the group's lag on it."""
        labels = {"group": self.group, "topic": self.topic, "partition": str(partition)}
        END_OFFSET.labels(**labels).set(end)
        if committed is not None:
            CONSUMER_LAG.labels(**labels).set(max(0, end - committed))

    def on_partitions_forgotten(self, partitions: Sequence[int]) -> None:
        """Partitions this member no longer owns: their gauges go (the new owner reports them)."""
        for partition in partitions:
            for gauge in (CONSUMER_LAG, COMMITTED_OFFSET, END_OFFSET):
                try:
                    gauge.remove(self.group, self.topic, str(partition))
                except KeyError:
                    pass

    def on_stopped(self) -> None:
        metrics.QUEUE_DEPTH.set(0)
        metrics.PAUSED.set(0)

    # ---- generation thread -----------------------------------------------------------------------------------------

    def on_request_decoded(self, ok: bool) -> None:
        """A record of the batch decoded into a request with its prompt (`ok`), or went to the dead letters."""
        EVENTS.labels(topic=self.topic, outcome="ok" if ok else "dead_lettered").inc()

    def on_expired_in_queue(self, count: int) -> None:
        """Requests that passed the TTL while their batch was queued: skipped, not generated."""
        metrics.COTS.labels(backend=self.backend, outcome="skipped_ttl").inc(count)

    def on_batch_started(self, size: int) -> None:
        """A batch with `size` requests goes to the backend."""
        metrics.BATCH_SIZE.observe(size)

    def on_batch_generated(self, seconds: float) -> None:
        """The batch's generation (retries and backpressure waits included) took `seconds`."""
        metrics.BATCH_SECONDS.labels(backend=self.backend).observe(seconds)

    def on_generation_failed(self) -> None:
        """A request failed every attempt and was dead-lettered."""
        metrics.COTS.labels(backend=self.backend, outcome="retries_exhausted").inc()

    def on_capacity(self, cots_per_s: float) -> None:
        metrics.CAPACITY.set(cots_per_s)

    def on_results_delivered(self, results: Sequence[CotResult], requested_at: Sequence[datetime],
                             published_at: float) -> None:
        """The batch's results are durable on cot-results (`requested_at`: each result's request's)."""
        observe_freshness("cot_generated", [result.ts for result in results], now=published_at)
        for result, requested in zip(results, requested_at, strict=True):
            metrics.REQUEST_LATENCY.observe(max(0.0, published_at - requested.timestamp()))
            metrics.TOKENS.labels(backend=self.backend, kind="prompt").inc(result.prompt_tokens)
            metrics.TOKENS.labels(backend=self.backend, kind="completion").inc(result.completion_tokens)
        metrics.COTS.labels(backend=self.backend, outcome="ok").inc(len(results))
