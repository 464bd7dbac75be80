"""The Faust glue of `llmcf worker`: the app's configuration, three agents that hand consumed batches to the plain batch
processors, and a lag timer.

Agents (raw bytes in, decoded by the processors through the dead-letter policy), each delivering its batches through
`streams.delivery.BatchDelivery`, whose docstring numbers the commit order:
- `items`: `ItemBatchProcessor` (persist, embed once, catalogue);
- `interactions`: `InteractionBatchProcessor` with the `history` table (last N items per user, changelog-backed; the
  topic is keyed by user id, so table and topic are co-partitioned and nothing is repartitioned);
- `cot-results`: `ResultBatchProcessor` (complete samples in PostgreSQL and the index).
The timer reports consumer lag, committed and end offsets per partition every few seconds (`streams.lag`), then runs a
round of `streams.repair.DeliveryRepair`: what faust-streaming's bookkeeping gets wrong around a rebalance (ranges it
reports as holding no record, a committed offset stalled behind processed records) is read from the broker and
processed again, or committed past where it holds no record.
"""

from __future__ import annotations

import gc
import logging
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

import faust

from llmcf import kafka
from llmcf.cot_policy import CotPolicy
from llmcf.dead_letters import DeadLetterPolicy, KafkaDeadLetterSink
from llmcf.embeddings import TextEmbedder
from llmcf.settings import Settings
from llmcf.topics import Topics
from storage.repository import Repository
from storage.vectors import VectorIndex
from streams.batch import Writer
from streams.catalogue import Catalogue
from streams.commits import ExactCommitApp
from streams.delivery import BatchDelivery, BatchStream
from streams.history import HistoryItem, HistoryStore, from_stored, to_stored
from streams.interactions import InteractionBatchProcessor
from streams.items import ItemBatchProcessor
from streams.lag import LAG_INTERVAL_S, LagReporter
from streams.options import WorkerOptions
from streams.probe import OffsetProbe
from streams.processor import BatchProcessor
from streams.publisher import RequestPublisher
from streams.repair import DeliveryRepair
from streams.results import ResultBatchProcessor
from streams.stalls import StallGuard

log = logging.getLogger(__name__)

MAX_POLL_RECORDS = 2000
HISTORY_TABLE = "history"


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


@dataclass
class WorkerResources:
    """What the worker's processors write to, opened and closed by the caller (`run_worker`)."""

    repository: Repository
    index: VectorIndex
    embedder: TextEmbedder


def build_processors(
    settings: Settings, bootstrap: str, options: WorkerOptions, resources: WorkerResources, histories: HistoryStore
) -> tuple[list[BatchProcessor], Callable[[], None]]:
    """The three batch processors, each writing on threads of its own, and a `close()` for their producer and threads."""
    topics = Topics.from_settings(settings)
    group = app_id(settings)
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
        topics.interactions, resources.repository, resources.index, catalogue, histories, publisher,
        Writer(executors["interactions"], interactions_policy),
        Writer(executors["interactions-index"], interactions_policy),
        CotPolicy.from_settings(settings), settings.history_length,
        options.item_wait_s,
    )
    results = ResultBatchProcessor(
        topics.cot_results, resources.repository, resources.index,
        Writer(executors["results"], policy(f"{group}/cot-results")),
    )

    def close() -> None:
        publisher.close()
        for executor in executors.values():
            executor.shutdown(wait=True)

    return [items, interactions, results], close


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
        # Short heartbeats: a group joins much sooner than with Faust's defaults, and a dead member is noticed quickly.
        broker_heartbeat_interval=0.5,
        broker_session_timeout=6.0,
        producer_acks=-1,
        # Flow control: Faust stops fetching a partition once its stream buffer is 80% full, but delivers what was
        # already fetched (up to max_poll_records) into it, and a full buffer blocks delivery for EVERY topic. The
        # interactions agent may wait for the items agent, so the last 20% must hold a whole fetch, or the wait
        # could starve the very items it waits for. Polls of 2,000 records rather than 500: fewer, larger deliveries
        # leave more of the GIL to the batches (bench/worker.py).
        broker_max_poll_records=MAX_POLL_RECORDS,
        stream_buffer_maxsize=max(4096, 3 * options.batch_size, 10 * MAX_POLL_RECORDS),
    )

    def raw_topic(name: str) -> faust.TopicT:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                         partitions=partitions)

    # No key/value types: Faust then keeps the user id (str) and the stored history (a list) as JSON in the changelog.
    history_table = app.Table(HISTORY_TABLE, default=None, partitions=partitions)
    assert isinstance(history_table, faust.Table)  # `conf.Table`, Faust's default
    histories = TableHistories(history_table)
    batch_processors, close_processors = build_processors(settings, bootstrap, options, resources, histories)
    stall_guard = StallGuard()
    delivery = BatchDelivery(batch_processors, stall_guard, options.batch_size, options.batch_within_s)

    @app.agent(raw_topic(topics.items), name="items")
    async def consume_items(stream: faust.StreamT) -> None:
        await delivery.consume(cast(BatchStream, stream), topics.items)

    @app.agent(raw_topic(topics.interactions), name="interactions")
    async def consume_interactions(stream: faust.StreamT) -> None:
        await delivery.consume(cast(BatchStream, stream), topics.interactions)

    @app.agent(raw_topic(topics.cot_results), name="cot-results")
    async def consume_results(stream: faust.StreamT) -> None:
        await delivery.consume(cast(BatchStream, stream), topics.cot_results)

    offset_probe = OffsetProbe(settings, bootstrap, group)
    lag = LagReporter(lambda: app.exact_consumer, offset_probe.committed, group, delivery.topics)
    repair = DeliveryRepair(lambda: app.exact_consumer, offset_probe.read, delivery.process_again, stall_guard,
                            delivery.topics)

    @app.timer(LAG_INTERVAL_S)
    async def report_lag() -> None:
        """Lag, committed and end offsets per consumed partition; then a round of delivery repair."""
        offsets = await lag.report()
        if offsets is not None:
            await repair.run(offsets.committed, offsets.ends)

    def close() -> None:
        close_processors()
        offset_probe.close()

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
    # The embedder (torch, transformers) leaves hundreds of thousands of long-lived objects that every full garbage
    # collection would walk again, holding the GIL, and Faust and the batches allocate fast enough to trigger those
    # collections: park them outside the collector's generations.
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

