"""History merging: idempotent, order-independent, truncated to the last N, and readable before each interaction."""

from __future__ import annotations

from streams.history import HistoryItem, before, from_stored, latest, merge, to_stored


def item(ts: int, n: int) -> HistoryItem:
    return HistoryItem(ts, f"x{n}", f"i{n}", n % 2)


def test_redelivered_interactions_appear_once() -> None:
    history = merge([], [item(1, 1), item(2, 2)])
    assert merge(history, [item(2, 2), item(1, 1)]) == history


def test_merge_orders_by_event_time_whatever_the_arrival_order() -> None:
    assert merge([item(5, 5)], [item(3, 3), item(9, 9)]) == [item(3, 3), item(5, 5), item(9, 9)]
    assert merge(merge([], [item(9, 9)]), [item(3, 3)]) == merge(merge([], [item(3, 3)]), [item(9, 9)])


def test_latest_keeps_the_last_n_and_an_old_redelivery_stays_out() -> None:
    kept = latest(merge([], [item(t, t) for t in range(30)]), 20)
    assert [h.ts_ms for h in kept] == list(range(10, 30))
    assert latest(merge(kept, [item(0, 0)]), 20) == kept


def test_before_is_the_history_strictly_earlier_than_the_interaction() -> None:
    history = merge([], [item(t, t) for t in range(10)])
    assert before(history, item(5, 5), 3) == [item(2, 2), item(3, 3), item(4, 4)]
    assert before(history, item(0, 0), 3) == []


def test_stored_form_round_trips_through_json_values() -> None:
    history = [item(1, 1), item(2, 2)]
    assert from_stored(to_stored(history)) == history
    assert from_stored(None) == []
