"""The polling thread: the confluent-kafka consumer loop of a pool member. It consumes `cot-requests` into the
`Backlog`, skips what the budget cannot generate, forms micro-batches for the generation thread, pauses consumption
while the backend is saturated, marks finished batches' offsets done and commits them, reports offsets, and serves the
group's rebalances. Everything here runs on the thread that calls `run()` (the consumer's callbacks included)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from generators.backlog import Backlog, SkipReason
from generators.config import PoolConfig, PoolFailure
from generators.generation import Pace
from generators.offsets import OffsetTracker, Ownership
from generators.progress import PoolStats, ProgressLog
from generators.sensor import PoolSensor
from generators.work import Work
from llmcf.dead_letters import SourceRecord
from llmcf.events import CotRequest, decode

log = logging.getLogger(__name__)

POLL_TIMEOUT_S = 0.1
BLOCKED_POLL_TIMEOUT_S = 0.02
REPORT_EVERY_S = 1.0
CONSUME_MAX = 500  # records per consume() call: the backlog takes the inflow's pace, and _expire runs once per call


@dataclass(frozen=True)
class Handoff:
    """The queues between the threads: batches to generate (bounded, `max_queued_batches`; None ends the generation
    thread) and the batches it finished."""

    work: queue.Queue[list[Work] | None]
    finished: queue.Queue[list[Work]]


class Poller:
    """The consumer side of one pool member. `consumer` is subscribed by the caller with `on_assign`, `on_revoke`
    and `on_lost` as its callbacks; `pace` is the generation thread's, read here; `assigned` is set once the group
    gave this member at least one partition."""

    def __init__(self, consumer: Consumer, topic: str, config: PoolConfig, *, handoff: Handoff, ownership: Ownership,
                 pace: Pace, stats: PoolStats, sensor: PoolSensor, assigned: threading.Event):
        self.consumer = consumer
        self.topic = topic
        self.config = config
        self.backlog: Backlog[Work] = Backlog(config.max_backlog)
        self.offsets = OffsetTracker()
        self.waiting = 0  # requests in the backlog, queued or generating (queue depth)
        self.stopping = False  # a revoke during shutdown does not wait for in-flight work
        self.paused: list[TopicPartition] = []
        self._handoff = handoff
        self._ownership = ownership
        self._pace = pace
        self._stats = stats
        self._sensor = sensor
        self._assigned = assigned

    def run(self, stop: threading.Event) -> None:
        """Consume, batch and commit until `stop` is set; raises `PoolFailure` on a fatal consumer error."""
        next_report = time.monotonic()
        progress = ProgressLog(self._stats)
        while not stop.is_set():
            self.apply_finished()
            self.commit()
            self._dispatch_ready()
            self._update_pause()
            try:
                messages = self.consumer.consume(CONSUME_MAX, self._poll_timeout())
            except KafkaException as exc:
                raise PoolFailure(f"consuming {self.topic}: {exc}") from exc
            for message in messages:
                self._collect(message)
            self._expire()
            self._dispatch_ready()
            now = time.monotonic()
            if now >= next_report:
                self._report_offsets()
                self._sensor.on_work_sampled(self.waiting, len(self.backlog))
                next_report = now + REPORT_EVERY_S
            progress.maybe_log(self.waiting, bool(self.paused))

    def _poll_timeout(self) -> float:
        """Until the oldest waiting request's batch is due, at most `POLL_TIMEOUT_S`."""
        oldest = self.backlog.oldest_arrival_s()
        if oldest is None:
            return POLL_TIMEOUT_S
        batch_due = oldest + self.config.max_wait_ms / 1000 - time.monotonic()
        # A due batch still here is waiting for room in the queue: poll briefly (the generation thread takes the queued
        # batch at any moment, and the next one should be ready soon after), but never spin.
        return min(POLL_TIMEOUT_S, batch_due) if batch_due > 0 else BLOCKED_POLL_TIMEOUT_S

    def _collect(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                return
            if error.fatal():
                raise PoolFailure(f"fatal consumer error: {error.str()}")
            log.warning("consumer error (librdkafka retries): %s", error.str())
            return
        partition, offset, topic = message.partition(), message.offset(), message.topic()
        # A record without an error always carries its position.
        assert partition is not None and offset is not None and topic is not None
        epoch = self._ownership.epoch(partition)
        if epoch is None or not self.offsets.consumed(partition, offset, epoch):
            return  # fetched just before a revoke: the partition's new owner reads it
        self._stats.consumed += 1
        try:
            request: CotRequest | None = decode(CotRequest, message.value())
        except Exception:  # noqa: BLE001 - an undecodable record goes first to the generation thread, which dead-letters it
            request = None
        record = SourceRecord(message.value(), message.key(), topic, partition, offset)
        work = Work(record, epoch, request.request_id if request is not None else None)
        self.waiting += 1
        for skipped, reason in self.backlog.offer(work, request, time.monotonic()):
            self._skip(skipped, reason)

    def _expire(self) -> None:
        """Skip the waiting requests whose results would be published past the TTL: the request at backlog position i
        waits for the batch generating, those queued and the i // max_batch before its own, then its own."""
        if not self.config.ttl_s or not len(self.backlog):
            return
        ahead, batch_s, size = self._handoff.work.qsize() + 1, self._pace.batch_seconds, self.config.max_batch
        for work in self.backlog.expire(time.time(), self.config.ttl_s,
                                        lambda position: (ahead + position // size + 1) * batch_s):
            self._skip(work, "ttl")

    def _skip(self, work: Work, reason: SkipReason) -> None:
        """Finish a request without generating it: committable with its neighbours, counted by reason."""
        partition, epoch = work.record.partition, work.epoch
        self.offsets.dispatched(partition, epoch)
        self.offsets.finished(partition, work.record.offset, epoch)
        self.waiting -= 1
        if reason == "ttl":
            self._stats.skipped_ttl += 1
        elif reason == "backlog_full":
            self._stats.skipped_backlog += 1
        else:
            self._stats.skipped_duplicate += 1
        self._sensor.on_request_skipped(reason)

    def _dispatch_ready(self) -> None:
        """While the generation queue has room, hand it the backlog's first `max_batch` requests once that many wait
        or the oldest has waited `max_wait_ms` (formed as late as possible, so a batch follows the latest priorities)."""
        work_queue = self._handoff.work
        while len(self.backlog) and not work_queue.full():  # this thread is the queue's only producer
            oldest = self.backlog.oldest_arrival_s()
            waited = oldest is not None and time.monotonic() - oldest >= self.config.max_wait_ms / 1000
            if len(self.backlog) < self.config.max_batch and not waited:
                return
            batch = self.backlog.take(self.config.max_batch)
            for work in batch:
                self.offsets.dispatched(work.record.partition, work.epoch)
            work_queue.put_nowait(batch)

    def _update_pause(self) -> None:
        # Only a saturated backend pauses (it may stay so for minutes): a full generation queue does not, the backlog
        # takes the inflow and skips what ranks last.
        saturated = time.monotonic() < self._pace.saturated_until
        if saturated and not self.paused:
            assignment = self.consumer.assignment()
            if not assignment:
                return
            self.consumer.pause(assignment)
            self.paused = assignment
            self._stats.pauses["backend_saturated"] += 1
            self._sensor.on_paused()
            log.debug("paused %d partitions: backend saturated", len(assignment))
        elif not saturated and self.paused:
            owned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
            still_owned = [tp for tp in self.paused if (tp.topic, tp.partition) in owned]
            if still_owned:
                self.consumer.resume(still_owned)
            self.paused = []
            self._sensor.on_resumed()
            log.debug("resumed consumption")

    def apply_finished(self, wait_s: float = 0.0) -> None:
        """Mark the finished batches' offsets done (optionally waiting up to `wait_s` for the first one)."""
        finished = self._handoff.finished
        try:
            batch = finished.get(timeout=wait_s) if wait_s > 0 else finished.get_nowait()
        except queue.Empty:
            return
        while True:
            for work in batch:
                self.offsets.finished(work.record.partition, work.record.offset, work.epoch)
                if work.request_id is not None:
                    self.backlog.finished(work.request_id, work.generated)
            self.waiting -= len(batch)
            try:
                batch = finished.get_nowait()
            except queue.Empty:
                return

    def commit(self, partitions: list[int] | None = None) -> None:
        """Commit (synchronously) the committable offsets; a failed commit is retried with the next one."""
        offsets = self.offsets.to_commit(partitions)
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in offsets.items()], asynchronous=False)
        except KafkaException as exc:
            # Typically a rebalance in progress: the offsets stay committable and go with the next commit, or the new
            # owner of the partition consumes those requests again (at-least-once).
            log.warning("commit of %s failed: %s", offsets, exc.args[0].str() if exc.args else exc)
            return
        self._stats.commits += 1
        for partition, offset in offsets.items():
            self.offsets.mark_committed(partition, offset)
            self._sensor.on_committed(partition, offset)

    def drop_backlog(self) -> int:
        """Forget every waiting request, uncommitted (redelivered after a restart); how many there were."""
        left = self.backlog.remove(lambda _: True)
        self.waiting -= len(left)
        return len(left)

    def _report_offsets(self) -> None:
        """Consumer lag, committed and end offsets per owned partition. The end offset is the high watermark of the last
        fetch (cached; Tansu answers ListOffsets wrongly); lag = end - committed offset (the group's unfinished work)."""
        unknown = [p for p in self.offsets.partitions() if self.offsets.committed(p) is None]
        if unknown:
            self._load_committed(unknown)
        for partition in self.offsets.partitions():
            watermarks = self.consumer.get_watermark_offsets(TopicPartition(self.topic, partition), cached=True)
            if not watermarks or watermarks[1] < 0:
                continue
            self._sensor.on_partition_offsets(partition, watermarks[1], self.offsets.committed(partition))

    def _load_committed(self, partitions: list[int]) -> None:
        """The group's committed offsets for newly owned partitions (a partition never committed counts from 0)."""
        try:
            found = self.consumer.committed([TopicPartition(self.topic, p) for p in partitions], timeout=2.0)
        except KafkaException as exc:
            log.debug("committed offsets not available yet: %s", exc)
            return
        for tp in found:
            self.offsets.mark_committed(tp.partition, max(tp.offset, 0))

    # ---- rebalances (called by the consumer inside consume()) --------------------------------------------------------

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.offsets.start(tp.partition, self._ownership.grant(tp.partition))
        consumer.assign(partitions)  # eager assignment: consumer_config keeps librdkafka's default strategies
        # librdkafka keeps a partition's pause flag across assignments: start every new assignment unpaused (the loop
        # pauses it again if the pool is still saturated).
        if partitions:
            consumer.resume(partitions)
        self.paused = []
        self._sensor.on_resumed()
        log.info("assigned %s[%s]", self.topic, ",".join(str(tp.partition) for tp in partitions))
        if partitions:
            self._assigned.set()

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = [tp.partition for tp in partitions]
        self._drop_collected(revoked)
        deadline = time.monotonic() + (0.0 if self.stopping else self.config.revoke_grace_s)
        while self.offsets.in_flight(revoked) and time.monotonic() < deadline:
            self.apply_finished(wait_s=0.1)
        self.commit(revoked)
        unfinished = self.offsets.in_flight(revoked)
        if unfinished:
            log.warning("revoked %s[%s] with %d requests still in flight: they stay uncommitted here and go to the new "
                        "owner", self.topic, ",".join(map(str, revoked)), unfinished)
        self._forget(revoked)

    def on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = [tp.partition for tp in partitions]
        log.warning("lost %s[%s] (session timed out): forgetting them without a commit", self.topic, ",".join(map(str, lost)))
        self._drop_collected(lost)
        self._forget(lost)

    def _drop_collected(self, partitions: list[int]) -> None:
        """Forget the waiting requests of these partitions, uncommitted: their new owner consumes them again."""
        self.waiting -= len(self.backlog.remove(lambda work: work.record.partition in partitions))

    def _forget(self, partitions: list[int]) -> None:
        # The dispatched requests of these partitions leave the queue depth when their batches come back.
        paused = [tp for tp in self.paused if tp.partition in partitions]
        if paused:
            try:
                self.consumer.resume(paused)  # while still assigned: a pause flag left behind would outlive the assignment
            except KafkaException as exc:
                log.debug("resuming %s on revoke: %s", paused, exc)  # lost partitions: on_assign clears the flag
        for partition in partitions:
            self._ownership.revoke(partition)
            self.offsets.forget(partition)
        self._sensor.on_partitions_forgotten(partitions)
        self.paused = [tp for tp in self.paused if tp.partition not in partitions]
