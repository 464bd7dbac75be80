"""`OffsetProbe` on the real broker: what a stalled partition's repair reads, transaction markers included."""

from __future__ import annotations

from confluent_kafka import Producer

from llmcf.kafka import producer_config
from llmcf.settings import Settings
from llmcf.topics import Topics
from streams.app import app_id
from streams.probe import OffsetProbe


def test_the_probe_reads_an_offset_range_skipping_offsets_without_records(kafka_settings: Settings) -> None:
    bootstrap = kafka_settings.kafka_bootstrap_servers or ""
    topic = Topics.from_settings(kafka_settings).interactions
    plain = Producer(producer_config(kafka_settings, bootstrap))
    for value in (b"a", b"b", b"c"):
        plain.produce(topic, key=b"u", value=value, partition=0)
    assert plain.flush(30) == 0
    transactional = Producer(producer_config(kafka_settings, bootstrap) | {"transactional.id": f"{topic}-probe"})
    transactional.init_transactions(30)
    transactional.begin_transaction()
    transactional.produce(topic, key=b"u", value=b"d", partition=0)
    transactional.commit_transaction(30)  # offset 3 is "d", offset 4 its commit marker
    assert plain.produce(topic, key=b"u", value=b"e", partition=0) is None and plain.flush(30) == 0  # offset 5

    probe = OffsetProbe(kafka_settings, bootstrap, app_id(kafka_settings))
    try:
        def read(start: int, end: int) -> list[tuple[int, bytes]] | None:
            records = probe.read(topic, 0, start, end)
            return None if records is None else [(r.offset, r.value) for r in records]

        assert read(1, 3) == [(1, b"b"), (2, b"c")]
        assert read(3, 6) == [(3, b"d"), (5, b"e")]
        assert read(4, 5) == [], "a marker alone: nothing to process, the range can be acknowledged"
        assert read(5, 100) == [(5, b"e")], "up to the partition's end"
        assert read(6, 7) == []
        records = probe.read(topic, 0, 0, 1)
        assert records is not None and (records[0].topic, records[0].partition, records[0].key) == (topic, 0, b"u")
        assert probe.committed([(topic, 0)]) == {}, "reading commits nothing for the worker's group"
    finally:
        probe.close()
