"""Decoding `interactions` records straight into storage rows: the first step of the worker's hot path.

`llmcf.events.decode` builds a pydantic model per record, ~15 us with its timestamp validator, and the worker then
reads a handful of fields out of it. `decode_interactions` parses each record with orjson and accepts it at once when
every field has exactly the contract's type and bounds, which is what well-behaved producers send. Any record it does
not accept outright goes to `llmcf.events.decode`, whose verdict stands: pydantic alone decides what is invalid and
words the dead letter, and decides which lenient forms it accepts (`"schema_version": 1.0`). The fast path can
therefore only be narrower than the contract, never wider; tests/streams/test_decoding.py compares both on edge cases
and on generated records, so a change to the contract that the fast path does not follow fails there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from datetime import datetime
from hashlib import sha256
from typing import NamedTuple, get_args

import orjson

from llmcf.dead_letters import SourceRecord
from llmcf.events import DeadLetterReason, EventError, InteractionEvent, InteractionKind, decode, epoch_ms
from storage.rows import InteractionRow

_KINDS = frozenset(get_args(InteractionKind))
_ID_MAX = 128


class Received(NamedTuple):
    """A valid interaction with the record it came from (for a later `processing_failed` dead letter)."""

    record: SourceRecord
    row: InteractionRow


def decode_interactions(
    records: Iterable[SourceRecord], policy: Callable[[SourceRecord, DeadLetterReason, str], object]
) -> list[Received]:
    """The valid interactions among `records`, in order; every invalid record is handed to `policy` (a
    `DeadLetterPolicy`) with the reason and message `llmcf.events.decode` gives."""
    received = []
    for record in records:
        row = fast_row(record.value)
        if row is None:
            try:
                row = InteractionRow.from_event(decode(InteractionEvent, record.value))
            except EventError as exc:
                policy(record, exc.reason, str(exc))
                continue
        received.append(Received(record, row))
    return received


def fast_row(raw: bytes | None) -> InteractionRow | None:
    """The row of a record whose every field is exactly of the contract's type and within its bounds; None when the
    record needs the full validator's judgement (it may still be valid)."""
    if raw is None:
        return None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(data) is not dict:
        return None
    get = data.get
    user_id, item_id, kind, label, ts_text = get("user_id"), get("item_id"), get("kind"), get("label"), get("ts")
    if type(user_id) is not str or type(item_id) is not str or type(ts_text) is not str or type(label) is not int:
        return None
    if type(kind) is not str:  # before `kind in _KINDS`, which raises TypeError for a list or an object
        return None
    if not (0 < len(user_id) <= _ID_MAX and 0 < len(item_id) <= _ID_MAX and kind in _KINDS and label in (0, 1)):
        return None
    schema_version = get("schema_version", 1)
    if type(schema_version) is not int or schema_version != 1:
        return None
    value = get("value")
    if value is not None:
        if type(value) is int:
            value = float(value)
        elif type(value) is not float or not math.isfinite(value):
            return None
    event_id = get("event_id")
    if event_id is not None and (type(event_id) is not str or not 0 < len(event_id) <= _ID_MAX):
        return None
    try:
        ts = datetime.fromisoformat(ts_text)
    except ValueError:
        return None
    if ts.tzinfo is None:  # fromisoformat gives a fixed offset or none
        return None
    version = epoch_ms(ts)
    # `InteractionEvent.interaction_id`, i.e. deterministic_id("interaction", user_id, item_id, kind, version), spelt out.
    interaction_id = event_id or sha256(f"interaction\x1f{user_id}\x1f{item_id}\x1f{kind}\x1f{version}".encode()).hexdigest()[:32]
    return InteractionRow(interaction_id, user_id, item_id, kind, label, value, ts, version)
