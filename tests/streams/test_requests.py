"""A batch's CoT samples, built without models: the published JSON is the contract's `CotRequest`, the pending row is
what `upsert_cot_samples` would store for it, and the vectors are `llmcf.samples.sample_vector`'s."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

import migrations
from llmcf.cot_policy import cot_request_id
from llmcf.dead_letters import SourceRecord
from llmcf.events import CotRequest, HistoryEntry, ItemSnapshot, decode, epoch_ms
from llmcf.samples import decode_history, sample_vector
from storage.repository import Repository
from storage.rows import InteractionRow, PendingSampleRow
from streams.catalogue import Catalogue, CatalogueItem
from streams.history import HistoryItem
from streams.requests import Decided, build_samples, sample_vectors

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
REQUESTED_AT = datetime(2024, 6, 1, 8, 30, 15, 250_000, tzinfo=timezone.utc)


@pytest.fixture
def catalogue(tmp_path: Path) -> Iterator[Catalogue]:
    url = f"sqlite:///{tmp_path / 'llmcf.db'}"
    migrations.upgrade(url)
    with Repository.from_url(url) as repository:
        made = Catalogue(repository)
        rng = np.random.default_rng(7)
        for n in range(30):
            snapshot = ItemSnapshot(item_id=f"i{n}", title=f"Movie \"{n}\" ü", text="" if n % 2 else "Plot.",
                                    tags=["Drama", "Comedy"][: n % 3])
            made.add(CatalogueItem(snapshot=snapshot, created_ms=0, version=1,
                                   vector=rng.standard_normal(384).astype(np.float32)))
        yield made


def decided(catalogue: Catalogue, user_id: str, target: str, past: list[str], ts: datetime, offset: int = 0) -> Decided:
    row = InteractionRow(f"x-{user_id}-{target}", user_id, target, "rating", 1, 4.0, ts, epoch_ms(ts))
    history = [HistoryItem(epoch_ms(T0) + n, f"h{n}", item_id, n % 2) for n, item_id in enumerate(past)]
    record = SourceRecord(value=b"{}", key=b"k", topic="interactions", partition=0, offset=offset)
    return Decided(record, row, "cold_start" if offset % 2 else "sampled", catalogue.cached([target])[target], history)


def expected_request(catalogue: Catalogue, d: Decided) -> CotRequest:
    """The request as the contract's model builds it, with full validation."""
    items = catalogue.cached([h.item_id for h in d.past])
    return CotRequest(
        request_id=cot_request_id(d.row.interaction_id), user_id=d.row.user_id, item_id=d.row.item_id,
        label=d.row.label, ts=d.row.ts, target=d.target.snapshot,
        history=[HistoryEntry(**items[h.item_id].snapshot.model_dump(), label=h.label) for h in d.past],
        reason=d.reason, requested_at=REQUESTED_AT,
    )


def test_requests_rows_and_points_match_the_models_and_the_shared_sample_vector(catalogue: Catalogue) -> None:
    paris = timezone(timedelta(hours=2))
    batch = [
        decided(catalogue, "u1", "i3", ["i1", "i2", "i1"], T0, offset=0),
        decided(catalogue, "u2", "i4", [], T0 + timedelta(microseconds=5), offset=1),  # no history: a cold user
        decided(catalogue, "ü\"3", "i5", [f"i{n}" for n in range(6, 26)], datetime(2024, 5, 1, 16, tzinfo=paris), 2),
    ]
    refused = []
    samples = build_samples(batch, catalogue, REQUESTED_AT, lambda record, error: refused.append(error))
    assert refused == [] and len(samples) == 3

    for d, sample in zip(batch, samples, strict=True):
        request = expected_request(catalogue, d)
        assert decode(CotRequest, sample.request) == request
        assert sample.request_id == request.request_id and sample.reason == request.reason
        assert sample.pending == PendingSampleRow.from_request(request)
        assert sample.record is d.record and sample.row is d.row

        point = sample.point
        assert point.key == request.request_id
        assert point.payload == {"user_id": d.row.user_id, "item_id": d.row.item_id, "label": 1,
                                 "ts": epoch_ms(d.row.ts), "status": "pending", "history": point.payload["history"]}
        assert decode_history(point.payload["history"]) == tuple(h.item_id for h in d.past)
        history_vectors = np.stack([catalogue.cached([h.item_id])[h.item_id].vector for h in d.past]) if d.past else (
            np.zeros((0, 384), dtype=np.float32))
        np.testing.assert_allclose(point.vector, sample_vector(history_vectors, d.target.vector), atol=1e-6)
    assert not samples[1].point.vector[:384].any()


def test_a_sample_that_cannot_be_encoded_is_refused_and_the_others_are_built(catalogue: Catalogue) -> None:
    batch = [decided(catalogue, "u1", "i3", ["i1"], T0, offset=0),
             decided(catalogue, "bad\ud800", "i4", ["i2"], T0, offset=1),  # a lone surrogate: no UTF-8 for it
             decided(catalogue, "u3", "i5", [], T0, offset=2)]
    refused = []
    samples = build_samples(batch, catalogue, REQUESTED_AT, lambda record, error: refused.append((record.offset, error)))
    assert [s.row.user_id for s in samples] == ["u1", "u3"]
    assert [offset for offset, _ in refused] == [1] and "surrogates" in refused[0][1]


def test_sample_vectors_equal_the_shared_definition_for_any_history_lengths() -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((50, 384)).astype(np.float32)
    vectors[0] = 0
    targets = list(rng.integers(1, 50, 64))
    histories = [list(rng.integers(1, 50, rng.integers(0, 25))) for _ in range(64)]
    got = sample_vectors(vectors, targets, histories)
    for target, history, row in zip(targets, histories, got, strict=True):
        history_vectors = vectors[history] if history else np.zeros((0, 384), dtype=np.float32)
        np.testing.assert_allclose(row, sample_vector(history_vectors, vectors[target]), atol=1e-6)
    assert got.dtype == np.float32 and got.shape == (64, 768)
    assert build_samples([], None, REQUESTED_AT, print) == []
