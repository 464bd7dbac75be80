"""Stalled partitions: notice a partition whose committed offset stopped behind records already processed.

Why: faust-streaming can drop records fetched while a rebalance changes the consumer generation (a restarted worker
joins an existing group with a new generation, and records fetched under the old one are discarded on their way to
the stream) after the fetch position has moved past them. Faust commits only a gap-free run of acknowledged offsets,
so the partition's committed offset then stays at the first dropped record for good, while later records are still
processed: the dropped ones would wait for the next restart, and the lag never drains. Seen after a kill -9 and
restart of a worker (tests/streams/test_worker_process.py); see faust-streaming issues #216, #221, #312.

`StallGuard` notices this from outside Faust's bookkeeping: a partition whose committed offset has not moved for
`patience_s` although records at or after it exist (its end offset is past it, or a completed batch processed one)
and no batch in hand holds any of its records. The worker then seeks the partition back to its committed offset, so
every record after it is consumed again; the processors are idempotent, so a record processed twice changes nothing.
A rewind that raced with an in-flight fetch simply shows up as stalled again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llmcf.dead_letters import SourceRecord

Partition = tuple[str, int]

STALL_PATIENCE_S = 30.0


@dataclass(frozen=True)
class _Watch:
    committed: int
    since: float


class StallGuard:
    """Remembers which partitions the batches in hand hold, what completed batches processed, and how long each
    partition's committed offset has stood still."""

    def __init__(self, patience_s: float = STALL_PATIENCE_S):
        self.patience_s = patience_s
        self._in_hand: Counter[Partition] = Counter()
        self._processed_through: dict[Partition, int] = {}
        self._watches: dict[Partition, _Watch] = {}

    def taken(self, records: Sequence[SourceRecord]) -> None:
        """A batch is in hand: its partitions are not stalled, whatever their commit, until `processed(records)`."""
        self._in_hand.update({(r.topic, r.partition) for r in records})

    def processed(self, records: Sequence[SourceRecord]) -> None:
        """The batch taken with `taken(records)` is processed."""
        through = self._processed_through
        for r in records:
            key = (r.topic, r.partition)
            if r.offset > through.get(key, -1):
                through[key] = r.offset
        self._in_hand.subtract({(r.topic, r.partition) for r in records})
        self._in_hand += Counter()  # drops partitions no batch holds any more

    def stalled(self, committed: Mapping[Partition, int], ends: Mapping[Partition, int | None], now: float
                ) -> dict[Partition, int]:
        """Of the assigned partitions (the keys of `ends`, their end offsets as last fetched, None if unknown), those
        to rewind, each with its committed offset (0 where the group never committed one). A rewound partition is
        watched afresh."""
        rewind: dict[Partition, int] = {}
        for key, end in ends.items():
            offset = committed.get(key, 0)
            behind = (end or 0) > offset or self._processed_through.get(key, -1) >= offset
            if not behind or key in self._in_hand:
                self._watches.pop(key, None)
                continue
            watch = self._watches.get(key)
            if watch is None or watch.committed != offset:
                self._watches[key] = _Watch(offset, now)
            elif now - watch.since >= self.patience_s:
                rewind[key] = offset
                del self._watches[key]
                self._processed_through[key] = offset - 1
        return rewind
