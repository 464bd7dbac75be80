"""`llmcf update` as an operator runs it: `--once` as a subprocess against PostgreSQL filled through the storage API,
the loop surviving failed rounds, and the metrics it serves."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from llmcf.infra import free_port
from llmcf.settings import Settings
from ranker.export import sha256_file
from ranker.options import UpdateOptions
from ranker.updates.metrics import record_promotion
from ranker.updates.service import run_once, run_updater
from storage.registry import ModelVersionRecord
from storage.repository import Repository
from tests.ranker.updates.stream_data import replay_into

pytestmark = pytest.mark.slow

LLMCF = str(Path(sys.executable).parent / "llmcf")


def runs(outcome: str) -> float:
    return REGISTRY.get_sample_value("llmcf_updater_runs_total", {"outcome": outcome}) or 0.0


def update_once(home: Path, database_url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMCF_") and k != "DATABASE_URL"}
    env |= {"LLMCF_HOME": str(home), "DATABASE_URL": database_url, "LLMCF_METRICS_PORT": "0"}
    return subprocess.run([LLMCF, "update", "--once", "--scratch-epochs", "1", "--threads", "2"], env=env,
                          capture_output=True, text=True, timeout=900)


def test_update_once_promotes_a_first_version_then_skips_when_nothing_is_new(pg_database_url: str, tmp_path: Path) -> None:
    replay_into(pg_database_url, 0, 2_500)

    first = update_once(tmp_path, pg_database_url)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "promoted" in first.stdout
    with Repository.from_url(pg_database_url) as repository:
        serving = repository.latest_model_version("deepfm+ict", "serving")
    assert serving is not None and serving.parent_version is None
    assert serving.checksum == sha256_file(Path(serving.artifact_path))
    assert Path(serving.artifact_path).is_relative_to(tmp_path / "models")

    again = update_once(tmp_path, pg_database_url)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "skipped: nothing new" in again.stdout


def test_failed_rounds_are_counted_and_the_loop_goes_on(tmp_path: Path) -> None:
    settings = Settings.from_env({"LLMCF_HOME": str(tmp_path), "DATABASE_URL": f"sqlite:///{tmp_path / 'llmcf.db'}"})
    options = UpdateOptions(kind="deepfm+ict", window_s=120 * 86400)
    import migrations

    migrations.upgrade(settings.database_url)
    skipped = runs("skipped")
    assert run_once(settings, options, lambda _line: None) == "skipped"  # an empty database: nothing to learn from
    assert runs("skipped") == skipped + 1

    replay_into(settings.database_url, 0, 600)
    missing = tmp_path / "models" / "gone" / "model.onnx"  # a serving version whose artifact was deleted
    with Repository.from_settings(settings) as repository:
        repository.record_model_version(ModelVersionRecord(
            version_id="deepfm-ict-gone", kind="deepfm+ict", artifact_path=str(missing), checksum="0" * 64,
            created_at=datetime.now(timezone.utc), status="serving"))

    failed = runs("failed")
    port = free_port()
    stop = threading.Event()
    loop = threading.Thread(target=run_updater, args=(settings, options, 0.05, False, port, lambda _line: None, stop))
    loop.start()
    try:
        deadline = time.monotonic() + 600
        while runs("failed") < failed + 2 and time.monotonic() < deadline and loop.is_alive():
            time.sleep(0.2)
        assert runs("failed") >= failed + 2  # the first failure did not stop the loop
        exposition = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        stop.set()
        loop.join(timeout=600)
    assert not loop.is_alive()
    for name in ('llmcf_updater_runs_total{outcome="failed"}', 'llmcf_updater_runs_total{outcome="rejected"}',
                 "llmcf_updater_run_seconds_bucket", "llmcf_updater_holdout_auc", "llmcf_updater_last_promotion_timestamp_seconds",
                 "llmcf_updater_training_data_age_seconds"):
        assert name in exposition
    assert run_updater(settings, options, 0.05, True, 0, lambda _line: None) == 1  # --once exits 1 on a failed round


def test_the_training_data_age_keeps_growing_after_a_promotion() -> None:
    before = time.time()
    newest_ms = int(before * 1000) - 3_600_000
    record_promotion(newest_ms)
    first = REGISTRY.get_sample_value("llmcf_updater_training_data_age_seconds")
    assert 3_600 - 0.001 <= first <= 3_600 + (time.time() - before) + 0.001  # bounded by what this test measured
    assert before <= REGISTRY.get_sample_value("llmcf_updater_last_promotion_timestamp_seconds") <= time.time()
    time.sleep(0.05)
    assert REGISTRY.get_sample_value("llmcf_updater_training_data_age_seconds") > first
