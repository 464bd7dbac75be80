"""The shared error policy of the batch processors (`streams.batch`): data refused record by record and dead-lettered,
transient faults retried in place, and a bug (`TypeError`) raised so that the batch fails instead of dead-lettering
every record."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest

from llmcf.dead_letters import DeadLetterPolicy, DeadLetterSink, SourceRecord
from llmcf.events import CotResult, DeadLetter
from streams.batch import Writer
from streams.results import ResultBatchProcessor

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


class Letters(DeadLetterSink):
    """The dead letters sent, in memory."""

    def __init__(self) -> None:
        self.sent: list[DeadLetter] = []
        self.flushes = 0

    def send(self, letter: DeadLetter) -> None:
        self.sent.append(letter)

    def flush(self, timeout_s: float = 30.0) -> None:
        self.flushes += 1


def record(offset: int, value: bytes = b"{}") -> SourceRecord:
    return SourceRecord(value=value, key=b"k", topic="cot-results", partition=0, offset=offset)


def writing(letters: Letters) -> tuple[Writer, ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(1)
    return Writer(executor, DeadLetterPolicy(letters, "test")), executor


def test_data_refused_is_written_record_by_record_and_only_the_refused_records_are_dead_lettered() -> None:
    letters = Letters()
    writer, executor = writing(letters)
    calls: list[list[int]] = []

    def write(batch: Sequence[SourceRecord]) -> None:
        calls.append([r.offset for r in batch])
        if any(r.offset == 1 for r in batch):
            raise ValueError("offset 1 is refused")

    try:
        written = asyncio.run(writer.each_good("store", [record(0), record(1), record(2)], write, lambda r: r))
    finally:
        executor.shutdown()
    assert [r.offset for r in written] == [0, 2]
    assert calls == [[0, 1, 2], [0], [1], [2]]
    assert [(letter.offset, letter.reason) for letter in letters.sent] == [(1, "processing_failed")]
    assert "store: ValueError: offset 1 is refused" in letters.sent[0].error


def test_a_transient_fault_is_retried_until_the_write_succeeds() -> None:
    letters = Letters()
    writer, executor = writing(letters)
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(len(attempts))
        if len(attempts) < 3:
            raise ConnectionError("database restarting")
        return "done"

    try:
        assert asyncio.run(writer.call("store", flaky)) == "done"
    finally:
        executor.shutdown()
    assert len(attempts) == 3 and letters.sent == []


def test_a_type_error_is_a_bug_raised_at_once_never_retried_nor_dead_lettered() -> None:
    letters = Letters()
    writer, executor = writing(letters)
    calls: list[int] = []

    def buggy(batch: Sequence[SourceRecord]) -> None:
        calls.append(len(batch))
        raise TypeError("unsupported operand type(s)")

    try:
        with pytest.raises(TypeError, match="unsupported operand"):
            asyncio.run(writer.each_good("store", [record(0), record(1)], buggy, lambda r: r))
    finally:
        executor.shutdown()
    assert calls == [2] and letters.sent == []


class BuggyRepository:
    """A repository whose write has a bug."""

    def complete_cot_samples(self, results: Sequence[CotResult]) -> int:
        raise TypeError("'NoneType' object is not subscriptable")


class Index:
    def __init__(self) -> None:
        self.payloads: list[dict] = []

    def set_payload(self, updates: dict) -> None:
        self.payloads.append(updates)


def test_a_type_error_from_a_processor_bug_fails_the_batch_instead_of_dead_lettering_it() -> None:
    letters = Letters()
    writer, executor = writing(letters)
    index = Index()
    processor = ResultBatchProcessor("cot-results", BuggyRepository(), index, writer)
    result = CotResult(
        request_id="r1", user_id="u1", item_id="i1", label=1, ts=T0, cot_text="because", cot_embedding=[0.5] * 4,
        backend="template", model="t", generated_at=T0,
    )
    try:
        with pytest.raises(TypeError, match="not subscriptable"):
            asyncio.run(processor.process([record(0, result.to_bytes()), record(1, b"not json")]))
    finally:
        executor.shutdown()
    # Only the record that does not decode is dead-lettered: the valid one is neither stored nor blamed.
    assert [(letter.offset, letter.reason) for letter in letters.sent] == [(1, "undecodable")]
    assert index.payloads == [] and letters.flushes == 0
