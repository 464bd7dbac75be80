"""The generator pool's backlog: the CoT requests consumed and waiting for a batch, in priority order, bounded.

Why a backlog rather than Kafka's own order: the stream asks for more chains of thought than a CPU pool writes (issue
14: ~10x at the demo's rates), so the pool cannot generate everything, and what it generates should be what the ranker
gains most from. Consuming at the inflow's pace into a bounded, ordered backlog decides that, where pausing the
consumer would leave the choice to Kafka (oldest first, a few partitions per resume) and the lag to grow without bound.

Order (`priority`): records that do not decode first (the generation thread dead-letters them at no cost), then
cold-start requests (new items, which have no collaborative signal yet), then the newest event time (fresh samples
are what the ranker retrieves); the arrival order breaks ties.

Every request offered ends in exactly one of: taken for a batch (`take`), or skipped with a reason, never generated:
- `backlog_full`: the backlog holds `capacity` requests and this one ranks last (the newcomer or the one it displaced);
- `duplicate`: a request with the same request_id is waiting, in a batch, or was generated recently (the last
  `remember` ids taken and generated);
- `ttl`: `expire` found that it would be published later than the TTL after its request, given its position and the
  pool's recent batch time.
Skipped requests stay retrievable downstream as pending samples; the pool counts them by reason and commits them.
One thread uses a backlog (the pool's polling thread).
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from llmcf.events import CotRequest

T = TypeVar("T")
SkipReason = Literal["backlog_full", "duplicate", "ttl"]

_UNDECODABLE, _COLD_START, _SAMPLED = 0, 1, 2


def priority(request: CotRequest | None) -> tuple[int, float]:
    """Sort key of a request (smaller is generated first): undecodable, then cold-start, then newest event time."""
    if request is None:
        return (_UNDECODABLE, 0.0)
    return (_COLD_START if request.reason == "cold_start" else _SAMPLED, -request.ts.timestamp())


@dataclass(frozen=True)
class _Entry(Generic[T]):
    item: T
    request_id: str | None
    requested_at_s: float | None  # epoch seconds; None for an undecodable record (never expires: it is dead-lettered)
    arrived_s: float  # monotonic


class Backlog(Generic[T]):
    """Requests waiting for generation, in `priority` order, at most `capacity` of them. See the module docstring."""

    def __init__(self, capacity: int, remember: int = 10_000):
        if capacity < 1:
            raise ValueError("the backlog's capacity must be at least 1")
        self.capacity = capacity
        self._remember = remember
        self._entries: list[tuple[tuple[int, float], int, _Entry[T]]] = []  # sorted; the int breaks ties by arrival
        self._arrivals = itertools.count()
        self._waiting_ids: set[str] = set()
        self._taken_ids: set[str] = set()
        self._generated_ids: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def offer(self, item: T, request: CotRequest | None, now_s: float) -> list[tuple[T, SkipReason]]:
        """Add a request (None: a record that did not decode); returns what this skips: the newcomer itself (a
        duplicate, or last in a full backlog) or the waiting request it displaced."""
        request_id = request.request_id if request is not None else None
        if request_id is not None and (
            request_id in self._waiting_ids or request_id in self._taken_ids or request_id in self._generated_ids
        ):
            return [(item, "duplicate")]
        requested_at_s = request.requested_at.timestamp() if request is not None else None
        entry = (priority(request), next(self._arrivals), _Entry(item, request_id, requested_at_s, now_s))
        if len(self._entries) >= self.capacity:
            if entry[:2] > self._entries[-1][:2]:
                return [(item, "backlog_full")]
            displaced = self._entries.pop()[2]
            self._forget_waiting(displaced)
            bisect.insort(self._entries, entry)
            self._note_waiting(entry[2])
            return [(displaced.item, "backlog_full")]
        bisect.insort(self._entries, entry)
        self._note_waiting(entry[2])
        return []

    def take(self, count: int) -> list[T]:
        """The `count` first requests in priority order, removed from the backlog; each is in flight until `finished`."""
        taken, self._entries = self._entries[:count], self._entries[count:]
        for _, _, entry in taken:
            self._forget_waiting(entry)
            if entry.request_id is not None:
                self._taken_ids.add(entry.request_id)
        return [entry.item for _, _, entry in taken]

    def finished(self, request_id: str, generated: bool) -> None:
        """A taken request is done: a generated one is remembered (a later copy is a duplicate), others are not."""
        self._taken_ids.discard(request_id)
        if generated:
            self._generated_ids[request_id] = None
            self._generated_ids.move_to_end(request_id)
            while len(self._generated_ids) > self._remember:
                self._generated_ids.popitem(last=False)

    def expire(self, now_epoch_s: float, ttl_s: float, publish_after_s: Callable[[int], float]) -> list[T]:
        """Remove the requests that would be published more than `ttl_s` after their request: the one at position i
        (0 = next) is expected `publish_after_s(i)` seconds from now."""
        kept, expired = [], []
        for position, entry in enumerate(self._entries):
            waiting = entry[2]
            if waiting.requested_at_s is not None and (
                now_epoch_s - waiting.requested_at_s + publish_after_s(position) > ttl_s
            ):
                expired.append(waiting)
            else:
                kept.append(entry)
        if expired:
            self._entries = kept
            for waiting in expired:
                self._forget_waiting(waiting)
        return [waiting.item for waiting in expired]

    def remove(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove (without a reason: the caller leaves them uncommitted) the waiting requests matching `predicate`."""
        removed = [entry for entry in self._entries if predicate(entry[2].item)]
        if removed:
            self._entries = [entry for entry in self._entries if not predicate(entry[2].item)]
            for _, _, waiting in removed:
                self._forget_waiting(waiting)
        return [waiting.item for _, _, waiting in removed]

    def oldest_arrival_s(self) -> float | None:
        """When the longest-waiting request arrived (monotonic seconds), None when empty."""
        return min((entry[2].arrived_s for entry in self._entries), default=None)

    def _note_waiting(self, entry: _Entry[T]) -> None:
        if entry.request_id is not None:
            self._waiting_ids.add(entry.request_id)

    def _forget_waiting(self, entry: _Entry[T]) -> None:
        if entry.request_id is not None:
            self._waiting_ids.discard(entry.request_id)
