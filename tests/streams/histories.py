"""A `HistoryStore` in a dict: the users' histories of the processor tests, instead of the worker's Faust table."""

from __future__ import annotations

from streams.history import HistoryItem


class MemoryHistories:
    """A `streams.history.HistoryStore` in a dict."""

    def __init__(self) -> None:
        self.data: dict[str, list[HistoryItem]] = {}

    def get(self, user_id: str) -> list[HistoryItem]:
        return list(self.data.get(user_id, ()))

    def put(self, user_id: str, history: list[HistoryItem], partition: int) -> None:
        self.data[user_id] = list(history)
