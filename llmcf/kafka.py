"""confluent-kafka plumbing shared by every stage: client configurations, the broker address, and the topics.

Every producer, consumer and admin client in the project is configured here, so security settings, delivery guarantees
and timeouts are decided once. The configs are plain dicts for `confluent_kafka.Producer/Consumer/AdminClient`; they
contain the SASL password when one is set, so log them only through `redacted()`.

The broker is either the cluster named by KAFKA_BOOTSTRAP_SERVERS (production: Apache Kafka) or the embedded Tansu
broker that `llmcf infra up` started and recorded under `$LLMCF_HOME` (`resolve_bootstrap()` decides). Nothing here
depends on which one it is.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Iterator

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from llmcf.errors import UserFacingError
from llmcf.settings import Settings
from llmcf.topics import Topics

log = logging.getLogger(__name__)

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_SECRET_KEYS = frozenset({"sasl.password", "ssl.key.password"})

ClientConfig = dict[str, str | int | float | bool]
"""The connection part of a librdkafka config, typed as `AdminClient` takes it."""


def client_config(settings: Settings, bootstrap: str, client_id: str = "llmcf") -> ClientConfig:
    """Connection settings every client shares: bootstrap servers, security protocol and SASL credentials.

    Raises `UserFacingError` for a protocol or mechanism librdkafka would reject, or SASL without credentials, so the
    operator sees which variable to fix instead of an opaque connection failure.
    """
    protocol = settings.kafka_security_protocol.upper()
    if protocol not in SECURITY_PROTOCOLS:
        raise UserFacingError(
            f"KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol!r} is not one of "
            f"{', '.join(SECURITY_PROTOCOLS)}"
        )
    config: ClientConfig = {"bootstrap.servers": bootstrap, "security.protocol": protocol, "client.id": client_id}
    if protocol.startswith("SASL_"):
        mechanism = (settings.kafka_sasl_mechanism or "").upper()
        if mechanism not in SASL_MECHANISMS:
            raise UserFacingError(
                f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_MECHANISM set to one of "
                f"{', '.join(SASL_MECHANISMS)} (got {settings.kafka_sasl_mechanism!r})"
            )
        if not settings.kafka_sasl_username or not settings.kafka_sasl_password:
            raise UserFacingError(
                f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
            )
        config.update(
            {
                "sasl.mechanism": mechanism,
                "sasl.username": settings.kafka_sasl_username,
                "sasl.password": settings.kafka_sasl_password,
            }
        )
    return config


def producer_config(settings: Settings, bootstrap: str, client_id: str = "llmcf-producer") -> dict[str, object]:
    """An idempotent producer: retries never duplicate or reorder records within a partition.

    acks=all waits for every in-sync replica. Batching (linger 10 ms, up to 1 MB per batch, lz4) is what gives the
    ~100k+ small records/s measured against Tansu on 2 cores; 10 ms of added latency is invisible next to the
    pipeline's freshness budget. Callers must `poll()` regularly to serve delivery callbacks and `flush()` before exit:
    records still queued when the process ends are lost.
    """
    return {
        **client_config(settings, bootstrap, client_id),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 10,
        "batch.size": 1_000_000,
        "compression.type": "lz4",
    }


def consumer_config(
    settings: Settings, bootstrap: str, group_id: str, client_id: str = "llmcf-consumer"
) -> dict[str, object]:
    """A group consumer that commits only what the caller has processed (at-least-once).

    Auto-commit is off: commit after the work for a record is durable, never before. A new group starts from the
    earliest record, so nothing published before the first start is skipped. Heartbeats every 500 ms with a 6 s session
    timeout (Kafka's minimum by default) make a group join take ~3 s instead of ~23 s and detect a dead member quickly;
    slow processing is bounded by `max.poll.interval.ms`, not by the session timeout.
    """
    return {
        **client_config(settings, bootstrap, client_id),
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "heartbeat.interval.ms": 500,
        "session.timeout.ms": 6000,
    }


def redacted(config: dict[str, object]) -> dict[str, object]:
    """The config with secrets replaced by `***`: the only form in which a config may be logged or printed."""
    return {key: ("***" if key in _SECRET_KEYS and value else value) for key, value in config.items()}


def resolve_bootstrap(settings: Settings) -> str:
    """The bootstrap servers to use: KAFKA_BOOTSTRAP_SERVERS, else the embedded broker recorded by `llmcf infra up`.

    Raises `UserFacingError` when neither exists, or when the recorded embedded broker is no longer running (its
    memory-only storage is gone with it, so silently restarting it would hide lost data).
    """
    if settings.kafka_bootstrap_servers:
        return settings.kafka_bootstrap_servers
    # Imported here: the broker module builds on this one (it creates topics through `ensure_topics`).
    from llmcf.infra import broker

    record = broker.load_record(settings)
    if record is None:
        raise UserFacingError("no Kafka broker: run `llmcf infra up` or set KAFKA_BOOTSTRAP_SERVERS")
    if not record.is_running():
        raise UserFacingError(
            f"the embedded broker recorded in {broker.record_path(settings)} (pid {record.pid}, {record.bootstrap}) is "
            "not running, and its topics were lost with it: run `llmcf infra up` or set KAFKA_BOOTSTRAP_SERVERS"
        )
    return record.bootstrap


def ensure_topics(settings: Settings, bootstrap: str, timeout: float = 15.0) -> list[str]:
    """Create the pipeline's missing topics (`Topics.specs`) and wait until all are visible; return their names.

    Existing topics are left as they are (a different partition count is logged, not changed: repartitioning a live
    topic would break per-key ordering). Raises `UserFacingError` when the cluster cannot be reached within `timeout`
    seconds, when a creation is refused (the message names the topic and, for replication errors,
    LLMCF_TOPIC_REPLICATION), or when created topics do not appear in the metadata in time.
    """
    specs = Topics.from_settings(settings).specs(settings)
    admin = AdminClient(client_config(settings, bootstrap, "llmcf-admin"))
    existing = _topic_partitions(admin, bootstrap, timeout)

    for spec in specs:
        if spec.name in existing and existing[spec.name] != spec.partitions:
            log.warning(
                "topic %s has %d partitions, settings ask for %d: leaving it as it is",
                spec.name, existing[spec.name], spec.partitions,
            )
    missing = [spec for spec in specs if spec.name not in existing]
    if missing:
        new_topics = [NewTopic(s.name, num_partitions=s.partitions, replication_factor=s.replication) for s in missing]
        futures = admin.create_topics(new_topics, request_timeout=timeout)
        for name, future in futures.items():
            try:
                future.result()
                log.info("created topic %s", name)
            except KafkaException as exc:
                error = exc.args[0]
                if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue  # created concurrently by another process: that is what we wanted
                hint = (
                    " (the cluster has fewer brokers than LLMCF_TOPIC_REPLICATION)"
                    if error.code() == KafkaError.INVALID_REPLICATION_FACTOR
                    else ""
                )
                raise UserFacingError(f"cannot create topic {name} on {bootstrap}: {error.str()}{hint}") from None

    wanted = {spec.name for spec in specs}
    deadline = time.monotonic() + timeout
    while not wanted <= set(_topic_partitions(admin, bootstrap, timeout)):
        if time.monotonic() > deadline:
            absent = sorted(wanted - set(_topic_partitions(admin, bootstrap, timeout)))
            raise UserFacingError(f"topics {', '.join(absent)} were created on {bootstrap} but are still not visible")
        time.sleep(0.1)
    return [spec.name for spec in specs]


def _topic_partitions(admin: AdminClient, bootstrap: str, timeout: float) -> dict[str, int]:
    """Topic name -> partition count from a fresh metadata request; `UserFacingError` if the cluster is unreachable."""
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise UserFacingError(
            f"cannot reach Kafka at {bootstrap} within {timeout:g} s ({exc.args[0].str()}): is the broker running "
            "(`llmcf infra status`), and are KAFKA_BOOTSTRAP_SERVERS and KAFKA_SECURITY_PROTOCOL right?"
        ) from None
    return {name: len(topic.partitions) for name, topic in metadata.topics.items() if topic.error is None}


def read_to_end(settings: Settings, bootstrap: str, topic: str, timeout: float = 60.0) -> Iterator[Message]:
    """Every record of `topic`, partition by partition as fetched, from offset 0 up to the end each partition had when
    reached; nothing is committed. Raises `UserFacingError` for a missing topic, or when some partition's end was not
    reached within `timeout` seconds.

    The end is detected by end-of-partition events from fetches, not by ListOffsets (which Tansu answers wrongly).
    """
    consumer = Consumer(
        {**consumer_config(settings, bootstrap, f"llmcf-read-{uuid.uuid4().hex}"), "enable.partition.eof": True}
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        if metadata.error is not None:
            raise UserFacingError(f"topic {topic!r} on {bootstrap}: {metadata.error.str()}")
        partitions = sorted(metadata.partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(at_end) < len(partitions):
            if time.monotonic() > deadline:
                raise UserFacingError(f"{topic}: partitions {sorted(set(partitions) - at_end)} not read to the end "
                                      f"within {timeout:.0f}s")
            for message in consumer.consume(10_000, timeout=1.0):
                error = message.error()
                if error is None:
                    yield message
                elif error.code() == KafkaError._PARTITION_EOF:
                    partition = message.partition()
                    assert partition is not None  # an end-of-partition event names its partition
                    at_end.add(partition)
                else:
                    raise UserFacingError(f"reading {topic}: {error.str()}")
    finally:
        consumer.close()
