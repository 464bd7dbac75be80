"""Reading the processes' Prometheus `/metrics` from outside: samples by name, totals, and freshness p99s and quantiles
computed from the histogram buckets, as the demo's status line, summary and plot show them."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import numpy as np

from llmcf.metrics import FreshnessStage

FRESHNESS_STAGES: tuple[str, ...] = get_args(FreshnessStage)

Samples = dict[str, list[tuple[dict[str, str], float]]]
"""A scrape: sample name -> (labels, value) of each series."""


def scrape(port: int) -> Samples:
    """Samples of a process's `/metrics` by sample name; empty if it does not answer (yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(value for sample_labels, value in samples.get(name, []) if labels.items() <= sample_labels.items())


def freshness_samples(ports: Iterable[int]) -> Samples:
    """The freshness histograms of the processes serving /metrics on `ports`, merged: each process observes its own
    stages (the worker up to `retrievable` and `cot_retrievable`, the generator `cot_generated`, the ranker `served`),
    so merging counts nothing twice."""
    merged: Samples = {}
    for port in ports:
        for name, samples in scrape(port).items():
            if name.startswith("llmcf_freshness_seconds"):
                merged.setdefault(name, []).extend(samples)
    return merged


def freshness_buckets(samples: Samples, stage: str) -> tuple[np.ndarray, np.ndarray]:
    """(upper bounds, cumulative counts) of `llmcf_freshness_seconds{stage}`."""
    rows = sorted((float(labels["le"]), value) for labels, value in samples.get("llmcf_freshness_seconds_bucket", [])
                  if labels.get("stage") == stage)
    return np.array([b for b, _ in rows]), np.array([c for _, c in rows])


def histogram_quantile(q: float, bounds: np.ndarray, cumulative: np.ndarray) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding the q-th observation."""
    if len(cumulative) == 0 or cumulative[-1] <= 0:
        return None
    rank = q * cumulative[-1]
    i = int(np.searchsorted(cumulative, rank, side="left"))
    if i >= len(bounds) - 1 and np.isinf(bounds[-1]):
        return float(bounds[-2]) if len(bounds) > 1 else None  # in the +Inf bucket: the highest finite bound
    lower, below = (0.0, 0.0) if i == 0 else (float(bounds[i - 1]), float(cumulative[i - 1]))
    inside = float(cumulative[i]) - below
    return lower + (float(bounds[i]) - lower) * ((rank - below) / inside if inside else 1.0)


@dataclass
class FreshnessSeries:
    """p99 per stage over each status interval (from bucket deltas), for the live line and the plot."""

    started: float = field(default_factory=time.monotonic)
    previous: dict[str, np.ndarray] = field(default_factory=dict)
    points: list[tuple[float, str, float]] = field(default_factory=list)
    latest: dict[str, float] = field(default_factory=dict)
    """The p99 of each stage's last interval that saw samples (an idle interval keeps the previous figure)."""

    def record(self, samples: Samples) -> dict[str, float]:
        latest = self.latest
        for stage in FRESHNESS_STAGES:
            bounds, cumulative = freshness_buckets(samples, stage)
            if len(cumulative) == 0:
                continue
            before = self.previous.get(stage)
            window = cumulative - before if before is not None and len(before) == len(cumulative) else cumulative
            self.previous[stage] = cumulative
            p99 = histogram_quantile(0.99, bounds, window)
            if p99 is not None:
                latest[stage] = p99
                self.points.append((time.monotonic() - self.started, stage, p99))
        return latest

    def write(self, csv_path: Path, plot_path: Path) -> Path | None:
        """The series as CSV at `csv_path` and a PNG plot at `plot_path` (returned); None when nothing was measured."""
        if not self.points:
            return None
        with open(csv_path, "w") as out:
            out.write("elapsed_s,stage,p99_s\n")
            out.writelines(f"{t:.1f},{stage},{p99:.4f}\n" for t, stage, p99 in self.points)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(9, 4.5))
        for stage in FRESHNESS_STAGES:
            series = [(t, p99) for t, s, p99 in self.points if s == stage]
            if series:
                axes.plot(*zip(*series, strict=True), label=stage, marker=".", linewidth=1)
        axes.set_yscale("log")
        axes.set_xlabel("seconds since the demo started")
        axes.set_ylabel("p99 per interval, from histogram buckets (s)")
        axes.set_title("llmcf demo: how old a sample is when it reaches each stage")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(plot_path, dpi=110)
        plt.close(figure)
        return plot_path
