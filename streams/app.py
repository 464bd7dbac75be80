"""The Faust glue of `llmcf worker`: three agents that hand consumed batches to the plain batch processors.

Agents (raw bytes in, decoded by the processors through the dead-letter policy):
- `items`: `ItemBatchProcessor` (persist, embed once, catalogue);
- `interactions`: `InteractionBatchProcessor` with the `history` table (last N items per user, changelog-backed; the
  topic is keyed by user id, so table and topic are co-partitioned and nothing is repartitioned);
- `cot-results`: `ResultBatchProcessor` (complete samples in PostgreSQL and the index).
A timer publishes consumer lag, committed and end offsets per partition every few seconds, then runs a round of
`streams.repair.DeliveryRepair`: what faust-streaming's bookkeeping gets wrong around a rebalance (ranges it reports as
holding no record, a committed offset stalled behind processed records) is read from the broker and processed again,
or committed past where it holds no record.

Lifecycle contract of every agent: it takes batches with `stream.take_events(batch_size, within)` and awaits the
processor until the batch is durable. Faust acks a batch when the body returns, even if it raised, and commits acked
offsets every `broker_commit_interval` after flushing its own producer (the table changelog), so the body never raises:
an unexpected error processes the whole (idempotent) batch again after a pause, and a shutdown lets the batch in hand
finish before the agent stops. Offsets are therefore committed only after PostgreSQL, the vector index, the
`cot-requests` producer and the dead letters have all confirmed the batch.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import faust
from confluent_kafka import Consumer, KafkaError, TopicPartition
from faust.types import TP

from llmcf import kafka
from llmcf.dead_letters import DeadLetterPolicy, KafkaDeadLetterSink, SourceRecord
from llmcf.embeddings import TextEmbedder
from llmcf.metrics import COMMITTED_OFFSET, CONSUMER_LAG, END_OFFSET
from llmcf.settings import Settings
from llmcf.topics import Topics
from storage.repository import Repository
from storage.vectors import VectorIndex
from streams.batch import RETRY_MAX_DELAY_S, Writer
from streams.catalogue import Catalogue
from streams.commits import ExactCommitApp
from streams.decisions import CotPolicy
from streams.history import HistoryItem, from_stored, to_stored
from streams.interactions import InteractionBatchProcessor
from streams.items import ItemBatchProcessor
from streams.metrics import BATCH_RECORDS, BATCH_SECONDS, WRITE_FAILURES
from streams.publisher import RequestPublisher
from streams.repair import DeliveryRepair
from streams.results import ResultBatchProcessor
from streams.stalls import StallGuard

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 5.0
READ_TIMEOUT_S = 30.0
MAX_POLL_RECORDS = 2000
HISTORY_TABLE = "history"


@dataclass(frozen=True)
class WorkerOptions:
    """How one worker consumes: batch size and wait, Faust's web port (None = no web server), item wait."""

    batch_size: int = 2000
    batch_within_s: float = 0.2
    web_port: int | None = None
    item_wait_s: float = 60.0


def app_id(settings: Settings) -> str:
    """Faust app id (= consumer group, prefix of its internal topics): one per topic namespace, so isolated prefixes
    (tests, tenants on a shared cluster) never share a group or a changelog."""
    return f"{settings.topic_prefix}llmcf-worker"


def broker_credentials(settings: Settings) -> faust.SASLCredentials | faust.SSLCredentials | None:
    """The Kafka security settings in Faust's terms (same variables as every confluent-kafka client)."""
    kafka.client_config(settings, "unused")  # validates protocol, mechanism and credentials with clear errors
    protocol = settings.kafka_security_protocol.upper()
    if protocol == "SSL":
        return faust.SSLCredentials(ssl.create_default_context())
    if protocol.startswith("SASL_"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password,
            mechanism=(settings.kafka_sasl_mechanism or "").upper(),
            ssl_context=ssl.create_default_context() if protocol == "SASL_SSL" else None,
        )
    return None


def source_records(events: Sequence[faust.EventT]) -> list[SourceRecord]:
    """The consumed records of a batch, byte for byte, independent of Faust."""
    return [
        SourceRecord(
            value=e.message.value, key=e.message.key, topic=e.message.topic,
            partition=e.message.partition, offset=e.message.offset,
        )
        for e in events
    ]


async def until_processed(topic: str, process: Callable[[], Awaitable[None]]) -> None:
    """Run `process()` until it completes. Unexpected errors process the batch again (its writes are idempotent); a
    cancellation (shutdown) waits for the batch in hand to finish first, since Faust acks it on the way out."""
    delay = 1.0
    while True:
        with BATCH_SECONDS.labels(topic=topic).time():
            task = asyncio.ensure_future(process())
            try:
                await asyncio.shield(task)
                return
            except asyncio.CancelledError:
                log.info("stopping: finishing the %s batch in hand first", topic)
                await task
                raise
            except Exception:
                WRITE_FAILURES.labels(step=f"{topic} batch").inc()
                log.exception("processing a %s batch failed; processing it again in %.0f s", topic, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX_DELAY_S)


class TableHistories:
    """The `HistoryStore` over the Faust table: reads from its store, writes the store and the changelog partition
    of the user's source partition explicitly (a `take_events` batch spans partitions, so the table's own
    current-event partitioning would be wrong)."""

    def __init__(self, table: faust.Table):
        self.table = table

    def get(self, user_id: str) -> list[HistoryItem]:
        return from_stored(self.table.data.get(user_id))

    def put(self, user_id: str, history: list[HistoryItem], partition: int) -> None:
        stored = to_stored(history)
        self.table.data[user_id] = stored
        self.table.send_changelog(partition, user_id, stored)


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
                    if message.offset() >= end:
                        return records
                    records.append(SourceRecord(value=message.value(), key=message.key(), topic=topic,
                                                partition=partition, offset=message.offset()))
            return None
        finally:
            self._consumer.unassign()

    def close(self) -> None:
        self._consumer.close()


@dataclass
class WorkerResources:
    """What the worker's processors write to, opened and closed by the caller (`run_worker`)."""

    repository: Repository
    index: VectorIndex
    embedder: TextEmbedder


def create_app(
    settings: Settings, bootstrap: str, options: WorkerOptions, resources: WorkerResources
) -> tuple[faust.App, Callable[[], None]]:
    """The Faust app with its agents and timer, and a `close()` for what it opened besides (producers, threads)."""
    topics = Topics.from_settings(settings)
    partitions = settings.topic_partitions
    group = app_id(settings)
    app = ExactCommitApp(
        group,
        broker=[f"kafka://{server.strip()}" for server in bootstrap.split(",")],
        broker_credentials=broker_credentials(settings),
        store="memory://",
        datadir=str(settings.home / "faust"),
        autodiscover=False,
        web_enabled=options.web_port is not None,
        web_port=options.web_port or 6066,
        web_bind="127.0.0.1",
        topic_partitions=partitions,
        topic_replication_factor=settings.topic_replication,
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        # Short heartbeats: a group join in ~3 s instead of ~23 s, and a dead member is noticed quickly.
        broker_heartbeat_interval=0.5,
        broker_session_timeout=6.0,
        producer_acks=-1,
        # Flow control: Faust stops fetching a partition once its stream buffer is 80% full, but delivers what was
        # already fetched (up to max_poll_records) into it, and a full buffer blocks delivery for EVERY topic. The
        # interactions agent may wait for the items agent, so the last 20% must hold a whole fetch, or the wait
        # could starve the very items it waits for. Polls of 2,000 records rather than 500: fewer, larger deliveries
        # leave more of the GIL to the batches (bench/worker.py, quiet machine: 58-67% of the bare agent with 500, 71-75%
        # with 2,000).
        broker_max_poll_records=MAX_POLL_RECORDS,
        stream_buffer_maxsize=max(4096, 3 * options.batch_size, 10 * MAX_POLL_RECORDS),
    )

    def raw_topic(name: str) -> faust.TopicT:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                         partitions=partitions)

    # No key/value types: Faust then keeps the user id (str) and the stored history (a list) as JSON in the changelog.
    history_table = app.Table(HISTORY_TABLE, default=None, partitions=partitions)
    producer = kafka.producer_config(settings, bootstrap, "llmcf-worker")
    executors = {
        name: ThreadPoolExecutor(1, thread_name_prefix=f"llmcf-{name}")
        for name in ("items", "interactions", "interactions-index", "results")
    }

    def policy(consumer: str) -> DeadLetterPolicy:
        return DeadLetterPolicy(KafkaDeadLetterSink(producer, topics.dead_letters), consumer)

    catalogue = Catalogue(resources.repository)
    publisher = RequestPublisher(producer, topics.cot_requests)
    items = ItemBatchProcessor(
        topics.items, resources.repository, catalogue, resources.embedder,
        Writer(executors["items"], policy(f"{group}/items")),
    )
    interactions_policy = policy(f"{group}/interactions")
    interactions = InteractionBatchProcessor(
        topics.interactions, resources.repository, resources.index, catalogue, publisher,
        Writer(executors["interactions"], interactions_policy),
        Writer(executors["interactions-index"], interactions_policy),
        CotPolicy.from_settings(settings), settings.history_length,
        options.item_wait_s,
    )
    results = ResultBatchProcessor(
        topics.cot_results, resources.repository, resources.index,
        Writer(executors["results"], policy(f"{group}/cot-results")),
    )
    histories = TableHistories(history_table)
    stall_guard = StallGuard()

    processors: dict[str, Callable[[list[SourceRecord]], Awaitable[None]]] = {
        topics.items: items.process,
        topics.interactions: lambda records: interactions.process(records, histories),
        topics.cot_results: results.process,
    }
    # One batch of a topic at a time, whether the agent took it or a stalled partition's repair read it: a batch
    # merges histories and catalogue entries that the next one reads.
    processing = {topic: asyncio.Lock() for topic in processors}

    async def consume(stream: faust.StreamT, topic: str) -> None:
        async for events in stream.take_events(options.batch_size, within=options.batch_within_s):
            records = source_records(events)
            BATCH_RECORDS.labels(topic=topic).observe(len(records))
            stall_guard.taken(topic)
            async with processing[topic]:
                await until_processed(topic, partial(processors[topic], records))
            stall_guard.processed(topic, records, time.monotonic())

    @app.agent(raw_topic(topics.items), name="items")
    async def consume_items(stream: faust.StreamT) -> None:
        await consume(stream, topics.items)

    @app.agent(raw_topic(topics.interactions), name="interactions")
    async def consume_interactions(stream: faust.StreamT) -> None:
        await consume(stream, topics.interactions)

    @app.agent(raw_topic(topics.cot_results), name="cot-results")
    async def consume_results(stream: faust.StreamT) -> None:
        await consume(stream, topics.cot_results)

    offset_probe = OffsetProbe(settings, bootstrap, group)
    consumed_topics = {topics.items, topics.interactions, topics.cot_results}

    async def process_again(topic: str, records: list[SourceRecord]) -> None:
        async with processing[topic]:
            await until_processed(topic, partial(processors[topic], records))

    repair = DeliveryRepair(lambda: app.consumer, offset_probe.read, process_again, stall_guard, consumed_topics)

    @app.timer(LAG_INTERVAL_S)
    async def report_lag() -> None:
        """Lag, committed and end offsets per consumed partition; then a round of delivery repair."""
        assigned = sorted((tp.topic, tp.partition) for tp in app.consumer.assignment() if tp.topic in consumed_topics)
        if not assigned:
            return
        committed = await asyncio.get_running_loop().run_in_executor(None, offset_probe.committed, assigned)
        # None until the first fetch of that partition.
        ends = {(topic, partition): app.consumer.highwater(TP(topic, partition)) for topic, partition in assigned}
        for (topic, partition), end in ends.items():
            labels = {"group": group, "topic": topic, "partition": str(partition)}
            position = committed.get((topic, partition), 0)
            COMMITTED_OFFSET.labels(**labels).set(position)
            if end is not None:
                END_OFFSET.labels(**labels).set(end)
                CONSUMER_LAG.labels(**labels).set(max(0, end - position))
        await repair.run(committed, ends)

    def close() -> None:
        publisher.close()
        offset_probe.close()
        for executor in executors.values():
            executor.shutdown(wait=True)

    return app, close


def run_worker(settings: Settings, options: WorkerOptions, metrics_port: int | None) -> int:
    """`llmcf worker`: resolve the broker, ensure topics, open storage, run the agents until SIGTERM/SIGINT, close."""
    from llmcf.metrics import serve_metrics
    from llmcf.samples import SAMPLE_DIMENSION
    from storage.vectors import open_vector_index

    bootstrap = kafka.resolve_bootstrap(settings)
    kafka.ensure_topics(settings, bootstrap)
    (settings.home / "faust").mkdir(parents=True, exist_ok=True)
    # Torch on one thread: the event loop, librdkafka and PostgreSQL need the other core; one item is embedded once.
    embedder = TextEmbedder.load("cpu", threads=1)
    repository = Repository.from_settings(settings)
    index = open_vector_index(settings, SAMPLE_DIMENSION)
    serve_metrics(metrics_port)
    app, close = create_app(settings, bootstrap, options, WorkerResources(repository, index, embedder))
    # The embedder (torch, transformers) leaves ~400k long-lived objects that every full garbage collection would walk
    # again (0.1-0.2 s, GIL held), and Faust and the batches allocate fast enough to trigger those collections: park
    # them outside the collector's generations.
    gc.collect()
    gc.freeze()
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False, override_logging=False)
    log.info("worker %s consuming %s", app_id(settings), bootstrap)
    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 0
    else:
        code = 0
    finally:
        close()
        index.close()
        repository.close()
    log.info("worker stopped")
    return code

