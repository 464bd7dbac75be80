"""One update round: from the stored stream to a promoted (or rejected) model version.

A round, for the model kind the server serves (`LLMCF_RANKER_KIND`):
1. Skip when nothing is new: the round's data marker (stored interactions, CoT samples per status) equals the one
   recorded with the latest version this updater judged (serving or rejected). Re-delivered events do not change the
   counts (upserts), new interactions and newly generated CoTs do.
2. No serving version at all: train from scratch on the database (`llmcf train --source database`) and promote it.
3. Otherwise the window: the stored interactions of the last `window_s` of event time before the newest one, at most
   the latest `max_samples`. Its newest `holdout_fraction` (by event time) is the holdout, never trained on; the same
   share before it is the validation slice for early stopping; the rest is trained on.
4. The example pool: the stored CoT samples before the holdout (at most the latest `max_pool_samples`); every window
   row gets its 2+2 examples from the serving engine (`ranker.examples`).
5. Fine-tune from the serving version's weights (`finetune.fine_tune`: the vocabulary grows).
6. Both models score the same holdout rows with the same examples (the serving model through its own vocabulary, as
   it serves). A candidate whose AUC is lower than the serving model's by more than `max_auc_drop` is recorded as
   'rejected' with the numbers in `notes`; otherwise it is recorded (parent_version = the serving version) and promoted
   in one transaction (the previous version becomes 'retired'). Either way it is exported to ONNX with the parity
   check, which only a promoted candidate must pass (a rejected one records its figure).

Lifecycle: any exception leaves the database as it was (a version row is written only after its artifact is complete,
and promotion is one transaction); the caller counts the round as failed. Too little data (a split with one label) is
a skip, not a failure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from llmcf.errors import UserFacingError
from llmcf.settings import Settings
from ranker.cot_pool import CotPool, stored_cot_rows
from ranker.data import Corpus, database_corpus
from ranker.dataset import NotEnoughData, Samples, Split, require_both_labels
from ranker.examples import retrieve_examples
from ranker.export import load_model
from ranker.fitting import Batches, evaluate
from ranker.options import FitOptions, TrainOptions, UpdateOptions
from ranker.progress import Stepper
from ranker.registry import PARITY_ROWS, TrainResult, export_artifact, register_version
from ranker.train import train
from ranker.updates.finetune import fine_tune
from ranker.updates.metrics import HOLDOUT_AUC

Outcome = Literal["promoted", "rejected", "skipped"]


@dataclass(frozen=True)
class RoundReport:
    outcome: Outcome
    reason: str
    version_id: str | None = None
    parent_version: str | None = None
    candidate_auc: float | None = None
    serving_auc: float | None = None
    newest_event_ms: int | None = None


def run_round(settings: Settings, options: UpdateOptions, log: Callable[[str], None] = print) -> RoundReport:
    """One round (module docstring). Raises on failure; returns what it did otherwise."""
    from storage.repository import Repository

    step = Stepper(log)
    with Repository.from_settings(settings) as repository:
        marker = {"interactions": repository.counts()["interactions"], "cot_samples": repository.cot_sample_statuses()}
        serving = repository.latest_model_version(options.kind, "serving")
        judged = [v for v in (serving, repository.latest_model_version(options.kind, "rejected")) if v is not None]
        last = max(judged, key=lambda v: v.created_at) if judged else None
        if marker["interactions"] == 0:
            return _skip(step, "no interactions stored yet")
        if last is not None and last.metrics.get("data_marker") == marker:
            return _skip(step, f"nothing new since version {last.version_id} ({marker['interactions']:,} interactions)")
        corpus = database_corpus(repository)
    step(f"database: {len(corpus):,} interactions, {len(corpus.stored_cot):,} CoT samples; serving "
         f"{options.kind}: {serving.version_id if serving else 'none'}")
    try:
        if serving is None:
            return _from_scratch(corpus, settings, options, marker, log, step)
        return _fine_tune_round(corpus, settings, options, marker, serving, step)
    except NotEnoughData as exc:
        return _skip(step, f"not enough data yet: {exc}")


def _skip(step: Stepper, reason: str) -> RoundReport:
    step(f"skipped: {reason}")
    return RoundReport("skipped", reason)


def _from_scratch(corpus: Corpus, settings: Settings, options: UpdateOptions, marker: dict[str, Any],
                  log: Callable[[str], None], step: Stepper) -> RoundReport:
    step("no serving version: training from scratch on the database")
    result = train(TrainOptions(dataset=None, backbone=options.backbone, ict=options.ict, max_train_samples=options.max_samples,
                                fit=FitOptions(max_epochs=options.scratch_max_epochs, batch_size=options.fit.batch_size,
                                               seed=options.fit.seed),
                                threads=options.threads, register=False),
                   settings, log, corpus=corpus)
    result.metrics["data_marker"] = marker
    _promote(settings, result, None, f"llmcf update: first version, trained from scratch on the database "
             f"(test AUC {result.metrics['auc']:.4f})")
    step(f"promoted {result.version_id} (trained from scratch)")
    return RoundReport("promoted", "trained from scratch", result.version_id, None, result.metrics["auc"], None,
                       result.metrics["newest_event_ms"])


def window_splits(corpus: Corpus, options: UpdateOptions) -> tuple[Split, Split, Split]:
    """Train / validation / holdout of the newest window, by event time (module docstring, step 3)."""
    newest = int(corpus.ts_ms.max())
    rows = np.flatnonzero(corpus.ts_ms >= newest - options.window_s * 1000)[-options.max_samples :]
    share = max(1, int(round(len(rows) * options.holdout_fraction)))
    splits = (Split("train", rows[: len(rows) - 2 * share]), Split("valid", rows[len(rows) - 2 * share : len(rows) - share]),
              Split("holdout", rows[len(rows) - share :]))
    for split in splits:
        require_both_labels(corpus, split)
    return splits


def _fine_tune_round(corpus: Corpus, settings: Settings, options: UpdateOptions, marker: dict[str, Any], serving: Any,
                     step: Stepper) -> RoundReport:
    train_split, valid_split, holdout = window_splits(corpus, options)
    step(f"window: train {len(train_split.rows):,}, valid {len(valid_split.rows):,}, holdout {len(holdout.rows):,} "
         f"(the newest {options.holdout_fraction:g} by event time, never trained on)")
    cache_dir = settings.home / "cache" / "ranker"
    samples = Samples.of(corpus, cache_dir)
    records = []
    pool = CotPool.empty()
    if options.ict:
        pool_rows, cots = stored_cot_rows(corpus, np.arange(int(holdout.rows[0])))
        keep = slice(-options.max_pool_samples, None)
        pool = CotPool(pool_rows[keep], cots[keep], "database")
        step(f"CoT pool: {len(pool.rows):,} stored samples before the holdout ({sum(c is None for c in pool.cots):,} pending)")
        records = retrieve_examples(samples, pool, [train_split, valid_split, holdout], cache_dir, step, cache=False)

    parent, parent_space, _ = load_model(Path(serving.artifact_path).parent)
    if parent.config.kind != options.kind:
        raise UserFacingError(f"serving version {serving.version_id} is a {parent.config.kind} model, not {options.kind}")
    tuned = fine_tune(parent, parent_space, samples, records, train_split, valid_split, options.fit, step)

    candidate = evaluate(tuned.model, tuned.batches, holdout)
    current = evaluate(parent, Batches(samples, parent_space, records, with_examples=options.ict), holdout)
    HOLDOUT_AUC.labels(model="candidate").set(candidate["auc"])
    HOLDOUT_AUC.labels(model="serving").set(current["auc"])
    accepted = candidate["auc"] >= current["auc"] - options.max_auc_drop
    comparison = (f"holdout of {len(holdout.rows):,} rows: candidate AUC {candidate['auc']:.4f} (LogLoss "
                  f"{candidate['logloss']:.4f}) vs serving {serving.version_id} AUC {current['auc']:.4f} (LogLoss "
                  f"{current['logloss']:.4f}); max drop {options.max_auc_drop:g}")
    step(comparison)

    newest_event_ms = int(corpus.ts_ms[train_split.rows].max())
    metrics = {
        "auc": candidate["auc"], "logloss": candidate["logloss"], "serving_auc": current["auc"],
        "serving_logloss": current["logloss"], "holdout_samples": len(holdout.rows), "train_samples": len(train_split.rows),
        "valid_samples": len(valid_split.rows), "valid_auc": max(h["valid_auc"] for h in tuned.history),
        "epochs": len(tuned.history), "new_users": tuned.new_users, "new_items": tuned.new_items, "new_tags": tuned.new_tags,
        "pool_size": len(pool.rows), "cot_backend": pool.backend, "newest_event_ms": newest_event_ms,
        "window_start_ms": int(corpus.ts_ms[train_split.rows[0]]), "data_marker": marker,
    }
    manifest = {"epochs": tuned.history, "options": asdict(options), "parent_version": serving.version_id,
                "data": {"source": corpus.source, "window": "train / valid / holdout by event time"},
                "cot_pool": pool.describe() if options.ict else None}
    artifact = export_artifact(tuned.model, tuned.space, tuned.batches.arrays(holdout, np.arange(min(PARITY_ROWS, len(holdout.rows)))),
                               metrics, manifest, settings, require_parity=accepted)
    result = TrainResult(artifact.version_id, options.kind, artifact.directory, artifact.onnx_path, artifact.checksum,
                         artifact.metrics, tuned.history, artifact.created_at)
    report = dict(version_id=result.version_id, parent_version=serving.version_id, candidate_auc=candidate["auc"],
                  serving_auc=current["auc"], newest_event_ms=newest_event_ms)
    if not accepted:
        register_version(settings, result, status="rejected", parent_version=serving.version_id,
                         notes=f"rejected by llmcf update: {comparison}")
        step(f"rejected {result.version_id}: its holdout AUC is lower by more than {options.max_auc_drop:g}")
        return RoundReport("rejected", comparison, **report)
    _promote(settings, result, serving.version_id, f"promoted by llmcf update: {comparison}")
    step(f"promoted {result.version_id} (parent {serving.version_id}); {serving.version_id} retired")
    return RoundReport("promoted", comparison, **report)


def _promote(settings: Settings, result: TrainResult, parent_version: str | None, notes: str) -> None:
    """Record the version, then make it the serving one; the previous serving version is retired in the same
    transaction (`Repository.set_model_status`), so a server polling model_versions sees one or the other."""
    from storage.repository import Repository

    register_version(settings, result, status="candidate", parent_version=parent_version, notes=notes)
    with Repository.from_settings(settings) as repository:
        repository.set_model_status(result.version_id, "serving", notes)
