"""`StallGuard`: which partitions the worker consumes again, and when."""

from __future__ import annotations

from llmcf.dead_letters import SourceRecord
from streams.stalls import StallGuard

P0 = ("interactions", 0)
P1 = ("interactions", 1)


def records(topic: str, partition: int, offsets: range | list[int]) -> list[SourceRecord]:
    return [SourceRecord(value=b"{}", key=b"u", topic=topic, partition=partition, offset=o) for o in offsets]


def test_a_commit_stuck_behind_processed_records_is_rewound_once_patience_runs_out() -> None:
    guard = StallGuard(patience_s=30)
    guard.processed(records("interactions", 0, range(150, 1034)))
    assert guard.stalled({P0: 100}, [P0], now=0) == {}
    assert guard.stalled({P0: 100}, [P0], now=29) == {}
    assert guard.stalled({P0: 100}, [P0], now=30) == {P0: 100}
    # Watched afresh: nothing more until a record after the rewind is processed and the commit still stands still.
    assert guard.stalled({P0: 100}, [P0], now=100) == {}
    guard.processed(records("interactions", 0, [100]))
    assert guard.stalled({P0: 100}, [P0], now=101) == {}
    assert guard.stalled({P0: 100}, [P0], now=131) == {P0: 100}


def test_a_moving_commit_or_a_caught_up_partition_is_never_rewound() -> None:
    guard = StallGuard(patience_s=30)
    guard.processed(records("interactions", 0, range(100)))
    for now in range(0, 300, 5):
        # P0: everything processed is committed (offset 100 is the next record to read); P1: the commit follows.
        guard.processed(records("interactions", 1, [10 + now]))
        assert guard.stalled({P0: 100, P1: 11 + now}, [P0, P1], now=now) == {}


def test_the_clock_restarts_when_the_commit_moves() -> None:
    guard = StallGuard(patience_s=30)
    guard.processed(records("items", 3, [500]))
    key = ("items", 3)
    assert guard.stalled({key: 100}, [key], now=0) == {}
    assert guard.stalled({key: 200}, [key], now=25) == {}
    assert guard.stalled({key: 200}, [key], now=50) == {}
    assert guard.stalled({key: 200}, [key], now=55) == {key: 200}


def test_a_partition_never_committed_is_rewound_to_the_start_and_unassigned_ones_are_ignored() -> None:
    guard = StallGuard(patience_s=30)
    guard.processed(records("interactions", 0, [40]) + records("interactions", 1, [40]))
    assert guard.stalled({}, [P0], now=0) == {}
    assert guard.stalled({}, [P0], now=30) == {P0: 0}
