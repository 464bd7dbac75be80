"""The dead-letter helper against a real broker: bad records land in `dead-letters` whole, with reasons; good ones pass."""

import base64

import pytest

from llmcf import kafka
from llmcf.dead_letters import (
    DeadLetterDeliveryError,
    DeadLetterPolicy,
    KafkaDeadLetterSink,
    SourceRecord,
    decode_batch,
)
from llmcf.events import DeadLetter, InteractionEvent, decode
from llmcf.infra import free_port
from llmcf.metrics import DEAD_LETTERS
from llmcf.topics import Topics

GOOD = b'{"user_id":"u1","item_id":"i1","kind":"click","label":1,"ts":"2024-05-01T12:00:00Z"}'
BAD = [
    (b"{oops", "undecodable", "not a JSON object"),
    (b'{"user_id":"u1","item_id":"i1","kind":"click","label":7,"ts":"2024-05-01T12:00:00Z"}', "invalid", "label"),
    (None, "undecodable", "tombstone"),
]


def test_bad_records_are_dead_lettered_with_reasons_and_the_batch_goes_on(kafka_settings, kafka_broker):
    topics = Topics.from_settings(kafka_settings)
    sink = KafkaDeadLetterSink(kafka.producer_config(kafka_settings, kafka_broker), topics.dead_letters)
    policy = DeadLetterPolicy(sink, consumer="test-consumer")
    values = [GOOD, BAD[0][0], GOOD, BAD[1][0], BAD[2][0], GOOD]
    records = [SourceRecord(v, b"u1", topics.interactions, 2, 100 + i) for i, v in enumerate(values)]
    before = DEAD_LETTERS.labels(topic=topics.interactions, reason="undecodable")._value.get()

    events = decode_batch(InteractionEvent, records, policy)
    policy.flush()

    assert len(events) == 3 and all(e.user_id == "u1" for e in events)
    letters = [decode(DeadLetter, m.value()) for m in kafka.read_to_end(kafka_settings, kafka_broker, topics.dead_letters)]
    assert [letter.offset for letter in letters] == [101, 103, 104]
    for letter, (raw, reason, text) in zip(letters, BAD, strict=True):
        assert letter.reason == reason and text in letter.error
        assert letter.original_bytes() == (raw or b"")
        assert letter.topic == topics.interactions and letter.partition == 2 and letter.consumer == "test-consumer"
        assert base64.b64decode(letter.key) == b"u1"
    assert DEAD_LETTERS.labels(topic=topics.interactions, reason="undecodable")._value.get() == before + 2


def test_undeliverable_dead_letters_refuse_the_commit(kafka_settings):
    unreachable = f"127.0.0.1:{free_port()}"
    config = {**kafka.producer_config(kafka_settings, unreachable), "message.timeout.ms": 1000}
    policy = DeadLetterPolicy(KafkaDeadLetterSink(config, "dead-letters"), consumer="test-consumer")
    policy(SourceRecord(b"{oops", None, "interactions", 0, 1), "undecodable", "not a JSON object")
    with pytest.raises(DeadLetterDeliveryError, match="1 failed"):
        policy.flush(timeout_s=10)
