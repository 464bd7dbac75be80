"""The event contracts: good records round-trip, bad ones are rejected with a message that names the problem."""

import json
from datetime import datetime, timezone

import pytest

from llmcf.events import (
    CONTRACTS,
    CotRequest,
    CotResult,
    DeadLetter,
    EventError,
    InteractionEvent,
    ItemEvent,
    ItemSnapshot,
    decode,
    deterministic_id,
    point_id,
)

GOOD_INTERACTION = {"user_id": "u1", "item_id": "i1", "kind": "click", "label": 1, "ts": "2024-05-01T12:00:00Z"}
GOOD_ITEM = {"item_id": "i1", "title": "Cats", "text": "a cat video", "tags": ["pets"], "created_at": "2024-05-01T00:00:00Z"}


def _with(base: dict, **changes) -> bytes:
    record = {**base, **changes}
    return json.dumps({k: v for k, v in record.items() if v is not ...}).encode()


MALFORMED = [
    # (id, model, raw bytes, reason, text the message must contain)
    ("not-json", InteractionEvent, b"{user_id: u1", "undecodable", "not a JSON object"),
    ("not-utf8", InteractionEvent, b"\xff\xfe\x00garbage", "undecodable", "not a JSON object"),
    ("empty-bytes", InteractionEvent, b"", "undecodable", "not a JSON object"),
    ("tombstone", InteractionEvent, None, "undecodable", "no value"),
    ("json-array", InteractionEvent, b"[1, 2]", "invalid", "record: Input should be an object"),
    ("missing-user", InteractionEvent, _with(GOOD_INTERACTION, user_id=...), "invalid", "user_id: Field required"),
    ("int-user-id", InteractionEvent, _with(GOOD_INTERACTION, user_id=42), "invalid", "user_id: Input should be a valid string"),
    ("empty-item-id", InteractionEvent, _with(GOOD_INTERACTION, item_id=""), "invalid", "item_id: String should have at least 1"),
    ("long-item-id", InteractionEvent, _with(GOOD_INTERACTION, item_id="x" * 200), "invalid", "item_id: String should have at most 128"),
    ("label-2", InteractionEvent, _with(GOOD_INTERACTION, label=2), "invalid", "label: Input should be less than or equal to 1"),
    ("label-string", InteractionEvent, _with(GOOD_INTERACTION, label="1"), "invalid", "label: Input should be a valid integer"),
    ("label-true", InteractionEvent, _with(GOOD_INTERACTION, label=True), "invalid", "label: Input should be a valid integer"),
    ("label-float", InteractionEvent, _with(GOOD_INTERACTION, label=1.0), "invalid", "label: Input should be a valid integer"),
    ("value-nan", InteractionEvent, _with(GOOD_INTERACTION, value=float("nan")), "invalid", "value: Input should be a finite number"),
    ("value-infinite", InteractionEvent, _with(GOOD_INTERACTION, value=float("inf")), "invalid", "value: Input should be a finite"),
    ("unknown-kind", InteractionEvent, _with(GOOD_INTERACTION, kind="purchase"), "invalid", "kind: Input should be"),
    ("value-string", InteractionEvent, _with(GOOD_INTERACTION, value="4.5"), "invalid", "value: Input should be a valid number"),
    ("naive-ts", InteractionEvent, _with(GOOD_INTERACTION, ts="2024-05-01T12:00:00"), "invalid", "ts: Input should have timezone info"),
    ("epoch-ts", InteractionEvent, _with(GOOD_INTERACTION, ts=1714564800), "invalid", "ts: Input should be a valid datetime"),
    ("word-ts", InteractionEvent, _with(GOOD_INTERACTION, ts="yesterday"), "invalid", "ts: Value error, expected an RFC 3339"),
    ("bare-year-ts", InteractionEvent, _with(GOOD_INTERACTION, ts="2020"), "invalid", "ts: Value error, expected an RFC 3339"),
    ("future-schema", InteractionEvent, _with(GOOD_INTERACTION, schema_version=2), "invalid", "schema_version: Input should be 1"),
    ("item-no-title", ItemEvent, _with(GOOD_ITEM, title=...), "invalid", "title: Field required"),
    ("item-tags-string", ItemEvent, _with(GOOD_ITEM, tags="pets"), "invalid", "tags: Input should be a valid array"),
    ("item-tag-int", ItemEvent, _with(GOOD_ITEM, tags=["ok", 7]), "invalid", "tags.1: Input should be a valid string"),
]


@pytest.mark.parametrize("model, raw, reason, expected", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_record_is_rejected_with_a_message_naming_the_problem(model, raw, reason, expected):
    with pytest.raises(EventError) as caught:
        decode(model, raw)
    assert caught.value.reason == reason
    assert expected in str(caught.value)


def test_every_bad_field_is_named_in_one_message():
    raw = _with(GOOD_INTERACTION, user_id=1, label=5, ts="noon")
    with pytest.raises(EventError) as caught:
        decode(InteractionEvent, raw)
    message = str(caught.value)
    for field in ("user_id:", "label:", "ts:"):
        assert field in message
    assert "kind:" not in message


def test_unknown_fields_are_ignored_and_description_is_an_alias_of_text():
    raw = _with(GOOD_ITEM, text=..., description="from the platform", colour="red")
    item = decode(ItemEvent, raw)
    assert item.text == "from the platform"
    assert not hasattr(item, "colour")


def test_versions_follow_event_time():
    item = decode(ItemEvent, _with(GOOD_ITEM))
    updated = decode(ItemEvent, _with(GOOD_ITEM, updated_at="2024-05-02T00:00:00Z"))
    assert updated.version - item.version == 24 * 3600 * 1000
    other_zone = decode(InteractionEvent, _with(GOOD_INTERACTION, ts="2024-05-01T14:00:00+02:00"))
    assert other_zone.version == decode(InteractionEvent, _with(GOOD_INTERACTION)).version


def test_interaction_id_is_deterministic_and_prefers_the_platforms_event_id():
    a = decode(InteractionEvent, _with(GOOD_INTERACTION))
    b = decode(InteractionEvent, _with(GOOD_INTERACTION))
    later = decode(InteractionEvent, _with(GOOD_INTERACTION, ts="2024-05-01T12:00:01Z"))
    assert a.interaction_id == b.interaction_id != later.interaction_id
    assert decode(InteractionEvent, _with(GOOD_INTERACTION, event_id="evt-9")).interaction_id == "evt-9"


def test_ids_are_stable_across_calls():
    assert deterministic_id("a", 1) == deterministic_id("a", 1) != deterministic_id("a", 2)
    assert point_id("k") == point_id("k") != point_id("k2")


def test_every_contract_round_trips_through_bytes():
    now = datetime(2024, 5, 1, tzinfo=timezone.utc)
    target = ItemSnapshot(item_id="i1", title="Cats")
    samples = [
        decode(ItemEvent, _with(GOOD_ITEM)),
        decode(InteractionEvent, _with(GOOD_INTERACTION)),
        CotRequest(request_id="r1", user_id="u1", item_id="i1", label=1, ts=now, target=target, requested_at=now),
        CotResult(
            request_id="r1", user_id="u1", item_id="i1", label=1, ts=now, cot_text="because", cot_embedding=[0.1, 0.2],
            backend="template", model="template-v1", generated_at=now,
        ),
        DeadLetter(original="eA==", topic="items", partition=0, offset=5, reason="invalid", error="x", consumer="w",
                   failed_at=now),
    ]
    assert [type(s) for s in samples] == list(CONTRACTS.values())
    for sample in samples:
        assert decode(type(sample), sample.to_bytes()) == sample


def test_json_schemas_are_published_for_every_topic():
    for topic, model in CONTRACTS.items():
        schema = model.model_json_schema()
        assert "schema_version" in schema["properties"], topic


def test_docs_tables_document_every_platform_field():
    from pathlib import Path

    contracts = (Path(__file__).parents[2] / "docs" / "events.md").read_text()
    for model in (ItemEvent, InteractionEvent):
        for field in model.model_fields:
            if field != "schema_version":
                assert f"| `{field}` |" in contracts, f"{model.__name__}.{field} missing from docs/events.md"
