"""`ModelRegistry` on its own, on SQLite and PostgreSQL: recording artifacts, the serving lifecycle per kind, and the
reads (the repository's `*_model_version` methods delegate here)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest

import migrations
from storage.engine import make_engine
from storage.registry import ModelRegistry, ModelVersionConflict, ModelVersionRecord

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def registry(database_url: str) -> Iterator[ModelRegistry]:
    migrations.upgrade(database_url)
    engine = make_engine(database_url)
    yield ModelRegistry(engine)
    engine.dispose()


def version(version_id: str, kind: str = "deepfm+ict", created: datetime = T0, **extra) -> ModelVersionRecord:
    return ModelVersionRecord(
        version_id=version_id, kind=kind, artifact_path=f"/models/{version_id}.onnx",
        checksum=hashlib.sha256(version_id.encode()).hexdigest(), created_at=created, **extra,
    )


def test_recording_twice_keeps_one_version_and_reads_it_back(registry: ModelRegistry) -> None:
    registry.record(version("v1", metrics={"auc": 0.7}))
    registry.record(version("v1", metrics={"auc": 0.7}))
    assert registry.get("v1") == version("v1", metrics={"auc": 0.7})
    assert registry.latest("deepfm+ict", status="candidate") == version("v1", metrics={"auc": 0.7})
    assert registry.get("v2") is None


def test_a_conflicting_record_writes_nothing(registry: ModelRegistry) -> None:
    registry.record(version("v1"))
    clash = ModelVersionRecord(version_id="v1", kind="other", artifact_path="/x",
                               checksum=hashlib.sha256(b"other").hexdigest(), created_at=T0 + timedelta(hours=1))
    with pytest.raises(ModelVersionConflict, match="already recorded"):
        registry.record(clash)
    assert registry.get("v1") == version("v1")


def test_serving_retires_the_previous_version_of_the_same_kind_only(registry: ModelRegistry) -> None:
    registry.record(version("a1", kind="a"))
    registry.record(version("a2", kind="a", created=T0 + timedelta(hours=1)))
    registry.record(version("b1", kind="b"))
    registry.set_status("a1", "serving")
    registry.set_status("b1", "serving")
    registry.set_status("a2", "serving")
    assert {v: registry.get(v).status for v in ("a1", "a2", "b1")} == {"a1": "retired", "a2": "serving", "b1": "serving"}


def test_latest_is_the_most_recently_created_in_the_status(registry: ModelRegistry) -> None:
    registry.record(version("old", created=T0))
    registry.record(version("new", created=T0 + timedelta(hours=1)))
    registry.record(version("newest-rejected", created=T0 + timedelta(hours=2), status="rejected"))
    assert registry.latest("deepfm+ict", status="candidate").version_id == "new"
    assert registry.latest("deepfm+ict") is None  # none serving yet
    assert registry.latest("other", status="candidate") is None


def test_notes_are_replaced_only_when_given(registry: ModelRegistry) -> None:
    registry.record(version("v1", notes="trained"))
    registry.set_status("v1", "rejected")
    assert (registry.get("v1").status, registry.get("v1").notes) == ("rejected", "trained")
    registry.set_status("v1", "candidate", notes="re-evaluated")
    assert (registry.get("v1").status, registry.get("v1").notes) == ("candidate", "re-evaluated")


def test_unknown_versions_and_statuses_are_refused(registry: ModelRegistry) -> None:
    with pytest.raises(KeyError):
        registry.set_status("missing", "serving")
    registry.record(version("v1"))
    with pytest.raises(ValueError, match="status must be one of"):
        registry.set_status("v1", "live")  # type: ignore[arg-type]
    assert registry.get("v1").status == "candidate"
