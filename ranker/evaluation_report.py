"""The results of `llmcf evaluate` and their reports: one record per offline run (`RunResult`) and per replayed day
and case (`StreamRow`), the per-variant summary with the +ICT gains, and the Markdown and CSV files written from them
(`offline.md`/`offline.csv`, `streaming.md`/`streaming.csv`), each naming the CoT backend of the pool and the caps."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from llmcf.settings import Settings
from ranker.evaluation_options import STREAM_CASES, TEST_SLICES, EvaluationOptions, backend_label


@dataclass
class RunResult:
    variant: str
    seed: int
    auc: float
    logloss: float
    epochs: int
    best_epoch: int
    seconds: float
    auc_new_items: float | None = None  # test rows on new items (`TEST_SLICES`); None: the slice lacks a label
    auc_unseen_users: float | None = None
    cot_pool: str = ""  # +ICT runs: the offline pool (`COT_POOLS`) of its in-context examples


@dataclass
class StreamRow:
    day: int
    date: str
    case: str
    recent_rows: int
    recent_auc: float | None
    all_rows: int
    all_auc: float | None
    pool_size: int


def run_labels(results: Sequence[RunResult]) -> list[str]:
    """Each run's row in the tables: its variant, and its pool where the runs use several ("deepfm+ict (llm)")."""
    several = len({r.cot_pool for r in results if r.cot_pool}) > 1
    return [f"{r.variant} ({r.cot_pool})" if several and r.cot_pool else r.variant for r in results]


def summarise(results: Sequence[RunResult]) -> dict[str, dict[str, float]]:
    """Per table row (`run_labels`): runs, mean and sample std of AUC and LogLoss (std 0 for a single run) and of
    each slice's AUC, mean seconds."""
    summary = {}
    labels = run_labels(results)
    for variant in dict.fromkeys(labels):
        runs = [r for r, label in zip(results, labels, strict=True) if label == variant]
        aucs, losses = np.array([r.auc for r in runs]), np.array([r.logloss for r in runs])
        ddof = 1 if len(runs) > 1 else 0
        summary[variant] = {"runs": len(runs), "auc_mean": float(aucs.mean()), "auc_std": float(aucs.std(ddof=ddof)),
                            "logloss_mean": float(losses.mean()), "logloss_std": float(losses.std(ddof=ddof)),
                            "seconds_mean": float(np.mean([r.seconds for r in runs]))}
        for name in TEST_SLICES:
            values = np.array([v for r in runs if (v := getattr(r, f"auc_{name}")) is not None])
            summary[variant][f"auc_{name}_mean"] = float(values.mean()) if len(values) else math.nan
            summary[variant][f"auc_{name}_std"] = float(values.std(ddof=1 if len(values) > 1 else 0)) \
                if len(values) else math.nan
    return summary


def ict_gains(summary: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """For each +ICT row of `summary` whose backbone is there too, on all test rows and on each slice both have an AUC
    for: the AUC gain of +ICT and whether it exceeds two standard deviations."""
    gains = []
    for variant, ict in summary.items():
        backbone = variant.split("+")[0]
        base = summary.get(backbone)
        if "+ict" not in variant or base is None:
            continue
        for rows, prefix in (("all", "auc"), *((name, f"auc_{name}") for name in TEST_SLICES)):
            if any(math.isnan(s.get(f"{prefix}_mean", math.nan)) for s in (base, ict)):
                continue
            gain = ict[f"{prefix}_mean"] - base[f"{prefix}_mean"]
            threshold = 2 * max(base[f"{prefix}_std"], ict[f"{prefix}_std"])
            gains.append({"variant": variant, "backbone": backbone, "rows": rows, "gain": gain, "two_std": threshold,
                          "beats": gain > threshold})
    return gains


def write_offline(results: list[RunResult], options: EvaluationOptions, out: Path, files: list[Path]) -> str:
    """`offline.csv` (one row per run) and `offline.md` (the summary and the +ICT gains) under `out`, appended to
    `files`; returns the Markdown."""
    summary = summarise(results)
    csv_path = out / "offline.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "seed", "auc", "logloss", "epochs", "best_epoch", "seconds", "dataset", "cot_backend",
                         "cot_pool", "auc_new_items", "auc_unseen_users"])
        for r in results:  # a backbone reads no pool: no CoT backend
            writer.writerow([r.variant, r.seed, f"{r.auc:.6f}", f"{r.logloss:.6f}", r.epochs, r.best_epoch,
                             f"{r.seconds:.1f}", options.dataset, options.pool_backend(r.cot_pool) if r.cot_pool else "",
                             r.cot_pool,
                             *("" if v is None else f"{v:.6f}" for v in (r.auc_new_items, r.auc_unseen_users))])
    lines = [
        f"## Offline evaluation: {options.dataset}, {options.seeds} seed(s) per variant",
        "",
        f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Caps: {options.caps()}. Split and pool fixed (seed 0); "
        "the seed varies model initialisation and batch order.",
        "",
        f"Test slices: new items = rows on items first seen at most {options.new_item_window_days:g} days earlier; "
        f"unseen users = {TEST_SLICES['unseen_users']}.",
        "",
        "| variant | runs | AUC (mean ± std) | LogLoss (mean ± std) | AUC new items | AUC unseen users | s/run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, s in summary.items():
        lines.append(f"| {variant} | {s['runs']} | {s['auc_mean']:.4f} ± {s['auc_std']:.4f} | "
                     f"{s['logloss_mean']:.4f} ± {s['logloss_std']:.4f} | {fmt(s['auc_new_items_mean'])} ± "
                     f"{fmt(s['auc_new_items_std'])} | {fmt(s['auc_unseen_users_mean'])} ± "
                     f"{fmt(s['auc_unseen_users_std'])} | {s['seconds_mean']:.0f} |")
    gains = ict_gains(summary)
    if gains:
        lines += ["", "| +ICT vs backbone | test rows | AUC gain | 2 std | beats by > 2 std |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {g['variant']} vs {g['backbone']} | {g['rows'].replace('_', ' ')} | {g['gain']:+.4f} | "
                  f"{g['two_std']:.4f} | {'yes' if g['beats'] else 'no'} |" for g in gains]
    return _write_markdown(out / "offline.md", lines, csv_path, files)


def write_streaming(rows: list[StreamRow], options: EvaluationOptions, settings: Settings, out: Path,
                    files: list[Path]) -> str:
    """`streaming.csv` (one row per day and case) and `streaming.md` under `out`, appended to `files`; returns the
    Markdown."""
    csv_path = out / "streaming.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["day", "date", "case", "recent_rows", "recent_auc", "all_rows", "all_auc", "pool_size", "cot_backend"])
        for r in rows:
            writer.writerow([*asdict(r).values(), options.cot_backend])
    lines = [
        f"## Streaming replay: {options.dataset}, {options.days} day(s) from the day the data passes "
        f"{options.start_fraction:g} of its interactions, {options.stream_kind}",
        "",
        f"CoT pool backend: **{backend_label(options.cot_backend)}**. Recently introduced item: first interaction in the "
        f"data at most {options.new_item_window_days:g} days earlier. Live pool: + each previous day's samples chosen "
        f"as the stream worker chooses them (cold start {settings.cold_start_window_s:g} s, rate {options.pool_rate:g}). "
        f"Daily update: last {options.update_window_days:g} days, at most {options.update_max_samples:,} rows, "
        f"{options.update_epochs} epoch(s), lr {options.update_learning_rate:g}. Frozen model caps: {options.caps()}.",
        "",
        "| day | date | case | recent-item rows | AUC (recent items) | all rows (sample) | AUC (all) | pool |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r.day} | {r.date} | ({r.case}) {STREAM_CASES[r.case]} | {r.recent_rows:,} | {fmt(r.recent_auc)} | "
              f"{r.all_rows:,} | {fmt(r.all_auc)} | {r.pool_size:,} |" for r in rows]
    return _write_markdown(out / "streaming.md", lines, csv_path, files)


def _write_markdown(md_path: Path, lines: list[str], csv_path: Path, files: list[Path]) -> str:
    markdown = "\n".join(lines)
    md_path.write_text(markdown + "\n")
    files += [md_path, csv_path]
    return markdown


def fmt(value: float | None) -> str:
    """An AUC for a table or a progress line; n/a where there is none."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def utc_date(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d")
