"""The ranker's replica of the example pool on the embedded defaults: its points are the worker's points, and a sample
written through the storage API becomes retrievable by a running server within seconds (SQLite and PostgreSQL)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

import migrations
from llmcf.dead_letters import SourceRecord
from llmcf.embeddings import EMBEDDING_DIMENSION
from llmcf.events import CotResult, ItemSnapshot, epoch_ms
from ranker.serving.app import RankerService
from ranker.serving.pool import sample_points
from ranker.train import TrainResult
from storage.repository import InteractionRow, Repository
from streams.catalogue import Catalogue, CatalogueItem
from streams.history import HistoryItem
from streams.requests import Decided, Sample, build_samples
from tests.ranker.serving.support import running_server
from tests.ranker.serving.test_app import rank, wait_ready


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(EMBEDDING_DIMENSION).astype(np.float32)
    return vector / np.linalg.norm(vector)


def worker_sample(repository: Repository, user_id: str, item_id: str, ts: datetime, history: list[str],
                  vectors: dict[str, np.ndarray]) -> Sample:
    """A sample built by the stream worker's own code (`streams.requests.build_samples`), history oldest first."""
    catalogue = Catalogue(repository)
    for known, vector in vectors.items():
        catalogue.add(CatalogueItem(ItemSnapshot(item_id=known, title=known.upper()), created_ms=0, version=1, vector=vector))
    row = InteractionRow(f"x-{user_id}-{item_id}", user_id, item_id, "click", 1, None, ts, epoch_ms(ts))
    record = SourceRecord(value=b"{}", key=user_id.encode(), topic="interactions", partition=0, offset=0)
    past = [HistoryItem(epoch_ms(ts) - 1000 * (len(history) - n), f"h{n}", h, n % 2) for n, h in enumerate(history)]
    decided = Decided(record, row, "sampled", catalogue.cached([item_id])[item_id], past)
    [sample] = build_samples([decided], catalogue, datetime.now(timezone.utc), lambda _record, error: pytest.fail(error))
    return sample


def test_replica_points_are_the_points_the_worker_indexes(database_url: str) -> None:
    migrations.upgrade(database_url)
    catalogue = {"target": unit(1), "seen-a": unit(2), "seen-b": unit(3)}
    with Repository.from_url(database_url) as repository:
        sample = worker_sample(repository, "u1", "target", datetime(2024, 5, 1, tzinfo=timezone.utc), ["seen-a", "seen-b"],
                               catalogue)
        repository.upsert_item_embeddings(catalogue, model="m")
        repository.upsert_pending_samples([sample.pending])
        vectors = repository.get_item_embeddings(catalogue)
        [pending] = sample_points(repository.get_cot_samples([sample.request_id]).values(), vectors)

        assert pending is not None and pending.key == sample.point.key
        np.testing.assert_array_equal(pending.vector, sample.point.vector)
        assert pending.payload == sample.point.payload

        cot = unit(9)
        repository.complete_cot_samples([CotResult(
            request_id=sample.request_id, user_id="u1", item_id="target", label=1, ts=sample.row.ts,
            cot_text="because", cot_embedding=cot.tolist(), backend="template", model="template",
            generated_at=datetime.now(timezone.utc))])
        [generated] = sample_points(repository.get_cot_samples([sample.request_id]).values(), vectors)
        unembedded = sample_points(repository.get_cot_samples([sample.request_id]).values(), {})
    # what streams.results merges into the worker's point once the CoT is generated
    assert generated.payload == {**sample.point.payload, "status": "generated", "cot_embedding": [float(x) for x in cot]}
    assert unembedded == [None]  # no embedding of its target item: the worker would not have indexed it either


@pytest.mark.slow
def test_a_sample_written_through_storage_is_retrievable_by_the_server_within_seconds(
        make_service: Callable[..., RankerService], versions: dict[str, TrainResult], serving_settings, database_url: str
) -> None:
    service = make_service("deepfm+ict", database_url=database_url)
    with Repository.from_settings(serving_settings) as trained_in, Repository.from_url(database_url) as repository:
        repository.record_model_version(trained_in.get_model_version(versions["ict_a"].version_id))
        service.holder.load(versions["ict_a"].version_id)
        space = service.holder.current.space
        target, *history = space.item_ids[:3]
        catalogue = {item: space.item_vector(item) for item in (target, *history)}  # as the worker embedded them
        repository.upsert_item_embeddings(catalogue, model="m")
        request = {"user_id": "sync-user", "candidates": [target], "history": history}
        with running_server(service) as url:
            wait_ready(url)
            before = rank(url, request)
            assert before.status_code == 200 and before.json()["example_age_s"] is None  # the pool is empty

            event_time = datetime.now(timezone.utc) - timedelta(seconds=120)
            sample = worker_sample(repository, "someone-else", target, event_time, history, catalogue)
            repository.upsert_pending_samples([sample.pending])
            written = time.monotonic()
            while True:
                age = rank(url, request).json()["example_age_s"]
                if age is not None:
                    break
                assert time.monotonic() - written < 5.0, "the sample did not become retrievable within 5 s"
                time.sleep(0.1)
            assert service.source.index.count() == 1
    assert 119 <= age <= 130
