"""The model registry: trained ranker artifacts (`model_versions`), their validation, and their lifecycle (candidate,
serving, retired, rejected), with at most one version serving per kind."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Engine, select, update

from storage.engine import dialect_insert
from storage.models import MODEL_STATUSES, ModelVersion

ModelStatus = Literal["candidate", "serving", "retired", "rejected"]
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ModelVersionRecord:
    """A trained ranker artifact; `checksum` is the artifact's sha256 in hex."""

    version_id: str
    kind: str
    artifact_path: str
    checksum: str
    created_at: datetime
    metrics: dict[str, Any] = field(default_factory=dict)
    parent_version: str | None = None
    status: ModelStatus = "candidate"
    notes: str | None = None

    def __post_init__(self) -> None:
        if not _SHA256_HEX.fullmatch(self.checksum):
            raise ValueError(f"checksum must be a lowercase sha256 hex digest, got {self.checksum!r}")
        if self.status not in MODEL_STATUSES:
            raise ValueError(f"status must be one of {MODEL_STATUSES}, got {self.status!r}")


class ModelVersionConflict(ValueError):
    """A version id was recorded again with a different artifact: ids must name one artifact forever."""


class ModelRegistry:
    """Model versions over one engine, one transaction per call (the `Repository` contracts). The repository exposes
    it as its `*_model_version` and `set_model_status` methods."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._insert = dialect_insert(engine)

    def record(self, version: ModelVersionRecord) -> None:
        """Register a trained artifact. Recording the same version again is a no-op (a retried trainer step);
        recording its id with a different checksum raises `ModelVersionConflict` and writes nothing."""
        table = ModelVersion.__table__
        row = {
            "version_id": version.version_id,
            "created_at": version.created_at,
            "kind": version.kind,
            "parent_version": version.parent_version,
            "metrics": version.metrics,
            "artifact_path": version.artifact_path,
            "checksum": version.checksum,
            "status": version.status,
            "notes": version.notes,
        }
        with self.engine.begin() as conn:
            conn.execute(self._insert(table).on_conflict_do_nothing(index_elements=["version_id"]), [row])
            stored = conn.execute(
                select(table.c.checksum).where(table.c.version_id == version.version_id)
            ).scalar_one()
            if stored != version.checksum:
                raise ModelVersionConflict(
                    f"model version {version.version_id!r} is already recorded with checksum {stored}, "
                    f"not {version.checksum}"
                )

    def set_status(self, version_id: str, status: ModelStatus, notes: str | None = None) -> None:
        """Move a version to `status` (and replace its notes when given). Promoting one to 'serving' retires the
        version of the same kind that was serving, in the same transaction: at most one serves per kind."""
        if status not in MODEL_STATUSES:
            raise ValueError(f"status must be one of {MODEL_STATUSES}, got {status!r}")
        table = ModelVersion.__table__
        with self.engine.begin() as conn:
            kind = conn.execute(select(table.c.kind).where(table.c.version_id == version_id)).scalar_one_or_none()
            if kind is None:
                raise KeyError(f"no model version {version_id!r}")
            if status == "serving":
                conn.execute(
                    update(table)
                    .where(table.c.kind == kind, table.c.status == "serving", table.c.version_id != version_id)
                    .values(status="retired")
                )
            values: dict[str, Any] = {"status": status}
            if notes is not None:
                values["notes"] = notes
            conn.execute(update(table).where(table.c.version_id == version_id).values(**values))

    def latest(self, kind: str, status: ModelStatus = "serving") -> ModelVersionRecord | None:
        """The most recently created version of `kind` in `status`, or None."""
        table = ModelVersion.__table__
        with self.engine.connect() as conn:
            row = conn.execute(
                select(table)
                .where(table.c.kind == kind, table.c.status == status)
                .order_by(table.c.created_at.desc(), table.c.version_id.desc())
                .limit(1)
            ).mappings().first()
        return None if row is None else ModelVersionRecord(**row)

    def get(self, version_id: str) -> ModelVersionRecord | None:
        """The version `version_id` whatever its status, or None."""
        table = ModelVersion.__table__
        with self.engine.connect() as conn:
            row = conn.execute(select(table).where(table.c.version_id == version_id)).mappings().first()
        return None if row is None else ModelVersionRecord(**row)
