"""The in-Python halves of the portable write statements: collapsing a batch per key, users from interactions, and
IN lists in chunks."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from storage.rows import PendingSampleRow
from storage.statements import in_chunks, latest_per_key, users_of

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def test_latest_per_key_keeps_the_highest_version_and_the_first_on_ties_in_key_order() -> None:
    rows = [
        {"id": "b", "version": 1, "n": 1},
        {"id": "a", "version": 2, "n": 2},
        {"id": "b", "version": 3, "n": 3},
        {"id": "a", "version": 2, "n": 4},
        {"id": "b", "version": 2, "n": 5},
    ]
    assert [row["n"] for row in latest_per_key(rows, key="id")] == [2, 3]


def test_latest_per_key_reads_the_version_from_the_named_field() -> None:
    rows = [{"id": "a", "at": T0 + timedelta(seconds=1), "n": 1}, {"id": "a", "at": T0, "n": 2}]
    assert [row["n"] for row in latest_per_key(rows, key="id", version="at")] == [1]


def test_users_of_spans_each_users_interactions_in_user_order() -> None:
    def row(user: str, seconds: int, version: int) -> dict[str, object]:
        return {"user_id": user, "ts": T0 + timedelta(seconds=seconds), "version": version}

    users = users_of([row("u2", 5, 50), row("u1", 9, 10), row("u2", 1, 70), row("u2", 3, 30)])
    assert users == [
        {"user_id": "u1", "first_seen_at": T0 + timedelta(seconds=9), "last_seen_at": T0 + timedelta(seconds=9),
         "interactions": 0, "version": 10},
        {"user_id": "u2", "first_seen_at": T0 + timedelta(seconds=1), "last_seen_at": T0 + timedelta(seconds=5),
         "interactions": 0, "version": 70},
    ]


def test_in_chunks_covers_every_value_once_in_order() -> None:
    values = [str(i) for i in range(1_203)]
    chunks = list(in_chunks(values, size=500))
    assert [len(chunk) for chunk in chunks] == [500, 500, 203]
    assert [v for chunk in chunks for v in chunk] == values
    assert list(in_chunks([])) == []


def test_a_pending_samples_history_is_stored_as_item_and_label_objects() -> None:
    row = PendingSampleRow("r1", "u1", "i9", 1, T0, [("i1", 0), ("i2", 1)], "sampled", 0)
    assert row.history_json() == [{"item_id": "i1", "label": 0}, {"item_id": "i2", "label": 1}]
