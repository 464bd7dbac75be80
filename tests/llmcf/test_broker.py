"""The embedded broker and `llmcf infra up/down/status`, against real Tansu processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from llmcf import kafka
from llmcf.errors import UserFacingError
from llmcf.infra import broker, free_port
from llmcf.infra.broker import EmbeddedBroker, PortInUseError
from llmcf.settings import Settings
from llmcf.topics import Topics


def _partitions(bootstrap: str) -> dict[str, int]:
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=5)
    return {name: len(topic.partitions) for name, topic in metadata.topics.items()}


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.fixture
def embedded_settings(tmp_path: Path):
    """Settings for an embedded broker of this test's own, stopped afterwards whatever happens."""
    settings = Settings.from_env(
        {"LLMCF_HOME": str(tmp_path / "home"), "LLMCF_BROKER_PORT": str(free_port()), "LLMCF_TOPIC_PARTITIONS": "3"}
    )
    yield settings
    broker.down(settings)


def test_embedded_broker_starts_answers_and_stops(tmp_path):
    port = free_port()
    with EmbeddedBroker(port, tmp_path / "broker.log") as running:
        assert running.bootstrap == f"127.0.0.1:{port}"
        assert broker.answers_metadata(running.bootstrap, timeout=2)
        pid = running.pid
    assert pid is not None and not _alive(pid)
    assert broker.port_is_free(port)
    assert "listening on" in (tmp_path / "broker.log").read_text()


def test_embedded_broker_refuses_a_taken_port(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(PortInUseError, match=str(port)):
            EmbeddedBroker(port, tmp_path / "broker.log").start()


def test_up_status_down_lifecycle(embedded_settings):
    settings = embedded_settings
    info = broker.up(settings)
    record = json.loads((settings.home / "broker.json").read_text())
    assert info.origin == "embedded"
    assert info.bootstrap == record["bootstrap"] == f"127.0.0.1:{settings.broker_port}"
    assert set(record) == {"pid", "bootstrap", "started_at", "log_path"} and _alive(record["pid"])

    topics = Topics.from_settings(settings)
    assert info.topics == [
        topics.items, topics.interactions, topics.cot_requests, topics.cot_results, topics.dead_letters
    ]
    assert _partitions(info.bootstrap) == {
        topics.items: 3, topics.interactions: 3, topics.cot_requests: 3, topics.cot_results: 3, topics.dead_letters: 1
    }
    assert kafka.resolve_bootstrap(settings) == info.bootstrap

    again = broker.up(settings)
    assert again == info
    assert json.loads((settings.home / "broker.json").read_text())["pid"] == record["pid"]

    report = broker.status(settings)
    assert report["reachable"] is True and report["pid"] == record["pid"] and report["origin"] == "embedded"
    assert report["topics"][topics.dead_letters]["partitions"] == 1
    assert "vanish" in report["storage"]

    assert broker.down(settings) is True
    assert not _alive(record["pid"])
    assert not (settings.home / "broker.json").exists()
    assert broker.down(settings) is False
    assert broker.status(settings)["reachable"] is False
    with pytest.raises(UserFacingError, match="llmcf infra up"):
        kafka.resolve_bootstrap(settings)


def test_up_replaces_a_stale_record(embedded_settings):
    settings = embedded_settings
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    settings.home.mkdir(parents=True)
    stale = {"pid": dead_pid, "bootstrap": "127.0.0.1:1", "started_at": "2024-01-01T00:00:00+00:00", "log_path": "x"}
    (settings.home / "broker.json").write_text(json.dumps(stale))
    with pytest.raises(UserFacingError, match="not running"):
        kafka.resolve_bootstrap(settings)

    info = broker.up(settings)
    record = json.loads((settings.home / "broker.json").read_text())
    assert record["pid"] != dead_pid and info.bootstrap == f"127.0.0.1:{settings.broker_port}"
    assert broker.status(settings)["reachable"] is True


def test_up_names_the_port_setting_when_the_port_is_taken(embedded_settings):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", embedded_settings.broker_port))
        holder.listen()
        with pytest.raises(PortInUseError, match=rf"port {embedded_settings.broker_port}.*LLMCF_BROKER_PORT"):
            broker.up(embedded_settings)
    assert not (embedded_settings.home / "broker.json").exists()


def test_external_cluster_starts_nothing(kafka_broker, tmp_path):
    settings = Settings.from_env(
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka_broker,
            "LLMCF_HOME": str(tmp_path / "home"),
            "LLMCF_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:12]}.",
        }
    )
    info = broker.up(settings)
    assert info.origin == "external" and info.bootstrap == kafka_broker
    assert set(info.topics) <= set(_partitions(kafka_broker))
    assert not (settings.home / "broker.json").exists()
    report = broker.status(settings)
    assert report["origin"] == "external" and report["reachable"] is True
    assert broker.down(settings) is False


def test_unreachable_cluster_is_a_clear_error(tmp_path):
    settings = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}", "LLMCF_HOME": str(tmp_path)})
    with pytest.raises(UserFacingError, match="cannot reach Kafka"):
        kafka.ensure_topics(settings, settings.kafka_bootstrap_servers, timeout=1.0)


def test_no_broker_at_all_tells_what_to_do(tmp_path):
    settings = Settings.from_env({"LLMCF_HOME": str(tmp_path)})
    with pytest.raises(UserFacingError, match="run `llmcf infra up` or set KAFKA_BOOTSTRAP_SERVERS"):
        kafka.resolve_bootstrap(settings)


def test_sasl_config_needs_credentials_and_is_redacted():
    settings = Settings.from_env(
        {
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": "svc",
            "KAFKA_SASL_PASSWORD": "hunter2",
        }
    )
    config = kafka.producer_config(settings, "kafka:9093")
    assert config["sasl.password"] == "hunter2" and config["enable.idempotence"] is True
    assert "hunter2" not in repr(kafka.redacted(config))
    without_password = Settings.from_env({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "PLAIN"})
    with pytest.raises(UserFacingError, match="KAFKA_SASL_PASSWORD"):
        kafka.client_config(without_password, "kafka:9093")
