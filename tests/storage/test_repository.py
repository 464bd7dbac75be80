"""The repository's contracts, on SQLite and PostgreSQL: idempotent, version-ordered upserts and the reads the stages
use."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

import migrations
from llmcf.events import CotRequest, CotResult, HistoryEntry, InteractionEvent, ItemEvent, ItemSnapshot, epoch_ms
from storage.engine import normalize_database_url
from storage.registry import ModelVersionConflict, ModelVersionRecord
from storage.repository import Repository
from storage.rows import InteractionRow, PendingSampleRow

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def repo(database_url: str) -> Iterator[Repository]:
    migrations.upgrade(database_url)
    with Repository.from_url(database_url) as repository:
        yield repository


def item(item_id: str, title: str, at: datetime, **extra) -> ItemEvent:
    return ItemEvent(item_id=item_id, title=title, created_at=T0, updated_at=at, **extra)


def interaction(user: str, item_id: str, at: datetime, label: int = 1, **extra) -> InteractionEvent:
    return InteractionEvent(user_id=user, item_id=item_id, kind="click", label=label, ts=at, **extra)


def cot_request(request_id: str, requested_at: datetime, history: tuple[str, ...] = ("i0",)) -> CotRequest:
    return CotRequest(
        request_id=request_id,
        user_id="u1",
        item_id="i9",
        label=1,
        ts=T0,
        target=ItemSnapshot(item_id="i9", title="Target"),
        history=[HistoryEntry(item_id=h, title=h, label=0) for h in history],
        reason="cold_start",
        requested_at=requested_at,
    )


def cot_result(request_id: str, text: str, generated_at: datetime) -> CotResult:
    return CotResult(
        request_id=request_id,
        user_id="u1",
        item_id="i9",
        label=1,
        ts=T0,
        cot_text=text,
        cot_embedding=[0.1, 0.2],
        backend="template",
        model="tmpl-1",
        generated_at=generated_at,
    )


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---- items ----------------------------------------------------------------------------------------------------------


def test_same_item_batch_twice_gives_the_same_rows(repo: Repository) -> None:
    batch = [item("a", "A", T0, tags=["x", "y"]), item("b", "B", T0)]
    assert repo.upsert_items(batch) == 2
    first = repo.get_items(["a", "b"])
    assert repo.upsert_items(batch) == 2
    again = repo.get_items(["a", "b"])
    assert repo.counts()["items"] == 2
    assert again == first  # stored_at included: an equal version rewrites nothing
    assert first["a"].tags == ["x", "y"]
    assert first["a"].version == epoch_ms(T0)


def test_newer_item_replaces_older_but_not_the_reverse(repo: Repository) -> None:
    repo.upsert_items([item("a", "old", T0)])
    repo.upsert_items([item("a", "new", T0 + timedelta(minutes=1))])
    assert repo.get_items(["a"])["a"].title == "new"

    repo.upsert_items([item("a", "stale", T0 + timedelta(seconds=30))])
    stored = repo.get_items(["a"])["a"]
    assert stored.title == "new"
    assert stored.updated_at == T0 + timedelta(minutes=1)
    assert stored.version == epoch_ms(T0 + timedelta(minutes=1))


def test_duplicates_inside_one_batch_keep_the_highest_version(repo: Repository) -> None:
    batch = [
        item("a", "middle", T0 + timedelta(seconds=2)),
        item("a", "newest", T0 + timedelta(seconds=3)),
        item("a", "oldest", T0 + timedelta(seconds=1)),
        item("b", "B", T0),
    ]
    assert repo.upsert_items(batch) == 2
    assert repo.get_items(["a"])["a"].title == "newest"
    assert repo.counts()["items"] == 2


def test_timestamps_read_back_as_aware_utc(repo: Repository) -> None:
    paris = timezone(timedelta(hours=2))
    repo.upsert_items([ItemEvent(item_id="a", title="A", created_at=datetime(2024, 5, 1, 14, 0, tzinfo=paris))])
    stored = repo.get_items(["a"])["a"]
    assert stored.created_at == T0
    assert stored.created_at.utcoffset() == timedelta(0)
    assert stored.updated_at is None
    assert stored.stored_at.tzinfo is not None


def test_get_items_ignores_unknown_ids(repo: Repository) -> None:
    repo.upsert_items([item("a", "A", T0)])
    assert set(repo.get_items(["a", "missing"])) == {"a"}
    assert repo.get_items([]) == {}


# ---- interactions and users -----------------------------------------------------------------------------------------


def test_redelivered_interactions_are_stored_and_counted_once(repo: Repository) -> None:
    batch = [interaction("u1", "i1", T0), interaction("u1", "i2", T0 + timedelta(seconds=1))]
    repo.upsert_interactions(batch)
    repo.upsert_interactions(batch)
    repo.upsert_interactions(batch[:1] + batch[:1])
    assert repo.counts()["interactions"] == 2
    user = repo.get_users(["u1"])["u1"]
    assert user.interactions == 2


def test_users_keep_first_and_last_seen_whatever_the_order(repo: Repository) -> None:
    repo.upsert_interactions([interaction("u1", "i5", T0 + timedelta(hours=5))])
    repo.upsert_interactions([interaction("u1", "i1", T0 + timedelta(hours=1)), interaction("u2", "i1", T0)])
    repo.upsert_interactions([interaction("u1", "i9", T0 + timedelta(hours=9))])
    repo.upsert_interactions([interaction("u1", "i3", T0 + timedelta(hours=3))])

    users = repo.get_users(["u1", "u2"])
    assert users["u1"].first_seen_at == T0 + timedelta(hours=1)
    assert users["u1"].last_seen_at == T0 + timedelta(hours=9)
    assert users["u1"].interactions == 4
    assert users["u1"].version == epoch_ms(T0 + timedelta(hours=9))
    assert users["u2"].first_seen_at == users["u2"].last_seen_at == T0
    assert users["u2"].interactions == 1
    assert repo.counts()["users"] == 2


def test_interaction_with_the_same_event_id_keeps_the_later_version(repo: Repository) -> None:
    repo.upsert_interactions([interaction("u1", "i1", T0 + timedelta(seconds=5), label=1, event_id="e1")])
    repo.upsert_interactions([interaction("u1", "i1", T0, label=0, event_id="e1")])
    (stored,) = repo.user_history("u1")
    assert stored.interaction_id == "e1"
    assert stored.label == 1
    assert stored.ts == T0 + timedelta(seconds=5)

    repo.upsert_interactions([interaction("u1", "i1", T0 + timedelta(seconds=9), label=0, event_id="e1")])
    (stored,) = repo.user_history("u1")
    assert (stored.label, stored.ts) == (0, T0 + timedelta(seconds=9))


def test_user_history_is_the_latest_before_a_time_oldest_first(repo: Repository) -> None:
    repo.upsert_interactions([interaction("u1", f"i{n}", T0 + timedelta(minutes=n)) for n in range(10)])
    repo.upsert_interactions([interaction("u2", "other", T0)])

    assert [h.item_id for h in repo.user_history("u1", limit=3)] == ["i7", "i8", "i9"]
    before = T0 + timedelta(minutes=5)
    assert [h.item_id for h in repo.user_history("u1", limit=3, before=before)] == ["i2", "i3", "i4"]
    assert repo.user_history("nobody") == []


def test_iter_interactions_yields_every_row_in_time_order_across_pages(repo: Repository) -> None:
    # Several rows share a timestamp, so pages must break ties by id to neither skip nor repeat rows.
    events = [interaction(f"u{n % 7}", f"i{n}", T0 + timedelta(seconds=n // 3)) for n in range(50)]
    repo.upsert_interactions(events)
    rows = list(repo.iter_interactions(batch_size=4))
    assert len(rows) == 50
    assert len({r.interaction_id for r in rows}) == 50
    assert [(r.ts, r.interaction_id) for r in rows] == sorted((r.ts, r.interaction_id) for r in rows)

    window = list(repo.iter_interactions(start=T0 + timedelta(seconds=3), end=T0 + timedelta(seconds=5)))
    assert sorted(r.item_id for r in window) == sorted(f"i{n}" for n in range(9, 15))


def test_a_failing_batch_writes_nothing(repo: Repository) -> None:
    naive = InteractionEvent.model_construct(
        user_id="u1", item_id="bad", kind="click", label=1, value=None, ts=datetime(2024, 1, 1), event_id="bad"
    )
    with pytest.raises(ValueError, match="naive datetime"):
        repo.upsert_interactions([interaction("u1", "good", T0), naive])
    assert repo.counts()["interactions"] == 0
    assert repo.counts()["users"] == 0


def test_large_batch(repo: Repository) -> None:
    events = [interaction(f"u{n % 100}", f"i{n % 500}", T0 + timedelta(seconds=n)) for n in range(3_000)]
    assert repo.upsert_interactions(events) == 3_000
    counts = repo.counts()
    assert counts["interactions"] == 3_000
    assert counts["users"] == 100
    assert repo.get_users(["u42"])["u42"].interactions == 30


def test_one_batch_repeating_an_interaction_keeps_its_highest_version_and_the_first_on_ties(repo: Repository) -> None:
    batch = [
        interaction("u1", "i1", T0 + timedelta(seconds=5), label=1, event_id="e1", value=1.0),
        interaction("u1", "i1", T0, label=0, event_id="e1"),  # older: loses, and does not count as first seen
        interaction("u1", "i1", T0 + timedelta(seconds=5), label=0, event_id="e1", value=2.0),  # tie: the first wins
        interaction("u1", "i2", T0 + timedelta(seconds=7)),
    ]
    assert repo.upsert_interactions(batch) == 2
    first, second = repo.user_history("u1")
    assert (first.interaction_id, first.label, first.value, first.ts) == ("e1", 1, 1.0, T0 + timedelta(seconds=5))
    assert second.item_id == "i2"
    user = repo.get_users(["u1"])["u1"]
    assert (user.first_seen_at, user.last_seen_at, user.interactions) == (
        T0 + timedelta(seconds=5), T0 + timedelta(seconds=7), 2,
    )


def test_one_batch_repeating_a_request_keeps_the_latest_and_the_first_on_ties(repo: Repository) -> None:
    assert repo.upsert_cot_samples([
        cot_request("r1", T0, history=("i0",)),
        cot_request("r1", T0 + timedelta(seconds=1), history=("i0", "i1")),
        cot_request("r1", T0 + timedelta(seconds=1), history=()),
        cot_request("r2", T0, history=()),
    ]) == 2
    samples = repo.get_cot_samples(["r1", "r2"])
    assert samples["r1"].history == [{"item_id": "i0", "label": 0}, {"item_id": "i1", "label": 0}]
    assert samples["r1"].version == epoch_ms(T0 + timedelta(seconds=1))
    assert (samples["r2"].history, samples["r2"].status) == ([], "pending")


def test_refused_rows_on_postgresql_raise_sqlalchemy_data_errors_and_write_nothing(pg_database_url: str) -> None:
    from sqlalchemy.exc import DataError

    migrations.upgrade(pg_database_url)
    with Repository.from_url(pg_database_url) as repo:
        good = interaction("u1", "i1", T0)
        with pytest.raises(DataError, match="0x00"):  # refused while copying
            repo.upsert_interactions([good, interaction("u1", "bad\x00item", T0)])
        with pytest.raises(DataError, match="too long"):  # refused by the upsert (the server)
            repo.upsert_interaction_rows([InteractionRow.from_event(good), InteractionRow("e2", "u" * 129, "i1", "click", 1, None,
                                                                                      T0, epoch_ms(T0))])
        with pytest.raises(DataError, match="0x00"):
            repo.upsert_pending_samples([PendingSampleRow("r1", "u1", "i\x009", 1, T0, [("i0", 0)], "sampled", 1)])
        assert (repo.counts()["interactions"], repo.counts()["users"], repo.counts()["cot_samples"]) == (0, 0, 0)

        repo.upsert_interactions([good])  # the session's staging table was left empty by the rollbacks
        repo.upsert_cot_samples([cot_request("r1", T0)])
        assert (repo.counts()["interactions"], repo.counts()["users"], repo.counts()["cot_samples"]) == (1, 1, 1)


# ---- CoT samples ----------------------------------------------------------------------------------------------------


def test_pending_then_generated(repo: Repository) -> None:
    repo.upsert_cot_samples([cot_request("r1", T0)])
    pending = repo.get_cot_samples(["r1"])["r1"]
    assert (pending.status, pending.cot_text, pending.reason) == ("pending", None, "cold_start")
    assert pending.history == [{"item_id": "i0", "label": 0}]

    repo.complete_cot_samples([cot_result("r1", "because", T0 + timedelta(seconds=5))])
    repo.upsert_cot_samples([cot_request("r1", T0)])  # re-delivered request
    done = repo.get_cot_samples(["r1"])["r1"]
    assert (done.status, done.cot_text, done.backend, done.model) == ("generated", "because", "template", "tmpl-1")
    assert done.generated_at == T0 + timedelta(seconds=5)
    assert done.history == [{"item_id": "i0", "label": 0}]
    assert repo.counts()["cot_samples"] == 1


def test_generated_before_pending_stays_generated(repo: Repository) -> None:
    repo.complete_cot_samples([cot_result("r1", "because", T0 + timedelta(seconds=5))])
    early = repo.get_cot_samples(["r1"])["r1"]
    assert (early.status, early.history, early.reason, early.version) == ("generated", None, None, 0)

    repo.upsert_cot_samples([cot_request("r1", T0, history=("i0", "i1"))])
    merged = repo.get_cot_samples(["r1"])["r1"]
    assert merged.status == "generated"
    assert merged.cot_text == "because"
    assert merged.history == [{"item_id": "i0", "label": 0}, {"item_id": "i1", "label": 0}]
    assert merged.reason == "cold_start"
    assert merged.version == epoch_ms(T0)


def test_redelivered_result_changes_nothing_and_a_later_one_replaces(repo: Repository) -> None:
    repo.upsert_cot_samples([cot_request("r1", T0)])
    repo.complete_cot_samples([cot_result("r1", "first", T0 + timedelta(seconds=5))])
    first = repo.get_cot_samples(["r1"])["r1"]
    repo.complete_cot_samples([cot_result("r1", "first", T0 + timedelta(seconds=5))])
    assert repo.get_cot_samples(["r1"])["r1"] == first

    repo.complete_cot_samples([cot_result("r1", "older", T0 + timedelta(seconds=1))])
    assert repo.get_cot_samples(["r1"])["r1"].cot_text == "first"
    repo.complete_cot_samples([cot_result("r1", "regenerated", T0 + timedelta(seconds=9))])
    assert repo.get_cot_samples(["r1"])["r1"].cot_text == "regenerated"


def test_generated_sample_keeps_its_cot_embedding_as_float32(repo: Repository) -> None:
    repo.upsert_cot_samples([cot_request("r1", T0)])
    repo.complete_cot_samples([cot_result("r1", "because", T0 + timedelta(seconds=5))])
    sample = repo.get_cot_samples(["r1"])["r1"]
    assert sample.cot_vector().dtype == np.float32
    np.testing.assert_allclose(sample.cot_vector(), [0.1, 0.2], rtol=1e-6)
    assert repo.get_cot_samples(["r1"])["r1"].cot_stored_at == sample.cot_stored_at


def test_item_embeddings_are_written_once_and_read_back_by_id(repo: Repository) -> None:
    first = np.array([0.25, -0.5, 1.0], dtype=np.float32)
    assert repo.upsert_item_embeddings({"a": first, "b": np.zeros(3, dtype=np.float32)}, model="m") == 2
    repo.upsert_item_embeddings({"a": np.ones(3, dtype=np.float32)}, model="m")  # re-delivered item: kept as first
    found = repo.get_item_embeddings(["a", "b", "unknown"])
    assert set(found) == {"a", "b"}
    assert found["a"].dtype == np.float32
    np.testing.assert_array_equal(found["a"], first)


def test_newer_request_replaces_request_fields_only(repo: Repository) -> None:
    repo.upsert_cot_samples([cot_request("r1", T0, history=("i0",))])
    repo.upsert_cot_samples([cot_request("r1", T0 + timedelta(seconds=1), history=("i0", "i1")), cot_request("r2", T0)])
    repo.upsert_cot_samples([cot_request("r1", T0, history=())])
    samples = repo.get_cot_samples(["r1", "r2"])
    assert [h["item_id"] for h in samples["r1"].history] == ["i0", "i1"]
    assert samples["r1"].status == "pending"
    assert set(samples) == {"r1", "r2"}


def test_cot_samples_changed_since_sees_new_requests_and_completions_in_change_order(repo: Repository) -> None:
    repo.upsert_cot_samples([cot_request("r1", T0), cot_request("r2", T0), cot_request("r3", T0)])
    everything = list(repo.cot_samples_changed_since(None, batch_size=2))  # pages of 2: the keyset carries over
    assert sorted(s.sample_id for s in everything) == ["r1", "r2", "r3"]
    cursor = max(s.stored_at for s in everything)

    later = cursor + timedelta(microseconds=1)
    assert list(repo.cot_samples_changed_since(later)) == []
    repo.complete_cot_samples([cot_result("r2", "because", T0 + timedelta(seconds=5))])
    repo.upsert_cot_samples([cot_request("r4", T0)])
    changed = list(repo.cot_samples_changed_since(later, batch_size=1))
    assert [s.sample_id for s in changed] == ["r2", "r4"]  # r2 completed first, then r4 stored
    assert changed[0].status == "generated" and changed[0].cot_stored_at >= later
    assert [s.sample_id for s in repo.cot_samples_changed_since(changed[0].cot_stored_at + timedelta(microseconds=1))] == ["r4"]


# ---- model versions -------------------------------------------------------------------------------------------------


def model(version_id: str, created: datetime, **extra) -> ModelVersionRecord:
    return ModelVersionRecord(
        version_id=version_id,
        kind="deepfm+ict",
        artifact_path=f"/models/{version_id}.onnx",
        checksum=sha(version_id),
        created_at=created,
        metrics={"auc": 0.75},
        **extra,
    )


def test_model_version_lifecycle(repo: Repository) -> None:
    repo.record_model_version(model("v1", T0))
    repo.record_model_version(model("v1", T0))  # a retried trainer step
    assert repo.latest_model_version("deepfm+ict") is None
    candidate = repo.latest_model_version("deepfm+ict", status="candidate")
    assert candidate == model("v1", T0)

    repo.set_model_status("v1", "serving")
    repo.record_model_version(model("v2", T0 + timedelta(hours=1), parent_version="v1"))
    assert repo.latest_model_version("deepfm+ict").version_id == "v1"

    repo.set_model_status("v2", "serving", notes="auc +0.01")
    serving = repo.latest_model_version("deepfm+ict")
    assert (serving.version_id, serving.parent_version, serving.notes) == ("v2", "v1", "auc +0.01")
    assert repo.latest_model_version("deepfm+ict", status="retired").version_id == "v1"

    repo.set_model_status("v1", "serving")  # roll back
    assert repo.latest_model_version("deepfm+ict").version_id == "v1"
    assert repo.latest_model_version("other-kind") is None
    assert repo.counts()["model_versions"] == 2


def test_model_version_id_cannot_name_another_artifact(repo: Repository) -> None:
    repo.record_model_version(model("v1", T0))
    clash = ModelVersionRecord(
        version_id="v1", kind="deepfm+ict", artifact_path="/x", checksum=sha("other"), created_at=T0
    )
    with pytest.raises(ModelVersionConflict):
        repo.record_model_version(clash)


def test_get_model_version_reads_one_version_whatever_its_status(repo: Repository) -> None:
    repo.record_model_version(model("v1", T0))
    repo.set_model_status("v1", "rejected", notes="auc -0.02")
    found = repo.get_model_version("v1")
    assert (found.version_id, found.status, found.notes, found.checksum) == ("v1", "rejected", "auc -0.02", sha("v1"))
    assert repo.get_model_version("v2") is None


def test_model_status_and_checksum_are_validated(repo: Repository) -> None:
    with pytest.raises(ValueError):
        model("v1", T0, status="live")
    with pytest.raises(ValueError):
        ModelVersionRecord(version_id="v", kind="k", artifact_path="/x", checksum="abc", created_at=T0)
    with pytest.raises(KeyError):
        repo.set_model_status("missing", "serving")


# ---- counts and URLs ------------------------------------------------------------------------------------------------


def test_counts_cover_every_table(repo: Repository) -> None:
    tables = ("items", "users", "interactions", "cot_samples", "model_versions", "item_embeddings")
    assert repo.counts() == dict.fromkeys(tables, 0)
    repo.upsert_items([item("a", "A", T0)])
    repo.upsert_item_embeddings({"a": np.ones(4, dtype=np.float32)}, model="m")
    repo.upsert_interactions([interaction("u1", "a", T0)])
    repo.upsert_cot_samples([cot_request("r1", T0)])
    repo.record_model_version(model("v1", T0))
    assert repo.counts() == dict.fromkeys(tables, 1)


@pytest.mark.parametrize(
    "url",
    ["postgres://u:secret@h:5432/db", "postgresql://u:secret@h/db", "postgresql+psycopg://u:secret@h/db"],
)
def test_postgres_urls_use_psycopg3(url: str) -> None:
    assert normalize_database_url(url).drivername == "postgresql+psycopg"
    assert "secret" not in repr(Repository.from_url(url))


def test_other_databases_are_refused() -> None:
    with pytest.raises(ValueError, match="PostgreSQL or SQLite"):
        normalize_database_url("mysql://u:secret@h/db")
