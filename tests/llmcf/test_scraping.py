"""Reading /metrics from outside: scrapes of live endpoints, totals, freshness quantiles and the per-interval series."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from llmcf.infra import free_port
from llmcf.metrics import FRESHNESS_BUCKETS
from llmcf.scraping import FreshnessSeries, Samples, freshness_buckets, freshness_samples, histogram_quantile, scrape, total


def scraped(values_by_stage: dict[str, list[float]]) -> Samples:
    """What `scrape()` returns for a process whose freshness histogram observed these values."""
    registry = _registry(values_by_stage)
    samples: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _registry(values_by_stage: dict[str, list[float]]) -> CollectorRegistry:
    registry = CollectorRegistry()
    histogram = Histogram("llmcf_freshness_seconds", "test", ["stage"], buckets=FRESHNESS_BUCKETS, registry=registry)
    for stage, values in values_by_stage.items():
        for value in values:
            histogram.labels(stage=stage).observe(value)
    return registry


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
    csv_path, plot_path = tmp_path / "freshness.csv", tmp_path / "freshness.png"
    series = FreshnessSeries()
    assert series.write(csv_path, plot_path) is None
    series.record(scraped({"stored": [0.5, 1.0], "retrievable": [0.7, 1.5]}))
    plot = series.write(csv_path, plot_path)
    assert plot == plot_path and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert csv_path.read_text().splitlines()[0] == "elapsed_s,stage,p99_s"


@pytest.fixture
def serve_registry():
    """Serves a registry's /metrics on a free port of 127.0.0.1; returns the port. Servers stop with the test."""
    servers = []

    def serve(registry: CollectorRegistry) -> int:
        port = free_port()
        servers.append(start_http_server(port, addr="127.0.0.1", registry=registry))
        return port

    yield serve
    for server, thread in servers:
        server.shutdown()
        thread.join()


def test_scrape_reads_every_sample_of_a_live_endpoint_and_nothing_from_a_silent_port(serve_registry):
    registry = _registry({"stored": [0.5, 2.0]})
    Counter("llmcf_things", "test", ["outcome"], registry=registry).labels(outcome="ok").inc(3)
    samples = scrape(serve_registry(registry))
    assert total(samples, "llmcf_things_total") == 3.0
    assert total(samples, "llmcf_freshness_seconds_count", stage="stored") == 2.0
    assert total(samples, "llmcf_freshness_seconds_count", stage="served") == 0.0
    assert scrape(free_port()) == {}


def test_freshness_samples_merge_the_histograms_of_every_port_and_only_them(serve_registry):
    worker = _registry({"stored": [0.5], "retrievable": [1.0]})
    Counter("llmcf_things", "test", registry=worker).inc()
    ports = (serve_registry(worker), serve_registry(_registry({"served": [0.1, 0.2]})), free_port())
    merged = freshness_samples(ports)
    assert all(name.startswith("llmcf_freshness_seconds") for name in merged)
    counts = {labels["stage"]: value for labels, value in merged["llmcf_freshness_seconds_count"]}
    assert counts == {"stored": 1.0, "retrievable": 1.0, "served": 2.0}
