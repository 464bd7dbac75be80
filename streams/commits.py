"""Faust's Kafka transport with its commit rule made exact: a partition's commit advances only over a gap-free run of
acknowledged offsets that starts AT its committed offset.

Why: faust-streaming (0.15.3, `Consumer._new_offset`) lets the run start one past the committed offset, so a record
that never reached the stream at exactly that offset is committed unprocessed. That happens around a rebalance: a
restarted worker rejoins with a new generation, and records fetched under the old one are discarded on their way to
the stream after the fetch position moved past them; when the first record after the committed offset is one of
them, Faust committed past it and it was lost (1 record in 3,000, in ~2 of 70 kill -9 restarts under load). Faust
allows the off-by-one on purpose: right after a seek it cannot tell a dropped record from an offset that holds none (a
transaction marker, a compacted record), and it would otherwise wait forever for the latter.

With the exact rule, both show up as a commit standing still behind processed records, which `streams.stalls`
notices; the worker then reads the records between the committed offset and the next acknowledged one from the broker
itself, processes them, and `acknowledge`s that range (`streams.repair`): dropped records are processed, offsets holding
none are passed. A transactional upstream therefore costs the stall guard's patience once after a restart that lands
on a marker, instead of a lost record. (The worker never seeks Faust's consumer for this: records of a fetch already
in Faust's hands at the moment of a seek are still delivered afterwards, and make Faust report a gap, see below.)

Faust's gaps are not trusted either. Faust reports the offsets between two records it delivered in turn as holding no
record (`_add_gap`), and its own rule counts them as acknowledged. But Faust itself seeks its consumer back to the
committed offset after a rebalance, and a record of a fetch made before that seek, delivered after it, reports
everything between the committed offset and itself as a gap although those offsets hold records: dropped ones, or ones
delivered before the seek and discarded with the old generation. Counted as acknowledged, they were committed
unprocessed (65 and 49 of 3,000 records in two CI runs of the kill -9 test, 27 in 1 of 2 runs here, 2026-12-05). Here a
gap is only a range to verify: `take_gaps` hands it to the worker, which reads it from the broker at its next lag report
and processes and acknowledges what it finds, exactly like a stalled commit's range, but without waiting for the stall
guard's patience, so a transactional upstream's markers between records cost one read of a few offsets each, not a
stall.
"""

from __future__ import annotations

import asyncio

import faust
from faust.transport.drivers import aiokafka as faust_kafka
from faust.types import TP
from faust.utils.functional import consecutive_numbers


class ExactCommitConsumer(faust_kafka.Consumer):
    """Faust's aiokafka consumer, committing only acknowledged offsets contiguous with the committed one."""

    def _new_offset(self, tp: TP) -> int | None:
        acked = self._acked[tp]
        if not acked:
            return None
        acked.sort()
        # The committed offset is the next one to process (None: the group never committed past offset 0).
        if acked[0] > (self._committed_offset[tp] or 0):
            return None
        run = next(consecutive_numbers(acked))
        acked[: len(run)] = []
        self._acked_index[tp].difference_update(run)
        return run[-1] + 1

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        # Called with the offsets between two records delivered in turn (`offset_to` is the later record), which Faust
        # believes hold none. Kept to verify (`take_gaps`), never counted as acknowledged. Right after Faust's seek to
        # the committed offset, its last read offset IS the committed one although that record was never delivered:
        # the range to verify starts there.
        committed = self._committed_offset[tp]
        start = offset_from
        if committed is not None:
            start = committed if offset_from == committed + 1 else max(offset_from, committed)
        if start < offset_to:
            gaps = self._gap[tp]
            gaps.addi(start, offset_to)
            gaps.merge_overlaps()
            await asyncio.sleep(0)  # as Faust's own: a long run of gaps yields to the event loop

    def take_gaps(self) -> dict[TP, list[tuple[int, int]]]:
        """The ranges `[start, end)` Faust reported as holding no record since the last call, above each partition's
        committed offset, in order; forgotten here. The caller verifies them (`acknowledge` what it processed, or
        `return_gap` a range it could not read)."""
        taken: dict[TP, list[tuple[int, int]]] = {}
        for tp, gaps in self._gap.items():
            committed = self._committed_offset.get(tp) or 0
            ranges = [(max(i.begin, committed), i.end) for i in sorted(gaps) if i.end > committed]
            gaps.clear()
            if ranges:
                taken[tp] = ranges
        return taken

    def return_gap(self, tp: TP, start: int, end: int) -> None:
        """A range from `take_gaps` that could not be verified this time: the next `take_gaps` hands it out again."""
        self._gap[tp].addi(start, end)
        self._gap[tp].merge_overlaps()

    def first_acknowledged_after(self, tp: TP, offset: int) -> int | None:
        """The lowest offset of `tp` above `offset` acknowledged but not committed yet, None if there is none."""
        return min((acked for acked in self._acked[tp] if acked > offset), default=None)

    def acknowledge(self, tp: TP, start: int, end: int) -> None:
        """Offsets `start` to `end - 1` of `tp` are done (processed, or holding no record), though never delivered
        to the stream: the next commit may pass them."""
        committed = self._committed_offset[tp] or 0
        index = self._acked_index[tp]
        fresh = [offset for offset in range(max(start, committed), end) if offset not in index]
        index.update(fresh)
        self._acked[tp].extend(fresh)


class ExactCommitTransport(faust_kafka.Transport):
    """Faust's aiokafka transport with `ExactCommitConsumer`."""

    Consumer = ExactCommitConsumer


class ExactCommitApp(faust.App):
    """A `faust.App` whose consumer is an `ExactCommitConsumer`."""

    def _new_transport(self) -> ExactCommitTransport:
        return ExactCommitTransport(self.conf.broker_consumer, self)

    @property
    def exact_consumer(self) -> ExactCommitConsumer:
        """`consumer`, typed as the transport makes it. Built on first access: read it once the worker runs, on its loop."""
        consumer = self.consumer
        assert isinstance(consumer, ExactCommitConsumer)
        return consumer
