"""The worker's catalogue: items by id, their vectors as rows of one matrix, their JSON forms inside CoT requests."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

import migrations
from llmcf.events import HistoryEntry, ItemEvent, ItemSnapshot
from storage.repository import Repository
from streams.catalogue import Catalogue, CatalogueItem

T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)


@pytest.fixture
def repository(tmp_path: Path) -> Iterator[Repository]:
    url = f"sqlite:///{tmp_path / 'llmcf.db'}"
    migrations.upgrade(url)
    with Repository.from_url(url) as repo:
        yield repo


def item(item_id: str, vector: np.ndarray, version: int = 1, title: str = "A film") -> CatalogueItem:
    snapshot = ItemSnapshot(item_id=item_id, title=title, text="about \"it\"", tags=["Drama"])
    return CatalogueItem(snapshot=snapshot, created_ms=0, version=version, vector=vector)


def test_every_item_gets_its_own_row_and_the_matrix_grows_with_them(repository: Repository) -> None:
    catalogue = Catalogue(repository)
    rng = np.random.default_rng(0)
    vectors = {f"i{n}": rng.standard_normal(384).astype(np.float32) for n in range(2_500)}
    for item_id, vector in vectors.items():
        catalogue.add(item(item_id, vector))
    assert len(catalogue) == 2_500
    assert sorted(catalogue.row_of.values()) == list(range(1, 2_501))
    for item_id, vector in vectors.items():
        np.testing.assert_array_equal(catalogue.vectors[catalogue.row_of[item_id]], vector)
    assert not catalogue.vectors[0].any()  # the padding row


def test_a_newer_version_replaces_the_snapshot_and_keeps_the_row_an_older_one_changes_nothing(repository: Repository) -> None:
    catalogue = Catalogue(repository)
    vector = np.ones(384, dtype=np.float32)
    catalogue.add(item("a", vector, version=2, title="Second"))
    row = catalogue.row_of["a"]
    catalogue.add(item("a", vector, version=1, title="First"))
    assert catalogue.cached(["a"])["a"].snapshot.title == "Second"
    catalogue.add(item("a", vector, version=3, title="Third"))
    assert catalogue.cached(["a"])["a"].snapshot.title == "Third"
    assert catalogue.row_of == {"a": row}
    assert HistoryEntry.model_validate_json(catalogue.history_json["a", 1]).title == "Third"


def test_json_forms_are_the_snapshot_and_the_history_entries_of_each_label(repository: Repository) -> None:
    catalogue = Catalogue(repository)
    added = item("a", np.ones(384, dtype=np.float32))
    catalogue.add(added)
    assert ItemSnapshot.model_validate_json(added.target_json) == added.snapshot
    for label in (0, 1):
        assert HistoryEntry.model_validate_json(catalogue.history_json["a", label]) == HistoryEntry(
            **added.snapshot.model_dump(), label=label
        )


def test_lookup_reads_stored_items_with_their_embeddings_into_rows(repository: Repository) -> None:
    repository.upsert_items([ItemEvent(item_id="s", title="Stored", created_at=T0)])
    vector = np.full(384, 0.5, dtype=np.float32)
    repository.upsert_item_embeddings({"s": vector}, model="m")
    catalogue = Catalogue(repository)
    found = catalogue.lookup(["s", "unknown"])
    assert set(found) == {"s"} and found["s"].snapshot.title == "Stored"
    np.testing.assert_array_equal(catalogue.vectors[catalogue.row_of["s"]], vector)
