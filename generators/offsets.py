"""Which offsets a pool member may commit, and which partitions it owns: `OffsetTracker` (per partition, the first
offset still unfinished) and `Ownership` (partition -> assignment epoch, so work of a revoked partition is recognised)."""

from __future__ import annotations

import threading
from collections import deque


class Ownership:
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

    def owns(self, partition: int, epoch: int) -> bool:
        """Whether `partition` is still owned under the `epoch` a record of it was consumed in."""
        return self.epoch(partition) == epoch


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
