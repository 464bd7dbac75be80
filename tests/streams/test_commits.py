"""`ExactCommitConsumer`: which offset a partition's commit may advance to, given what the stream acknowledged."""

from __future__ import annotations

import asyncio

import pytest
from faust.transport.drivers import aiokafka as faust_kafka
from faust.types import TP

from streams.commits import ExactCommitApp, ExactCommitConsumer

TP0 = TP("interactions", 0)


@pytest.fixture
def consumer() -> ExactCommitConsumer:
    app = ExactCommitApp("test-commits", broker="kafka://127.0.0.1:1", autodiscover=False)
    assert isinstance(app.consumer, ExactCommitConsumer)
    return app.consumer


def acknowledge(consumer: faust_kafka.Consumer, *offsets: int) -> None:
    consumer._acked[TP0].extend(offsets)
    consumer._acked_index[TP0].update(offsets)


def test_a_record_missing_at_the_committed_offset_holds_the_commit(consumer: ExactCommitConsumer) -> None:
    consumer._committed_offset[TP0] = 10
    acknowledge(consumer, 11, 12)
    assert consumer._new_offset(TP0) is None
    acknowledge(consumer, 10)
    assert consumer._new_offset(TP0) == 13


def test_faust_s_own_rule_commits_past_it(consumer: ExactCommitConsumer) -> None:
    # The reason for ExactCommitConsumer: if this starts failing, faust-streaming fixed its rule upstream.
    consumer._committed_offset[TP0] = 10
    acknowledge(consumer, 11, 12)
    assert faust_kafka.Consumer._new_offset(consumer, TP0) == 13


def test_the_commit_advances_over_the_first_contiguous_run_only(consumer: ExactCommitConsumer) -> None:
    consumer._committed_offset[TP0] = 10
    acknowledge(consumer, 10, 11, 12, 14, 15)
    assert consumer._new_offset(TP0) == 13
    consumer._committed_offset[TP0] = 13
    assert consumer._new_offset(TP0) is None
    acknowledge(consumer, 13)
    assert consumer._new_offset(TP0) == 16


def test_a_group_that_never_committed_starts_at_offset_zero(consumer: ExactCommitConsumer) -> None:
    acknowledge(consumer, 1, 2)
    assert consumer._new_offset(TP0) is None
    acknowledge(consumer, 0)
    assert consumer._new_offset(TP0) == 3


def test_offsets_faust_reports_without_records_are_verified_before_they_are_committed(
        consumer: ExactCommitConsumer) -> None:
    consumer._committed_offset[TP0] = 10
    acknowledge(consumer, 10)
    asyncio.run(consumer._add_gap(TP0, 11, 13))  # records 10 and 13 delivered in turn: Faust believes 11-12 hold none
    acknowledge(consumer, 13)
    assert consumer._new_offset(TP0) == 11, "a reported gap is not acknowledged by itself"
    consumer._committed_offset[TP0] = 11
    assert consumer.take_gaps() == {TP0: [(11, 13)]}
    assert consumer.take_gaps() == {}, "a gap is handed out once"
    consumer.acknowledge(TP0, 11, 13)  # the worker read them from the broker (and processed what it found)
    assert consumer._new_offset(TP0) == 14


def test_a_gap_right_after_faust_s_seek_to_the_committed_offset_includes_that_offset(
        consumer: ExactCommitConsumer) -> None:
    # Faust's seek sets its read offset to the committed one (10) without delivering record 10; a record of an older
    # fetch (25) then reports 11-24 as a gap, although 10-24 may all hold records that were never processed.
    consumer._committed_offset[TP0] = 10
    asyncio.run(consumer._add_gap(TP0, 11, 25))
    acknowledge(consumer, 25)
    assert consumer._new_offset(TP0) is None
    assert consumer.take_gaps() == {TP0: [(10, 25)]}


def test_a_marker_right_at_the_committed_offset_is_a_gap_too(consumer: ExactCommitConsumer) -> None:
    # Record 9 was committed (commit 10); offset 10 is a transaction marker, so the next record fetched is 11.
    consumer._committed_offset[TP0] = 10
    asyncio.run(consumer._add_gap(TP0, 10, 11))
    acknowledge(consumer, 11)
    assert consumer.take_gaps() == {TP0: [(10, 11)]}
    consumer.acknowledge(TP0, 10, 11)
    assert consumer._new_offset(TP0) == 12


def test_gaps_below_the_committed_offset_are_not_handed_out(consumer: ExactCommitConsumer) -> None:
    consumer._committed_offset[TP0] = 3
    asyncio.run(consumer._add_gap(TP0, 5, 9))
    consumer._committed_offset[TP0] = 7  # committed meanwhile, e.g. the records were delivered after all
    assert consumer.take_gaps() == {TP0: [(7, 9)]}
    asyncio.run(consumer._add_gap(TP0, 8, 9))
    consumer._committed_offset[TP0] = 9
    assert consumer.take_gaps() == {}


def test_a_marker_at_the_committed_offset_after_a_restart_holds_the_commit_until_acknowledged(
        consumer: ExactCommitConsumer) -> None:
    # A restarted consumer's first fetch starts past the marker at 10: Faust sees no gap, only a missing offset, which
    # could as well be a dropped record. The worker asked the broker (nothing at 10) and acknowledged it.
    consumer._committed_offset[TP0] = 10
    acknowledge(consumer, 11, 12)
    assert consumer._new_offset(TP0) is None
    consumer.acknowledge(TP0, 10, 11)
    assert consumer._new_offset(TP0) == 13


def test_a_repaired_range_is_committed_even_with_nothing_acknowledged_after_it(consumer: ExactCommitConsumer) -> None:
    # The dropped records were the partition's last: the worker read and processed offsets 10-14 itself.
    consumer._committed_offset[TP0] = 10
    assert consumer.first_acknowledged_after(TP0, 10) is None
    consumer.acknowledge(TP0, 10, 15)
    assert consumer._new_offset(TP0) == 15


def test_a_repair_fills_the_hole_up_to_the_first_acknowledged_offset(consumer: ExactCommitConsumer) -> None:
    consumer._committed_offset[TP0] = 10
    acknowledge(consumer, 13, 14, 20)
    assert consumer.first_acknowledged_after(TP0, 10) == 13
    consumer.acknowledge(TP0, 10, 13)
    consumer.acknowledge(TP0, 12, 14)  # overlapping what the stream acknowledged changes nothing
    assert consumer._new_offset(TP0) == 15
    assert consumer._acked[TP0] == [20]


def test_the_faust_internals_it_overrides_and_reads_still_exist(consumer: ExactCommitConsumer) -> None:
    # streams/commits.py replaces two private methods and reads four private attributes of faust-streaming 0.15's
    # consumer (the dependency is pinned below 0.16): if an upgrade renames one, this fails before any data is lost.
    import inspect

    from faust.transport.consumer import Consumer as FaustConsumer

    for name in ("_acked", "_acked_index", "_gap", "_committed_offset"):
        assert hasattr(consumer, name), name
    assert inspect.signature(FaustConsumer._new_offset).parameters.keys() == {"self", "tp"}
    assert list(inspect.signature(FaustConsumer._add_gap).parameters) == ["self", "tp", "offset_from", "offset_to"]
    assert "self._add_gap(tp, r_offset + 1, offset)" in inspect.getsource(FaustConsumer._drain_messages)
    assert "self._gap.pop(tp, None)" in inspect.getsource(FaustConsumer.on_partitions_revoked)
