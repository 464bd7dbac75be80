"""`llmcf train`: fit a ranker (DeepFM or DIN, with or without ICT), export it to ONNX, check parity, register it.

Steps, each printed with its time:
1. Samples: labelled interactions in time order (MovieLens straight from its package, or the database), histories of 20.
   Split by time: the first 80% train, the next 10% validation, the last 10% test. Training keeps the latest
   `max_train_samples` train rows; validation and test are uniform samples of at most `max_eval_samples` rows.
2. The CoT pool: offline, a uniform 1/10 of the training rows with chains of thought from a backend (`template` by
   default: a deterministic rationale, NOT an LLM, and the manifest says so), embedded with MiniLM; from the database,
   the stored CoT samples of the training period (pending ones keep a placeholder CoT). Embeddings are cached under
   `$LLMCF_HOME/cache/ranker/`, so a second run embeds nothing.
3. The pool goes into the exact retrieval engine the server uses (`ranker.retrieval`), which finds the 2+2 examples of
   every sample: never the sample itself nor the same user's later samples (`ranker.examples`). The retrieved examples
   are cached on disk too, as raw records (ids, vectors, CoT), so any feature space can encode them.
4. Adam, mini-batches, BCE + lambda * L_rec, early stopping (patience 2) on validation AUC; the best epoch is kept.
5. Export to ONNX, parity onnxruntime vs torch (max abs diff <= 1e-5, else the run fails), artifact under
   `$LLMCF_HOME/models/<version_id>/`, and a `model_versions` row (status 'candidate') with metrics and the sha256.

Each step lives in its own module (`ranker.dataset`, `ranker.cot_pool`, `ranker.examples`, `ranker.fitting`,
`ranker.registry`); they take explicit inputs and keep no state, so one prepared corpus, pool and retrieval serve many
fits (`llmcf evaluate`'s variants and seeds, `llmcf update`'s daily fine-tuning).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Callable

import numpy as np
import torch

from llmcf.settings import Settings
from ranker.cot_pool import CotPool, build_cot_pool
from ranker.data import Corpus
from ranker.dataset import SPLIT, Samples, build_feature_space, load_corpus, time_split
from ranker.examples import retrieve_examples
from ranker.fitting import Batches, evaluate, fit
from ranker.metrics import logloss
from ranker.model import ModelConfig, RankerModel
from ranker.options import TrainOptions
from ranker.progress import Stepper
from ranker.registry import PARITY_ROWS, TrainResult, export_artifact, register_version
from ranker.sample_pool import ExampleRecord


def train(options: TrainOptions, settings: Settings, log: Callable[[str], None] = print,
          corpus: Corpus | None = None) -> TrainResult:
    """Run the whole pipeline (module docstring); returns where the artifact went and its metrics. `corpus` skips
    loading one (the updater already read the database)."""
    torch.set_num_threads(options.threads)
    started = time.perf_counter()
    cache_dir = settings.home / "cache" / "ranker"
    step = Stepper(log, started)

    corpus = corpus if corpus is not None else load_corpus(options.dataset, settings)
    train_split, valid_split, test_split = time_split(corpus, options.max_train_samples, options.max_eval_samples,
                                                      options.fit.seed)
    step(f"samples from {corpus.source}: {len(corpus):,} interactions; train {len(train_split.rows):,}, "
         f"valid {len(valid_split.rows):,}, test {len(test_split.rows):,} (time-ordered split "
         f"{'/'.join(str(int(s * 100)) for s in SPLIT)})")
    samples = Samples.of(corpus, cache_dir)

    pool = CotPool.empty()
    records: list[ExampleRecord] = []
    if options.ict:  # the backbone alone needs no CoT pool and no examples
        pool = build_cot_pool(samples, train_split.rows, options.pool_rate, options.cot_backend, options.fit.seed,
                              cache_dir, step)
        records = retrieve_examples(samples, pool, [train_split, valid_split, test_split], cache_dir, step)

    space = build_feature_space(samples, train_split.rows)
    step(f"features: {space.n_users - 1:,} users, {space.n_items - 1:,} items, {space.n_tags - 1} tags in the vocabulary")

    torch.manual_seed(options.fit.seed)
    model = RankerModel(ModelConfig(options.backbone, options.ict, space.n_users, space.n_items, space.n_tags,
                                    n_user_tags=space.n_user_tags, history_labels=True))
    batches = Batches(samples, space, records, with_examples=options.ict)
    history = fit(model, batches, train_split, valid_split, options.fit, step)

    test_metrics = evaluate(model, batches, test_split)
    valid_metrics = evaluate(model, batches, valid_split)
    base_rate = float(corpus.label[train_split.rows].mean())
    metrics = {
        "auc": test_metrics["auc"], "logloss": test_metrics["logloss"],
        "valid_auc": valid_metrics["auc"], "valid_logloss": valid_metrics["logloss"],
        "constant_logloss": logloss(corpus.label[test_split.rows], np.full(len(test_split.rows), base_rate)),
        "epochs": len(history), "best_epoch": int(np.argmax([h["valid_auc"] for h in history])) + 1,
        "train_samples": len(train_split.rows), "valid_samples": len(valid_split.rows), "test_samples": len(test_split.rows),
        "pool_size": len(pool.rows), "cot_backend": pool.backend,
        "examples_found": float((test_split.slots >= 0).mean()) if options.ict and test_split.slots is not None else None,
        "newest_event_ms": int(corpus.ts_ms[train_split.rows].max()),
    }
    step(f"test: AUC {metrics['auc']:.4f}, LogLoss {metrics['logloss']:.4f} "
         f"(constant predictor: AUC 0.5, LogLoss {metrics['constant_logloss']:.4f})")

    manifest = {
        "epochs": history, "options": asdict(options), "data": {"source": corpus.source, "split": SPLIT},
        "cot_pool": pool.describe() if options.ict else None,
    }
    artifact = export_artifact(model, space, batches.arrays(test_split, np.arange(min(PARITY_ROWS, len(test_split.rows)))),
                               metrics, manifest, settings)
    notes = f"llmcf train on {corpus.source}" + (f"; CoT pool: {pool.backend}" if options.ict else "")
    result = TrainResult(artifact.version_id, model.config.kind, artifact.directory, artifact.onnx_path, artifact.checksum,
                         artifact.metrics, history, artifact.created_at, notes)
    if options.register:
        register_version(settings, result)
    step(f"exported {result.onnx_path} (parity {result.metrics['onnx_parity_max_abs_diff']:.2e}), "
         f"version {result.version_id}")
    return result
