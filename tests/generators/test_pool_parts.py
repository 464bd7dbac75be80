"""The generator pool's parts without a broker: the sensor's metrics, partition ownership, the pace the budget plans
with, the result publisher's retries and a batch's turn through `BatchGenerator`."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from prometheus_client import REGISTRY

from generators.backends import create_backend
from generators.backends.base import BackendError, BackendSaturated, CotBackend, Generation
from generators.config import PoolConfig, PoolFailure
from generators.delivery import BatchDeadLetters, ResultPublisher
from generators.generation import Abandoned, BatchGenerator, Pace, sleep_unless_abandoned
from generators.offsets import Ownership
from generators.progress import PoolStats
from generators.prompt import Prompt
from generators.sensor import PoolSensor
from generators.work import Work
from llmcf.backend_names import BACKEND_NAMES, parse_backend_name
from llmcf.dead_letters import DeadLetterDeliveryError, DeadLetterSink, SourceRecord
from llmcf.events import CotResult, DeadLetter
from tests.generators import make_request

FAST = PoolConfig(max_batch=8, max_wait_ms=50, retry_backoff_s=0.0, publish_attempts=2, flush_timeout_s=0.1)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---- backend names ---------------------------------------------------------------------------------------------------


def test_backend_names_are_parsed_against_the_one_vocabulary():
    assert BACKEND_NAMES == ("transformers", "openai", "template")
    assert [parse_backend_name(name) for name in BACKEND_NAMES] == list(BACKEND_NAMES)
    with pytest.raises(ValueError, match="choose one of: transformers, openai, template"):
        parse_backend_name("gpt")


# ---- sensor ----------------------------------------------------------------------------------------------------------


def test_the_sensor_counts_skips_by_reason_and_delivered_results_by_outcome():
    sensor = PoolSensor("template", "group-sensor", "topic-sensor")
    before = {outcome: sample("llmcf_generator_cots_total", backend="template", outcome=outcome)
              for outcome in ("skipped_duplicate", "skipped_ttl", "ok", "retries_exhausted")}
    consumed = sample("llmcf_events_total", topic="topic-sensor", outcome="ok")
    sensor.on_request_skipped("duplicate")
    sensor.on_expired_in_queue(3)
    sensor.on_generation_failed()
    now = datetime.now(timezone.utc)
    result = CotResult(request_id="r", user_id="u", item_id="i", label=1, ts=now, cot_text="why",
                       cot_embedding=[0.0], backend="template", model="m", generated_at=now, prompt_tokens=7,
                       completion_tokens=5)
    prompt_tokens = sample("llmcf_generator_tokens_total", backend="template", kind="prompt")
    sensor.on_results_delivered([result, result], [now - timedelta(seconds=2)] * 2, now.timestamp())
    after = {outcome: sample("llmcf_generator_cots_total", backend="template", outcome=outcome) for outcome in before}
    assert {k: after[k] - before[k] for k in before} == {"skipped_duplicate": 1, "skipped_ttl": 3, "ok": 2,
                                                         "retries_exhausted": 1}
    assert sample("llmcf_events_total", topic="topic-sensor", outcome="ok") == consumed + 1
    assert sample("llmcf_generator_tokens_total", backend="template", kind="prompt") == prompt_tokens + 14


def test_the_sensor_sets_partition_gauges_and_removes_them_when_the_partition_goes():
    sensor = PoolSensor("template", "group-gauges", "topic-gauges")
    labels = {"group": "group-gauges", "topic": "topic-gauges", "partition": "3"}
    sensor.on_committed(3, 40)
    sensor.on_partition_offsets(3, end=50, committed=40)
    assert sample("llmcf_consumer_lag_records", **labels) == 10
    assert sample("llmcf_consumer_committed_offset", **labels) == 40
    sensor.on_partitions_forgotten([3, 4])  # 4 never had gauges
    assert REGISTRY.get_sample_value("llmcf_consumer_lag_records", labels) is None
    sensor.on_paused()
    assert sample("llmcf_generator_paused") == 1
    sensor.on_stopped()
    assert sample("llmcf_generator_paused") == 0 and sample("llmcf_generator_queue_depth") == 0


# ---- ownership and pace ----------------------------------------------------------------------------------------------


def test_ownership_recognises_work_of_an_earlier_assignment():
    ownership = Ownership()
    first = ownership.grant(0)
    assert ownership.owns(0, first)
    ownership.revoke(0)
    assert not ownership.owns(0, first) and ownership.epoch(0) is None
    second = ownership.grant(0)
    assert second != first and ownership.owns(0, second) and not ownership.owns(0, first)


def test_pace_weighs_recent_batches_most():
    pace = Pace()
    pace.measure(10, 2.0)
    assert (pace.batch_seconds, pace.capacity) == (2.0, 5.0)
    pace.measure(10, 1.0)
    assert pace.batch_seconds == pytest.approx(0.7 * 2.0 + 0.3 * 1.0)
    assert pace.capacity == pytest.approx(0.7 * 5.0 + 0.3 * 10.0)


def test_an_abandoned_wait_raises():
    abandon = threading.Event()
    sleep_unless_abandoned(abandon, 0.0)
    abandon.set()
    with pytest.raises(Abandoned):
        sleep_unless_abandoned(abandon, 10.0)


# ---- delivery --------------------------------------------------------------------------------------------------------


class FakeProducer:
    """Keeps what is produced; the first `failing_flushes` flushes leave one message undelivered."""

    def __init__(self, failing_flushes: int = 0):
        self.produced: list[tuple[str, bytes]] = []
        self.failing_flushes = failing_flushes

    def produce(self, topic: str, key: bytes, value: bytes, on_delivery) -> None:
        self.produced.append((topic, key))

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        if self.failing_flushes:
            self.failing_flushes -= 1
            return 1
        return 0


class MemorySink(DeadLetterSink):
    def __init__(self, failing_flushes: int = 0):
        self.sent: list[DeadLetter] = []
        self.failing_flushes = failing_flushes

    def send(self, letter: DeadLetter) -> None:
        self.sent.append(letter)

    def flush(self, timeout_s: float = 30.0) -> None:
        if self.failing_flushes:
            self.failing_flushes -= 1
            raise DeadLetterDeliveryError("dead letters undelivered")


def record(offset: int, value: bytes | None) -> SourceRecord:
    return SourceRecord(value, b"k", "cot-requests", 0, offset)


def result(request_id: str) -> CotResult:
    now = datetime.now(timezone.utc)
    return CotResult(request_id=request_id, user_id="u", item_id="i", label=1, ts=now, cot_text="why",
                     cot_embedding=[0.0], backend="template", model="m", generated_at=now, prompt_tokens=1,
                     completion_tokens=1)


def test_a_failed_flush_publishes_results_and_dead_letters_again():
    producer, sink = FakeProducer(failing_flushes=1), MemorySink()
    letters = BatchDeadLetters(sink, consumer="group")
    letters(record(0, b"junk"), "undecodable", "not json")
    ResultPublisher(producer, "cot-results", FAST, lambda _: None).deliver([result("a"), result("b")], letters)
    assert [key for _, key in producer.produced] == [b"a", b"b", b"a", b"b"]
    assert len(sink.sent) == 2  # the batch's letter, sent again with the second attempt


def test_delivery_that_keeps_failing_stops_the_pool():
    sink = MemorySink(failing_flushes=5)
    publisher = ResultPublisher(FakeProducer(), "cot-results", FAST, lambda _: None)
    with pytest.raises(PoolFailure, match="after 2 attempts"):
        publisher.deliver([result("a")], BatchDeadLetters(sink, consumer="group"))


# ---- a batch's turn --------------------------------------------------------------------------------------------------


class ScriptedBackend(CotBackend):
    """The template backend, except for targets titled "FAIL" (always an error) and a first call answered "busy"."""

    name = "template"

    def __init__(self, busy_first: bool = False):
        self._inner = create_backend("template")
        self.model, self.options, self.max_batch = self._inner.model, self._inner.options, self._inner.max_batch
        self.busy_first = busy_first
        self.calls: list[int] = []

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]:
        self.calls.append(len(prompts))
        if self.busy_first:
            self.busy_first = False
            raise BackendSaturated(0.0)
        if any(p.request.target.title == "FAIL" for p in prompts):
            raise BackendError("model crashed")
        return self._inner.generate(prompts)


class ConstantEmbedder:
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.ones((len(texts), 4), dtype=np.float32) / 2


def make_generator(backend: CotBackend, config: PoolConfig = FAST) -> tuple[BatchGenerator, FakeProducer, MemorySink,
                                                                            Ownership]:
    producer, sink, ownership = FakeProducer(), MemorySink(), Ownership()
    generator = BatchGenerator(
        backend, ConstantEmbedder(), config, ownership=ownership,
        publisher=ResultPublisher(producer, "cot-results", config, lambda _: None),
        dead_letters=BatchDeadLetters(sink, consumer="group"), stats=PoolStats(),
        sensor=PoolSensor(backend.name, "group", "cot-requests"), abandon=threading.Event(),
    )
    return generator, producer, sink, ownership


def works(ownership: Ownership, titles: list[str]) -> list[Work]:
    epoch = ownership.grant(0)
    return [Work(record(i, make_request(request_id=f"r{i}", title=title).to_bytes()), epoch, f"r{i}")
            for i, title in enumerate(titles)]


def test_a_batch_publishes_its_results_and_dead_letters_what_fails_every_attempt():
    generator, producer, sink, ownership = make_generator(ScriptedBackend())
    batch = works(ownership, ["Heat (1995)", "FAIL", "Fargo (1996)"])
    batch.append(Work(record(3, b"not json"), batch[0].epoch))
    generator.process(batch)
    assert [key for _, key in producer.produced] == [b"r0", b"r2"]
    assert sorted(letter.reason for letter in sink.sent) == ["retries_exhausted", "undecodable"]
    assert [work.generated for work in batch] == [True, False, True, False]
    stats = generator._stats
    assert (stats.batches, stats.published, stats.dead_lettered) == (1, 2, 2)
    assert generator.pace.capacity > 0


def test_saturation_is_waited_out_not_counted_as_an_attempt():
    backend = ScriptedBackend(busy_first=True)
    generator, producer, sink, ownership = make_generator(backend, PoolConfig(max_attempts=1, retry_backoff_s=0.0))
    generator.process(works(ownership, ["Heat (1995)"]))
    assert backend.calls == [1, 1] and len(producer.produced) == 1 and not sink.sent
    assert generator.pace.saturated_until > 0


def test_requests_of_a_revoked_partition_are_not_generated():
    backend = ScriptedBackend()
    generator, producer, _, ownership = make_generator(backend)
    batch = works(ownership, ["Heat (1995)"])
    ownership.revoke(0)
    generator.process(batch)
    assert backend.calls == [] and producer.produced == [] and not batch[0].generated


def test_requests_that_would_pass_the_ttl_are_skipped_in_the_queue():
    generator, producer, _, ownership = make_generator(ScriptedBackend(), PoolConfig(ttl_s=60.0))
    now = datetime.now(timezone.utc)
    old = make_request(request_id="old", requested_at=now - timedelta(minutes=5))
    fresh = make_request(request_id="fresh", requested_at=now)
    epoch = ownership.grant(0)
    generator.process([Work(record(0, old.to_bytes()), epoch, "old"), Work(record(1, fresh.to_bytes()), epoch, "fresh")])
    assert [key for _, key in producer.produced] == [b"fresh"]
    assert generator._stats.skipped_in_queue == 1
