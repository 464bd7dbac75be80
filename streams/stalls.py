"""Stalled partitions: notice a partition whose committed offset stands still behind records already processed.

Why: faust-streaming can drop records fetched while a rebalance changes the consumer generation (a restarted worker
joins an existing group with a new generation, and records fetched under the old one are discarded on their way to
the stream) after the fetch position has moved past them. Faust commits only a gap-free run of acknowledged offsets,
so the partition's committed offset then stays at the first dropped record for good, while later records are still
processed: the dropped ones would wait for the next restart, and the lag never drains (Faust's own rule even committed
past one dropped record at the committed offset; `streams.commits` makes it exact). Seen after a kill -9 and restart
of a worker (tests/streams/test_worker_process.py); see faust-streaming issues #216, #221, #312.

`StallGuard` notices this from outside Faust's bookkeeping. A partition is stalled once its committed offset has not
moved for `patience_s` although either
- a completed batch processed a record at or after it (a completed batch is acknowledged, and Faust commits
  acknowledged offsets every second), or
- records at or after it exist (its end offset, as last fetched, is past it) while its agent had no batch in hand for
  that whole time: the dropped records were the partition's last ones, and nothing later will arrive to show it.
The worker then repairs it (`streams.repair`): it reads the records from the committed offset up to the next
acknowledged one (or the partition's end) from the broker itself, processes them like any batch (the processors are
idempotent, so a record processed twice changes nothing), and acknowledges that range, offsets without records
(transaction markers, compacted records, which the exact commit rule of `streams.commits` waits on) included. Ranges
Faust itself reports as holding no record are verified the same way, at the next lag report, without this patience
(`streams.commits`).
"""

from __future__ import annotations

from collections import Counter
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
    """Remembers what completed batches processed, which agents have a batch in hand and since when they are idle, and
    how long each partition's committed offset has stood still."""

    def __init__(self, patience_s: float = STALL_PATIENCE_S):
        self.patience_s = patience_s
        self._processed_through: dict[Partition, int] = {}
        self._watches: dict[Partition, _Watch] = {}
        self._in_hand: Counter[str] = Counter()
        self._last_busy: dict[str, float] = {}

    def taken(self, topic: str) -> None:
        """A batch of `topic` is in hand until `processed` is called for it."""
        self._in_hand[topic] += 1

    def processed(self, topic: str, records: Iterable[SourceRecord], now: float) -> None:
        """One batch of `topic` taken earlier is processed (batches of a topic complete in the order taken)."""
        through = self._processed_through
        for r in records:
            key = (r.topic, r.partition)
            if r.offset > through.get(key, -1):
                through[key] = r.offset
        self._in_hand[topic] -= 1
        self._last_busy[topic] = now

    def stalled(self, committed: Mapping[Partition, int], ends: Mapping[Partition, int | None], now: float
                ) -> dict[Partition, int]:
        """Of the assigned partitions (the keys of `ends`: their end offsets as last fetched, None before the first
        fetch), those to repair, each with its committed offset (0 where the group never committed one). A repaired
        partition is watched afresh."""
        stalled: dict[Partition, int] = {}
        for key, end in ends.items():
            offset = committed.get(key, 0)
            processed_past = self._processed_through.get(key, -1) >= offset
            if not processed_past and (end is None or end <= offset):
                self._watches.pop(key, None)
                continue
            watch = self._watches.get(key)
            if watch is None or watch.committed != offset:
                self._watches[key] = _Watch(offset, now)
                continue
            if now - watch.since < self.patience_s:
                continue
            topic = key[0]
            idle = self._in_hand[topic] == 0 and now - self._last_busy.get(topic, float("-inf")) >= self.patience_s
            if processed_past or idle:
                stalled[key] = offset
                del self._watches[key]
                self._processed_through[key] = offset - 1
        return stalled
