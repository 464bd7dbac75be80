"""The worker's interactions decoding: whatever the record, the same verdict as the contract's validator
(`llmcf.events.decode`), the same row when valid, the same dead-letter reason and message when not."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcf.dead_letters import SourceRecord
from llmcf.events import EventError, InteractionEvent, decode
from storage.rows import InteractionRow
from streams.decoding import decode_interactions, fast_row

GOOD = {"user_id": "196", "item_id": "242", "kind": "rating", "label": 1, "value": 3.0, "ts": "1997-12-04T15:55:49Z"}


def verdict_of_the_validator(raw: bytes | None) -> InteractionRow | tuple[str, str]:
    try:
        return InteractionRow.from_event(decode(InteractionEvent, raw))
    except EventError as exc:
        return (exc.reason, str(exc))


def verdict_of_the_worker(raw: bytes | None) -> InteractionRow | tuple[str, str]:
    letters = []
    record = SourceRecord(value=raw, key=b"196", topic="interactions", partition=0, offset=7)
    received = decode_interactions([record], lambda rec, reason, error: letters.append((rec, reason, error)))
    if received:
        assert letters == [] and len(received) == 1 and received[0].record is record
        return received[0].row
    [(rec, reason, error)] = letters
    assert rec is record
    return (reason, error)


def same_verdict(raw: bytes | None) -> InteractionRow | tuple[str, str]:
    expected = verdict_of_the_validator(raw)
    got = verdict_of_the_worker(raw)
    assert got == expected
    if isinstance(expected, InteractionRow):  # equal values of the same types (5 == 5.0, but the row holds a float)
        assert [type(v) for v in got] == [type(v) for v in expected]
        assert got.ts.utcoffset() == expected.ts.utcoffset()
    return got


def raw(**changes: object) -> bytes:
    record = {**GOOD, **changes}
    return json.dumps({k: v for k, v in record.items() if v is not ...}).encode()


def test_a_well_formed_record_is_decoded_by_the_fast_path_into_the_validators_row() -> None:
    for record in (raw(), raw(value=5), raw(value=..., event_id="e-1"), raw(schema_version=1, extra={"x": [1]}),
                   raw(ts="2024-05-01T14:00:00.123456+02:00", label=0)):
        assert fast_row(record) is not None
        row = same_verdict(record)
        assert row.interaction_id == decode(InteractionEvent, record).interaction_id
        assert row.version == int(decode(InteractionEvent, record).ts.timestamp() * 1000)


@pytest.mark.parametrize("record", [
    raw(label=True), raw(label=1.0), raw(schema_version=1.0), raw(schema_version=True), raw(value=True),
    raw(value="3"), raw(label="1"), raw(label=2), raw(user_id=""), raw(user_id="u" * 129), raw(item_id=7),
    raw(kind="purchase"), raw(kind=["rating"]), raw(kind={"rating": 1}), raw(ts="2024-05-01T12:00:00"),
    raw(ts="yesterday"), raw(ts=1714564800), raw(event_id=""),
    raw(event_id=None), raw(value=None), raw(schema_version=2), raw(schema_version=None), raw(user_id=...),
    raw(ts=...), b'{"label": 0, "label": 1, "user_id": "u", "item_id": "i", "kind": "view", "ts": "2024-05-01T12:00:00Z"}',
    b'{"user_id": "u\\ud800", "item_id": "i", "kind": "view", "label": 1, "ts": "2024-05-01T12:00:00Z"}',
    b'{"user_id": "\\u00e9t\\u00e9", "item_id": "i", "kind": "view", "label": 1, "ts": "2024-05-01T12:00:00Z"}',
    b'{"value": 1e400, "user_id": "u", "item_id": "i", "kind": "view", "label": 1, "ts": "2024-05-01T12:00:00Z"}',
    b"[1, 2]", b"not json", b"", b"\xff\xfe", None,
])
def test_unusual_and_invalid_records_get_the_validators_verdict(record: bytes | None) -> None:
    same_verdict(record)


def test_a_batch_keeps_the_valid_records_in_order_and_dead_letters_the_others() -> None:
    records = [SourceRecord(value=v, key=None, topic="interactions", partition=1, offset=n)
               for n, v in enumerate([raw(), b"{", raw(item_id="i2", schema_version=1.0), raw(kind="nope")])]
    letters = []
    received = decode_interactions(records, lambda rec, reason, error: letters.append((rec.offset, reason)))
    assert fast_row(records[2].value) is None  # valid, but only the full validator accepts 1.0 for 1
    assert [(r.record.offset, r.row.item_id, r.row.label) for r in received] == [(0, "242", 1), (2, "i2", 1)]
    assert letters == [(1, "undecodable"), (3, "invalid")]


FIELD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=3), st.sampled_from(["rating", "view", "x" * 128, "x" * 129, "2024-05-01T12:00:00Z",
                                          "2024-05-01T12:00:00+05:30", "2024-05-01T12:00:00", "2024-13-01T00:00:00Z"]),
    st.just(["rating"]), st.just({"rating": 1}), st.just(...),
)


@settings(max_examples=400, deadline=None)
@given(st.fixed_dictionaries({name: FIELD_VALUES for name in (*GOOD, "event_id", "schema_version")}))
def test_any_mix_of_field_values_gets_the_validators_verdict(changes: dict[str, object]) -> None:
    same_verdict(raw(**changes))


def test_the_row_keeps_the_time_zone_it_was_given() -> None:
    row = same_verdict(raw(ts="2024-05-01T14:00:00+02:00"))
    assert row.ts == datetime(2024, 5, 1, 12, tzinfo=timezone.utc) and row.ts.utcoffset().total_seconds() == 7200
