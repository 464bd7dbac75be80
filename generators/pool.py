"""The generator pool: a Kafka consumer group on `cot-requests` that writes `cot-results`, one process per GPU.

Modules: this one wires the two threads together; `polling` is the consumer loop and its micro-batching,
`generation` a batch's turn through the backend, `delivery` the publication of results and dead letters, `offsets`
what may be committed, `sensor` every metric, `progress` the counters and the progress log, `config` the settings.

Two threads per process:
- the polling thread (the caller of `run()`) owns the confluent-kafka consumer: it consumes at the inflow's pace into
  the `Backlog` (bounded, in priority order: `generators.backlog`), forms each batch from the backlog's first
  requests when the generation queue (`max_queued_batches`) has room and `max_batch` requests wait or the oldest has
  waited `max_wait_ms`, pauses consumption only while the backend is saturated (and keeps polling, so the group
  membership stays alive), commits offsets and serves rebalances;
- the generation thread decodes each batch (`decode_batch`; bad records go to `dead-letters`), builds the LLM-CF prompts,
  calls the backend, embeds the chains of thought, publishes `CotResult`s (key = request_id) with an idempotent producer
  and flushes them, then reports the batch as finished.

Delivery contract (at-least-once):
- offsets are committed only after the batch's results AND its dead letters are flushed; if a flush fails, the batch's
  publication is retried (`publish_attempts` times) and, if it still fails, the pool stops with `PoolFailure` without
  committing it, so the batch is consumed again after a restart;
- per partition, the committed offset is the first unfinished offset (or the next after the last finished one): it never
  passes a request that is still collected, queued or generating, whatever order batches finish in;
- a process killed at any moment (kill -9) loses nothing: what it had not committed is redelivered to the group, and
  results are keyed by request_id, so the duplicates this causes are absorbed by the idempotent upserts downstream.

Budget: the pool generates what its capacity allows, in priority order (cold-start items first, then the newest
event time), and skips the rest, each skip counted by reason (`llmcf_generator_cots_total{outcome="skipped_*"}`):
- `skipped_ttl` (`ttl_s`, `LLMCF_COT_TTL_S`): a request that would be older than the TTL when its result is published
  (its age, plus the generation time of the batches ahead of it and of its own, from the pool's recent batches). The
  polling thread sweeps the backlog after each poll, so an overloaded pool publishes only results within about a TTL
  of their request; the generation thread skips those that aged past it while queued;
- `skipped_backlog` (`max_backlog`, `LLMCF_COT_MAX_BACKLOG`): the backlog is full and the request ranks last;
- `skipped_duplicate`: a request for a sample this member is generating or generated recently (the stream worker
  publishes at least once).
Skipped requests are finished at once (committable), not generated; their samples stay retrievable with the pending
placeholder. Whatever the inflow, the pool holds at most `max_backlog` waiting requests plus the batches queued and
generating, and every request ends generated, skipped or dead-lettered.

Failures and backpressure:
- a batch whose backend call fails (`BackendError`) is retried request by request; a request that fails `max_attempts`
  times alone (or keeps getting an empty text) goes to `dead-letters` with reason `retries_exhausted`, and its offset
  becomes committable;
- `BackendSaturated(retry_after_s)` is not a failure: the generation thread waits `retry_after_s` and retries the same
  call, and meanwhile the polling thread pauses the assigned partitions;
- on a revoke, the polling thread waits up to `revoke_grace_s` for the in-flight work of the revoked partitions, commits
  what is finished, then forgets them: work still in flight for them is finished or skipped but never committed here
  (the new owner gets those requests again). Lost partitions are forgotten at once, without a commit.

Lifecycle: build with a backend and an embedder (the caller owns and closes both; the generation thread is their only
user, so two pools in one process need two embedders, or calls serialised around a shared one), `run()` blocks until `stop()` (safe
from a signal handler or another thread) or a fatal error. On stop: polling ends, requests collected but not queued are
left uncommitted (redelivered), queued batches are finished within `drain_timeout_s`, the finished offsets are committed,
and the consumer leaves the group.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from functools import partial
from typing import TYPE_CHECKING

from confluent_kafka import Consumer, Producer

from generators.backends.base import CotBackend
from generators.config import PoolConfig, PoolFailure, group_id
from generators.delivery import BatchDeadLetters, ResultPublisher
from generators.generation import Abandoned, BatchGenerator, sleep_unless_abandoned
from generators.offsets import Ownership
from generators.polling import Handoff, Poller
from generators.progress import PoolStats
from generators.sensor import PoolSensor
from generators.work import Work
from llmcf.dead_letters import KafkaDeadLetterSink
from llmcf.kafka import consumer_config, producer_config
from llmcf.settings import Settings
from llmcf.topics import Topics

if TYPE_CHECKING:
    from llmcf.embeddings import TextEmbedder

log = logging.getLogger(__name__)


class GeneratorPool:
    """One member of the generator group. See the module docstring for the threads and the delivery contract."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        backend: CotBackend,
        embedder: TextEmbedder,
        config: PoolConfig | None = None,
    ):
        self.settings = settings
        self.bootstrap = bootstrap
        self.backend = backend
        self.embedder = embedder
        self.config = config or PoolConfig()
        self.topics = Topics.from_settings(settings)
        self.group_id = group_id(settings)
        self.stats = PoolStats()
        self.assigned = threading.Event()  # set once the group gave this member at least one partition

        self._stop = threading.Event()
        self._abandon = threading.Event()
        self._failure: BaseException | None = None
        self._handoff = Handoff(queue.Queue(maxsize=self.config.max_queued_batches), queue.Queue())
        self._ownership = Ownership()
        self._sensor = PoolSensor(backend.name, self.group_id, self.topics.cot_requests)
        self._poller: Poller | None = None  # made by run(), with the consumer
        dead_letters = BatchDeadLetters(
            KafkaDeadLetterSink(producer_config(settings, bootstrap, "llmcf-generator-dead-letters"),
                                self.topics.dead_letters),
            consumer=self.group_id,
        )
        producer = Producer(producer_config(settings, bootstrap, "llmcf-generator"))
        self._generator = BatchGenerator(
            backend, embedder, self.config, ownership=self._ownership, dead_letters=dead_letters, stats=self.stats,
            sensor=self._sensor, abandon=self._abandon,
            publisher=ResultPublisher(producer, self.topics.cot_results, self.config,
                                      partial(sleep_unless_abandoned, self._abandon)),
        )
        self._generation_thread = threading.Thread(target=self._generation_loop, name="cot-generation", daemon=True)

    # ---- control ---------------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask `run()` to finish in-flight work, commit and return. Safe from signal handlers and other threads."""
        self._stop.set()

    @property
    def backlog_size(self) -> int:
        """Requests waiting in the backlog right now (read from any thread: a sample for tests, benches and logs)."""
        return len(self._poller.backlog) if self._poller is not None else 0

    @property
    def capacity(self) -> float:
        """CoTs per second of a batch's turn (generation, embedding, publication) over recent batches (0 before the
        first); any thread may read it."""
        return self._generator.pace.capacity

    @property
    def paused(self) -> bool:
        """Whether consumption is paused right now (the backend is saturated)."""
        return self._poller is not None and bool(self._poller.paused)

    def run(self) -> None:
        """Consume, generate and publish until `stop()`; raises `PoolFailure` when the pool cannot go on safely."""
        consumer = Consumer(consumer_config(self.settings, self.bootstrap, self.group_id, "llmcf-generator"))
        poller = self._poller = Poller(
            consumer, self.topics.cot_requests, self.config, handoff=self._handoff, ownership=self._ownership,
            pace=self._generator.pace, stats=self.stats, sensor=self._sensor, assigned=self.assigned,
        )
        consumer.subscribe(
            [self.topics.cot_requests], on_assign=poller.on_assign, on_revoke=poller.on_revoke, on_lost=poller.on_lost
        )
        self._generation_thread.start()
        log.info("generator pool joined group %s on %s (backend %s, model %s, max batch %d, max wait %d ms)",
                 self.group_id, self.topics.cot_requests, self.backend.name, self.backend.model,
                 self.config.max_batch, self.config.max_wait_ms)
        try:
            poller.run(self._stop)
        finally:
            self._shut_down(poller)
        if self._failure is not None:
            raise PoolFailure(f"generator pool stopped: {self._failure}") from self._failure

    # ---- shutdown (polling thread) -----------------------------------------------------------------------------------

    def _shut_down(self, poller: Poller) -> None:
        poller.stopping = True
        left = poller.drop_backlog()
        if left:
            log.info("stopping: %d requests of the backlog not started, left uncommitted for redelivery", left)
        deadline = time.monotonic() + self.config.drain_timeout_s
        self._send_end_of_work(poller, deadline)
        while self._generation_thread.is_alive() and time.monotonic() < deadline:
            poller.apply_finished(wait_s=0.1)
            poller.commit()
        if self._generation_thread.is_alive():
            log.warning("stopping: in-flight work did not finish within %.0f s; dropping it uncommitted",
                        self.config.drain_timeout_s)
            self._abandon.set()
            self._generation_thread.join(timeout=5.0)
        poller.apply_finished()
        poller.commit()
        poller.consumer.close()
        self._sensor.on_stopped()
        log.info("generator pool stopped: %d consumed, %d results published, %d dead-lettered",
                 self.stats.consumed, self.stats.published, self.stats.dead_lettered)

    def _send_end_of_work(self, poller: Poller, deadline: float) -> None:
        """Queue the end-of-work marker behind the queued batches (the queue may be full: wait, finishing batches)."""
        while self._generation_thread.is_alive() and time.monotonic() < deadline:
            try:
                self._handoff.work.put(None, timeout=0.1)
                return
            except queue.Full:
                poller.apply_finished()
                poller.commit()

    # ---- generation thread -----------------------------------------------------------------------------------------

    def _generation_loop(self) -> None:
        try:
            while True:
                batch: list[Work] | None = self._handoff.work.get()
                if batch is None:
                    return
                self._generator.process(batch)
                self._handoff.finished.put(batch)
        except Abandoned:
            log.warning("generation thread: batch abandoned at shutdown (uncommitted, will be redelivered)")
        except BaseException as exc:  # noqa: BLE001 - any failure here must stop the pool loudly, never silently
            log.exception("generation thread failed; stopping the pool without committing the current batch")
            self._failure = exc
            self._stop.set()
