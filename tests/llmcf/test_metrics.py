"""Shared metrics: bulk observation must expose exactly what one observe() per value would."""

from datetime import datetime, timedelta, timezone

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from llmcf.metrics import FRESHNESS, FRESHNESS_BUCKETS, observe_freshness, observe_many


def test_observe_many_matches_one_observe_per_value():
    values = np.array([0.0, 0.05, 0.051, 0.3, 1.0, 2.0, 2.5, 59.9, 86400.0, 1e7, 0.25])
    one_by_one, bulk = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("h", "h", buckets=FRESHNESS_BUCKETS, registry=one_by_one)
    for value in values:
        reference.observe(float(value))
    observe_many(Histogram("h", "h", buckets=FRESHNESS_BUCKETS, registry=bulk), values)
    assert _samples(bulk) == _samples(one_by_one)


def test_freshness_is_measured_from_the_event_time():
    now = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    stage = FRESHNESS.labels(stage="stored")
    count_before, sum_before = _count(stage), stage._sum.get()
    observe_freshness("stored", [now - timedelta(seconds=3), now + timedelta(seconds=5)], now=now.timestamp())
    assert _count(stage) == count_before + 2
    assert stage._sum.get() - sum_before == 3.0  # an event from the future counts as age 0, never negative


def _samples(registry: CollectorRegistry) -> list[bytes]:
    """The exposition without `_created` (each histogram's creation time)."""
    return [line for line in generate_latest(registry).splitlines() if b"_created" not in line]


def _count(histogram) -> float:
    return sum(bucket.get() for bucket in histogram._buckets)


def test_docs_catalogue_every_exported_metric():
    """The metrics table in docs/metrics.md lists exactly the metrics the processes export."""
    import re
    from pathlib import Path

    from prometheus_client import REGISTRY

    import generators.metrics  # noqa: F401 - registers the generator's metrics
    import ranker.serving.metrics  # noqa: F401 - registers the ranker's metrics
    import ranker.updates.metrics  # noqa: F401 - registers the updater's metrics
    import streams.metrics  # noqa: F401 - registers the worker's metrics

    exported = {m.name for m in REGISTRY.collect() if m.name.startswith("llmcf_")}
    catalogue = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    catalogued = set(re.findall(r"^\| `(llmcf_[a-z_]+)`", catalogue, flags=re.M))
    # prometheus_client names a counter's family without its `_total` suffix.
    assert {name.removesuffix("_total") for name in catalogued} == exported
