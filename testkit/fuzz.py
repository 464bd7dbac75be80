"""Fuzzed `items` and `interactions` records for a running `llmcf worker`, and the oracle that checks what it did with them.

A hypothesis strategy draws `Spec`s: a valid event (ids, unicode text, extreme but valid timestamps, unknown fields)
plus at most one mutation (wrong types, missing fields, bad timestamps, over-long and huge strings, empty ids, non-JSON
bytes, non-UTF-8, lone surrogates, truncation, tombstones, NUL characters PostgreSQL cannot store, an item that never
arrives). `materialize()` turns a list of specs into `Case`s under a namespace of their own (every id starts with it),
each knowing by construction what the worker must do with it: store it, or dead-letter it with a given reason (or both:
an interaction on an item that never arrives is stored, and its CoT decision dead-lettered). `publish()` sends them and
records each one's partition and offset; `check()` asserts, once the worker has committed everything, that each bad
record has exactly one dead letter (topic, partition, offset, reason, bytes) and each good one is stored exactly once,
field for field, with the CoT samples its decision function calls for.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from confluent_kafka import Producer
from hypothesis import strategies as st
from sqlalchemy import select

from llmcf.cot_policy import CotPolicy, cot_request_id
from llmcf.events import DeadLetter, decode, deterministic_id, epoch_ms
from llmcf.kafka import producer_config, read_to_end
from llmcf.settings import Settings
from llmcf.topics import Topics
from storage.models import CotSample, Interaction, Item
from storage.repository import Repository
from streams.app import app_id
from testkit.kafka import partitions_behind
from testkit.processes import LlmcfProcess, wait_while_running

STORED = "stored"
STORED_AND_DEAD_LETTERED = "stored, decision dead-lettered"  # an interaction whose item never arrives
BASE_CREATED_AT = datetime(2024, 1, 1, tzinfo=timezone.utc)
KINDS = ("impression", "view", "click", "like", "share", "comment", "rating", "skip")

# Text a platform may send: any code point JSON can carry except NUL, which gets its own mutation (PostgreSQL refuses it).
_text_chars = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
_timezones = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda minutes: timezone(timedelta(minutes=minutes)))
# Valid RFC 3339 timestamps, far past to far future; the first and last years are left out because an offset can push
# them outside what Python's datetime holds once converted to UTC.
_timestamps = st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=_timezones)


def rfc3339(moment: datetime, zulu: bool) -> str:
    text = moment.isoformat()
    return text.replace("+00:00", "Z") if zulu else text


@dataclass(frozen=True)
class Spec:
    """One drawn record before it is given a namespace: a valid event's fields, a mutation and how it is sent."""

    topic: str
    fields: dict[str, Any]
    mutation: str
    argument: Any = None
    key_mode: str = "id"
    ascii_json: bool = True
    unknown_fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Case:
    """A record to publish and what the worker must do with it. `expect` is STORED, STORED_AND_DEAD_LETTERED or the
    dead-letter reason; `event` is the stored content for stored cases; partition and offset are set by `publish`."""

    topic: str
    key: bytes | None
    value: bytes | None
    expect: str
    mutation: str
    event: dict[str, Any] | None = None
    partition: int = -1
    offset: int = -1

    @property
    def stored(self) -> bool:
        return self.expect in (STORED, STORED_AND_DEAD_LETTERED)

    @property
    def dead_letter_reason(self) -> str | None:
        if self.expect == STORED:
            return None
        return "processing_failed" if self.expect == STORED_AND_DEAD_LETTERED else self.expect


_WRONG_VALUES = st.sampled_from([42, -1, 3.5, [], ["x"], {}, {"v": 1}, None])
_BAD_TIMESTAMPS = st.sampled_from([
    1714564800, 1714564800.5, "2024-05-01T12:00:00", "2024-05-01", "yesterday", "2020", "", "2024-13-01T00:00:00Z",
    "2024-02-30T00:00:00Z", "2024-05-01T25:00:00Z", "2024-05-01T12:00:00+25:00", "10000-01-01T00:00:00Z", None, [],
])
_WRONG_LABELS = st.sampled_from(["1", "0", 2, -1, None, [1], {"v": 1}, True, False, 1.0])
_WRONG_KINDS = st.sampled_from(["purchase", "", "CLICK", 1, None, ["click"]])
_WRONG_VALUE_FIELD = st.sampled_from(["4.5", "", [], {"v": 1}, "NaN", math.nan, math.inf, -math.inf])
_NON_OBJECTS = st.sampled_from([b"[]", b"[1, 2]", b"42", b'"a string"', b"null", b"true", b"1e999"])
_BYTE_LEVEL_ARGUMENTS = {"not_json": st.binary(max_size=64), "truncated": st.floats(0.0, 0.99), "non_object": _NON_OBJECTS}
# Mutations that set one field to the drawn argument: mutation -> field.
_FIELD_SET_TO_ARGUMENT = {
    "wrong_label": "label", "wrong_kind": "kind", "wrong_value": "value", "bad_ts": "ts", "schema_version": "schema_version",
    "bad_created_at": "created_at", "bad_updated_at": "updated_at", "item_id_not_string": "item_id",
}
_id_text = st.text(_text_chars, min_size=1, max_size=40)
_tags = st.lists(st.text(_text_chars, min_size=1, max_size=64), max_size=64)


@st.composite
def _unknown_fields(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(st.text(_text_chars, min_size=1, max_size=12), max_size=3, unique=True))
    values = st.one_of(st.none(), st.booleans(), st.integers(), st.text(_text_chars, max_size=20), st.lists(st.integers(), max_size=3))
    # A contract field name would not be unknown: give unknown fields a prefix no contract uses.
    return {f"x-{name}": draw(values) for name in names}


@st.composite
def interaction_specs(draw: st.DrawFn, base_items: list[str]) -> Spec:
    fields = {
        "user_id": draw(st.one_of(st.sampled_from(["u1", "u2", "u3"]), _id_text)),
        "item_id": draw(st.sampled_from(base_items)),
        "kind": draw(st.sampled_from(KINDS)),
        "label": draw(st.sampled_from([0, 1])),
        "ts": rfc3339(draw(_timestamps), draw(st.booleans())),
    }
    value = draw(st.one_of(
        st.none(), st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**53), 2**53),
    ))
    if value is not None:
        fields["value"] = value
    if draw(st.booleans()):
        fields["event_id"] = draw(_id_text)
    required = ["user_id", "item_id", "kind", "label", "ts"]
    mutation = draw(st.sampled_from([
        "none", "none", "none", "none", "duplicate", "huge_unknown_field", "missing", "wrong_type", "wrong_label",
        "wrong_kind", "wrong_value", "bad_ts", "empty_id", "long_id", "schema_version", "nul_user", "unknown_item",
        "not_json", "non_utf8", "lone_surrogate", "truncated", "empty_value", "tombstone", "non_object",
    ]))
    arguments = {
        "missing": st.sampled_from(required),
        "wrong_type": st.tuples(st.sampled_from(["user_id", "item_id", "event_id"]), _WRONG_VALUES),
        "wrong_label": _WRONG_LABELS,
        "wrong_kind": _WRONG_KINDS,
        "wrong_value": _WRONG_VALUE_FIELD,
        "bad_ts": _BAD_TIMESTAMPS,
        "empty_id": st.sampled_from(["user_id", "item_id", "event_id"]),
        "long_id": st.tuples(st.sampled_from(["user_id", "item_id", "event_id"]), st.integers(129, 200_000)),
        "huge_unknown_field": st.integers(10_000, 200_000),
        "schema_version": st.sampled_from([2, 0, "1", None]),
    }
    return _spec(draw, "interactions", fields, mutation, arguments, ["id", "id", "none", "binary", "empty"])


@st.composite
def item_specs(draw: st.DrawFn) -> Spec:
    created = draw(_timestamps)
    fields: dict[str, Any] = {
        "title": draw(st.one_of(st.text(_text_chars, min_size=1, max_size=60), st.just("T" * 512))),
        "tags": draw(_tags),
        "created_at": rfc3339(created, draw(st.booleans())),
    }
    text = draw(st.one_of(st.none(), st.text(_text_chars, max_size=200), st.just("d" * 8192)))
    if text is not None:
        fields["description" if draw(st.booleans()) else "text"] = text
    if draw(st.booleans()):
        fields["updated_at"] = rfc3339(draw(_timestamps), False)
    mutation = draw(st.sampled_from([
        "none", "none", "none", "update", "duplicate", "missing", "empty_title", "long_title", "long_text",
        "tags_not_list", "tag_not_string", "too_many_tags", "long_tag", "bad_created_at", "bad_updated_at",
        "item_id_not_string", "nul_title", "not_json", "non_utf8", "truncated", "empty_value", "tombstone",
        "non_object",
    ]))
    arguments = {
        "missing": st.sampled_from(["item_id", "title", "created_at"]),
        "long_title": st.integers(513, 100_000),
        "bad_created_at": _BAD_TIMESTAMPS,
        "bad_updated_at": _BAD_TIMESTAMPS.filter(lambda v: v is not None),  # null is a valid "no update"
        "item_id_not_string": _WRONG_VALUES,
    }
    return _spec(draw, "items", fields, mutation, arguments, ["id", "none", "binary"])


def _spec(draw: st.DrawFn, topic: str, fields: dict[str, Any], mutation: str,
          arguments: dict[str, st.SearchStrategy[Any]], key_modes: list[str]) -> Spec:
    """The record spec, with the mutation's argument (the topic's `arguments` or the byte-level ones every topic has),
    how the record is keyed, whether its JSON is ASCII-escaped, and unknown fields."""
    argument = {**arguments, **_BYTE_LEVEL_ARGUMENTS}.get(mutation)
    return Spec(
        topic, fields, mutation, draw(argument) if argument is not None else None,
        key_mode=draw(st.sampled_from(key_modes)), ascii_json=draw(st.booleans()), unknown_fields=draw(_unknown_fields()),
    )


def specs(base_items: list[str], min_size: int, max_size: int) -> st.SearchStrategy[list[Spec]]:
    """Lists of item and interaction specs, about two interactions to one item."""
    one = st.one_of(interaction_specs(base_items), interaction_specs(base_items), item_specs())
    return st.lists(one, min_size=min_size, max_size=max_size)


def _json(record: Any, ascii_json: bool) -> bytes:
    return json.dumps(record, ensure_ascii=ascii_json).encode()


def _key(spec: Spec, natural: str, index: int) -> bytes | None:
    return {"id": natural.encode(), "none": None, "binary": bytes([0xFF, 0xFE, index % 256, 0x00]), "empty": b""}[spec.key_mode]


def _raw_mutation(spec: Spec, good: bytes) -> tuple[bytes | None, str] | None:
    """The bytes and reason of the mutations that break the record itself rather than a field."""
    if spec.mutation == "not_json":
        return b"\xff" + spec.argument, "undecodable"  # 0xff never starts (or appears in) valid UTF-8
    if spec.mutation == "non_utf8":
        inside_a_string = good.index(b'": "') + len(b'": "')
        return good[:inside_a_string] + b"\xc3\x28" + good[inside_a_string:], "undecodable"  # an invalid UTF-8 pair
    if spec.mutation == "lone_surrogate":
        return good.replace(b'"user_id": "', b'"user_id": "\\ud800', 1), "undecodable"
    if spec.mutation == "truncated":
        return good[: int(len(good) * spec.argument)], "undecodable"
    if spec.mutation == "empty_value":
        return b"", "undecodable"
    if spec.mutation == "tombstone":
        return None, "undecodable"
    if spec.mutation == "non_object":
        # JSON `1e999` is a number too large for a float: jiter reads it as infinity, still not an object.
        return spec.argument, "invalid"
    return None


def materialize(specs_: list[Spec], namespace: str) -> list[Case]:
    """The cases of one example: every id is prefixed with `namespace`, and derived interaction ids are made unique
    where two different drawn events would collide (a collision of equal events is a deliberate duplicate)."""
    cases: list[Case] = []
    seen_interactions: dict[str, dict[str, Any]] = {}
    for index, spec in enumerate(specs_):
        fields = dict(spec.fields)
        if spec.topic == "interactions":
            fields["user_id"] = f"{namespace}{fields['user_id']}"
            if "event_id" in fields:
                fields["event_id"] = f"{namespace}{fields['event_id']}"
            content = _interaction_content(fields)
            interaction_id = _interaction_id(fields)
            if seen_interactions.get(interaction_id, content) != content:
                fields["event_id"] = f"{namespace}unique-{index}"
                content = _interaction_content(fields)
            natural = fields["user_id"]
        else:
            fields["item_id"] = f"{namespace}item-{index}"
            natural = fields["item_id"]
        cases.extend(_cases_of(spec, fields, natural, index, namespace))
        for case in cases[-2:]:
            if case.topic == "interactions" and case.stored:
                seen_interactions[_interaction_id(case.event)] = _interaction_content(case.event)
    return cases


def _interaction_content(fields: dict[str, Any]) -> tuple:
    return tuple(fields.get(name) for name in ("user_id", "item_id", "kind", "label", "value", "ts", "event_id"))


def _interaction_id(fields: dict[str, Any]) -> str:
    if fields.get("event_id"):
        return fields["event_id"]
    ts = datetime.fromisoformat(fields["ts"])
    return deterministic_id("interaction", fields["user_id"], fields["item_id"], fields["kind"], epoch_ms(ts))


def _cases_of(spec: Spec, fields: dict[str, Any], natural: str, index: int, namespace: str) -> list[Case]:
    key = _key(spec, natural, index)
    record = {**spec.unknown_fields, **fields}
    good = _json(record, spec.ascii_json)
    raw = _raw_mutation(spec, good)
    if raw is not None:
        value, reason = raw
        return [Case(spec.topic, key, value, reason, spec.mutation)]
    mutation, argument = spec.mutation, spec.argument
    if mutation in ("none", "duplicate"):
        case = Case(spec.topic, key, good, STORED, mutation, event=fields)
        return [case, Case(spec.topic, key, good, STORED, mutation, event=fields)] if mutation == "duplicate" else [case]
    if mutation == "huge_unknown_field":
        return [Case(spec.topic, key, _json({**record, "x-blob": "b" * argument}, spec.ascii_json), STORED, mutation,
                     event=fields)]
    if mutation == "nul_user":  # valid JSON, valid contract, refused by PostgreSQL's text type
        bad = {**record, "user_id": record["user_id"] + "\x00"}
        return [Case(spec.topic, key, _json(bad, spec.ascii_json), "processing_failed", mutation)]
    if mutation == "nul_title":
        bad = {**record, "title": record["title"][:-1] + "\x00"}
        return [Case(spec.topic, key, _json(bad, spec.ascii_json), "processing_failed", mutation)]
    if mutation == "unknown_item":
        changed = {**fields, "item_id": f"{namespace}never-published-{index}"}
        return [Case(spec.topic, key, _json({**record, **changed}, spec.ascii_json), STORED_AND_DEAD_LETTERED, mutation,
                     event=changed)]
    if mutation == "update":
        first = Case(spec.topic, key, good, STORED, mutation, event=fields)
        newest = max(datetime.fromisoformat(fields["created_at"]), datetime.fromisoformat(fields.get("updated_at") or
                                                                                           fields["created_at"]))
        updated = {**fields, "title": f"{fields['title'][:500]} (v2)", "updated_at": rfc3339(newest + timedelta(days=1), True)}
        first.event = updated  # the row must end up as the newer version, whatever order the two are consumed in
        return [first, Case(spec.topic, key, _json({**record, **updated}, spec.ascii_json), STORED, mutation, event=updated)]
    bad = dict(record)
    if mutation in _FIELD_SET_TO_ARGUMENT:
        bad[_FIELD_SET_TO_ARGUMENT[mutation]] = argument
    elif mutation == "missing":
        del bad[argument]
    elif mutation == "wrong_type":
        name, wrong = argument
        bad[name] = wrong
        if name == "event_id" and wrong is None:  # null is a valid "no event id"
            bad[name] = ["not", "an", "id"]
    elif mutation == "empty_id":
        bad[argument] = ""
    elif mutation == "long_id":
        name, length = argument
        bad[name] = "L" * length
    elif mutation == "empty_title":
        bad["title"] = ""
    elif mutation == "long_title":
        bad["title"] = "T" * argument
    elif mutation == "long_text":
        bad["text"] = "d" * 8193
        bad.pop("description", None)
    elif mutation == "tags_not_list":
        bad["tags"] = "drama"
    elif mutation == "tag_not_string":
        bad["tags"] = [*record["tags"][:3], 7]
    elif mutation == "too_many_tags":
        bad["tags"] = [f"t{i}" for i in range(65)]
    elif mutation == "long_tag":
        bad["tags"] = ["g" * 65]
    else:
        raise AssertionError(f"unknown mutation {mutation!r}")
    return [Case(spec.topic, key, _json(bad, spec.ascii_json), "invalid", mutation)]


def publish(settings: Settings, cases: list[Case]) -> None:
    """Publish every case to its topic and record where it landed."""
    topics = Topics.from_settings(settings)
    producer = Producer(producer_config(settings, settings.kafka_bootstrap_servers or ""))
    failures: list[str] = []

    def delivered(case: Case):
        def on_delivery(err, msg) -> None:
            if err is not None:
                failures.append(str(err))
            else:
                case.partition, case.offset = msg.partition(), msg.offset()
        return on_delivery

    for case in cases:
        producer.produce(getattr(topics, case.topic), key=case.key, value=case.value, on_delivery=delivered(case))
        producer.poll(0)
    assert producer.flush(60) == 0 and not failures, f"could not publish the fuzzed records: {failures[:3]}"


def dead_letters_by_source(settings: Settings) -> dict[tuple[str, int, int], list[DeadLetter]]:
    letters: dict[tuple[str, int, int], list[DeadLetter]] = defaultdict(list)
    topics = Topics.from_settings(settings)
    for message in read_to_end(settings, settings.kafka_bootstrap_servers or "", topics.dead_letters):
        letter = decode(DeadLetter, message.value())
        letters[(letter.topic, letter.partition, letter.offset)].append(letter)
    return letters


def check(settings: Settings, repository: Repository, cases: list[Case], namespace: str) -> Counter[str]:
    """Assert what the worker did with one example's cases (call once its group has committed them all); returns the
    number of dead letters per reason."""
    topics = Topics.from_settings(settings)
    letters = dead_letters_by_source(settings)
    reasons: Counter[str] = Counter()
    for case in cases:
        found = letters.get((getattr(topics, case.topic), case.partition, case.offset), [])
        expected = case.dead_letter_reason
        where = f"{case.topic}[{case.partition}]@{case.offset} ({case.mutation}: {case.value[:120] if case.value else case.value!r})"
        if expected is None:
            assert not found, f"{where} is valid but was dead-lettered: {[(x.reason, x.error) for x in found]}"
            continue
        assert len(found) == 1, f"{where}: expected one {expected} dead letter, found {[(x.reason, x.error) for x in found]}"
        letter = found[0]
        assert letter.reason == expected, f"{where}: dead-lettered as {letter.reason} ({letter.error}), expected {expected}"
        assert letter.error, f"{where}: dead letter without a message"
        assert letter.original_bytes() == (case.value or b""), f"{where}: the dead letter does not hold the record's bytes"
        reasons[expected] += 1
    _check_items(repository, [c for c in cases if c.topic == "items" and c.stored], namespace)
    _check_interactions(settings, repository, [c for c in cases if c.topic == "interactions" and c.stored], namespace)
    return reasons


def _utc(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text).astimezone(timezone.utc)


def _check_items(repository: Repository, stored: list[Case], namespace: str) -> None:
    table = Item.__table__
    with repository.engine.connect() as conn:
        rows = [r for r in conn.execute(select(table)).mappings() if r["item_id"].startswith(namespace)]
    assert len(rows) == len({r["item_id"] for r in rows})
    expected = {case.event["item_id"]: case.event for case in stored}
    assert {r["item_id"] for r in rows} == set(expected), "the stored items are not exactly the valid ones"
    for row in rows:
        event = expected[row["item_id"]]
        text = event.get("text", event.get("description", ""))
        assert (row["title"], row["text"], row["tags"]) == (event["title"], text, event["tags"]), row["item_id"]
        assert row["created_at"] == _utc(event["created_at"]) and row["updated_at"] == _utc(event.get("updated_at"))


def _check_interactions(settings: Settings, repository: Repository, stored: list[Case], namespace: str) -> None:
    interactions, samples = Interaction.__table__, CotSample.__table__
    with repository.engine.connect() as conn:
        rows = [r for r in conn.execute(select(interactions)).mappings() if r["user_id"].startswith(namespace)]
        sample_ids = [s for s, user in conn.execute(select(samples.c.sample_id, samples.c.user_id)) if user.startswith(namespace)]
    expected = {_interaction_id(case.event): case.event for case in stored}
    assert len(rows) == len({r["interaction_id"] for r in rows})
    assert {r["interaction_id"] for r in rows} == set(expected), "the stored interactions are not exactly the valid ones"
    for row in rows:
        event = expected[row["interaction_id"]]
        assert (row["user_id"], row["item_id"], row["kind"], row["label"], row["ts"]) == (
            event["user_id"], event["item_id"], event["kind"], event["label"], _utc(event["ts"])
        ), row["interaction_id"]
        value = event.get("value")
        assert row["value"] == (None if value is None else float(value)), row["interaction_id"]
    policy = CotPolicy.from_settings(settings)
    base_created_ms = epoch_ms(BASE_CREATED_AT)
    wanted = {
        cot_request_id(interaction_id)
        for interaction_id, event in expected.items()
        if not event["item_id"].startswith(namespace)  # items that never arrived get no decision
        and policy.reason(interaction_id, epoch_ms(datetime.fromisoformat(event["ts"])), base_created_ms) is not None
    }
    assert len(sample_ids) == len(set(sample_ids)) and set(sample_ids) == wanted, "CoT samples differ from the policy's"


def base_item_ids(count: int) -> list[str]:
    return [f"base-{i}" for i in range(count)]


def publish_base_catalogue(settings: Settings, count: int) -> None:
    """The catalogue the fuzzed interactions point at: publish it, then wait for the worker to embed it, before any
    fuzzing (an interaction on an item that is not known yet waits for it)."""
    producer = Producer(producer_config(settings, settings.kafka_bootstrap_servers or ""))
    for item_id in base_item_ids(count):
        record = {"item_id": item_id, "title": f"Base item {item_id}", "tags": ["base"],
                  "created_at": rfc3339(BASE_CREATED_AT, True)}
        producer.produce(Topics.from_settings(settings).items, key=item_id.encode(), value=json.dumps(record).encode())
    assert producer.flush(30) == 0


def wait_until_committed(settings: Settings, worker: LlmcfProcess, timeout_s: float) -> None:
    """Until the worker's group has committed every record of `items` and `interactions`: then every record's fate
    (stored, dead-lettered) is durable and no more dead letters can come for them."""
    topics = Topics.from_settings(settings)
    group = app_id(settings)
    wait_while_running(
        lambda: not partitions_behind(settings, group, topics.items) and not partitions_behind(settings, group, topics.interactions),
        [worker], timeout_s, "the worker to commit every fuzzed record", interval_s=1.0,
    )
