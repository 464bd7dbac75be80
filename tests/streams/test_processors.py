"""The batch processors without Faust, on real parts: the test broker, SQLite and PostgreSQL, a Qdrant Edge shard in
tmp_path and the real MiniLM embedder."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

import migrations
from llmcf.cot_policy import CotPolicy, cot_request_id
from llmcf.dead_letters import DeadLetterPolicy, KafkaDeadLetterSink, SourceRecord
from llmcf.embeddings import TextEmbedder
from llmcf.events import CotRequest, CotResult, DeadLetter, InteractionEvent, ItemEvent, decode
from llmcf.kafka import producer_config, read_to_end
from llmcf.samples import SAMPLE_DIMENSION, decode_history
from llmcf.settings import Settings
from llmcf.topics import Topics
from storage.repository import Repository
from storage.vectors import Filter, Match
from storage.vectors.edge import EdgeIndex
from streams.batch import Writer
from streams.catalogue import Catalogue
from streams.interactions import InteractionBatchProcessor
from streams.items import ItemBatchProcessor
from streams.publisher import RequestPublisher
from streams.results import ResultBatchProcessor
from tests.streams.histories import MemoryHistories

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


class Parts:
    def __init__(self, settings: Settings, database_url: str, shard: Path):
        migrations.upgrade(database_url)
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.repository = Repository.from_url(database_url)
        self.index = EdgeIndex(shard, SAMPLE_DIMENSION)
        self.catalogue = Catalogue(self.repository)
        self.executor, self.index_executor = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
        config = producer_config(settings, settings.kafka_bootstrap_servers)
        policy = DeadLetterPolicy(KafkaDeadLetterSink(config, self.topics.dead_letters), "test")
        self.writer, self.index_writer = Writer(self.executor, policy), Writer(self.index_executor, policy)
        self.publisher = RequestPublisher(config, self.topics.cot_requests)
        self.histories = MemoryHistories()
        self.items = ItemBatchProcessor(
            self.topics.items, self.repository, self.catalogue, TextEmbedder.load("cpu", threads=1), self.writer
        )
        self.interactions = InteractionBatchProcessor(
            self.topics.interactions, self.repository, self.index, self.catalogue, self.histories, self.publisher,
            self.writer, self.index_writer, CotPolicy(rate=0.0, cold_start_window_s=86_400), history_length=20,
            item_wait_s=1.0,
        )
        self.results = ResultBatchProcessor(self.topics.cot_results, self.repository, self.index, self.writer)

    def close(self) -> None:
        self.publisher.close()
        self.executor.shutdown()
        self.index_executor.shutdown()
        self.index.close()
        self.repository.close()

    def read(self, topic: str) -> list[tuple[bytes, bytes]]:
        return [(m.key(), m.value()) for m in read_to_end(self.settings, self.settings.kafka_bootstrap_servers, topic)]


@pytest.fixture
def parts(kafka_settings: Settings, database_url: str, tmp_path: Path) -> Iterator[Parts]:
    made = Parts(kafka_settings, database_url, tmp_path / "shard")
    yield made
    made.close()


def records(topic: str, values: list[bytes], key: bytes = b"k") -> list[SourceRecord]:
    return [SourceRecord(value=v, key=key, topic=topic, partition=0, offset=n) for n, v in enumerate(values)]


def item(item_id: str, created_at: datetime) -> bytes:
    return ItemEvent(item_id=item_id, title=f"Movie {item_id}", tags=["Drama"], created_at=created_at).to_bytes()


def interaction(item_id: str, at: datetime, label: int = 1) -> InteractionEvent:
    return InteractionEvent(user_id="u1", item_id=item_id, kind="rating", label=label, ts=at)


def test_items_are_stored_embedded_once_and_known(parts: Parts) -> None:
    batch = records(parts.topics.items, [item("old", T0 - timedelta(days=30)), item("new", T0), b"{not json"])
    asyncio.run(parts.items.process(batch))
    asyncio.run(parts.items.process(batch))  # re-delivered

    assert parts.repository.counts()["items"] == 2
    vectors = parts.repository.get_item_embeddings(["old", "new"])
    assert set(vectors) == {"old", "new"}
    assert vectors["old"].shape == (384,) and np.linalg.norm(vectors["old"]) == pytest.approx(1.0, abs=1e-5)
    assert {"old", "new"} <= set(parts.catalogue.cached(["old", "new"]))
    letters = [decode(DeadLetter, value) for _, value in parts.read(parts.topics.dead_letters)]
    assert {(letter.reason, letter.offset) for letter in letters} == {("undecodable", 2)}


def test_sampled_interaction_is_stored_indexed_and_requested_with_its_earlier_history(parts: Parts) -> None:
    asyncio.run(parts.items.process(records(parts.topics.items, [
        item("a", T0 - timedelta(days=30)), item("b", T0 - timedelta(days=30)), item("new", T0),
    ])))
    events = [interaction("a", T0 + timedelta(minutes=1)), interaction("b", T0 + timedelta(minutes=2), label=0),
              interaction("new", T0 + timedelta(minutes=3))]
    batch = records(parts.topics.interactions, [e.to_bytes() for e in events] + [b'{"user_id": 7}'])
    asyncio.run(parts.interactions.process(batch))
    asyncio.run(parts.interactions.process(batch))  # re-delivered: same rows, same point

    request_id = cot_request_id(events[2].interaction_id)
    counts = parts.repository.counts()
    assert (counts["interactions"], counts["cot_samples"]) == (3, 1)
    sample = parts.repository.get_cot_samples([request_id])[request_id]
    assert (sample.status, sample.reason) == ("pending", "cold_start")
    assert sample.history == [{"item_id": "a", "label": 1}, {"item_id": "b", "label": 0}]

    assert parts.index.count() == 1
    [[hit]] = parts.index.search(np.ones((1, SAMPLE_DIMENSION), dtype=np.float32), k=1)
    assert hit.key == request_id
    assert hit.payload["status"] == "pending" and decode_history(hit.payload["history"]) == ("a", "b")
    assert hit.payload["ts"] == int(events[2].ts.timestamp() * 1000)

    published = [decode(CotRequest, value) for _, value in parts.read(parts.topics.cot_requests)]
    assert {r.request_id for r in published} == {request_id}  # twice on the topic at most: at-least-once
    assert [h.item_id for h in published[0].history] == ["a", "b"]
    assert published[0].target.title == "Movie new"
    assert [h.interaction_id for h in parts.histories.get("u1")] == [e.interaction_id for e in events]
    letters = [decode(DeadLetter, value) for _, value in parts.read(parts.topics.dead_letters)]
    assert {letter.reason for letter in letters} == {"invalid"}
    assert "item_id" in letters[0].error

    result = CotResult(
        request_id=request_id, user_id="u1", item_id="new", label=1, ts=events[2].ts, cot_text="because",
        cot_embedding=[0.5] * 384, backend="template", model="t", generated_at=T0 + timedelta(hours=1),
    )
    asyncio.run(parts.results.process(records(parts.topics.cot_results, [result.to_bytes(), b"[]"])))
    done = parts.repository.get_cot_samples([request_id])[request_id]
    assert (done.status, done.cot_text) == ("generated", "because")
    assert done.cot_vector().shape == (384,)
    assert parts.index.count(Filter(must=[Match("status", "generated")])) == 1


def test_an_interaction_on_an_unknown_item_is_stored_and_its_sample_dead_lettered(parts: Parts) -> None:
    event = interaction("never-published", T0)
    asyncio.run(parts.interactions.process(records(parts.topics.interactions, [event.to_bytes()])))
    assert parts.repository.counts()["interactions"] == 1
    [letter] = [decode(DeadLetter, value) for _, value in parts.read(parts.topics.dead_letters)]
    assert letter.reason == "processing_failed" and "never-published" in letter.error


def test_a_sample_whose_interaction_postgresql_refuses_is_neither_requested_nor_left_in_the_index(
    kafka_settings: Settings, pg_database_url: str, tmp_path: Path
) -> None:
    parts = Parts(kafka_settings, pg_database_url, tmp_path / "shard")
    try:
        asyncio.run(parts.items.process(records(parts.topics.items, [item("new", T0)])))
        good = interaction("new", T0 + timedelta(minutes=1))
        refused = InteractionEvent(user_id="u\x00", item_id="new", kind="rating", label=1, ts=T0)  # no NUL in PostgreSQL
        batch = records(parts.topics.interactions, [good.to_bytes(), refused.to_bytes()])
        asyncio.run(parts.interactions.process(batch))

        assert parts.repository.counts()["interactions"] == 1
        assert set(parts.repository.get_cot_samples([cot_request_id(good.interaction_id),
                                                     cot_request_id(refused.interaction_id)])) == {
            cot_request_id(good.interaction_id)}
        assert parts.index.count() == 1  # the refused interaction's point was indexed with the batch, then removed
        published = [decode(CotRequest, value).request_id for _, value in parts.read(parts.topics.cot_requests)]
        assert published == [cot_request_id(good.interaction_id)]
        [letter] = [decode(DeadLetter, value) for _, value in parts.read(parts.topics.dead_letters)]
        assert (letter.reason, letter.offset) == ("processing_failed", 1) and "store interactions" in letter.error
    finally:
        parts.close()
