"""Users' recent histories: the last N interactions per user, merged idempotently.

A history is a list of `HistoryItem`s ordered by (ts, interaction id). Merging is a set union by interaction id followed
by keeping the last N in that order, so it is idempotent (a re-delivered interaction changes nothing), commutative
(batches may be merged in any order) and needs no per-event table write: a batch merges all of a user's new
interactions at once and stores the result once.

The stored form (`to_stored`/`from_stored`) is a compact JSON list of lists, which is what the Faust table's changelog
carries.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import NamedTuple, Protocol


class HistoryItem(NamedTuple):
    """One past interaction of a user: enough to rebuild the sample's history (item and label) and to order it."""

    ts_ms: int
    interaction_id: str
    item_id: str
    label: int

    @property
    def order(self) -> tuple[int, str]:
        return (self.ts_ms, self.interaction_id)


def merge(history: Sequence[HistoryItem], new: Iterable[HistoryItem]) -> list[HistoryItem]:
    """`history` and `new`, without repeated interaction ids, in (ts, id) order: untruncated, so the history before
    each new interaction can still be read from it; `latest()` truncates it for storage."""
    by_id = {item.interaction_id: item for item in history}
    for item in new:
        by_id.setdefault(item.interaction_id, item)
    return sorted(by_id.values())


def latest(history: Sequence[HistoryItem], length: int) -> list[HistoryItem]:
    """The last `length` items of an ordered history: what the table keeps."""
    return list(history[-length:])


def before(history: Sequence[HistoryItem], item: HistoryItem, length: int) -> list[HistoryItem]:
    """The last `length` items strictly before `item` in an ordered history: the sample's history when it happened."""
    end = bisect_left(history, item.order, key=lambda h: h.order)
    return list(history[max(0, end - length) : end])


StoredItem = list[int | str]
"""A history item as the table's changelog carries it (JSON): [ts in ms, interaction id, item id, label]."""


def to_stored(history: Sequence[HistoryItem]) -> list[StoredItem]:
    return [list(item) for item in history]


def from_stored(stored: Sequence[Sequence[int | str]] | None) -> list[HistoryItem]:
    return [HistoryItem(int(ts), str(iid), str(item), int(label)) for ts, iid, item, label in stored or ()]


class HistoryStore(Protocol):
    """Where users' histories live between batches: the worker's changelog-backed Faust table, or a dict in tests."""

    def get(self, user_id: str) -> list[HistoryItem]:
        """The user's stored history, oldest first (empty for a new user)."""

    def put(self, user_id: str, history: list[HistoryItem], partition: int) -> None:
        """Replace the user's history; `partition` is the source partition of the user's interactions (user-keyed,
        so the table's changelog partition matches the topic's and a restart recovers it with the partition)."""

