"""The updater's Prometheus metrics (`llmcf update`, /metrics on LLMCF_METRICS_PORT, default `llmcf.ports`). Names are a
contract with the Grafana dashboard: change them only together."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

OUTCOMES = ("promoted", "rejected", "skipped", "failed")

RUNS = Counter("llmcf_updater_runs_total", "Update rounds, by outcome (promoted, rejected, skipped, failed).", ["outcome"])
RUN_SECONDS = Histogram(
    "llmcf_updater_run_seconds",
    "Wall time of one update round, whatever its outcome.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
)
HOLDOUT_AUC = Gauge(
    "llmcf_updater_holdout_auc",
    "AUC on the latest round's holdout (the newest slice of the window, never trained on), of the candidate and of "
    "the serving model on the same rows.",
    ["model"],
)
LAST_PROMOTION = Gauge("llmcf_updater_last_promotion_timestamp_seconds", "Unix time of the last promotion by this process.")
TRAINING_DATA_AGE = Gauge(
    "llmcf_updater_training_data_age_seconds",
    "Event-time age (now minus the event time) of the newest sample the last promoted model was trained on.",
)

for _outcome in OUTCOMES:  # every outcome is exported from the start, so rate() works before the first of each
    RUNS.labels(outcome=_outcome)


def record_promotion(newest_event_ms: int) -> None:
    """A promotion now, of a model whose newest training sample happened at `newest_event_ms` (epoch ms): the age
    gauge is computed at scrape time, so it keeps growing until the next promotion."""
    LAST_PROMOTION.set(time.time())
    TRAINING_DATA_AGE.set_function(lambda: max(0.0, time.time() - newest_event_ms / 1000.0))
