"""The ranker's in-memory example pool: its samples carry the worker's vectors, the sync reads each stored change once
the overlap has passed, CoTs land in place, retention keeps the newest, and a sample written through the storage API
becomes retrievable by a running server within seconds (SQLite and PostgreSQL)."""

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
from ranker.registry import TrainResult
from ranker.serving.app import RankerService
from ranker.serving.pool import OVERLAP, PoolSync, pool_samples_from_storage
from storage.repository import Repository
from storage.rows import InteractionRow
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


def test_pool_samples_carry_the_vectors_the_worker_indexes(database_url: str) -> None:
    migrations.upgrade(database_url)
    catalogue = {"target": unit(1), "seen-a": unit(2), "seen-b": unit(3)}
    with Repository.from_url(database_url) as repository:
        sample = worker_sample(repository, "u1", "target", datetime(2024, 5, 1, tzinfo=timezone.utc), ["seen-a", "seen-b"],
                               catalogue)
        repository.upsert_item_embeddings(catalogue, model="m")
        repository.upsert_pending_samples([sample.pending])
        vectors = repository.get_item_embeddings(catalogue)
        [pending] = pool_samples_from_storage(list(repository.get_cot_samples([sample.request_id]).values()), vectors)

        assert pending is not None and pending.key == sample.point.key and pending.cot is None
        # the worker indexes [h; t] / sqrt(2): the same h and t, one division apart
        np.testing.assert_allclose(np.concatenate([pending.history_vector, pending.target_vector]) / np.sqrt(2),
                                   sample.point.vector, atol=1e-6)
        payload = sample.point.payload
        assert (pending.user_id, pending.item_id, pending.label, pending.ts_ms) == (
            payload["user_id"], payload["item_id"], payload["label"], payload["ts"])
        assert pending.history == ("seen-a", "seen-b")

        cot = unit(9)
        repository.complete_cot_samples([CotResult(
            request_id=sample.request_id, user_id="u1", item_id="target", label=1, ts=sample.row.ts,
            cot_text="because", cot_embedding=cot.tolist(), backend="template", model="template",
            generated_at=datetime.now(timezone.utc))])
        stored = list(repository.get_cot_samples([sample.request_id]).values())
        [generated] = pool_samples_from_storage(stored, vectors)
        unembedded = pool_samples_from_storage(stored, {})
        repository.complete_cot_samples([CotResult(
            request_id=sample.request_id, user_id="u1", item_id="target", label=1, ts=sample.row.ts,
            cot_text="because, by a model", cot_embedding=cot.tolist(), backend="transformers", model="smollm2",
            generated_at=datetime.now(timezone.utc) + timedelta(seconds=1))])
        [rewritten] = pool_samples_from_storage(list(repository.get_cot_samples([sample.request_id]).values()), vectors)
    np.testing.assert_array_equal(generated.cot, cot)
    assert not pending.cot_by_llm and not generated.cot_by_llm and rewritten.cot_by_llm  # the template is no LLM
    assert unembedded == [None]  # no embedding of its target item: the worker would not have indexed it either


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CountingRepository:
    """The real repository, counting the rows each sync reads."""

    def __init__(self, repository: Repository) -> None:
        self.repository, self.read = repository, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.repository, name)

    def cot_samples_changed_since(self, moment: datetime | None, batch_size: int = 5_000):  # type: ignore[no-untyped-def]
        for sample in self.repository.cot_samples_changed_since(moment, batch_size):
            self.read += 1
            yield sample


def store_samples(repository: Repository, count: int, targets: int, history: list[str]) -> list[Sample]:
    """`count` pending samples of users u0.. on items item0..item{targets-1}, one second apart, each with `history`,
    stored (with every item's embedding) as the worker stores them, in one batch: one stored time for all."""
    catalogue = {f"item{n}": unit(n) for n in range(targets)} | {item: unit(100 + n) for n, item in enumerate(history)}
    repository.upsert_item_embeddings(catalogue, model="m")
    start = datetime(2024, 5, 1, tzinfo=timezone.utc)
    samples = [worker_sample(repository, f"u{n}", f"item{n % targets}", start + timedelta(seconds=n), history, catalogue)
               for n in range(count)]
    repository.upsert_pending_samples([s.pending for s in samples])
    return samples


def test_the_sync_reads_a_stored_change_again_only_within_the_overlap_and_lands_cots_in_place(database_url: str) -> None:
    migrations.upgrade(database_url)
    with Repository.from_url(database_url) as repository:
        samples = store_samples(repository, 20, targets=3, history=["seen-a", "seen-b"])
        clock = Clock()
        counting = CountingRepository(repository)
        sync = PoolSync(counting, sync_s=1.0, clock=clock)  # type: ignore[arg-type]

        assert sync.sync() == 20 and len(sync.pool) == 20 and counting.read == 20
        clock.now = 1.0
        assert sync.sync() == 0 and counting.read == 40  # within the overlap: read again, nothing applied twice
        clock.now = 2.0 + OVERLAP.total_seconds()
        sync.sync()
        clock.now = 3.0 + OVERLAP.total_seconds()
        read = counting.read
        assert sync.sync() == 0 and counting.read == read  # past the overlap: nothing is read again

        repository.complete_cot_samples([CotResult(
            request_id=samples[3].request_id, user_id="u3", item_id="item0", label=1, ts=samples[3].row.ts,
            cot_text="because", cot_embedding=unit(42).tolist(), backend="template", model="template",
            generated_at=datetime.now(timezone.utc))])
        assert sync.sync() == 1 and len(sync.pool) == 20
        view = sync.pool.view
        row = view.keys.index(samples[3].request_id)
        assert view.generated[row] and view.generated.sum() == 1
        np.testing.assert_array_equal(view.cot[row], unit(42))
        assert sync.reachable() == (True, "")


class LateCommit(CountingRepository):
    """The real repository, with some rows not committed yet: hidden from reads until `commit()`."""

    def __init__(self, repository: Repository, hidden: set[str]) -> None:
        super().__init__(repository)
        self.hidden = hidden

    def commit(self) -> None:
        self.hidden = set()

    def cot_samples_changed_since(self, moment: datetime | None, batch_size: int = 5_000):  # type: ignore[no-untyped-def]
        for sample in super().cot_samples_changed_since(moment, batch_size):
            if sample.sample_id not in self.hidden:
                yield sample


def test_a_row_that_commits_late_within_the_overlap_is_still_read(database_url: str) -> None:
    migrations.upgrade(database_url)
    with Repository.from_url(database_url) as repository:
        samples = store_samples(repository, 10, targets=2, history=["seen"])
        late = samples[4].request_id
        clock = Clock()
        reader = LateCommit(repository, {late})
        sync = PoolSync(reader, clock=clock)  # type: ignore[arg-type]
        for now in (0.0, 1.0, 2.0):
            clock.now = now
            sync.sync()
        assert len(sync.pool) == 9
        clock.now = OVERLAP.total_seconds() - 0.5
        reader.commit()  # its transaction ends within the overlap of its stored time
        clock.now = 2.0 + OVERLAP.total_seconds()  # the first sync whose horizon could pass it
        sync.sync()
        assert late in sync.pool and len(sync.pool) == 10


def test_retention_keeps_the_newest_samples_by_event_time(database_url: str) -> None:
    migrations.upgrade(database_url)
    with Repository.from_url(database_url) as repository:
        samples = store_samples(repository, 150, targets=1, history=["seen"])
        sync = PoolSync(repository, max_samples=100)
        sync.sync()
    kept = set(sync.pool.view.keys[: len(sync.pool)])
    assert len(kept) == 90  # compacted to 90% of the bound
    assert kept == {s.request_id for s in samples[-90:]}


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
                # a liveness guard, not a latency bound (bench.serving prints the sync lag): a busy machine is slow
                assert time.monotonic() - written < 120.0, "the sample never became retrievable"
                time.sleep(0.1)
            waited = time.monotonic() - written
            assert len(service.source.pool) == 1
    assert 119 <= age <= 120 + waited + 2.0  # the event's own age when served, not the time it was stored
