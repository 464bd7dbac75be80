"""`StallGuard`: which partitions the worker consumes again, and when."""

from __future__ import annotations

from llmcf.dead_letters import SourceRecord
from streams.stalls import StallGuard

P0 = ("interactions", 0)
P1 = ("interactions", 1)


def records(topic: str, partition: int, offsets: range | list[int]) -> list[SourceRecord]:
    return [SourceRecord(value=b"{}", key=b"u", topic=topic, partition=partition, offset=o) for o in offsets]


def test_a_commit_stuck_behind_later_records_is_rewound_once_patience_runs_out() -> None:
    guard = StallGuard(patience_s=30)
    batch = records("interactions", 0, range(150, 1034))
    guard.taken(batch)
    guard.processed(batch)
    ends = {P0: 1034}
    assert guard.stalled({P0: 100}, ends, now=0) == {}
    assert guard.stalled({P0: 100}, ends, now=29) == {}
    assert guard.stalled({P0: 100}, ends, now=30) == {P0: 100}
    # Watched afresh: the clock starts again, and it fires again only if the commit still does not move.
    assert guard.stalled({P0: 100}, ends, now=35) == {}
    assert guard.stalled({P0: 101}, ends, now=40) == {}
    assert guard.stalled({P0: 101}, ends, now=70) == {P0: 101}


def test_a_stall_is_seen_from_processed_records_before_any_end_offset_is_known() -> None:
    guard = StallGuard(patience_s=30)
    batch = records("interactions", 0, [120])
    guard.taken(batch)
    guard.processed(batch)
    assert guard.stalled({P0: 100}, {P0: None}, now=0) == {}
    assert guard.stalled({P0: 100}, {P0: None}, now=30) == {P0: 100}


def test_a_moving_commit_or_a_caught_up_partition_is_never_rewound() -> None:
    guard = StallGuard(patience_s=30)
    for now in range(0, 300, 5):
        # P0: everything there is was committed (offset 100 is the next record to read); P1: the commit moves on.
        assert guard.stalled({P0: 100, P1: 10 + now}, {P0: 100, P1: 500}, now=now) == {}


def test_a_partition_held_by_a_batch_in_hand_is_not_stalled_however_long_the_batch_takes() -> None:
    guard = StallGuard(patience_s=30)
    slow = records("interactions", 1, range(10, 20)) + records("interactions", 0, [5])
    guard.taken(slow)
    for now in range(0, 120, 5):
        assert guard.stalled({P0: 5, P1: 10}, {P0: 6, P1: 20}, now=now) == {}
    guard.processed(slow)
    # Processed but never committed from here on: patience counts from the end of the batch.
    assert guard.stalled({P0: 5, P1: 10}, {P0: 6, P1: 20}, now=120) == {}
    assert guard.stalled({P0: 5, P1: 10}, {P0: 6, P1: 20}, now=150) == {P0: 5, P1: 10}


def test_a_partition_never_committed_is_rewound_to_the_start_and_unassigned_ones_are_ignored() -> None:
    guard = StallGuard(patience_s=30)
    batch = records("interactions", 0, [40]) + records("interactions", 1, [40])
    guard.taken(batch)
    guard.processed(batch)
    assert guard.stalled({}, {P0: None}, now=0) == {}
    assert guard.stalled({}, {P0: None}, now=30) == {P0: 0}
