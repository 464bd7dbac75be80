"""From a fitted model to a servable version: the ONNX artifact directory with its parity figure (`export_artifact`)
and the `model_versions` row that announces it (`register_version`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmcf.settings import Settings
from ranker.export import (
    MODEL_ONNX,
    check_parity,
    check_split_parity,
    export_onnx,
    export_split,
    save_artifact,
    sha256_file,
    worst_parity,
)
from ranker.features import FeatureSpace
from ranker.model import RankerModel

if TYPE_CHECKING:
    from storage.registry import ModelStatus

PARITY_ROWS = 512


@dataclass
class TrainResult:
    version_id: str
    kind: str
    artifact_dir: Path
    onnx_path: Path
    checksum: str
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    created_at: datetime | None = None
    notes: str = ""


@dataclass
class Artifact:
    version_id: str
    directory: Path
    onnx_path: Path
    checksum: str
    created_at: datetime
    metrics: dict[str, Any]


def export_artifact(model: RankerModel, space: FeatureSpace, parity_inputs: dict[str, np.ndarray],
                    metrics: dict[str, Any], manifest: dict[str, Any], settings: Settings,
                    require_parity: bool = True) -> Artifact:
    """ONNX export, the parity check on random and the given real inputs (raises `ParityError` above the tolerance:
    nothing is left under models/ then but a staging directory), and the artifact directory
    `$LLMCF_HOME/models/<version_id>/` (moved into place only once complete). The metrics gain the parity figure.

    `require_parity=False` (a candidate already refused, kept for the record) measures the figure without enforcing
    it: a model wrecked by a destructive step has logits of 1e4 and more, and near the decision boundary the float32
    rounding of such sums differs between the two runtimes by more than the tolerance. The server refuses to load a
    version whose recorded figure is above the tolerance (`ranker.serving.models.load_bundle`)."""
    created_at = datetime.now(timezone.utc)
    staging = settings.home / "models" / f".staging-{created_at:%Y%m%dT%H%M%S%fZ}"
    onnx_path = export_onnx(model, staging / MODEL_ONNX)
    measure = check_parity if require_parity else worst_parity
    metrics = {**metrics, "onnx_parity_max_abs_diff": measure(model, onnx_path, [parity_inputs])}
    if model.config.ict:  # the two graphs the server runs, checked the same way
        examples_path, scorer_path = export_split(model, staging)
        metrics["onnx_split_parity_max_abs_diff"] = check_split_parity(model, examples_path, scorer_path, [parity_inputs],
                                                                       enforce=require_parity)
    checksum = sha256_file(onnx_path)
    version_id = f"{model.config.kind.replace('+', '-')}-{created_at:%Y%m%dT%H%M%SZ}-{checksum[:8]}"
    save_artifact(staging, model, space, {"version_id": version_id, "created_at": created_at.isoformat(),
                                          "metrics": metrics, **manifest})
    directory = settings.home / "models" / version_id
    staging.rename(directory)
    return Artifact(version_id, directory, directory / MODEL_ONNX, checksum, created_at, metrics)


def register_version(settings: Settings, result: TrainResult, status: ModelStatus = "candidate",
                     parent_version: str | None = None, notes: str | None = None) -> None:
    """Record the artifact as a `model_versions` row (migrating the database first)."""
    import migrations
    from storage.registry import ModelVersionRecord
    from storage.repository import Repository

    migrations.upgrade(settings.database_url)
    with Repository.from_settings(settings) as repository:
        repository.record_model_version(ModelVersionRecord(
            version_id=result.version_id, kind=result.kind, artifact_path=str(result.onnx_path), checksum=result.checksum,
            created_at=result.created_at or datetime.now(timezone.utc),
            metrics={k: v for k, v in result.metrics.items() if v is not None},
            parent_version=parent_version, status=status, notes=notes if notes is not None else result.notes,
        ))
