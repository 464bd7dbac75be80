"""The stream worker's own metrics, beside the shared ones in `llmcf.metrics` (freshness, events, dead letters, lag)."""

from __future__ import annotations

import time

import numpy as np
from prometheus_client import Counter, Histogram

from llmcf.metrics import FRESHNESS, FreshnessStage, observe_many

WRITE_FAILURES = Counter(
    "llmcf_worker_write_failures_total",
    "Failed attempts of a batch write (each is retried until it succeeds), by step.",
    ["step"],
)
BATCH_SECONDS = Histogram(
    "llmcf_worker_batch_seconds",
    "Time to process one consumed batch, from decode to the last write, by topic.",
    ["topic"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
BATCH_RECORDS = Histogram(
    "llmcf_worker_batch_records",
    "Records per consumed batch, by topic.",
    ["topic"],
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
)
REPAIRED_RANGES = Counter(
    "llmcf_worker_repaired_ranges_total",
    "Offset ranges Faust never delivered that held records, read from the broker and processed (streams.repair), by "
    "topic and cause: gap (reported by Faust as holding no record) or stall (a committed offset that stood still).",
    ["topic", "cause"],
)
COT_DECISIONS = Counter(
    "llmcf_worker_cot_requests_total",
    "Samples sent for a chain of thought, by reason (sampled, cold_start).",
    ["reason"],
)


def observe_freshness_ms(stage: FreshnessStage, event_times_ms: np.ndarray) -> None:
    """`llmcf.metrics.observe_freshness` from event times already in epoch ms (no datetime per event)."""
    ages = time.time() - event_times_ms / 1000.0
    observe_many(FRESHNESS.labels(stage=stage), np.maximum(ages, 0.0))
