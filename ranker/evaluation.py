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
pool gains that day's samples the stream worker would have sent to the generator pool (`llmcf.cot_policy.CotPolicy`:
every interaction on an item younger than LLMCF_COLD_START_WINDOW_S, plus a `pool_rate` hash sample), with their CoTs
from `cot_backend`.

Every finished offline run is cached under `$LLMCF_HOME/cache/ranker/runs/`, keyed by the code that trains and scores,
the options that change a run, the split and (for +ICT) the pool's rows and CoTs, so a stopped table resumes where it
stopped and a rerun with the same settings trains nothing.

Reports: `offline.md`/`offline.csv` and `streaming.md`/`streaming.csv` under `out` (default `$LLMCF_HOME/reports/`),
each naming the CoT backend of the pool and the caps used; the Markdown is printed too.

This module runs the offline table; what is compared and the options: `ranker.evaluation_options`; the replay:
`ranker.evaluation_streaming`; the result records and the reports: `ranker.evaluation_report`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmcf.embeddings import EMBEDDING_DIMENSION
from llmcf.model_kinds import ModelKind
from llmcf.settings import Settings
from ranker.cot_pool import CotPool, build_cot_pool, llm_file_pool
from ranker.data import fingerprint, movielens_corpus
from ranker.dataset import SPLIT, Samples, Split, build_feature_space, time_split
from ranker.evaluation_options import FILE_POOL_COTS, EvaluationOptions, on_new_items
from ranker.evaluation_report import RunResult, StreamRow, fmt, write_offline, write_streaming
from ranker.evaluation_streaming import evaluate_streaming
from ranker.examples import retrieve_examples
from ranker.fitting import Batches, fit, predict
from ranker.metrics import auc, auc_or_none, logloss
from ranker.model import ModelConfig, RankerModel
from ranker.progress import Stepper


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
        sections.append(write_offline(report.offline, options, out, report.files))
    if options.streaming:
        report.streaming = evaluate_streaming(samples, options, settings, step)
        sections.append(write_streaming(report.streaming, options, settings, out, report.files))
    report.markdown = "\n\n".join(sections)
    return report


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
            ict = ModelKind.parse(variant).ict
            for seed in range(options.seeds):
                cached = cache_dir / "runs" / f"{fingerprint(setup, variant, seed)}.json"
                if cached.is_file():  # the table is resumable: a run finished by an earlier, stopped call is kept
                    results.append(RunResult(**json.loads(cached.read_text())))
                    step(f"{variant:<10} {pool_name:<17} seed {seed}: test AUC {results[-1].auc:.4f} (cached from an "
                         f"earlier call, {results[-1].seconds:.0f} s then)")
                    continue
                started = time.perf_counter()
                torch.manual_seed(seed)
                model = RankerModel(ModelConfig(ModelKind.parse(variant).backbone, ict, space.n_users, space.n_items, space.n_tags,
                                                n_user_tags=space.n_user_tags if options.user_tags else 0,
                                                history_labels=options.history_labels, field_dim=options.field_dim))
                fit_options = dataclasses.replace(options.fit, seed=seed)
                history = fit(model, batches, train_split, valid_split, fit_options, quiet)
                scores = predict(model, batches, test_split)
                sliced = {name: auc_or_none(labels[mask], scores[mask]) for name, mask in in_slice.items()}
                result = RunResult(variant, seed, auc(labels, scores), logloss(labels, scores), len(history),
                                   int(np.argmax([h["valid_auc"] for h in history])) + 1, time.perf_counter() - started,
                                   sliced["new_items"], sliced["unseen_users"], pool_name)
                results.append(result)
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps(asdict(result)))
                step(f"{variant:<10} {pool_name:<17} seed {seed}: test AUC {result.auc:.4f} (new items "
                     f"{fmt(result.auc_new_items)}, unseen users {fmt(result.auc_unseen_users)}), LogLoss "
                     f"{result.logloss:.4f} ({result.epochs} epochs, best {result.best_epoch}, {result.seconds:.0f} s)")
        return results

    # The backbones once (they read no pool), then each +ICT variant with each pool.
    backbones = [v for v in options.variants if not ModelKind.parse(v).ict]
    results = runs(backbones, Batches(samples, space, [], with_examples=False), _setup_fingerprint(options, splits, None), "")
    with_ict = [v for v in options.variants if ModelKind.parse(v).ict]
    # The LLM file's rows are drawn from every training row, whatever the cap on the rows trained on.
    every_train_row = time_split(corpus, None, None, seed=0)[0].rows if set(options.cot_pools) - {"uniform"} else None
    for pool_name in options.cot_pools if with_ict else ():
        if pool_name == "uniform":
            pool = build_cot_pool(samples, train_split.rows, options.pool_rate, options.cot_backend, 0, cache_dir, step)
        else:
            assert every_train_row is not None
            pool = llm_file_pool(samples, every_train_row, options.llm_cot_file(), cache_dir, step,
                                 cots=FILE_POOL_COTS[pool_name])
        records = retrieve_examples(samples, pool, list(splits), cache_dir, step)
        results += runs(with_ict, Batches(samples, space, records, with_examples=True),
                        _setup_fingerprint(options, splits, pool), pool_name)
    return results


def training_code_fingerprint() -> str:
    """The source of the code that builds the inputs, trains and scores a run: a cached result is reused only while
    it is unchanged (`llmcf evaluate`'s runs, `llmcf tune`'s trials)."""
    import ranker.dataset
    import ranker.evaluation_options
    import ranker.examples
    import ranker.features
    import ranker.fitting
    import ranker.metrics
    import ranker.model
    import ranker.neighbours
    import ranker.retrieval

    return fingerprint(Path(__file__).read_text(), *(Path(module.__file__ or "").read_text() for module in (
        ranker.dataset, ranker.evaluation_options, ranker.examples, ranker.features, ranker.fitting, ranker.metrics,
        ranker.model, ranker.neighbours, ranker.retrieval)))


def _setup_fingerprint(options: EvaluationOptions, splits: Sequence[Split], pool: CotPool | None) -> tuple[str, ...]:
    """What a cached run's result depends on besides its variant and seed: the code that trains and scores, the
    options that change a run, the split (and slices) and, for +ICT runs (the third part), the pool's rows and CoTs."""
    settings = fingerprint(training_code_fingerprint(), options.dataset, options.new_item_window_days, options.field_dim, options.user_tags,
                           options.history_labels,
                           *(repr(value) for value in asdict(options.fit).values()))
    data = fingerprint(*(s.rows for s in splits))
    if pool is None:
        return settings, data
    cots = np.stack([np.zeros(EMBEDDING_DIMENSION, np.float32) if c is None else c for c in pool.cots]) \
        if len(pool.rows) else np.zeros(0, np.float32)
    return settings, data, fingerprint(pool.rows, cots, np.array([c is None for c in pool.cots]))
