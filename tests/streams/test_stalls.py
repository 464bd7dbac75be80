"""`StallGuard`: which partitions the worker repairs, and when."""

from __future__ import annotations

from llmcf.dead_letters import SourceRecord
from streams.stalls import StallGuard

P0 = ("interactions", 0)
P1 = ("interactions", 1)


def records(topic: str, partition: int, offsets: range | list[int]) -> list[SourceRecord]:
    return [SourceRecord(value=b"{}", key=b"u", topic=topic, partition=partition, offset=o) for o in offsets]


def process(guard: StallGuard, batch: list[SourceRecord], now: float) -> None:
    guard.taken(batch[0].topic)
    guard.processed(batch[0].topic, batch, now)


def test_a_commit_stuck_behind_processed_records_is_repaired_once_patience_runs_out() -> None:
    guard = StallGuard(patience_s=30)
    process(guard, records("interactions", 0, range(150, 1034)), now=0)
    ends = {P0: 1034}
    assert guard.stalled({P0: 100}, ends, now=0) == {}
    assert guard.stalled({P0: 100}, ends, now=29) == {}
    assert guard.stalled({P0: 100}, ends, now=30) == {P0: 100}
    # Watched afresh: the clock starts again and fires again only if the commit still stands still.
    assert guard.stalled({P0: 100}, ends, now=35) == {}
    assert guard.stalled({P0: 100}, ends, now=64) == {}
    assert guard.stalled({P0: 100}, ends, now=65) == {P0: 100}


def test_the_last_records_of_a_partition_dropped_are_repaired_once_its_agent_stays_idle() -> None:
    guard = StallGuard(patience_s=30)
    process(guard, records("interactions", 1, range(0, 500)), now=0)
    ends = {P0: 750, P1: 500}
    # P0's records after 100 never arrived; the agent went idle at t=0.
    assert guard.stalled({P0: 100, P1: 500}, ends, now=5) == {}
    assert guard.stalled({P0: 100, P1: 500}, ends, now=34) == {}
    assert guard.stalled({P0: 100, P1: 500}, ends, now=35) == {P0: 100}


def test_records_waiting_while_the_agent_has_a_batch_in_hand_are_not_a_stall() -> None:
    guard = StallGuard(patience_s=30)
    guard.taken("interactions")  # e.g. waiting for items the catalogue does not know yet
    ends = {P0: 750, P1: 500}
    for now in range(0, 120, 5):
        assert guard.stalled({P0: 100, P1: 0}, ends, now=now) == {}
    guard.processed("interactions", records("interactions", 0, range(100, 200)), now=120)
    # Done at t=120, committed (offset 200 is next): P1 waits behind no batch, its clock runs from the end of the batch.
    assert guard.stalled({P0: 200, P1: 0}, ends, now=125) == {}
    assert guard.stalled({P0: 200, P1: 0}, ends, now=149) == {}
    assert guard.stalled({P0: 200, P1: 0}, ends, now=150) == {P1: 0}


def test_a_moving_commit_or_a_caught_up_partition_is_never_repaired() -> None:
    guard = StallGuard(patience_s=30)
    process(guard, records("interactions", 0, range(100)), now=0)
    for now in range(0, 300, 5):
        # P0: everything there is was processed and committed (100 is the next offset); P1: the commit follows.
        process(guard, records("interactions", 1, [10 + now]), now=now)
        assert guard.stalled({P0: 100, P1: 11 + now}, {P0: 100, P1: 11 + now}, now=now) == {}
    assert guard.stalled({P0: 100}, {P0: None}, now=1000) == {}


def test_the_clock_restarts_when_the_commit_moves() -> None:
    guard = StallGuard(patience_s=30)
    process(guard, records("items", 3, [500]), now=0)
    key = ("items", 3)
    assert guard.stalled({key: 100}, {key: 501}, now=0) == {}
    assert guard.stalled({key: 200}, {key: 501}, now=25) == {}
    assert guard.stalled({key: 200}, {key: 501}, now=50) == {}
    assert guard.stalled({key: 200}, {key: 501}, now=55) == {key: 200}


def test_a_partition_never_committed_is_repaired_from_the_start_and_unassigned_ones_are_ignored() -> None:
    guard = StallGuard(patience_s=30)
    process(guard, records("interactions", 0, [40]) + records("interactions", 1, [40]), now=0)
    assert guard.stalled({}, {P0: None}, now=0) == {}
    assert guard.stalled({}, {P0: None}, now=30) == {P0: 0}
