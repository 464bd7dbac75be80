"""The generator pool: a Kafka consumer group on `cot-requests` that writes `cot-results`, one process per GPU.

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
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from generators import metrics as pool_metrics
from generators.backends import BackendError, BackendSaturated, CotBackend, Generation
from generators.backlog import Backlog, SkipReason
from generators.prompt import Prompt, build_prompt
from llmcf.dead_letters import DeadLetterDeliveryError, DeadLetterPolicy, KafkaDeadLetterSink, SourceRecord, decode_batch
from llmcf.events import CotRequest, CotResult, DeadLetter, DeadLetterReason, decode
from llmcf.kafka import consumer_config, producer_config
from llmcf.metrics import COMMITTED_OFFSET, CONSUMER_LAG, END_OFFSET, EVENTS, observe_freshness
from llmcf.settings import Settings
from llmcf.topics import Topics

if TYPE_CHECKING:
    from llmcf.embeddings import TextEmbedder

log = logging.getLogger(__name__)

MAX_COT_CHARS = 16384  # CotResult.cot_text's limit: a runaway generation is cut, not dead-lettered
_POLL_TIMEOUT_S = 0.1
_BLOCKED_POLL_TIMEOUT_S = 0.02
_REPORT_EVERY_S = 1.0
_CONSUME_MAX = 500  # records per consume() call: the backlog takes the inflow's pace, and _expire runs once per call
_SKIP_OUTCOMES: dict[SkipReason, str] = {"ttl": "skipped_ttl", "backlog_full": "skipped_backlog",
                                         "duplicate": "skipped_duplicate"}
_PROGRESS_LOG_EVERY_S = 10.0


def group_id(settings: Settings) -> str:
    """The consumer group of every generator process of a deployment (the topic prefix keeps deployments apart)."""
    return f"{settings.topic_prefix}llmcf-generators"


@dataclass(frozen=True)
class PoolConfig:
    """How the pool batches, retries and stops. The defaults are the CLI's."""

    max_batch: int = 16
    max_wait_ms: int = 200
    max_attempts: int = 3
    max_queued_batches: int = 1  # batches formed ahead of the generation thread: a later one reflects newer priorities
    max_backlog: int = 1000  # requests waiting for a batch (a few MB); the lowest-priority one is skipped beyond it
    retry_backoff_s: float = 0.5
    revoke_grace_s: float = 5.0
    drain_timeout_s: float = 120.0
    flush_timeout_s: float = 30.0
    publish_attempts: int = 3
    ttl_s: float = 0.0  # a request older than this (since requested_at) when its batch comes up is skipped; 0 = never

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_attempts", "max_queued_batches", "publish_attempts", "max_backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("max_wait_ms", "retry_backoff_s", "revoke_grace_s", "drain_timeout_s", "flush_timeout_s", "ttl_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


class PoolFailure(RuntimeError):
    """The pool stopped because it could not go on safely (results undeliverable, embedder or consumer failure).
    Nothing unfinished was committed: a restart resumes from the committed offsets."""


@dataclass
class PoolStats:
    """Counters for logs and tests. Each field is written by one thread only (see the comments), read by any."""

    consumed: int = 0  # polling thread
    batches: int = 0  # generation thread: batches with at least one request for the backend
    published: int = 0  # generation thread
    skipped_ttl: int = 0  # polling thread: requests in the backlog that would be published past the TTL
    skipped_in_queue: int = 0  # generation thread: requests that passed the TTL while queued, not generated
    skipped_backlog: int = 0  # polling thread: requests ranked last in a full backlog
    skipped_duplicate: int = 0  # polling thread: requests for a sample waiting, generating or generated recently
    dead_lettered: int = 0  # generation thread
    completion_tokens: int = 0  # generation thread
    commits: int = 0  # polling thread
    pauses: dict[str, int] = field(default_factory=lambda: {"backend_saturated": 0})  # polling thread

    @property
    def skipped(self) -> int:
        return self.skipped_ttl + self.skipped_in_queue + self.skipped_backlog + self.skipped_duplicate


@dataclass
class _Work:
    """A consumed record, tagged with the assignment epoch of its partition when it was consumed."""

    record: SourceRecord
    epoch: int
    request_id: str | None = None  # None for a record that does not decode
    generated: bool = False  # set by the generation thread before the batch comes back


@dataclass(frozen=True)
class _Prepared:
    """A decoded request with its prompt, ready for the backend."""

    work: _Work
    request: CotRequest
    prompt: Prompt


@dataclass(frozen=True)
class _GenerationFailed:
    error: str
    attempts: int


class _Abandoned(Exception):
    """The drain timeout passed during shutdown: the current batch is dropped unfinished (and stays uncommitted)."""


class _Ownership:
    """Partition -> assignment epoch, shared by both threads: the generation thread skips records of partitions this
    process no longer owns (or owns again under a new epoch), since their offsets could never be committed here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._epochs: dict[int, int] = {}
        self._next_epoch = 0

    def grant(self, partition: int) -> int:
        with self._lock:
            self._next_epoch += 1
            self._epochs[partition] = self._next_epoch
            return self._next_epoch

    def revoke(self, partition: int) -> None:
        with self._lock:
            self._epochs.pop(partition, None)

    def epoch(self, partition: int) -> int | None:
        with self._lock:
            return self._epochs.get(partition)

    def owns(self, work: _Work) -> bool:
        return self.epoch(work.record.partition) == work.epoch


class _PartitionOffsets:
    """One owned partition's offsets: consumed and unfinished (in consumption order), and the next safe to commit."""

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.unfinished: deque[int] = deque()
        self.finished_early: set[int] = set()
        self.committable: int | None = None
        self.committed: int | None = None
        self.in_flight = 0  # handed to the generation thread, not finished yet

    def finish(self, offset: int) -> None:
        self.finished_early.add(offset)
        # Advance only over a prefix of finished offsets: an unfinished request holds the commit back.
        while self.unfinished and self.unfinished[0] in self.finished_early:
            done = self.unfinished.popleft()
            self.finished_early.discard(done)
            self.committable = done + 1


class OffsetTracker:
    """Which offset each owned partition may commit. Used by the polling thread only.

    `consumed()` registers an offset as unfinished; `finished()` marks it done; `to_commit()` gives, per partition, the
    first offset still unfinished (or the next after the last finished one) when it is past the last commit.
    """

    def __init__(self) -> None:
        self._partitions: dict[int, _PartitionOffsets] = {}

    def start(self, partition: int, epoch: int) -> None:
        self._partitions[partition] = _PartitionOffsets(epoch)

    def forget(self, partition: int) -> None:
        self._partitions.pop(partition, None)

    def partitions(self) -> list[int]:
        return sorted(self._partitions)

    def consumed(self, partition: int, offset: int, epoch: int) -> bool:
        state = self._partitions.get(partition)
        if state is None or state.epoch != epoch:
            return False
        state.unfinished.append(offset)
        return True

    def dispatched(self, partition: int, epoch: int) -> None:
        """An offset was handed to the generation thread (a revoke waits for these)."""
        state = self._partitions.get(partition)
        if state is not None and state.epoch == epoch:
            state.in_flight += 1

    def finished(self, partition: int, offset: int, epoch: int) -> None:
        """Mark an offset done; ignored when the partition was revoked (or reassigned) since it was consumed."""
        state = self._partitions.get(partition)
        if state is not None and state.epoch == epoch:
            state.in_flight -= 1
            state.finish(offset)

    def in_flight(self, partitions: list[int]) -> int:
        return sum(self._partitions[p].in_flight for p in partitions if p in self._partitions)

    def to_commit(self, partitions: list[int] | None = None) -> dict[int, int]:
        wanted = self._partitions if partitions is None else {p: self._partitions[p] for p in partitions if p in self._partitions}
        return {
            p: s.committable
            for p, s in wanted.items()
            if s.committable is not None and (s.committed is None or s.committable > s.committed)
        }

    def mark_committed(self, partition: int, offset: int) -> None:
        state = self._partitions.get(partition)
        if state is not None:
            state.committed = offset if state.committed is None else max(state.committed, offset)

    def committed(self, partition: int) -> int | None:
        state = self._partitions.get(partition)
        return None if state is None else state.committed


class _BatchDeadLetters(DeadLetterPolicy):
    """The pool's error policy: dead-letters a record like `DeadLetterPolicy` and keeps the letters of the current
    batch, so that a failed flush can send them again before the batch is committed."""

    def __init__(self, sink: KafkaDeadLetterSink, consumer: str):
        super().__init__(sink, consumer)
        self.batch_letters: list[DeadLetter] = []

    def __call__(self, record: SourceRecord, reason: DeadLetterReason, error: str) -> DeadLetter:
        letter = super().__call__(record, reason, error)
        self.batch_letters.append(letter)
        return letter

    def resend(self) -> None:
        for letter in self.batch_letters:
            self.sink.send(letter)


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
        self._work: queue.Queue[list[_Work] | None] = queue.Queue(maxsize=self.config.max_queued_batches)
        self._finished: queue.Queue[list[_Work]] = queue.Queue()
        self._ownership = _Ownership()
        self._offsets = OffsetTracker()
        self._backlog: Backlog[_Work] = Backlog(self.config.max_backlog)
        self._paused: list[TopicPartition] = []
        self._saturated_until = 0.0  # monotonic; written by the generation thread, read by the polling thread
        self._batch_seconds = 0.0  # a batch's turn: generation, embedding, publication (moving average); generation thread
        self._capacity = 0.0  # CoTs per second of a batch's turn (moving average); generation thread
        self._waiting = 0  # requests in the backlog, queued or generating (queue depth), polling thread
        self._stopping = False
        self._consumer: Consumer | None = None
        self._producer = Producer(producer_config(settings, bootstrap, "llmcf-generator"))
        self._delivery_errors: list[str] = []
        self._dead_letters = _BatchDeadLetters(
            KafkaDeadLetterSink(producer_config(settings, bootstrap, "llmcf-generator-dead-letters"),
                                self.topics.dead_letters),
            consumer=self.group_id,
        )
        self._generation_thread = threading.Thread(target=self._generation_loop, name="cot-generation", daemon=True)

    # ---- control ---------------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask `run()` to finish in-flight work, commit and return. Safe from signal handlers and other threads."""
        self._stop.set()

    @property
    def backlog_size(self) -> int:
        """Requests waiting in the backlog right now (read from any thread: a sample for tests, benches and logs)."""
        return len(self._backlog)

    @property
    def capacity(self) -> float:
        """CoTs per second of a batch's turn (generation, embedding, publication) over recent batches (0 before the
        first); any thread may read it."""
        return self._capacity

    @property
    def paused(self) -> bool:
        """Whether consumption is paused right now (the backend is saturated)."""
        return bool(self._paused)

    def run(self) -> None:
        """Consume, generate and publish until `stop()`; raises `PoolFailure` when the pool cannot go on safely."""
        self._consumer = Consumer(consumer_config(self.settings, self.bootstrap, self.group_id, "llmcf-generator"))
        self._consumer.subscribe(
            [self.topics.cot_requests], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        self._generation_thread.start()
        log.info("generator pool joined group %s on %s (backend %s, model %s, max batch %d, max wait %d ms)",
                 self.group_id, self.topics.cot_requests, self.backend.name, self.backend.model,
                 self.config.max_batch, self.config.max_wait_ms)
        try:
            self._poll_loop()
        finally:
            self._shut_down()
        if self._failure is not None:
            raise PoolFailure(f"generator pool stopped: {self._failure}") from self._failure

    # ---- polling thread --------------------------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        next_report = time.monotonic()
        progress = _Progress(self.stats)
        while not self._stop.is_set():
            self._apply_finished()
            self._commit()
            self._dispatch_ready()
            self._update_pause()
            timeout = _POLL_TIMEOUT_S
            oldest = self._backlog.oldest_arrival_s()
            if oldest is not None:
                batch_due = oldest + self.config.max_wait_ms / 1000 - time.monotonic()
                # A due batch still here is waiting for room in the queue: poll briefly (the generation thread takes
                # the queued batch at any moment, and the next one should be ready soon after), but never spin.
                timeout = min(timeout, batch_due) if batch_due > 0 else _BLOCKED_POLL_TIMEOUT_S
            try:
                messages = consumer.consume(_CONSUME_MAX, timeout)
            except KafkaException as exc:
                raise PoolFailure(f"consuming {self.topics.cot_requests}: {exc}") from exc
            for message in messages:
                self._collect(message)
            self._expire()
            self._dispatch_ready()
            now = time.monotonic()
            if now >= next_report:
                self._report_offsets()
                pool_metrics.QUEUE_DEPTH.set(self._waiting)
                pool_metrics.BACKLOG.set(len(self._backlog))
                next_report = now + _REPORT_EVERY_S
            progress.maybe_log(self._waiting, self.paused)

    def _collect(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                return
            if error.fatal():
                raise PoolFailure(f"fatal consumer error: {error.str()}")
            log.warning("consumer error (librdkafka retries): %s", error.str())
            return
        partition, offset = message.partition(), message.offset()
        epoch = self._ownership.epoch(partition)
        if epoch is None or not self._offsets.consumed(partition, offset, epoch):
            return  # fetched just before a revoke: the partition's new owner reads it
        self.stats.consumed += 1
        try:
            request: CotRequest | None = decode(CotRequest, message.value())
        except Exception:  # noqa: BLE001 - an undecodable record goes first to the generation thread, which dead-letters it
            request = None
        record = SourceRecord(message.value(), message.key(), message.topic(), partition, offset)
        work = _Work(record, epoch, request.request_id if request is not None else None)
        self._waiting += 1
        for skipped, reason in self._backlog.offer(work, request, time.monotonic()):
            self._skip(skipped, reason)

    def _expire(self) -> None:
        """Skip the waiting requests whose results would be published past the TTL: the request at backlog position i
        waits for the batch generating, those queued and the i // max_batch before its own, then its own."""
        if not self.config.ttl_s or not len(self._backlog):
            return
        ahead, batch_s, size = self._work.qsize() + 1, self._batch_seconds, self.config.max_batch
        for work in self._backlog.expire(time.time(), self.config.ttl_s,
                                         lambda position: (ahead + position // size + 1) * batch_s):
            self._skip(work, "ttl")

    def _skip(self, work: _Work, reason: SkipReason) -> None:
        """Finish a request without generating it: committable with its neighbours, counted by reason."""
        partition, epoch = work.record.partition, work.epoch
        self._offsets.dispatched(partition, epoch)
        self._offsets.finished(partition, work.record.offset, epoch)
        self._waiting -= 1
        if reason == "ttl":
            self.stats.skipped_ttl += 1
        elif reason == "backlog_full":
            self.stats.skipped_backlog += 1
        else:
            self.stats.skipped_duplicate += 1
        EVENTS.labels(topic=self.topics.cot_requests, outcome="ok").inc()
        pool_metrics.COTS.labels(backend=self.backend.name, outcome=_SKIP_OUTCOMES[reason]).inc()

    def _too_old(self, request: CotRequest, now: datetime) -> bool:
        """Its result would be published after the TTL: its age plus its own batch's generation time (a recent
        batch's, measured) exceed it."""
        return (now - request.requested_at).total_seconds() + self._batch_seconds > self.config.ttl_s

    def _dispatch_ready(self) -> None:
        """While the generation queue has room, hand it the backlog's first `max_batch` requests once that many wait
        or the oldest has waited `max_wait_ms` (formed as late as possible, so a batch follows the latest priorities)."""
        while len(self._backlog) and not self._work.full():  # this thread is the queue's only producer
            oldest = self._backlog.oldest_arrival_s()
            waited = oldest is not None and time.monotonic() - oldest >= self.config.max_wait_ms / 1000
            if len(self._backlog) < self.config.max_batch and not waited:
                return
            batch = self._backlog.take(self.config.max_batch)
            for work in batch:
                self._offsets.dispatched(work.record.partition, work.epoch)
            self._work.put_nowait(batch)

    def _update_pause(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        # Only a saturated backend pauses (it may stay so for minutes): a full generation queue does not, the backlog
        # takes the inflow and skips what ranks last.
        saturated = time.monotonic() < self._saturated_until
        if saturated and not self._paused:
            assignment = consumer.assignment()
            if not assignment:
                return
            consumer.pause(assignment)
            self._paused = assignment
            self.stats.pauses["backend_saturated"] += 1
            pool_metrics.PAUSES.labels(reason="backend_saturated").inc()
            pool_metrics.PAUSED.set(1)
            log.debug("paused %d partitions: backend saturated", len(assignment))
        elif not saturated and self._paused:
            owned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
            still_owned = [tp for tp in self._paused if (tp.topic, tp.partition) in owned]
            if still_owned:
                consumer.resume(still_owned)
            self._paused = []
            pool_metrics.PAUSED.set(0)
            log.debug("resumed consumption")

    def _apply_finished(self, wait_s: float = 0.0) -> None:
        """Mark the finished batches' offsets done (optionally waiting up to `wait_s` for the first one)."""
        try:
            batch = self._finished.get(timeout=wait_s) if wait_s > 0 else self._finished.get_nowait()
        except queue.Empty:
            return
        while True:
            for work in batch:
                self._offsets.finished(work.record.partition, work.record.offset, work.epoch)
                if work.request_id is not None:
                    self._backlog.finished(work.request_id, work.generated)
            self._waiting -= len(batch)
            try:
                batch = self._finished.get_nowait()
            except queue.Empty:
                return

    def _commit(self, partitions: list[int] | None = None) -> None:
        """Commit (synchronously) the committable offsets; a failed commit is retried with the next one."""
        consumer = self._consumer
        assert consumer is not None
        offsets = self._offsets.to_commit(partitions)
        if not offsets:
            return
        topic = self.topics.cot_requests
        try:
            consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False)
        except KafkaException as exc:
            # Typically a rebalance in progress: the offsets stay committable and go with the next commit, or the new
            # owner of the partition consumes those requests again (at-least-once).
            log.warning("commit of %s failed: %s", offsets, exc.args[0].str() if exc.args else exc)
            return
        self.stats.commits += 1
        for partition, offset in offsets.items():
            self._offsets.mark_committed(partition, offset)
            COMMITTED_OFFSET.labels(group=self.group_id, topic=topic, partition=str(partition)).set(offset)

    def _report_offsets(self) -> None:
        """Consumer lag, committed and end offsets per owned partition. The end offset is the high watermark of the last
        fetch (cached; Tansu answers ListOffsets wrongly); lag = end - committed offset (the group's unfinished work)."""
        consumer = self._consumer
        assert consumer is not None
        topic = self.topics.cot_requests
        unknown = [p for p in self._offsets.partitions() if self._offsets.committed(p) is None]
        if unknown:
            self._load_committed(unknown)
        for partition in self._offsets.partitions():
            watermarks = consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            if not watermarks or watermarks[1] < 0:
                continue
            end = watermarks[1]
            labels = {"group": self.group_id, "topic": topic, "partition": str(partition)}
            END_OFFSET.labels(**labels).set(end)
            committed = self._offsets.committed(partition)
            if committed is not None:
                CONSUMER_LAG.labels(**labels).set(max(0, end - committed))

    def _load_committed(self, partitions: list[int]) -> None:
        """The group's committed offsets for newly owned partitions (a partition never committed counts from 0)."""
        consumer = self._consumer
        assert consumer is not None
        try:
            found = consumer.committed([TopicPartition(self.topics.cot_requests, p) for p in partitions], timeout=2.0)
        except KafkaException as exc:
            log.debug("committed offsets not available yet: %s", exc)
            return
        for tp in found:
            self._offsets.mark_committed(tp.partition, max(tp.offset, 0))

    # ---- rebalances (called by the consumer inside consume(), on the polling thread) ----------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._offsets.start(tp.partition, self._ownership.grant(tp.partition))
        consumer.assign(partitions)  # eager assignment: consumer_config keeps librdkafka's default strategies
        # librdkafka keeps a partition's pause flag across assignments: start every new assignment unpaused (the loop
        # pauses it again if the pool is still saturated).
        if partitions:
            consumer.resume(partitions)
        self._paused = []
        pool_metrics.PAUSED.set(0)
        log.info("assigned %s[%s]", self.topics.cot_requests, ",".join(str(tp.partition) for tp in partitions))
        if partitions:
            self.assigned.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = [tp.partition for tp in partitions]
        self._drop_collected(revoked)
        deadline = time.monotonic() + (0.0 if self._stopping else self.config.revoke_grace_s)
        while self._offsets.in_flight(revoked) and time.monotonic() < deadline:
            self._apply_finished(wait_s=0.1)
        self._commit(revoked)
        unfinished = self._offsets.in_flight(revoked)
        if unfinished:
            log.warning("revoked %s[%s] with %d requests still in flight: they stay uncommitted here and go to the new "
                        "owner", self.topics.cot_requests, ",".join(map(str, revoked)), unfinished)
        self._forget(revoked)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = [tp.partition for tp in partitions]
        log.warning("lost %s[%s] (session timed out): forgetting them without a commit",
                    self.topics.cot_requests, ",".join(map(str, lost)))
        self._drop_collected(lost)
        self._forget(lost)

    def _drop_collected(self, partitions: list[int]) -> None:
        """Forget the waiting requests of these partitions, uncommitted: their new owner consumes them again."""
        self._waiting -= len(self._backlog.remove(lambda work: work.record.partition in partitions))

    def _forget(self, partitions: list[int]) -> None:
        # The dispatched requests of these partitions leave the queue depth when their batches come back.
        topic = self.topics.cot_requests
        consumer = self._consumer
        assert consumer is not None
        paused = [tp for tp in self._paused if tp.partition in partitions]
        if paused:
            try:
                consumer.resume(paused)  # while still assigned: a pause flag left behind would outlive the assignment
            except KafkaException as exc:
                log.debug("resuming %s on revoke: %s", paused, exc)  # lost partitions: on_assign clears the flag
        for partition in partitions:
            self._ownership.revoke(partition)
            self._offsets.forget(partition)
            for gauge in (CONSUMER_LAG, COMMITTED_OFFSET, END_OFFSET):
                try:
                    gauge.remove(self.group_id, topic, str(partition))
                except KeyError:
                    pass
        self._paused = [tp for tp in self._paused if tp.partition not in partitions]

    # ---- shutdown --------------------------------------------------------------------------------------------------

    def _shut_down(self) -> None:
        self._stopping = True
        consumer = self._consumer
        assert consumer is not None
        left = self._backlog.remove(lambda _: True)
        if left:
            log.info("stopping: %d requests of the backlog not started, left uncommitted for redelivery", len(left))
            self._waiting -= len(left)
        deadline = time.monotonic() + self.config.drain_timeout_s
        self._send_end_of_work(deadline)
        while self._generation_thread.is_alive() and time.monotonic() < deadline:
            self._apply_finished(wait_s=0.1)
            self._commit()
        if self._generation_thread.is_alive():
            log.warning("stopping: in-flight work did not finish within %.0f s; dropping it uncommitted",
                        self.config.drain_timeout_s)
            self._abandon.set()
            self._generation_thread.join(timeout=5.0)
        self._apply_finished()
        self._commit()
        consumer.close()
        pool_metrics.QUEUE_DEPTH.set(0)
        pool_metrics.PAUSED.set(0)
        log.info("generator pool stopped: %d consumed, %d results published, %d dead-lettered",
                 self.stats.consumed, self.stats.published, self.stats.dead_lettered)

    def _send_end_of_work(self, deadline: float) -> None:
        """Queue the end-of-work marker behind the queued batches (the queue may be full: wait, finishing batches)."""
        while self._generation_thread.is_alive() and time.monotonic() < deadline:
            try:
                self._work.put(None, timeout=0.1)
                return
            except queue.Full:
                self._apply_finished()
                self._commit()

    # ---- generation thread -----------------------------------------------------------------------------------------

    def _generation_loop(self) -> None:
        try:
            while True:
                batch = self._work.get()
                if batch is None:
                    return
                self._process(batch)
                self._finished.put(batch)
        except _Abandoned:
            log.warning("generation thread: batch abandoned at shutdown (uncommitted, will be redelivered)")
        except BaseException as exc:  # noqa: BLE001 - any failure here must stop the pool loudly, never silently
            log.exception("generation thread failed; stopping the pool without committing the current batch")
            self._failure = exc
            self._stop.set()

    def _process(self, batch: list[_Work]) -> None:
        owned = [work for work in batch if self._ownership.owns(work)]
        if len(owned) < len(batch):
            log.info("skipping %d requests of revoked partitions (their new owner handles them)", len(batch) - len(owned))
        policy = self._dead_letters
        policy.batch_letters = []
        prepared = self._prepare(owned, policy)
        if prepared:
            pool_metrics.BATCH_SIZE.observe(len(prepared))
            self.stats.batches += 1
        started = time.perf_counter()
        outcomes = self._generate(prepared)
        seconds = time.perf_counter() - started
        pool_metrics.BATCH_SECONDS.labels(backend=self.backend.name).observe(seconds)

        succeeded: list[tuple[_Prepared, Generation]] = []
        for item, outcome in zip(prepared, outcomes, strict=True):
            if isinstance(outcome, Generation):
                succeeded.append((item, outcome))
            else:
                policy(item.work.record, "retries_exhausted",
                       f"generation failed {outcome.attempts} times; last error: {outcome.error}")
                pool_metrics.COTS.labels(backend=self.backend.name, outcome="retries_exhausted").inc()
        texts = [generation.text[:MAX_COT_CHARS] for _, generation in succeeded]
        vectors = self.embedder.embed(texts)
        generated_at = datetime.now(timezone.utc)
        results = [
            CotResult(
                request_id=item.request.request_id,
                user_id=item.request.user_id,
                item_id=item.request.item_id,
                label=item.request.label,
                ts=item.request.ts,
                cot_text=text,
                cot_embedding=[float(x) for x in vector],
                backend=self.backend.name,  # type: ignore[arg-type]  # a CotBackendName by construction
                model=self.backend.model,
                generated_at=generated_at,
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
            )
            for (item, generation), text, vector in zip(succeeded, texts, vectors, strict=True)
        ]
        self._deliver(results, policy)
        if prepared:
            # What the budget plans with: a batch's whole turn (generation, embedding, publication), recent batches
            # weighted most.
            seconds = time.perf_counter() - started
            self._batch_seconds = seconds if not self._batch_seconds else 0.7 * self._batch_seconds + 0.3 * seconds
            rate = len(prepared) / max(seconds, 1e-9)
            self._capacity = rate if not self._capacity else 0.7 * self._capacity + 0.3 * rate
            pool_metrics.CAPACITY.set(self._capacity)

        published_at = time.time()
        observe_freshness("cot_generated", [result.ts for result in results], now=published_at)
        for item, generation in succeeded:
            pool_metrics.REQUEST_LATENCY.observe(max(0.0, published_at - item.request.requested_at.timestamp()))
            pool_metrics.TOKENS.labels(backend=self.backend.name, kind="prompt").inc(generation.prompt_tokens)
            pool_metrics.TOKENS.labels(backend=self.backend.name, kind="completion").inc(generation.completion_tokens)
            self.stats.completion_tokens += generation.completion_tokens
        for item, _ in succeeded:
            item.work.generated = True
        pool_metrics.COTS.labels(backend=self.backend.name, outcome="ok").inc(len(results))
        self.stats.published += len(results)
        self.stats.dead_lettered += len(policy.batch_letters)

    def _prepare(self, batch: list[_Work], policy: _BatchDeadLetters) -> list[_Prepared]:
        prepared = []
        topic = self.topics.cot_requests
        now, skipped = datetime.now(timezone.utc), 0
        for work in batch:
            decoded = decode_batch(CotRequest, [work.record], policy)
            if not decoded:
                EVENTS.labels(topic=topic, outcome="dead_lettered").inc()
                continue
            request = decoded[0]
            try:
                prompt = build_prompt(request)
            except Exception as exc:  # noqa: BLE001 - one unusable request must not stop the stream
                policy(work.record, "processing_failed", f"building the prompt failed: {type(exc).__name__}: {exc}")
                EVENTS.labels(topic=topic, outcome="dead_lettered").inc()
                continue
            EVENTS.labels(topic=topic, outcome="ok").inc()
            if self.config.ttl_s and self._too_old(request, now):
                skipped += 1
                continue
            prepared.append(_Prepared(work, request, prompt))
        if skipped:
            # Not generated, not an error: the sample stays retrievable with the pending placeholder. The offset is
            # committed with the batch's.
            pool_metrics.COTS.labels(backend=self.backend.name, outcome="skipped_ttl").inc(skipped)
            self.stats.skipped_in_queue += skipped
            log.info("skipped %d CoT requests that would be older than the TTL (%g s) when generated (a batch takes "
                     "%.1f s): the pool is behind its inflow", skipped, self.config.ttl_s, self._batch_seconds)
        return prepared

    def _generate(self, prepared: list[_Prepared]) -> list[Generation | _GenerationFailed]:
        """One outcome per request: the batch in one backend call, then each failed request alone."""
        if not prepared:
            return []
        try:
            generations = self._call_backend([item.prompt for item in prepared])
        except BackendError as exc:
            if len(prepared) == 1:
                return [self._retry_alone(prepared[0], attempts=1, error=str(exc))]
            # A batch failure cannot be pinned on one request, so it costs none of them an attempt.
            log.warning("batch of %d failed (%s); retrying each request alone", len(prepared), exc)
            return [self._retry_alone(item, attempts=0, error=str(exc)) for item in prepared]
        return [
            generation if generation.text.strip() else self._retry_alone(item, attempts=1, error="empty text")
            for item, generation in zip(prepared, generations, strict=True)
        ]

    def _retry_alone(self, item: _Prepared, attempts: int, error: str) -> Generation | _GenerationFailed:
        while attempts < self.config.max_attempts:
            if attempts:
                self._sleep_unless_abandoned(min(30.0, self.config.retry_backoff_s * 2 ** (attempts - 1)))
            attempts += 1
            try:
                [generation] = self._call_backend([item.prompt])
            except BackendError as exc:
                error = str(exc)
                log.warning("request %s failed (attempt %d/%d): %s", item.request.request_id, attempts,
                            self.config.max_attempts, error)
                continue
            if generation.text.strip():
                return generation
            error = "empty text"
        return _GenerationFailed(error=error, attempts=attempts)

    def _call_backend(self, prompts: list[Prompt]) -> list[Generation]:
        """`backend.generate`, waiting out saturation (which is backpressure, not a failed attempt)."""
        while True:
            try:
                generations = self.backend.generate(prompts)
            except BackendSaturated as exc:
                wait_s = max(exc.retry_after_s, self.config.retry_backoff_s)
                self._saturated_until = time.monotonic() + wait_s
                log.info("backend saturated (%s): consumption paused, retrying in %.1f s", exc, wait_s)
                self._sleep_unless_abandoned(wait_s)
                continue
            if len(generations) != len(prompts):
                raise BackendError(f"backend returned {len(generations)} generations for {len(prompts)} prompts")
            return generations

    def _sleep_unless_abandoned(self, seconds: float) -> None:
        if self._abandon.wait(seconds):
            raise _Abandoned()

    def _deliver(self, results: list[CotResult], policy: _BatchDeadLetters) -> None:
        """Publish the results and make them and the batch's dead letters durable, or raise `PoolFailure`.

        A failed attempt sends everything again: the copies that did arrive are duplicates with the same key, which
        the idempotent consumers of both topics absorb."""
        for attempt in range(1, self.config.publish_attempts + 1):
            if attempt > 1:
                policy.resend()
            self._delivery_errors = []
            for result in results:
                self._producer.produce(self.topics.cot_results, key=result.request_id.encode(), value=result.to_bytes(),
                                       on_delivery=self._on_delivery)
                self._producer.poll(0)
            undelivered = self._producer.flush(self.config.flush_timeout_s)
            problem = None
            if undelivered or self._delivery_errors:
                problem = (f"{undelivered} results undelivered after {self.config.flush_timeout_s:.0f} s, "
                           f"{len(self._delivery_errors)} failed" + (f" ({self._delivery_errors[0]})" if self._delivery_errors else ""))
            try:
                policy.flush(self.config.flush_timeout_s)
            except DeadLetterDeliveryError as exc:
                problem = f"{problem}; {exc}" if problem else str(exc)
            if problem is None:
                return
            log.warning("delivery attempt %d/%d failed: %s", attempt, self.config.publish_attempts, problem)
            self._sleep_unless_abandoned(self.config.retry_backoff_s * attempt)
        raise PoolFailure(f"results could not be delivered after {self.config.publish_attempts} attempts")

    def _on_delivery(self, err: KafkaError | None, _message: Message) -> None:
        if err is not None:
            self._delivery_errors.append(err.str())


class _Progress:
    """A progress line every `_PROGRESS_LOG_EVERY_S` while the pool works (silent while idle)."""

    def __init__(self, stats: PoolStats):
        self._stats = stats
        self._last_at = time.monotonic()
        self._last_published = 0
        self._last_tokens = 0

    def maybe_log(self, waiting: int, paused: bool) -> None:
        now = time.monotonic()
        if now - self._last_at < _PROGRESS_LOG_EVERY_S:
            return
        published, tokens = self._stats.published, self._stats.completion_tokens
        if published != self._last_published or waiting:
            elapsed = now - self._last_at
            stats = self._stats
            log.info("%d results published (%.1f CoTs/s, %.0f tokens/s over %.0f s), %d skipped (ttl %d, backlog full "
                     "%d, duplicate %d), %d dead-lettered, %d requests waiting%s", published,
                     (published - self._last_published) / elapsed, (tokens - self._last_tokens) / elapsed, elapsed,
                     stats.skipped, stats.skipped_ttl + stats.skipped_in_queue, stats.skipped_backlog,
                     stats.skipped_duplicate, stats.dead_lettered, waiting, ", consumption paused" if paused else "")
        self._last_at, self._last_published, self._last_tokens = now, published, tokens
