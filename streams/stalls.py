"""Stalled partitions: notice a partition whose committed offset stands still behind records already processed.

Why: faust-streaming can drop records fetched while a rebalance changes the consumer generation (a restarted worker
joins an existing group with a new generation, and records fetched under the old one are discarded on their way to
the stream) after the fetch position has moved past them. Faust commits only a gap-free run of acknowledged offsets,
so the partition's committed offset then stays at the first dropped record for good, while later records are still
processed: the dropped ones would wait for the next restart, and the lag never drains. Seen after a kill -9 and
restart of a worker (tests/streams/test_worker_process.py); see faust-streaming issues #216, #221, #312.

`StallGuard` notices this from outside Faust's bookkeeping: a partition whose committed offset has not moved for
`patience_s` although a completed batch processed a record at or after it (a completed batch is acknowledged, and
Faust commits acknowledged offsets every second). The worker then seeks the partition back to its committed offset, so
every record after it is consumed again; the processors are idempotent, so a record processed twice changes nothing.
A rewind that raced with an in-flight fetch simply shows up as stalled again. Records dropped at the very end of a
partition are noticed once a later record there is processed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from llmcf.dead_letters import SourceRecord

Partition = tuple[str, int]

STALL_PATIENCE_S = 30.0


@dataclass(frozen=True)
class _Watch:
    committed: int
    since: float


class StallGuard:
    """Remembers what completed batches processed and how long each partition's committed offset has stood still."""

    def __init__(self, patience_s: float = STALL_PATIENCE_S):
        self.patience_s = patience_s
        self._processed_through: dict[Partition, int] = {}
        self._watches: dict[Partition, _Watch] = {}

    def processed(self, records: Iterable[SourceRecord]) -> None:
        """Record a completed batch."""
        through = self._processed_through
        for r in records:
            key = (r.topic, r.partition)
            if r.offset > through.get(key, -1):
                through[key] = r.offset

    def stalled(self, committed: Mapping[Partition, int], assigned: Iterable[Partition], now: float) -> dict[Partition, int]:
        """The assigned partitions to rewind, each with its committed offset (0 where the group never committed one).
        A rewound partition is watched afresh: it can stall again only once a record after the rewind is processed."""
        rewind: dict[Partition, int] = {}
        for key in assigned:
            offset = committed.get(key, 0)
            if self._processed_through.get(key, -1) < offset:
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
