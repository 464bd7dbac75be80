"""The demo's own pieces: the replay position it resumes from, the quantiles it reads off `/metrics`, its plot."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmcf import movielens
from llmcf.demo import (
    Child,
    DemoOptions,
    DemoPaths,
    FreshnessSeries,
    ReplayPosition,
    freshness_buckets,
    histogram_quantile,
    wait_for_worker,
)
from llmcf.events import InteractionEvent
from llmcf.infra import free_port
from llmcf.metrics import FRESHNESS_BUCKETS
from llmcf.settings import Settings
from storage.repository import Repository
from tests.fixtures.processes import child_environment


def scraped(values_by_stage: dict[str, list[float]]) -> dict[str, list[tuple[dict[str, str], float]]]:
    """What `scrape()` returns for a process whose freshness histogram observed these values."""
    registry = CollectorRegistry()
    histogram = Histogram("llmcf_freshness_seconds", "test", ["stage"], buckets=FRESHNESS_BUCKETS, registry=registry)
    for stage, values in values_by_stage.items():
        for value in values:
            histogram.labels(stage=stage).observe(value)
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def test_quantiles_from_buckets_bracket_the_true_quantile():
    values = np.random.default_rng(0).lognormal(mean=0.0, sigma=1.0, size=5_000)
    bounds, cumulative = freshness_buckets(scraped({"stored": list(values)}), "stored")
    for q in (0.5, 0.9, 0.99):
        estimate = histogram_quantile(q, bounds, cumulative)
        true = float(np.quantile(values, q))
        below = bounds[bounds < true].max(initial=0.0)
        above = bounds[bounds >= true].min()
        assert below <= estimate <= above, (q, estimate, true)


def test_quantile_of_an_empty_histogram_is_none_and_inf_bucket_reports_the_top_bound():
    assert histogram_quantile(0.99, np.array([]), np.array([])) is None
    bounds, cumulative = freshness_buckets(scraped({"stored": [1e9] * 10}), "stored")
    assert histogram_quantile(0.99, bounds, cumulative) == max(FRESHNESS_BUCKETS)


def test_series_records_the_p99_of_each_interval_not_of_all_time():
    series = FreshnessSeries()
    series.record(scraped({"retrievable": [0.1] * 100}))
    latest = series.record(scraped({"retrievable": [0.1] * 100 + [30.0] * 100}))
    assert latest["retrievable"] > 10  # the second interval only saw 30 s samples


def test_series_writes_a_png_and_csv(tmp_path):
    paths = DemoPaths(Settings.from_env({"LLMCF_HOME": str(tmp_path)}))
    paths.root.mkdir(parents=True)
    series = FreshnessSeries()
    assert series.write(paths) is None
    series.record(scraped({"stored": [0.5, 1.0], "retrievable": [0.7, 1.5]}))
    plot = series.write(paths)
    assert plot == paths.plot and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths.series.read_text().splitlines()[0] == "elapsed_s,stage,p99_s"


@pytest.mark.parametrize("same_window", [True, False])
def test_replay_position_survives_a_restart_only_for_the_same_window(tmp_path, same_window):
    path = tmp_path / "state.json"
    ReplayPosition("ml-100k", 5_000, published=1_200).save(path)
    limit = 5_000 if same_window else 6_000
    assert ReplayPosition.load(path, "ml-100k", limit).published == (1_200 if same_window else 0)


def free_port_run(length: int) -> int:
    """The first of `length` consecutive free ports (the demo puts its processes' /metrics on base, base+1, ...)."""
    for _ in range(50):
        base = free_port()
        if base + length < 65_535 and all(_bindable(base + offset) for offset in range(length)):
            return base
    raise AssertionError("no run of free ports found")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_demo_resumes_after_ctrl_c_runs_to_its_summary_and_leaves_a_ranker_that_answers(kafka_settings, tmp_path):
    """`llmcf demo` as a user runs it (template backend, a small fast window): interrupted mid-replay it stops with
    130; run again it resumes, prints its summary and plot, and the ranker it started answers `/v1/rank` until
    `llmcf demo --stop`. Every interaction of the window is stored once."""
    port, metrics_base = free_port(), free_port_run(3)
    env = child_environment(kafka_settings, kafka_settings.database_url, 0)
    env.pop("LLMCF_METRICS_PORT")
    demo = [sys.executable, "-m", "llmcf.cli", "demo", "--backend", "template", "--limit", "1500", "--rate", "300",
            "--port", str(port), "--metrics-port-base", str(metrics_base), "--update-interval", "5", "--timeout", "900"]
    paths = DemoPaths(kafka_settings)
    log = tmp_path / "demo.log"
    try:
        with open(log, "wb") as out:
            first = subprocess.Popen(demo, env=env, stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 240
            while not (paths.state.is_file() and json.loads(paths.state.read_text())["published"] >= 400):
                assert first.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
                time.sleep(0.2)
            first.send_signal(signal.SIGINT)
            assert first.wait(120) == 130, log.read_text(errors="replace")[-3000:]
        stopped_at = json.loads(paths.state.read_text())["published"]
        assert "run the demo again to resume" in log.read_text()
        assert not json.loads(paths.processes.read_text() if paths.processes.is_file() else "{}")

        second = subprocess.run(demo, env=env, capture_output=True, text=True, timeout=900)
        output = second.stdout + second.stderr
        assert second.returncode == 0, output[-4000:]
        assert f"from event {stopped_at:,}" in output
        assert "== summary" in output and "ranked:     user" in output and paths.plot.is_file()

        response = httpx.post(f"http://127.0.0.1:{port}/v1/rank", json={"user_id": "1", "candidates": ["1", "50"]},
                              timeout=30)
        assert response.status_code == 200 and len(response.json()["scores"]) == 2
    finally:
        subprocess.run([sys.executable, "-m", "llmcf.cli", "demo", "--stop"], env=env, timeout=120, check=False)

    with Repository.from_settings(kafka_settings) as repository:
        stored = repository.counts()["interactions"]
    window = [e for e in movielens.events("ml-100k", limit=1500) if isinstance(e, InteractionEvent)]
    assert stored == len({e.interaction_id for e in window}) == 1500


def test_the_replay_waits_for_a_worker_that_exits_and_says_so(tmp_path):
    worker = Child("worker", ["worker", "--no-such-flag"])
    worker.start(DemoPaths(Settings.from_env({"LLMCF_HOME": str(tmp_path)})), dict(os.environ))
    outcome = wait_for_worker(DemoOptions(metrics_port_base=free_port()), [worker], threading.Event())
    assert outcome == "failed: llmcf worker exited with status 2 (see worker.log)"
