"""`llmcf evaluate`: the offline comparison of the four ranker variants and the streaming replay on new items.

Offline (the paper's table): MovieLens, the time-ordered split of `llmcf train` (80/10/10; the latest
`max_train_samples` training rows, uniform samples of `max_eval_samples` validation and test rows), DeepFM, DeepFM+ICT,
DIN, DIN+ICT, `seeds` seeds each; AUC and LogLoss on the test rows, mean and sample standard deviation. The corpus,
split, CoT pool (uniform `pool_rate` of the training rows, CoTs from `cot_backend`) and retrieved examples are built
once (and cached on disk) and shared by every run: only the model's initialisation and the batch order depend on the
seed. The split and the pool use seed 0 whatever the run's seed, so runs differ by training alone.
The test AUC is also reported on two slices (`TEST_SLICES`): rows on new items (first interaction in the corpus at most
`new_item_window_days` earlier) and rows of users with no row among the training rows trained on. An +ICT variant
"beats" its backbone, overall or on a slice, when its mean AUC exceeds the backbone's by more than two standard
deviations (the larger of the two variants' standard deviations). `cot_pools` lists the pools (`COT_POOLS`) each +ICT
variant runs with (the backbones run once): the three pools over the rows of the LLM CoT file retrieve the same
examples and differ by their CoTs alone (the LLM's, template ones, none), which is the CoT ablation.

Streaming (`streaming=True`): day 0 is the start of the UTC day on which the corpus passes `start_fraction` of its
interactions (MovieLens introduces almost no new items at its very end, where the catalogue is complete, so the replay
sits where new items still arrive). A `stream_kind` model is trained on the time before day 0 (its last 10% is the
validation slice) with a pool of a uniform `pool_rate` of that time's rows. Then each of `days` days is scored, on
that day's interactions with RECENTLY INTRODUCED items (the item's first interaction in the corpus is at most
`new_item_window_days` before this one) and, for context, on all of that day's interactions (a uniform sample of at
most `max_day_rows` of them, fixed per day, plus every recent-item row), by:
(a) the frozen model with the frozen pool (day 0's), (b) the frozen model with the live pool, (c) the model fine-tuned
after every day with `ranker.updates.finetune.fine_tune` (the code `llmcf update` runs: the last `update_window_days`
of data, its newest 10% as validation, at most `update_max_samples` rows) with the live pool. After each day the live
pool gains that day's samples the stream worker would have sent to the generator pool (`streams.decisions.CotPolicy`:
every interaction on an item younger than LLMCF_COLD_START_WINDOW_S, plus a `pool_rate` hash sample), with their CoTs
from `cot_backend`.

Every finished offline run is cached under `$LLMCF_HOME/cache/ranker/runs/`, keyed by the code that trains and scores,
the options that change a run, the split and (for +ICT) the pool's rows and CoTs, so a stopped table resumes where it
stopped and a rerun with the same settings trains nothing.

Reports: `offline.md`/`offline.csv` and `streaming.md`/`streaming.csv` under `out` (default `$LLMCF_HOME/reports/`),
each naming the CoT backend of the pool and the caps used; the Markdown is printed too.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmcf.embeddings import EMBEDDING_DIMENSION
from llmcf.errors import UserFacingError
from llmcf.settings import Settings
from ranker.cot_pool import LLM_FILE_COTS, CotPool, build_cot_pool, generate_cot_vectors, llm_file_pool
from ranker.data import Corpus, fingerprint, movielens_corpus
from ranker.dataset import SPLIT, Samples, Split, build_feature_space, time_split
from ranker.examples import pool_samples, retrieve_examples, retrieve_rows, sample_pool
from ranker.fitting import Batches, FitOptions, fit, predict
from ranker.metrics import auc, logloss
from ranker.model import ModelConfig, RankerModel
from ranker.progress import Stepper
from ranker.retrieval import ExactRetriever
from ranker.sample_pool import SamplePool
from ranker.updates.finetune import fine_tune

VARIANTS = ("deepfm", "deepfm+ict", "din", "din+ict")
COT_POOLS = {
    "uniform": "a uniform --pool-rate of the training rows, CoTs from --cot-backend",
    "llm": "the rows of the LLM CoT file (`llmcf cots`), with the CoTs the LLM wrote",
    "llm-rows-template": "the rows of the LLM CoT file, with template CoTs (not an LLM): the control for `llm`",
    "llm-rows-no-cot": "the rows of the LLM CoT file, without CoTs (the ICT module's CoT token is its placeholder)",
}
# What each offline pool's CoTs are, for `ranker.cot_pool.llm_file_pool` and the reports' `cot_backend` column.
_FILE_POOL_COTS = {"llm": "llm", "llm-rows-template": "template", "llm-rows-no-cot": "none"}
DAY_MS = 86_400_000
TEST_SLICES = {
    "new_items": "rows on new items (the item's first interaction in the data at most --new-item-window-days earlier)",
    "unseen_users": "rows of users who have no row among the training rows trained on",
}
STREAM_CASES = {
    "a": "frozen model, frozen pool (day 0)",
    "b": "frozen model, live pool",
    "c": "model fine-tuned daily, live pool",
}


@dataclass(frozen=True)
class EvaluationOptions:
    """Caps and schedules of `llmcf evaluate` (defaults: see `--help`). The defaults are the full-scale table: every
    training row, 20,000 validation and 20,000 test rows, up to 10 epochs with early stopping, 5 seeds. `quick()` is
    the small configuration the test suite runs (ml-100k, seconds per run)."""

    dataset: str = "ml-1m"
    seeds: int = 5
    variants: tuple[str, ...] = VARIANTS
    max_train_samples: int | None = None
    max_eval_samples: int | None = 20_000
    max_epochs: int = 10
    patience: int = 2
    batch_size: int = 512
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    field_dim: int = 16
    user_tags: bool = True  # the demographics field, where the dataset ships demographics
    history_labels: bool = True  # the liked-history field
    reconstruction_weight: float = 1.0
    pool_rate: float = 0.1
    cot_backend: str = "template"
    cot_pools: tuple[str, ...] = ("uniform",)
    cot_file: Path | None = None
    threads: int = 1
    offline: bool = True
    streaming: bool = False
    days: int = 7
    start_fraction: float = 0.3
    new_item_window_days: float = 30.0
    stream_kind: str = "deepfm+ict"
    update_window_days: float = 7.0
    update_max_samples: int = 20_000
    max_day_rows: int = 1_000
    update_epochs: int = 1
    update_learning_rate: float = 5e-4

    def __post_init__(self) -> None:
        unknown = [v for v in (*self.variants, self.stream_kind) if v not in VARIANTS]
        if unknown:
            raise UserFacingError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
        if not 0 < self.start_fraction < 1:
            raise UserFacingError(f"start fraction {self.start_fraction} must be in (0, 1)")
        if self.seeds < 1 or self.days < 1:
            raise UserFacingError("seeds and days must be at least 1")
        unknown = [p for p in self.cot_pools if p not in COT_POOLS]
        if unknown or not self.cot_pools:
            raise UserFacingError(f"unknown CoT pool(s) {', '.join(unknown) or '(none given)'}: choose from "
                                  f"{', '.join(COT_POOLS)}")
        if self.cot_pools != ("uniform",) and self.streaming:
            raise UserFacingError("--cot-pool other than uniform is for the offline table; the streaming replay's "
                                  "pool grows by the stream's own choice of rows (--cot-pool uniform)")

    @classmethod
    def quick(cls) -> EvaluationOptions:
        """`--quick`: ml-100k, the latest 1,500 training rows, 300 validation and test rows, one epoch, 2 seeds, a
        2-day replay: every code path of the full table in about a minute, for the test suite and a first try."""
        return cls(dataset="ml-100k", seeds=2, max_train_samples=1_500, max_eval_samples=300, max_epochs=1, days=2,
                   update_max_samples=800, max_day_rows=300)

    def llm_cot_file(self) -> Path:
        from ranker.llm_cots import default_path

        return self.cot_file or default_path(self.dataset)

    def pool_label(self, pool: str) -> str:
        """The offline CoT pool `pool` in words, for the reports."""
        if pool == "uniform":
            return f"uniform {self.pool_rate:g} of train, CoTs: {_backend_label(self.cot_backend)}"
        return (f"the rows of {self.llm_cot_file().name} (a seeded sample of all training rows), "
                f"{LLM_FILE_COTS[_FILE_POOL_COTS[pool]]}")

    def pool_backend(self, pool: str) -> str:
        """What wrote the CoTs of `pool`: the reports' `cot_backend` column."""
        return self.cot_backend if pool == "uniform" else _FILE_POOL_COTS[pool]

    def caps(self) -> str:
        def cap(value: int | None) -> str:
            return "all" if value is None else f"{value:,}"

        return (f"train rows: latest {cap(self.max_train_samples)}; validation and test rows: {cap(self.max_eval_samples)} "
                f"each; at most {self.max_epochs} epochs (early stopping, patience {self.patience}); batch "
                f"{self.batch_size}; Adam lr {self.learning_rate:g}, weight decay {self.weight_decay:g}; field dim "
                f"{self.field_dim}; demographics {'on' if self.user_tags else 'off'}; liked history "
                f"{'on' if self.history_labels else 'off'}; CoT pool" + (
                    f": {self.pool_label(self.cot_pools[0])}" if len(self.cot_pools) == 1 else
                    "s: " + "; ".join(f"{pool} = {self.pool_label(pool)}" for pool in self.cot_pools)))


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


@dataclass
class Report:
    offline: list[RunResult] = field(default_factory=list)
    streaming: list[StreamRow] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    markdown: str = ""


def run_evaluation(options: EvaluationOptions, settings: Settings, out: Path | None = None,
                   log: Callable[[str], None] = print) -> Report:
    """Run the parts `options` asks for, write their reports under `out` and return them."""
    torch.set_num_threads(options.threads)
    out = out or settings.home / "reports"
    out.mkdir(parents=True, exist_ok=True)
    report = Report()
    step = Stepper(log)
    corpus = movielens_corpus(options.dataset)
    samples = Samples.of(corpus, settings.home / "cache" / "ranker")
    sections = []
    if options.offline:
        report.offline = evaluate_offline(samples, options, settings, step)
        sections.append(_write_offline(report.offline, options, out, report.files))
    if options.streaming:
        report.streaming = evaluate_streaming(samples, options, settings, step)
        sections.append(_write_streaming(report.streaming, options, settings, out, report.files))
    report.markdown = "\n\n".join(sections)
    return report


# ---- offline ---------------------------------------------------------------------------------------------------------


def evaluate_offline(samples: Samples, options: EvaluationOptions, settings: Settings, step: Stepper) -> list[RunResult]:
    corpus = samples.corpus
    cache_dir = settings.home / "cache" / "ranker"
    splits = time_split(corpus, options.max_train_samples, options.max_eval_samples, seed=0)
    train_split, valid_split, test_split = splits
    step(f"offline: {corpus.source}, train {len(train_split.rows):,}, valid {len(valid_split.rows):,}, "
         f"test {len(test_split.rows):,} (time-ordered split {'/'.join(str(int(s * 100)) for s in SPLIT)})")
    space = build_feature_space(samples, train_split.rows)
    test_rows, labels = test_split.rows, corpus.label[test_split.rows]
    in_slice = {"new_items": on_new_items(corpus, test_rows, options.new_item_window_days),
                "unseen_users": ~np.isin(corpus.user[test_rows], corpus.user[train_split.rows])}
    step(f"test slices: {in_slice['new_items'].sum():,} rows on new items (first interaction at most "
         f"{options.new_item_window_days:g} days earlier), {in_slice['unseen_users'].sum():,} rows of users unseen in "
         "the training rows")
    quiet = Stepper(lambda _line: None)

    def runs(variants: Sequence[str], batches: Batches, setup: tuple[str, ...], pool_name: str) -> list[RunResult]:
        results = []
        for variant in variants:
            backbone, ict = variant.split("+")[0], variant.endswith("+ict")
            for seed in range(options.seeds):
                cached = cache_dir / "runs" / f"{fingerprint(setup, variant, seed)}.json"
                if cached.is_file():  # the table is resumable: a run finished by an earlier, stopped call is kept
                    results.append(RunResult(**json.loads(cached.read_text())))
                    step(f"{variant:<10} {pool_name:<17} seed {seed}: test AUC {results[-1].auc:.4f} (cached from an "
                         f"earlier call, {results[-1].seconds:.0f} s then)")
                    continue
                started = time.perf_counter()
                torch.manual_seed(seed)
                model = RankerModel(ModelConfig(backbone, ict, space.n_users, space.n_items, space.n_tags,
                                        n_user_tags=space.n_user_tags if options.user_tags else 0,
                                        history_labels=options.history_labels,
                                        field_dim=options.field_dim))  # type: ignore[arg-type]
                fit_options = dataclasses.replace(FitOptions.of(options), seed=seed)
                history = fit(model, batches, train_split, valid_split, fit_options, quiet)
                scores = predict(model, batches, test_split)
                sliced = {name: _auc_or_none(labels[mask], scores[mask]) for name, mask in in_slice.items()}
                result = RunResult(variant, seed, auc(labels, scores), logloss(labels, scores), len(history),
                                   int(np.argmax([h["valid_auc"] for h in history])) + 1, time.perf_counter() - started,
                                   sliced["new_items"], sliced["unseen_users"], pool_name)
                results.append(result)
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps(asdict(result)))
                step(f"{variant:<10} {pool_name:<17} seed {seed}: test AUC {result.auc:.4f} (new items "
                     f"{_fmt(result.auc_new_items)}, unseen users {_fmt(result.auc_unseen_users)}), LogLoss "
                     f"{result.logloss:.4f} ({result.epochs} epochs, best {result.best_epoch}, {result.seconds:.0f} s)")
        return results

    # The backbones once (they read no pool), then each +ICT variant with each pool.
    backbones = [v for v in options.variants if not v.endswith("+ict")]
    results = runs(backbones, Batches(samples, space, [], with_examples=False), _setup_fingerprint(options, splits, None), "")
    with_ict = [v for v in options.variants if v.endswith("+ict")]
    # The LLM file's rows are drawn from every training row, whatever the cap on the rows trained on.
    every_train_row = time_split(corpus, None, None, seed=0)[0].rows if set(options.cot_pools) - {"uniform"} else None
    for pool_name in options.cot_pools if with_ict else ():
        if pool_name == "uniform":
            pool = build_cot_pool(samples, train_split.rows, options.pool_rate, options.cot_backend, 0, cache_dir, step)
        else:
            assert every_train_row is not None
            pool = llm_file_pool(samples, every_train_row, options.llm_cot_file(), cache_dir, step,
                                 cots=_FILE_POOL_COTS[pool_name])
        records = retrieve_examples(samples, pool, list(splits), cache_dir, step)
        results += runs(with_ict, Batches(samples, space, records, with_examples=True),
                        _setup_fingerprint(options, splits, pool), pool_name)
    return results


def training_code_fingerprint() -> str:
    """The source of the code that builds the inputs, trains and scores a run: a cached result is reused only while
    it is unchanged (`llmcf evaluate`'s runs, `llmcf tune`'s trials)."""
    import ranker.dataset
    import ranker.examples
    import ranker.features
    import ranker.fitting
    import ranker.metrics
    import ranker.model
    import ranker.retrieval

    return fingerprint(Path(__file__).read_text(), *(Path(module.__file__ or "").read_text() for module in (
        ranker.dataset, ranker.examples, ranker.features, ranker.fitting, ranker.metrics, ranker.model, ranker.retrieval)))


def _setup_fingerprint(options: EvaluationOptions, splits: Sequence[Split], pool: CotPool | None) -> tuple[str, ...]:
    """What a cached run's result depends on besides its variant and seed: the code that trains and scores, the
    options that change a run, the split (and slices) and, for +ICT runs (the third part), the pool's rows and CoTs."""
    settings = fingerprint(training_code_fingerprint(), options.dataset, options.new_item_window_days, options.field_dim, options.user_tags,
                           options.history_labels,
                           *(repr(value) for value in asdict(FitOptions.of(options)).values()))
    data = fingerprint(*(s.rows for s in splits))
    if pool is None:
        return settings, data
    cots = np.stack([np.zeros(EMBEDDING_DIMENSION, np.float32) if c is None else c for c in pool.cots]) \
        if len(pool.rows) else np.zeros(0, np.float32)
    return settings, data, fingerprint(pool.rows, cots, np.array([c is None for c in pool.cots]))


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


def _write_offline(results: list[RunResult], options: EvaluationOptions, out: Path, files: list[Path]) -> str:
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
                     f"{s['logloss_mean']:.4f} ± {s['logloss_std']:.4f} | {_fmt(s['auc_new_items_mean'])} ± "
                     f"{_fmt(s['auc_new_items_std'])} | {_fmt(s['auc_unseen_users_mean'])} ± "
                     f"{_fmt(s['auc_unseen_users_std'])} | {s['seconds_mean']:.0f} |")
    gains = ict_gains(summary)
    if gains:
        lines += ["", "| +ICT vs backbone | test rows | AUC gain | 2 std | beats by > 2 std |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {g['variant']} vs {g['backbone']} | {g['rows'].replace('_', ' ')} | {g['gain']:+.4f} | "
                  f"{g['two_std']:.4f} | {'yes' if g['beats'] else 'no'} |" for g in gains]
    markdown = "\n".join(lines)
    md_path = out / "offline.md"
    md_path.write_text(markdown + "\n")
    files += [md_path, csv_path]
    return markdown


# ---- streaming -------------------------------------------------------------------------------------------------------


def evaluate_streaming(samples: Samples, options: EvaluationOptions, settings: Settings, step: Stepper) -> list[StreamRow]:
    from streams.decisions import CotPolicy

    corpus = samples.corpus
    cache_dir = settings.home / "cache" / "ranker"
    n = len(corpus)
    day0 = int(corpus.ts_ms[int(n * options.start_fraction)]) // DAY_MS * DAY_MS
    before = np.flatnonzero(corpus.ts_ms < day0)
    valid_n = max(1, len(before) // 10)
    train_rows = before[:-valid_n]
    if options.max_train_samples is not None:
        train_rows = train_rows[-options.max_train_samples :]
    valid_rows = before[-valid_n:]
    if options.max_eval_samples is not None and len(valid_rows) > options.max_eval_samples:
        valid_rows = np.sort(np.random.default_rng(0).choice(valid_rows, options.max_eval_samples, replace=False))
    train_split, valid_split = Split("train", train_rows), Split("valid", valid_rows)
    step(f"streaming: day 0 = {_date(day0)}; frozen {options.stream_kind} trained on {len(train_rows):,} rows before it")

    backbone, ict = options.stream_kind.split("+")[0], options.stream_kind.endswith("+ict")
    pool0 = build_cot_pool(samples, train_rows, options.pool_rate, options.cot_backend, 0, cache_dir, step)
    records = retrieve_examples(samples, pool0, [train_split, valid_split], cache_dir, step) if ict else []
    space = build_feature_space(samples, train_rows)
    torch.manual_seed(0)
    frozen = RankerModel(ModelConfig(backbone, ict, space.n_users, space.n_items, space.n_tags,
                                        n_user_tags=space.n_user_tags if options.user_tags else 0,
                                        history_labels=options.history_labels,
                                        field_dim=options.field_dim))  # type: ignore[arg-type]
    fit(frozen, Batches(samples, space, records, ict), train_split, valid_split,
        FitOptions.of(options), step)

    first_seen = first_seen_ms(corpus)
    policy = CotPolicy(rate=options.pool_rate, cold_start_window_s=settings.cold_start_window_s)
    update_fit = dataclasses.replace(FitOptions.of(options), max_epochs=options.update_epochs, patience=1,
                                     learning_rate=options.update_learning_rate)
    rows_out: list[StreamRow] = []
    updated, updated_space = frozen, space
    frozen_pool, live_pool = sample_pool(samples, pool0), sample_pool(samples, pool0)
    pools = {"frozen": frozen_pool, "live": live_pool}
    for day in range(options.days):
        start, end = day0 + day * DAY_MS, day0 + (day + 1) * DAY_MS
        day_rows = np.flatnonzero((corpus.ts_ms >= start) & (corpus.ts_ms < end))
        recent = day_rows[on_new_items(corpus, day_rows, options.new_item_window_days, first_seen)]
        scored = day_rows
        if len(day_rows) > options.max_day_rows:
            sampled = np.random.default_rng(day).choice(day_rows, options.max_day_rows, replace=False)
            scored = np.union1d(sampled, recent)
        for case, model, case_space, pool_name in (("a", frozen, space, "frozen"), ("b", frozen, space, "live"),
                                                    ("c", updated, updated_space, "live")):
            scores = _score(samples, model, case_space, pools[pool_name] if ict else None, scored)
            recent_scores = scores[np.isin(scored, recent)]
            rows_out.append(StreamRow(day, _date(start), case, len(recent), _auc_or_none(corpus.label[recent], recent_scores),
                                      len(scored), _auc_or_none(corpus.label[scored], scores), len(pools[pool_name])))
            step(f"day {day} ({_date(start)}) {case}: recent items {len(recent):,} rows, AUC "
                 f"{_fmt(rows_out[-1].recent_auc)}; all (sample) {len(scored):,} rows, AUC {_fmt(rows_out[-1].all_auc)}")
        if day == options.days - 1:
            break
        chosen = np.array([r for r in day_rows.tolist() if policy.reason(
            corpus.sample_key(r), int(corpus.ts_ms[r]), int(first_seen[corpus.item[r]])) is not None], dtype=np.int64)
        if len(chosen):
            vectors = generate_cot_vectors(samples, chosen, options.cot_backend, cache_dir)
            live_pool.add(pool_samples(samples, CotPool(chosen, list(vectors), options.cot_backend)))
        updated, updated_space = _update(samples, updated, updated_space, live_pool if ict else None,
                                         end, options, update_fit, step)
    return rows_out


def _examples(samples: Samples, pool: SamplePool, splits: Sequence[Split]) -> list[Any]:
    """Set the splits' slots from the pool as it is now; returns the records they point into."""
    view = pool.view
    retriever = ExactRetriever(pool)
    for split in splits:
        split.slots = retrieve_rows(retriever, view, samples, split.rows)
    return view.records(range(view.n))


def _update(samples: Samples, model: RankerModel, space: Any, pool: SamplePool | None, until_ms: int,
            options: EvaluationOptions, fit_options: FitOptions, step: Stepper) -> tuple[RankerModel, Any]:
    """(c): fine-tune on the last `update_window_days` before `until_ms`, as `llmcf update` does."""
    corpus = samples.corpus
    rows = np.flatnonzero((corpus.ts_ms >= until_ms - options.update_window_days * DAY_MS) & (corpus.ts_ms < until_ms))
    rows = rows[-options.update_max_samples :]
    valid_n = max(1, len(rows) // 10)
    train_split, valid_split = Split("train", rows[:-valid_n]), Split("valid", rows[-valid_n:])
    if min(len(np.unique(corpus.label[s.rows])) for s in (train_split, valid_split)) < 2:
        step("update skipped: a split with a single label")
        return model, space
    records = _examples(samples, pool, [train_split, valid_split]) if pool is not None else []
    tuned = fine_tune(model, space, samples, records, train_split, valid_split, fit_options, Stepper(lambda _line: None))
    step(f"updated: {len(train_split.rows):,} rows, +{tuned.new_users} users, +{tuned.new_items} items, valid AUC "
         f"{max(h['valid_auc'] for h in tuned.history):.4f}")
    return tuned.model, tuned.space


def _score(samples: Samples, model: RankerModel, space: Any, pool: SamplePool | None, rows: np.ndarray) -> np.ndarray:
    split = Split("day", rows)
    records = _examples(samples, pool, [split]) if pool is not None else []
    return predict(model, Batches(samples, space, records, pool is not None), split)


def first_seen_ms(corpus: Corpus) -> np.ndarray:
    """Per item code: the time of its first interaction in the corpus."""
    first_seen = np.full(len(corpus.item_ids), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first_seen, corpus.item, corpus.ts_ms)
    return first_seen


def on_new_items(corpus: Corpus, rows: np.ndarray, window_days: float, first_seen: np.ndarray | None = None) -> np.ndarray:
    """Which `rows` are on a new item: one whose first interaction is at most `window_days` before the row's."""
    first_seen = first_seen_ms(corpus) if first_seen is None else first_seen
    return corpus.ts_ms[rows] - first_seen[corpus.item[rows]] <= window_days * DAY_MS


def _auc_or_none(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return auc(labels, scores) if len(np.unique(labels)) == 2 else None


def _write_streaming(rows: list[StreamRow], options: EvaluationOptions, settings: Settings, out: Path,
                     files: list[Path]) -> str:
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
        f"CoT pool backend: **{_backend_label(options.cot_backend)}**. Recently introduced item: first interaction in the "
        f"data at most {options.new_item_window_days:g} days earlier. Live pool: + each previous day's samples chosen "
        f"as the stream worker chooses them (cold start {settings.cold_start_window_s:g} s, rate {options.pool_rate:g}). "
        f"Daily update: last {options.update_window_days:g} days, at most {options.update_max_samples:,} rows, "
        f"{options.update_epochs} epoch(s), lr {options.update_learning_rate:g}. Frozen model caps: {options.caps()}.",
        "",
        "| day | date | case | recent-item rows | AUC (recent items) | all rows (sample) | AUC (all) | pool |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r.day} | {r.date} | ({r.case}) {STREAM_CASES[r.case]} | {r.recent_rows:,} | {_fmt(r.recent_auc)} | "
              f"{r.all_rows:,} | {_fmt(r.all_auc)} | {r.pool_size:,} |" for r in rows]
    markdown = "\n".join(lines)
    md_path = out / "streaming.md"
    md_path.write_text(markdown + "\n")
    files += [md_path, csv_path]
    return markdown


def _backend_label(backend: str) -> str:
    return "template (deterministic rationale, not an LLM)" if backend == "template" else backend


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def _date(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d")

