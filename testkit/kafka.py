"""Where a consumer group's commits stand on a topic, read without joining the group (so asking disturbs no member)."""

from __future__ import annotations

import uuid
from collections import Counter

from confluent_kafka import Consumer, TopicPartition

from llmcf.kafka import consumer_config, read_to_end
from llmcf.settings import Settings


def commits_and_ends(settings: Settings, group: str, topic: str) -> dict[int, tuple[int | None, int]]:
    """partition -> (offset committed by `group`, None if none; end) for the partitions of `topic` holding records.
    Ends are found by reading the records (Tansu answers ListOffsets wrongly), so a commit past a partition's
    trailing transaction marker is one past its end. The group is not joined, so asking disturbs no member."""
    bootstrap = settings.kafka_bootstrap_servers or ""
    ends: Counter[int] = Counter()
    for message in read_to_end(settings, bootstrap, topic):
        ends[message.partition()] = max(ends[message.partition()], message.offset() + 1)
    consumer = Consumer(consumer_config(settings, bootstrap, group, f"check-{uuid.uuid4().hex[:6]}"))
    try:
        committed = consumer.committed([TopicPartition(topic, p) for p in ends], timeout=10)
    finally:
        consumer.close()
    offsets = {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in committed}
    return {p: (offsets.get(p), end) for p, end in ends.items()}


def partitions_behind(settings: Settings, group: str, topic: str) -> dict[int, tuple[int | None, int]]:
    """The partitions of `commits_and_ends` whose commit is behind their end; {} when the group has committed
    everything (a commit past a trailing transaction marker included)."""
    return {p: (committed, end) for p, (committed, end) in commits_and_ends(settings, group, topic).items()
            if (committed or 0) < end}
