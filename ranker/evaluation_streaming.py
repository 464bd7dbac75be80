"""`llmcf evaluate --streaming`: the day-by-day replay on recently introduced items (`ranker.evaluation` states the
protocol), scoring each day with (a) the frozen model and pool, (b) the frozen model with the live pool and (c) the
model fine-tuned daily as `llmcf update` does, with the live pool grown by the stream worker's own choice of samples
(`llmcf.cot_policy.CotPolicy`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from llmcf.cot_policy import CotPolicy
from llmcf.model_kinds import ModelKind
from llmcf.settings import Settings
from ranker.cot_pool import CotPool, build_cot_pool, generate_cot_vectors
from ranker.dataset import Samples, Split, build_feature_space
from ranker.evaluation_options import DAY_MS, EvaluationOptions, first_seen_ms, on_new_items
from ranker.evaluation_report import StreamRow, fmt, utc_date
from ranker.examples import pool_samples, retrieve_examples, retrieve_rows, sample_pool
from ranker.features import FeatureSpace
from ranker.fitting import Batches, fit, predict
from ranker.metrics import auc_or_none
from ranker.model import ModelConfig, RankerModel
from ranker.options import FitOptions
from ranker.progress import Stepper
from ranker.retrieval import ExactRetriever
from ranker.sample_pool import ExampleRecord, SamplePool
from ranker.updates.finetune import fine_tune


def evaluate_streaming(samples: Samples, options: EvaluationOptions, settings: Settings, step: Stepper) -> list[StreamRow]:
    """The replay's rows: every day, each case (a), (b), (c), on the day's recent-item rows and on its sample."""
    corpus = samples.corpus
    cache_dir = settings.home / "cache" / "ranker"
    day0 = int(corpus.ts_ms[int(len(corpus) * options.start_fraction)]) // DAY_MS * DAY_MS
    train_split, valid_split = _frozen_splits(samples, options, day0)
    step(f"streaming: day 0 = {utc_date(day0)}; frozen {options.stream_kind} trained on {len(train_split.rows):,} rows "
         "before it")

    ict = ModelKind.parse(options.stream_kind).ict
    pool0 = build_cot_pool(samples, train_split.rows, options.pool_rate, options.cot_backend, 0, cache_dir, step)
    records = retrieve_examples(samples, pool0, [train_split, valid_split], cache_dir, step) if ict else []
    space = build_feature_space(samples, train_split.rows)
    torch.manual_seed(0)
    frozen = RankerModel(ModelConfig(ModelKind.parse(options.stream_kind).backbone, ict, space.n_users, space.n_items, space.n_tags,
                                     n_user_tags=space.n_user_tags if options.user_tags else 0,
                                     history_labels=options.history_labels, field_dim=options.field_dim))
    fit(frozen, Batches(samples, space, records, ict), train_split, valid_split, options.fit, step)

    first_seen = first_seen_ms(corpus)
    policy = CotPolicy(rate=options.pool_rate, cold_start_window_s=settings.cold_start_window_s)
    update_fit = dataclasses.replace(options.fit, max_epochs=options.update_epochs, patience=1,
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
            rows_out.append(StreamRow(day, utc_date(start), case, len(recent), auc_or_none(corpus.label[recent], recent_scores),
                                      len(scored), auc_or_none(corpus.label[scored], scores), len(pools[pool_name])))
            step(f"day {day} ({utc_date(start)}) {case}: recent items {len(recent):,} rows, AUC "
                 f"{fmt(rows_out[-1].recent_auc)}; all (sample) {len(scored):,} rows, AUC {fmt(rows_out[-1].all_auc)}")
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


def _frozen_splits(samples: Samples, options: EvaluationOptions, day0: int) -> tuple[Split, Split]:
    """The frozen model's train and validation rows: the time before day 0, its last 10% for validation."""
    corpus = samples.corpus
    before = np.flatnonzero(corpus.ts_ms < day0)
    valid_n = max(1, len(before) // 10)
    train_rows = before[:-valid_n]
    if options.max_train_samples is not None:
        train_rows = train_rows[-options.max_train_samples :]
    valid_rows = before[-valid_n:]
    if options.max_eval_samples is not None and len(valid_rows) > options.max_eval_samples:
        valid_rows = np.sort(np.random.default_rng(0).choice(valid_rows, options.max_eval_samples, replace=False))
    return Split("train", train_rows), Split("valid", valid_rows)


def _examples(samples: Samples, pool: SamplePool, splits: Sequence[Split]) -> list[ExampleRecord]:
    """Set the splits' slots from the pool as it is now; returns the records they point into."""
    view = pool.view
    retriever = ExactRetriever(pool)
    for split in splits:
        split.slots = retrieve_rows(retriever, view, samples, split.rows)
    return view.records(range(view.n))


def _update(samples: Samples, model: RankerModel, space: FeatureSpace, pool: SamplePool | None, until_ms: int,
            options: EvaluationOptions, fit_options: FitOptions, step: Stepper) -> tuple[RankerModel, FeatureSpace]:
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


def _score(samples: Samples, model: RankerModel, space: FeatureSpace, pool: SamplePool | None,
           rows: np.ndarray) -> np.ndarray:
    split = Split("day", rows)
    records = _examples(samples, pool, [split]) if pool is not None else []
    return predict(model, Batches(samples, space, records, pool is not None), split)
