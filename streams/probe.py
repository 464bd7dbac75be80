"""The broker, asked directly by the worker outside its group membership: the group's committed offsets (for lag
reporting) and the records of an offset range (for the delivery repair)."""

from __future__ import annotations

import time

from confluent_kafka import Consumer, KafkaError, TopicPartition

from llmcf import kafka
from llmcf.dead_letters import SourceRecord
from llmcf.settings import Settings

READ_TIMEOUT_S = 30.0


class OffsetProbe:
    """Asks the broker directly, outside the worker's group membership: committed offsets of the group (OffsetFetch,
    no join) and the records of an offset range. End offsets come from the Faust consumer's fetch high watermarks
    instead: Tansu answers ListOffsets wrongly."""

    def __init__(self, settings: Settings, bootstrap: str, group: str):
        self._consumer = Consumer(kafka.consumer_config(settings, bootstrap, group, "llmcf-worker-probe") | {
            "isolation.level": "read_uncommitted",  # as Faust's own consumer reads
            "enable.partition.eof": True,
        })

    def committed(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        found = self._consumer.committed([TopicPartition(t, p) for t, p in partitions], timeout=5.0)
        return {(tp.topic, tp.partition): tp.offset for tp in found if tp.offset >= 0}

    def read(self, topic: str, partition: int, start: int, end: int) -> list[SourceRecord] | None:
        """The records at offsets `start` to `end - 1` (fewer where offsets hold transaction markers or compacted
        records); None if the broker did not deliver them within `READ_TIMEOUT_S`. Assigned, never subscribed or
        committed: the group's membership and offsets stay the worker's."""
        self._consumer.assign([TopicPartition(topic, partition, start)])
        records: list[SourceRecord] = []
        deadline = time.monotonic() + READ_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                for message in self._consumer.consume(1000, timeout=0.5):
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            return records
                        continue
                    offset = message.offset()
                    assert offset is not None  # a consumed record always has one
                    if offset >= end:
                        return records
                    records.append(SourceRecord(value=message.value(), key=message.key(), topic=topic,
                                                partition=partition, offset=offset))
            return None
        finally:
            self._consumer.unassign()

    def close(self) -> None:
        self._consumer.close()
