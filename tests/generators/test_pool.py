"""The generator pool on a real broker: results, dead letters, commits, retries, backpressure, bounded work, rebalances."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Sequence

import numpy as np
import pytest
from confluent_kafka import Producer
from prometheus_client import REGISTRY

from generators.backends import create_backend
from generators.backends.base import CotBackend, Generation
from generators.backends.openai_backend import OpenAIBackend
from generators.backends.template_backend import TEMPLATE_MARKER
from generators.config import PoolConfig
from generators.offsets import OffsetTracker
from generators.pool import GeneratorPool
from generators.prompt import Prompt
from llmcf.embeddings import EMBEDDING_DIMENSION, TextEmbedder
from llmcf.kafka import producer_config
from llmcf.topics import Topics
from testkit.threads import running
from tests.generators import make_request
from tests.generators.pool_support import (
    ChatCompletionsServer,
    publish_requests,
    read_dead_letters,
    read_results,
    uncommitted,
    wait_until,
)

FAST = PoolConfig(max_batch=8, max_wait_ms=50, retry_backoff_s=0.01)


@pytest.fixture(scope="module")
def embedder() -> TextEmbedder:
    return TextEmbedder.load("cpu")


class SerialisedEmbedder:
    """A shared embedder used by two pools at once: the embedder serves one thread at a time."""

    def __init__(self, embedder: TextEmbedder):
        self._embedder = embedder
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            return self._embedder.embed(texts)


class SlowTemplateBackend(CotBackend):
    """The template backend, `delay_s` slower per call, recording each call's request ids; with `hold`, every call
    waits until the event is set."""

    name = "template"

    def __init__(self, delay_s: float, hold: threading.Event | None = None):
        self._inner = create_backend("template")
        self.model, self.options, self.max_batch = self._inner.model, self._inner.options, self._inner.max_batch
        self.delay_s = delay_s
        self.hold = hold
        self.calls: list[list[str]] = []

    @property
    def largest_batch(self) -> int:
        return max(map(len, self.calls), default=0)

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]:
        self.calls.append([prompt.request.request_id for prompt in prompts])
        if self.hold is not None:
            self.hold.wait(60)
        time.sleep(self.delay_s)
        return self._inner.generate(prompts)


# ---- offsets: the commit never passes an unfinished request ------------------------------------------------------------


def test_commit_stops_at_the_first_unfinished_offset_and_ignores_stale_epochs():
    tracker = OffsetTracker()
    tracker.start(0, epoch=1)
    for offset in range(5):
        assert tracker.consumed(0, offset, epoch=1)
    tracker.finished(0, 1, epoch=1)
    tracker.finished(0, 2, epoch=1)
    assert tracker.to_commit() == {}  # offset 0 still unfinished
    tracker.finished(0, 0, epoch=1)
    assert tracker.to_commit() == {0: 3}
    tracker.mark_committed(0, 3)
    assert tracker.to_commit() == {}
    tracker.start(0, epoch=2)  # revoked, then assigned again: work of the old epoch no longer counts
    tracker.consumed(0, 3, epoch=2)
    tracker.finished(0, 4, epoch=1)
    tracker.finished(0, 3, epoch=2)
    assert tracker.to_commit() == {0: 4}
    assert not tracker.consumed(1, 0, epoch=1)  # a partition never assigned


# ---- the happy path, dead letters and commits --------------------------------------------------------------------------


def test_every_request_gets_one_result_bad_records_are_dead_lettered_and_offsets_committed(kafka_settings, embedder):
    extra = [(b"junk", b"not json at all"), (b"bad", b'{"request_id": 5, "user_id": "u"}'), (b"tomb", None)]
    ids = publish_requests(kafka_settings, 40, extra=extra)
    pool = GeneratorPool(kafka_settings, kafka_settings.kafka_bootstrap_servers, create_backend("template"), embedder, FAST)
    with running(pool):
        wait_until(lambda: pool.stats.published == 40 and pool.stats.dead_lettered == 3, 60, "40 results, 3 dead letters")

    results = read_results(kafka_settings)
    assert sorted(r.request_id for r in results) == sorted(ids)  # exactly once each: no crash happened
    for result in results:
        assert (result.backend, result.model) == ("template", "template-v1")
        assert result.cot_text.startswith(TEMPLATE_MARKER)
        assert len(result.cot_embedding) == EMBEDDING_DIMENSION
        assert np.linalg.norm(result.cot_embedding) == pytest.approx(1.0, abs=1e-4)
        assert result.completion_tokens > 0 and result.generated_at >= result.ts
    by_id = {r.request_id: r for r in results}
    assert 'the user did not click "Movie 0 (1950)"' in by_id["req-0"].cot_text
    assert by_id["req-0"].label == 0 and by_id["req-1"].label == 1

    letters = read_dead_letters(kafka_settings)
    assert sorted(letter.reason for letter in letters) == ["invalid", "undecodable", "undecodable"]
    invalid = next(letter for letter in letters if letter.reason == "invalid")
    assert invalid.original_bytes() == b'{"request_id": 5, "user_id": "u"}'
    assert "request_id" in invalid.error and invalid.consumer == pool.group_id
    assert uncommitted(kafka_settings) == {}

    # A second member of the same group finds nothing left to do.
    second = GeneratorPool(kafka_settings, kafka_settings.kafka_bootstrap_servers, create_backend("template"), embedder, FAST)
    with running(second):
        assert second.assigned.wait(30)
        time.sleep(1.5)
    assert second.stats.consumed == 0
    assert len(read_results(kafka_settings)) == 40


def test_requests_older_than_the_ttl_are_skipped_counted_and_committed(kafka_settings, embedder):
    """A pool behind its inflow: requests past the TTL when their batch comes up are skipped (not generated, not dead
    letters), counted, and their offsets committed; the fresh ones are generated. Every request is accounted for."""
    stale = publish_requests(kafka_settings, 7, prefix="stale", age_s=120)
    fresh = publish_requests(kafka_settings, 5, prefix="fresh")
    skipped_before = REGISTRY.get_sample_value("llmcf_generator_cots_total",
                                               {"backend": "template", "outcome": "skipped_ttl"}) or 0.0
    pool = GeneratorPool(kafka_settings, kafka_settings.kafka_bootstrap_servers, create_backend("template"), embedder,
                         replace(FAST, ttl_s=60))
    with running(pool):
        wait_until(lambda: pool.stats.published + pool.stats.skipped == 12, 60, "12 requests generated or skipped")
        wait_until(lambda: uncommitted(kafka_settings) == {}, 30, "every offset committed")
    assert sorted(r.request_id for r in read_results(kafka_settings)) == sorted(fresh)
    assert (pool.stats.published, pool.stats.skipped, pool.stats.dead_lettered) == (len(fresh), len(stale), 0)
    assert REGISTRY.get_sample_value("llmcf_generator_cots_total",
                                     {"backend": "template", "outcome": "skipped_ttl"}) - skipped_before == len(stale)


def test_a_request_for_a_sample_already_generated_is_skipped_as_a_duplicate(kafka_settings, embedder):
    """The stream worker publishes at least once: a second request for a generated sample is not generated again."""
    ids = publish_requests(kafka_settings, 5)
    pool = GeneratorPool(kafka_settings, kafka_settings.kafka_bootstrap_servers, create_backend("template"), embedder,
                         FAST)
    with running(pool):
        wait_until(lambda: pool.stats.published == 5, 60, "5 results")
        assert publish_requests(kafka_settings, 5) == ids  # the same request ids again
        wait_until(lambda: pool.stats.skipped_duplicate == 5, 60, "5 duplicates skipped")
        wait_until(lambda: uncommitted(kafka_settings) == {}, 30, "every offset committed")
    assert pool.stats.published == 5 and len(read_results(kafka_settings)) == 5


# ---- retries and dead letters after max attempts, through the real OpenAI backend -------------------------------------


def test_requests_failing_every_attempt_are_dead_lettered_and_the_rest_succeed(kafka_settings, embedder):
    ids = publish_requests(kafka_settings, 12, poisoned={2, 7, 11})
    config = PoolConfig(max_batch=4, max_wait_ms=50, max_attempts=3, retry_backoff_s=0.01)
    with ChatCompletionsServer(fail_marker="POISON") as server:
        backend = OpenAIBackend(server.url, "smol", max_retries=0, backoff_base_s=0.01, read_timeout_s=5)
        pool = GeneratorPool(kafka_settings, kafka_settings.kafka_bootstrap_servers, backend, embedder, config)
        try:
            with running(pool):
                wait_until(lambda: pool.stats.published + pool.stats.dead_lettered == 12, 60, "12 requests finished")
        finally:
            backend.close()

    results = read_results(kafka_settings)
    good = sorted(set(ids) - {"req-2", "req-7", "req-11"})
    assert sorted(r.request_id for r in results) == good
    assert {(r.backend, r.model) for r in results} == {("openai", "smol")}
    assert all(r.cot_text.startswith("The user's history points to Movie") for r in results)
    assert all(r.prompt_tokens > 50 and r.completion_tokens > 5 for r in results)

    letters = read_dead_letters(kafka_settings)
    assert sorted(letter.reason for letter in letters) == ["retries_exhausted"] * 3
    assert sorted(letter.original_bytes().decode().split('"request_id":"')[1].split('"')[0] for letter in letters) == [
        "req-11", "req-2", "req-7"]
    assert all("failed 3 times" in letter.error and "500" in letter.error for letter in letters)
    for i in (2, 7, 11):
        assert server.titles[f"POISON Movie {i}"] >= 3  # every attempt reached the server
    assert uncommitted(kafka_settings) == {}  # dead-lettered requests are finished: their offsets are committed


# ---- backpressure: a saturated server pauses consumption, then everything completes -----------------------------------


def test_backend_saturation_pauses_consumption_then_everything_completes(kafka_settings, embedder):
    ids = publish_requests(kafka_settings, 10)
    with ChatCompletionsServer(busy_for_s=1.5, retry_after="1") as server:
        backend = OpenAIBackend(server.url, "smol", backpressure_waits=0, read_timeout_s=5)
        pool = GeneratorPool(kafka_settings, kafka_settings.kafka_bootstrap_servers, backend, embedder, FAST)
        seen_paused = threading.Event()
        try:
            with running(pool):
                def finished() -> bool:
                    if pool.paused:
                        seen_paused.set()
                    return pool.stats.published == 10

                wait_until(finished, 60, "10 results after the server recovers", interval_s=0.05)
        finally:
            backend.close()

    assert server.busy_answers >= 1
    assert pool.stats.pauses["backend_saturated"] >= 1 and seen_paused.is_set()
    assert pool.stats.dead_lettered == 0  # backpressure is not a failed attempt
    assert sorted(r.request_id for r in read_results(kafka_settings)) == sorted(ids)


# ---- bounded in-flight work -------------------------------------------------------------------------------------------


def test_a_burst_beyond_the_backlog_skips_the_oldest_keeps_work_bounded_and_accounts_for_every_request(
        kafka_settings, embedder):
    """30 requests at once into a slow pool with room for 6 waiting: consumption never pauses for it, the pool holds at
    most the backlog plus a queued and a generating batch, the newest requests (by event time) are generated, the rest
    are skipped as `backlog_full`, and generated + skipped = requested."""
    ids = publish_requests(kafka_settings, 30, event_minutes=True)
    backend = SlowTemplateBackend(delay_s=0.25)
    config = PoolConfig(max_batch=3, max_wait_ms=20, max_queued_batches=1, max_backlog=6)
    pool = GeneratorPool(kafka_settings, kafka_settings.kafka_bootstrap_servers, backend, embedder, config)
    most_waiting = 0
    with running(pool):
        def finished() -> bool:
            nonlocal most_waiting
            stats = pool.stats
            most_waiting = max(most_waiting, stats.consumed - stats.published - stats.skipped - stats.dead_lettered)
            return stats.published + stats.skipped == 30

        wait_until(finished, 60, "30 requests generated or skipped by a slow backend", interval_s=0.02)
        wait_until(lambda: uncommitted(kafka_settings) == {}, 30, "every offset committed")
    assert pool.stats.pauses == {"backend_saturated": 0}
    assert backend.largest_batch == 3
    # the backlog, one batch queued, one generating (and a request counted consumed just before its skip)
    assert most_waiting <= config.max_backlog + 2 * config.max_batch + 1
    generated = [r.request_id for r in read_results(kafka_settings)]
    assert len(generated) == len(set(generated)) == pool.stats.published
    assert pool.stats.skipped_backlog == 30 - pool.stats.published > 0
    assert set(ids[-config.max_backlog:]) <= set(generated)  # the newest event times are never the ones skipped


def test_batches_follow_priority_cold_start_items_first_then_the_newest_event_time(kafka_settings, embedder):
    """Requests published before the pool starts, the backend held until all are consumed: once the first two batches
    (formed before everything arrived) are out of the way, cold-start requests come first, then newest event time."""
    sampled = publish_requests(kafka_settings, 10, prefix="sampled", event_minutes=True)
    cold = publish_requests(kafka_settings, 4, prefix="cold", event_minutes=True, reason="cold_start")
    hold = threading.Event()
    backend = SlowTemplateBackend(delay_s=0.0, hold=hold)
    pool = GeneratorPool(kafka_settings, kafka_settings.kafka_bootstrap_servers, backend, embedder,
                         PoolConfig(max_batch=2, max_wait_ms=20, max_queued_batches=1))
    with running(pool):
        wait_until(lambda: pool.stats.consumed == 14 and backend.calls, 60, "every request consumed")
        hold.set()
        wait_until(lambda: pool.stats.published == 14, 60, "14 results")
    later = [request_id for call in backend.calls[2:] for request_id in call]
    expected = [i for i in reversed(cold) if i in later] + [i for i in reversed(sampled) if i in later]
    assert later == expected and len(later) >= 10  # the first two batches hold 2 each, or 1 if 20 ms passed first
    assert pool.stats.skipped == 0


def test_ten_times_its_capacity_keeps_the_backlog_bounded_and_every_request_is_accounted_for(kafka_settings, embedder):
    """Requests sent open-loop at ~10x a slow member's capacity (2 per 0.1 s batch) for 8 s: the backlog never exceeds
    its bound, the consumer keeps up with the inflow, the overflow is skipped and counted, and once the inflow stops
    generated + skipped + dead-lettered = requested, with one result per generated request (`bench.cot_budget` runs
    the same protocol for minutes on the real LLM and reports latencies against the TTL)."""
    backend = SlowTemplateBackend(delay_s=0.1)
    config = PoolConfig(max_batch=2, max_wait_ms=20, ttl_s=3, max_backlog=8)
    pool = GeneratorPool(kafka_settings, kafka_settings.kafka_bootstrap_servers, backend, embedder, config)
    sent: list[str] = []
    rate, seconds = 200.0, 8.0

    def publish() -> None:
        producer = Producer(producer_config(kafka_settings, kafka_settings.kafka_bootstrap_servers))
        topic = Topics.from_settings(kafka_settings).cot_requests
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            request = make_request(request_id=f"load-{i}", requested_at=datetime.now(timezone.utc))
            producer.produce(topic, key=request.request_id.encode(), value=request.to_bytes())
            producer.poll(0)
            sent.append(request.request_id)
        assert producer.flush(30) == 0

    most_backlog = 0
    with running(pool):
        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()

        def accounted() -> bool:
            nonlocal most_backlog
            most_backlog = max(most_backlog, pool.backlog_size)
            stats = pool.stats
            return not publisher.is_alive() and stats.published + stats.skipped + stats.dead_lettered == len(sent)

        wait_until(accounted, 180, "every request sent generated, skipped or dead-lettered", interval_s=0.05)
        wait_until(lambda: uncommitted(kafka_settings) == {}, 30, "every offset committed")
    stats = pool.stats
    assert len(sent) == int(rate * seconds)
    assert 0 < most_backlog <= config.max_backlog
    assert stats.published > 0 and stats.skipped_ttl + stats.skipped_in_queue + stats.skipped_backlog > 0
    assert stats.skipped_duplicate == stats.dead_lettered == 0
    generated = [r.request_id for r in read_results(kafka_settings)]
    assert len(generated) == len(set(generated)) == stats.published


# ---- rebalances: a second member joins mid-stream ----------------------------------------------------------------------


def test_a_member_joining_mid_stream_shares_the_work_and_nothing_is_lost(kafka_settings, embedder):
    ids = publish_requests(kafka_settings, 80)
    config = PoolConfig(max_batch=4, max_wait_ms=20, revoke_grace_s=2.0)
    shared = SerialisedEmbedder(embedder)
    first = GeneratorPool(kafka_settings, kafka_settings.kafka_bootstrap_servers, SlowTemplateBackend(0.1), shared, config)
    second = GeneratorPool(kafka_settings, kafka_settings.kafka_bootstrap_servers, SlowTemplateBackend(0.1), shared, config)
    with running(first):
        wait_until(lambda: first.stats.published >= 8, 30, "the first member to start publishing")
        with running(second):
            wait_until(lambda: len({r.request_id for r in read_results(kafka_settings)}) == 80, 60, "80 distinct results",
                       interval_s=1.0)
            assert second.assigned.is_set()
    assert second.stats.consumed > 0  # the group did hand it partitions
    assert {r.request_id for r in read_results(kafka_settings)} == set(ids)
    assert uncommitted(kafka_settings) == {}


# ---- the real model through the pool ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_real_smollm2_backend_writes_results_through_the_pool(kafka_settings, embedder):
    ids = publish_requests(kafka_settings, 2)
    backend = create_backend("transformers", device="cpu", max_new_tokens=16, seed=3)
    try:
        pool = GeneratorPool(kafka_settings, kafka_settings.kafka_bootstrap_servers, backend, embedder, FAST)
        with running(pool):
            wait_until(lambda: pool.stats.published + pool.stats.dead_lettered == 2, 120, "2 SmolLM2 results")
    finally:
        backend.close()
    results = read_results(kafka_settings)
    assert sorted(r.request_id for r in results) == sorted(ids)
    for result in results:
        assert (result.backend, result.model) == ("transformers", "SmolLM2-135M-Instruct.Q4_1")
        assert result.cot_text.strip() and not result.cot_text.startswith(TEMPLATE_MARKER)
        assert 1 <= result.completion_tokens <= 16 and result.prompt_tokens > 50
        assert len(result.cot_embedding) == EMBEDDING_DIMENSION
