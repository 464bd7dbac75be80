"""Update rounds against a real database filled through the storage API (MovieLens-100k slices, real MiniLM, exact
retrieval, ONNX export with parity): the first round trains from scratch, a round with nothing new skips, a
better fine-tuned candidate is promoted, and a candidate wrecked by a destructive learning rate is refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from llmcf.settings import Settings
from ranker.export import sha256_file
from ranker.features import FEATURES_JSON
from ranker.options import FitOptions, UpdateOptions
from ranker.updates.rounds import RoundReport, run_round, window_splits
from storage.registry import ModelVersionRecord
from storage.repository import Repository
from tests.ranker.updates.stream_data import replay_into

pytestmark = pytest.mark.slow

KIND = "deepfm+ict"
OPTIONS = UpdateOptions(kind=KIND, window_s=120 * 86400, scratch_max_epochs=2,
                        fit=FitOptions(max_epochs=2, patience=1, batch_size=256, learning_rate=1e-3))


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("update-home")
    return Settings.from_env({"LLMCF_HOME": str(home), "DATABASE_URL": f"sqlite:///{home / 'llmcf.db'}"})


def version(settings: Settings, status: str) -> ModelVersionRecord | None:
    with Repository.from_settings(settings) as repository:
        return repository.latest_model_version(KIND, status)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def rounds(settings: Settings) -> dict[str, tuple[RoundReport, ModelVersionRecord | None]]:
    """The rounds in stream order; each entry: the report and the serving version right after it."""
    import migrations

    migrations.upgrade(settings.database_url)
    done: dict[str, tuple[RoundReport, ModelVersionRecord | None]] = {}
    lines: list[str] = []

    def run(name: str, options: UpdateOptions) -> None:
        done[name] = (run_round(settings, options, lines.append), version(settings, "serving"))

    replay_into(settings.database_url, 0, 3_000)
    run("first", OPTIONS)
    run("nothing new", OPTIONS)
    replay_into(settings.database_url, 3_000, 12_000)
    run("better", OPTIONS)
    replay_into(settings.database_url, 12_000, 14_000)
    run("destructive", replace(OPTIONS, fit=replace(OPTIONS.fit, learning_rate=5.0, max_epochs=1)))
    return done


def test_the_first_round_trains_from_scratch_and_promotes(rounds, settings: Settings) -> None:
    report, serving = rounds["first"]
    assert report.outcome == "promoted" and report.parent_version is None
    assert serving is not None and serving.version_id == report.version_id and serving.parent_version is None
    assert serving.checksum == sha256_file(Path(serving.artifact_path))
    assert serving.metrics["data_marker"]["interactions"] == 3_000


def test_a_round_with_nothing_new_is_skipped(rounds) -> None:
    report, serving = rounds["nothing new"]
    assert report.outcome == "skipped" and "nothing new" in report.reason
    assert serving is not None and serving.version_id == rounds["first"][0].version_id


def test_a_better_candidate_is_fine_tuned_from_the_serving_version_and_promoted(rounds, settings: Settings) -> None:
    first = rounds["first"][1]
    report, serving = rounds["better"]
    assert report.outcome == "promoted", report.reason
    assert report.candidate_auc is not None and report.serving_auc is not None
    assert report.candidate_auc >= report.serving_auc
    assert serving is not None and first is not None
    assert serving.version_id == report.version_id and serving.parent_version == first.version_id
    assert serving.checksum == sha256_file(Path(serving.artifact_path))
    assert serving.metrics["serving_auc"] == pytest.approx(report.serving_auc)
    assert "candidate AUC" in (serving.notes or "")
    retired = version(settings, "retired")
    assert retired is not None and retired.version_id == first.version_id

    grown = json.loads((Path(serving.artifact_path).parent / FEATURES_JSON).read_text())
    parent = json.loads((Path(first.artifact_path).parent / FEATURES_JSON).read_text())
    assert grown["user_ids"][: len(parent["user_ids"])] == parent["user_ids"]  # extended, not rebuilt
    assert len(grown["user_ids"]) > len(parent["user_ids"]) and len(grown["item_ids"]) > len(parent["item_ids"])


def test_a_candidate_worse_on_the_holdout_is_rejected_and_the_serving_version_stays(rounds, settings: Settings) -> None:
    better = rounds["better"][0]
    report, serving = rounds["destructive"]
    assert report.outcome == "rejected", report.reason
    assert report.candidate_auc is not None and report.serving_auc is not None
    assert report.candidate_auc < report.serving_auc
    assert serving is not None and serving.version_id == better.version_id  # still serving

    rejected = version(settings, "rejected")
    assert rejected is not None and rejected.version_id == report.version_id
    assert rejected.parent_version == better.version_id
    assert f"candidate AUC {report.candidate_auc:.4f}" in (rejected.notes or "")
    assert f"AUC {report.serving_auc:.4f}" in (rejected.notes or "")
    assert rejected.checksum == sha256_file(Path(rejected.artifact_path))
    assert rejected.metrics["onnx_parity_max_abs_diff"] >= 0.0  # measured, not required (the server checks it)
    assert REGISTRY.get_sample_value("llmcf_updater_holdout_auc", {"model": "candidate"}) == pytest.approx(report.candidate_auc)
    assert REGISTRY.get_sample_value("llmcf_updater_holdout_auc", {"model": "serving"}) == pytest.approx(report.serving_auc)


def test_the_holdout_is_the_newest_slice_of_the_window_and_never_trained_on() -> None:
    from tests.ranker.updates.test_finetune import corpus

    data = corpus().corpus  # 1,000 rows, one a second
    train, valid, holdout = window_splits(data, replace(OPTIONS, window_s=500, max_samples=400, holdout_fraction=0.1))

    assert len(holdout.rows) == len(valid.rows) == 40 and len(train.rows) == 320
    assert holdout.rows.tolist() == list(range(960, 1_000))  # the newest 40 by event time
    assert data.ts_ms[train.rows].max() < data.ts_ms[valid.rows].min() <= data.ts_ms[valid.rows].max() < data.ts_ms[holdout.rows].min()
    assert not set(holdout.rows) & (set(train.rows) | set(valid.rows))
