"""Training on a small MovieLens-100k slice end to end: real MiniLM embeddings, a template CoT pool, exact retrieval of
the in-context examples, ONNX export (full and split graphs) with parity, and the model_versions row. Slow-ish (about
a minute on 2 cores, most of it embedding item texts on the first run)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llmcf.settings import Settings
from ranker.export import MANIFEST, load_model, onnx_session, sha256_file
from ranker.features import FeatureSpace
from ranker.metrics import auc
from ranker.options import FitOptions, TrainOptions
from ranker.registry import TrainResult
from ranker.train import train
from storage.repository import Repository

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("llmcf-home")
    return Settings.from_env({"LLMCF_HOME": str(home)})


@pytest.fixture(scope="module")
def trained(settings: Settings) -> Iterator[TrainResult]:
    options = TrainOptions(dataset="ml-100k", backbone="deepfm", ict=True, max_train_samples=4000, max_eval_samples=800,
                           fit=FitOptions(max_epochs=4, batch_size=256, seed=0))
    lines: list[str] = []
    result = train(options, settings, log=lines.append)
    assert any("epoch  1" in line for line in lines)
    yield result


def test_the_model_beats_a_constant_predictor_on_the_held_out_split(trained: TrainResult) -> None:
    metrics = trained.metrics
    assert metrics["auc"] > 0.55, metrics
    assert metrics["logloss"] < metrics["constant_logloss"] + 0.02, metrics
    assert metrics["cot_backend"] == "template"
    assert metrics["pool_size"] == 400
    assert metrics["examples_found"] > 0.99
    assert metrics["onnx_parity_max_abs_diff"] <= 1e-5


def test_a_model_versions_row_names_the_artifact_with_a_matching_checksum(trained: TrainResult, settings: Settings) -> None:
    with Repository.from_settings(settings) as repository:
        row = repository.latest_model_version("deepfm+ict", status="candidate")

    assert row is not None and row.version_id == trained.version_id
    assert Path(row.artifact_path) == trained.onnx_path
    assert row.checksum == sha256_file(Path(row.artifact_path)) == trained.checksum
    assert row.metrics["auc"] == pytest.approx(trained.metrics["auc"])
    assert trained.onnx_path.parent == settings.home / "models" / trained.version_id


def test_the_artifact_reloads_and_scores_cold_starts(trained: TrainResult) -> None:
    model, space, manifest = load_model(trained.artifact_dir)
    session = onnx_session(trained.onnx_path)
    assert manifest["cot_pool"]["backend"] == "template" and (trained.artifact_dir / MANIFEST).is_file()
    assert isinstance(space, FeatureSpace)

    inputs = space.encode_samples(["nobody", space.user_ids[0]], ["no-such-item", space.item_ids[0]], [[], space.item_ids[:3]])
    from ranker.features import gather_examples

    inputs |= gather_examples(space.encode_examples([]), np.full((2, 4), -1))
    scores = session.run(["score"], {n: inputs[n] for n in model.config.input_names})[0]
    assert scores.shape == (2,) and np.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()
    assert model.config.n_user_tags == space.n_user_tags > 0 and "user_tags" in model.config.input_names  # demographics


def test_training_rows_carry_the_users_demographics_as_serving_encodes_them(trained: TrainResult, settings: Settings) -> None:
    from ranker.data import movielens_corpus
    from ranker.dataset import Catalogue, Samples, sample_arrays

    _, space, _ = load_model(trained.artifact_dir)
    samples = Samples.of(movielens_corpus("ml-100k"), settings.home / "cache" / "ranker")
    corpus = samples.corpus
    rows = np.flatnonzero(~np.isin(corpus.user, space.user_index(corpus.user_ids).nonzero()[0]))[:3]
    rows = np.concatenate([rows, [len(corpus) - 1]])  # users the space lacks, and one it may know
    users = [corpus.user_ids[u] for u in corpus.user[rows].tolist()]
    arrays = sample_arrays(samples, Catalogue.of(samples, space), space, rows)
    served = space.encode_samples(users, [corpus.item_ids[i] for i in corpus.item[rows].tolist()], [[]] * len(rows),
                                  user_profiles=dict(zip(corpus.user_ids, corpus.user_tags, strict=True)))
    np.testing.assert_array_equal(arrays["user"], served["user"])
    np.testing.assert_array_equal(arrays["user_tags"], served["user_tags"])
    assert (arrays["user_tags"] > 0).sum(axis=1).tolist() == [3] * len(rows)  # gender, age and occupation


def test_auc_matches_the_rank_definition() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4])
    pairs = [(p, n) for p in scores[labels == 1] for n in scores[labels == 0]]
    expected = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert auc(labels, scores) == pytest.approx(expected)
