"""`llmcf demo`, the main job on the embedded defaults: broker up, database migrated, a MovieLens window replayed,
read back through the dead-letter helper into storage, and a count of what landed at each step.

Running it again is safe: the replay publishes the window again and storage upserts keep one row per event.
"""

from __future__ import annotations

import time

from llmcf.errors import UserFacingError
from llmcf.settings import Settings

STALL_TIMEOUT_S = 60.0


def _store_topics(settings: Settings, bootstrap: str, expected: int) -> tuple[int, int]:
    """Consume `items` and `interactions` until `expected` records are read, validate them with the shared dead-letter
    policy and upsert them, committing offsets only after each batch is written. Returns (consumed, dead-lettered)."""
    from confluent_kafka import Consumer

    from llmcf.dead_letters import DeadLetterPolicy, KafkaDeadLetterSink, SourceRecord, decode_batch
    from llmcf.events import InteractionEvent, ItemEvent
    from llmcf.kafka import consumer_config, producer_config
    from llmcf.topics import Topics
    from storage.repository import Repository

    topics = Topics.from_settings(settings)
    policy = DeadLetterPolicy(KafkaDeadLetterSink(producer_config(settings, bootstrap), topics.dead_letters), "llmcf-demo")
    repository = Repository.from_settings(settings)
    consumer = Consumer(consumer_config(settings, bootstrap, group_id="llmcf-demo-store"))
    consumer.subscribe([topics.items, topics.interactions])
    consumed = dead_lettered = 0
    last_progress = time.monotonic()
    try:
        while consumed < expected:
            if time.monotonic() - last_progress > STALL_TIMEOUT_S:
                raise UserFacingError(f"no records for {STALL_TIMEOUT_S:.0f}s after {consumed:,} of {expected:,}")
            messages = [m for m in consumer.consume(num_messages=5000, timeout=1.0) if m.error() is None]
            if not messages:
                continue
            last_progress = time.monotonic()
            records = [SourceRecord(m.value(), m.key(), m.topic(), m.partition(), m.offset()) for m in messages]
            items = decode_batch(ItemEvent, [r for r in records if r.topic == topics.items], policy)
            interactions = decode_batch(InteractionEvent, [r for r in records if r.topic == topics.interactions], policy)
            repository.upsert_items(items)
            repository.upsert_interactions(interactions)
            policy.flush()
            consumer.commit(asynchronous=False)
            consumed += len(records)
            dead_lettered += len(records) - len(items) - len(interactions)
            print(f"\rstored {consumed:,}/{expected:,} records", end="", flush=True)
        print()
    finally:
        consumer.close()
    return consumed, dead_lettered


def run_demo(settings: Settings, dataset: str, limit: int) -> int:
    import migrations
    from llmcf.infra import broker
    from llmcf.replay import ReplayOptions, replay
    from storage.repository import Repository

    print("== 1/4 infrastructure")
    info = broker.up(settings)
    print(f"broker {info.bootstrap} ({info.origin}); topics: {', '.join(info.topics)}")

    print("== 2/4 database migrations")
    migrations.upgrade(settings.database_url)
    print(f"database at revision {migrations.current(settings.database_url)}")

    print(f"== 3/4 replay {dataset}, {limit:,} interactions")
    summary = replay(settings, ReplayOptions(dataset=dataset, limit=limit))
    print(summary.render())

    print("== 4/4 read back and store")
    consumed, dead_lettered = _store_topics(settings, info.bootstrap, summary.items + summary.interactions)
    counts = Repository.from_settings(settings).counts()

    print("\n== what landed")
    print(f"published: {summary.interactions:,} interactions, {summary.items:,} items")
    print(f"consumed:  {consumed:,} records, {dead_lettered:,} dead-lettered")
    print("stored:    " + ", ".join(f"{table} {n:,}" for table, n in counts.items()))
    print(f"\nThe broker keeps running at {info.bootstrap}: read a topic with `.venv/bin/llmcf tail interactions --max 5`;"
          " stop it with `.venv/bin/llmcf infra down`.")
    return 0
