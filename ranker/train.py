"""`llmcf train`: fit a ranker (DeepFM or DIN, with or without ICT), export it to ONNX, check parity, register it.

Steps, each printed with its time:
1. Samples: labelled interactions in time order (MovieLens straight from its package, or the database), histories of 20.
   Split by time: the first 80% train, the next 10% validation, the last 10% test. Training keeps the latest
   `max_train_samples` train rows; validation and test are uniform samples of at most `max_eval_samples` rows.
2. The CoT pool: offline, a uniform 1/10 of the training rows with chains of thought from a backend (`template` by
   default: a deterministic rationale, NOT an LLM, and the manifest says so), embedded with MiniLM; from the database,
   the stored CoT samples of the training period (pending ones keep a placeholder CoT). Embeddings are cached under
   `$LLMCF_HOME/cache/ranker/`, so a second run embeds nothing.
3. A private vector index (Qdrant Edge under the cache directory) holds the pool exactly as the stream worker indexes
   samples, and `ExampleRetriever` (the serving code) finds 2+2 examples for every sample: never the sample itself nor
   the same user's later samples. The retrieved examples are cached on disk too.
4. Adam, mini-batches, BCE + lambda * L_rec, early stopping (patience 2) on validation AUC; the best epoch is kept.
5. Export to ONNX, parity onnxruntime vs torch (max abs diff <= 1e-5, else the run fails), artifact under
   `$LLMCF_HOME/models/<version_id>/`, and a `model_versions` row (status 'candidate') with metrics and the sha256.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from llmcf.embeddings import EMBEDDING_DIMENSION, MODEL_NAME
from llmcf.errors import UserFacingError
from llmcf.events import CotRequest, HistoryEntry, ItemSnapshot, from_epoch_ms
from llmcf.samples import SAMPLE_DIMENSION, encode_history
from llmcf.settings import Settings
from ranker.data import Corpus, EmbeddingCache, database_corpus, embedding_cache_path, fingerprint, movielens_corpus, user_histories
from ranker.export import MODEL_ONNX, check_parity, export_onnx, save_artifact, sha256_file
from ranker.features import HISTORY_LENGTH, MAX_TAGS, ExamplePool, FeatureSpace, gather_examples
from ranker.model import ModelConfig, RankerModel
from ranker.retrieval import ExampleQuery, ExampleRetriever
from storage.vectors import Point

SPLIT = (0.8, 0.1, 0.1)
DEFAULT_MAX_TRAIN_SAMPLES = 100_000
DEFAULT_MAX_EVAL_SAMPLES = 20_000
RETRIEVAL_CHUNK = 2_048
EVAL_BATCH = 4_096


@dataclass(frozen=True)
class TrainOptions:
    """One training run. `dataset` None = read the database (`DATABASE_URL`)."""

    dataset: str | None = "ml-1m"
    backbone: str = "deepfm"
    ict: bool = True
    max_train_samples: int | None = DEFAULT_MAX_TRAIN_SAMPLES
    max_eval_samples: int | None = DEFAULT_MAX_EVAL_SAMPLES
    max_epochs: int = 20
    patience: int = 2
    batch_size: int = 512
    learning_rate: float = 1e-3
    reconstruction_weight: float = 1.0
    pool_rate: float = 0.1
    cot_backend: str = "template"
    seed: int = 0
    threads: int = 2
    register: bool = True

    def __post_init__(self) -> None:
        if not 128 <= self.batch_size <= 4096:
            raise UserFacingError(f"batch size {self.batch_size} is outside 128..4096")
        if not 0 < self.pool_rate <= 1:
            raise UserFacingError(f"pool rate {self.pool_rate} must be in (0, 1]")


@dataclass
class Split:
    """Rows of the corpus for one split, their retrieved example slots (into the run's `ExamplePool`)."""

    name: str
    rows: np.ndarray
    slots: np.ndarray | None = None


@dataclass
class TrainResult:
    version_id: str
    kind: str
    artifact_dir: Path
    onnx_path: Path
    checksum: str
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


def train(options: TrainOptions, settings: Settings, log: Callable[[str], None] = print) -> TrainResult:
    """Run the whole pipeline (module docstring); returns where the artifact went and its metrics."""
    torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    started = time.perf_counter()
    cache_dir = settings.home / "cache" / "ranker"
    step = _Stepper(log, started)

    corpus = _load_corpus(options, settings)
    histories, history_labels = user_histories(corpus, HISTORY_LENGTH)
    train_split, valid_split, test_split = _split(corpus, options)
    step(f"samples from {corpus.source}: {len(corpus):,} interactions; train {len(train_split.rows):,}, "
         f"valid {len(valid_split.rows):,}, test {len(test_split.rows):,} (time-ordered split "
         f"{'/'.join(str(int(s * 100)) for s in SPLIT)})")

    pool_rows, pool_cot, backend_name = np.zeros(0, dtype=np.int64), [], None
    if options.ict:  # the backbone alone needs no CoT pool and no examples
        pool_rows, pool_cot, backend_name = _cot_pool(corpus, train_split.rows, histories, history_labels, options,
                                                      cache_dir, step)

    rows = np.concatenate([train_split.rows, valid_split.rows, test_split.rows, pool_rows])
    needed = np.unique(np.concatenate([corpus.item[rows], histories[rows].ravel()]))
    catalogue_text = _item_vectors(corpus, needed[needed >= 0], cache_dir)
    space, catalogue = _feature_space(corpus, train_split.rows, histories, catalogue_text)
    step(f"features: {space.n_users - 1:,} users, {space.n_items - 1:,} items, {space.n_tags - 1} tags in the vocabulary")

    pool = space.encode_examples([])
    if options.ict:
        pool = _retrieve_examples(corpus, histories, catalogue, space, pool_rows, pool_cot,
                                  [train_split, valid_split, test_split], cache_dir, step)

    config = ModelConfig(options.backbone, options.ict, space.n_users, space.n_items, space.n_tags)  # type: ignore[arg-type]
    model = RankerModel(config)
    batches = _Batches(corpus, histories, catalogue, pool, space)
    history = _fit(model, batches, train_split, valid_split, options, step)

    test_metrics = _evaluate(model, batches, test_split)
    valid_metrics = _evaluate(model, batches, valid_split)
    base_rate = float(corpus.label[train_split.rows].mean())
    metrics = {
        "auc": test_metrics["auc"], "logloss": test_metrics["logloss"],
        "valid_auc": valid_metrics["auc"], "valid_logloss": valid_metrics["logloss"],
        "constant_logloss": _logloss(corpus.label[test_split.rows], np.full(len(test_split.rows), base_rate)),
        "epochs": len(history), "best_epoch": int(np.argmax([h["valid_auc"] for h in history])) + 1,
        "train_samples": len(train_split.rows), "valid_samples": len(valid_split.rows), "test_samples": len(test_split.rows),
        "pool_size": len(pool_rows), "cot_backend": backend_name,
        "examples_found": float((test_split.slots >= 0).mean()) if options.ict and test_split.slots is not None else None,
    }
    step(f"test: AUC {metrics['auc']:.4f}, LogLoss {metrics['logloss']:.4f} "
         f"(constant predictor: AUC 0.5, LogLoss {metrics['constant_logloss']:.4f})")

    result = _export_and_register(model, space, batches, test_split, metrics, history, options, settings, corpus)
    step(f"exported {result.onnx_path} (parity {result.metrics['onnx_parity_max_abs_diff']:.2e}), "
         f"version {result.version_id}")
    return result


# ---- data ------------------------------------------------------------------------------------------------------------


def _load_corpus(options: TrainOptions, settings: Settings) -> Corpus:
    if options.dataset is not None:
        return movielens_corpus(options.dataset)
    from storage.repository import Repository

    with Repository.from_settings(settings) as repository:
        return database_corpus(repository)


def _split(corpus: Corpus, options: TrainOptions) -> tuple[Split, Split, Split]:
    n = len(corpus)
    train_end, valid_end = int(n * SPLIT[0]), int(n * (SPLIT[0] + SPLIT[1]))
    rng = np.random.default_rng(options.seed)
    train_rows = np.arange(train_end)
    if options.max_train_samples is not None:
        train_rows = train_rows[-options.max_train_samples :]

    def evaluation(low: int, high: int) -> np.ndarray:
        rows = np.arange(low, high)
        if options.max_eval_samples is not None and len(rows) > options.max_eval_samples:
            rows = np.sort(rng.choice(rows, options.max_eval_samples, replace=False))
        return rows

    splits = Split("train", train_rows), Split("valid", evaluation(train_end, valid_end)), Split("test", evaluation(valid_end, n))
    for split in splits:
        if len(split.rows) == 0 or len(np.unique(corpus.label[split.rows])) < 2:
            raise UserFacingError(f"the {split.name} split has no rows or a single label: use more data")
    return splits


def _cot_pool(corpus: Corpus, train_rows: np.ndarray, histories: np.ndarray, history_labels: np.ndarray,
              options: TrainOptions, cache_dir: Path, step: _Stepper) -> tuple[np.ndarray, list[np.ndarray | None], str]:
    """Pool rows and their CoT embeddings (None = pending) and which backend wrote them."""
    if corpus.stored_cot:
        rows, cots = [], []
        for row in train_rows.tolist():
            stored = corpus.stored_cot.get((int(corpus.user[row]), int(corpus.item[row]), int(corpus.ts_ms[row])))
            if stored is not None:
                rows.append(row)
                cots.append(stored[1])
        step(f"CoT pool from the database: {len(rows):,} samples ({sum(c is None for c in cots):,} pending)")
        return np.asarray(rows, dtype=np.int64), cots, "database"

    rng = np.random.default_rng(options.seed + 1)
    size = max(1, round(len(train_rows) * options.pool_rate))
    rows = np.sort(rng.choice(train_rows, size, replace=False))
    texts = _generate_cots(corpus, rows, histories, history_labels, options.cot_backend)
    vectors = EmbeddingCache(embedding_cache_path(cache_dir, "cot")).embed(texts)
    label = "template (deterministic rationale, not an LLM)" if options.cot_backend == "template" else options.cot_backend
    step(f"CoT pool: {len(rows):,} samples (uniform {options.pool_rate:g} of train), backend {label}, embedded with {MODEL_NAME}")
    return rows, list(vectors), options.cot_backend


def _generate_cots(corpus: Corpus, rows: np.ndarray, histories: np.ndarray, history_labels: np.ndarray,
                   backend_name: str) -> list[str]:
    from generators.backends import create_backend
    from generators.prompt import build_prompt

    def snapshot(code: int) -> dict[str, Any]:
        return {"item_id": corpus.item_ids[code], "title": corpus.item_texts[code].split(";")[0],
                "text": corpus.item_texts[code], "tags": list(corpus.item_tags[code])}

    prompts = []
    requested_at = datetime.now(timezone.utc)
    for row in rows.tolist():
        history = [HistoryEntry(**snapshot(int(code)), label=int(label))
                   for code, label in zip(histories[row], history_labels[row], strict=False) if code >= 0]
        request = CotRequest(
            request_id=corpus.sample_key(row), user_id=corpus.user_ids[corpus.user[row]],
            item_id=corpus.item_ids[corpus.item[row]], label=int(corpus.label[row]), ts=from_epoch_ms(int(corpus.ts_ms[row])),
            target=ItemSnapshot(**snapshot(int(corpus.item[row]))), history=history, requested_at=requested_at,
        )
        prompts.append(build_prompt(request, feedback="rating"))
    with create_backend(backend_name) as backend:
        texts: list[str] = []
        for start in range(0, len(prompts), backend.max_batch):
            texts.extend(g.text for g in backend.generate(prompts[start : start + backend.max_batch]))
    return texts


def _item_vectors(corpus: Corpus, codes: np.ndarray, cache_dir: Path) -> np.ndarray:
    """(n_items + 1, 384): row c + 1 = item c's text embedding where needed (zeros elsewhere); row 0 = zeros."""
    table = np.zeros((len(corpus.item_ids) + 1, EMBEDDING_DIMENSION), dtype=np.float32)
    to_embed = [c for c in codes.tolist() if c not in corpus.stored_item_vectors]
    for code, vector in corpus.stored_item_vectors.items():
        table[code + 1] = vector
    if to_embed:
        table[np.asarray(to_embed) + 1] = EmbeddingCache(embedding_cache_path(cache_dir, "items")).embed(
            [corpus.item_texts[c] for c in to_embed]
        )
    return table


@dataclass
class _Catalogue:
    """Every corpus item as the model sees it: text (row = code + 1), tags in the space's vocabulary, and its index
    in the space (0 for items the training rows never showed: scored as cold-start items, by their text)."""

    text: np.ndarray
    tags: np.ndarray
    to_space: np.ndarray


def _feature_space(corpus: Corpus, train_rows: np.ndarray, histories: np.ndarray, catalogue_text: np.ndarray
                   ) -> tuple[FeatureSpace, _Catalogue]:
    users = np.unique(corpus.user[train_rows])
    seen = np.unique(np.concatenate([corpus.item[train_rows], histories[train_rows].ravel()]))
    items = seen[seen >= 0]
    space = FeatureSpace.build(
        [corpus.user_ids[u] for u in users.tolist()],
        [corpus.item_ids[i] for i in items.tolist()],
        catalogue_text[items + 1],
        [corpus.item_tags[i] for i in items.tolist()],
    )
    to_space = np.zeros(len(corpus.item_ids) + 1, dtype=np.int64)
    to_space[1:] = space.item_index(corpus.item_ids)
    tag_index = {t: i + 1 for i, t in enumerate(space.tags)}
    tags = np.zeros((len(corpus.item_ids) + 1, MAX_TAGS), dtype=np.int64)
    for code, item_tags in enumerate(corpus.item_tags):
        known = [tag_index[t] for t in dict.fromkeys(item_tags) if t in tag_index][:MAX_TAGS]
        tags[code + 1, : len(known)] = known
    return space, _Catalogue(catalogue_text, tags, to_space)


def _sample_arrays(corpus: Corpus, histories: np.ndarray, catalogue: _Catalogue, space: FeatureSpace, rows: np.ndarray
                   ) -> dict[str, np.ndarray]:
    """`SAMPLE_INPUTS` for corpus rows; the same numbers `FeatureSpace.encode_samples` gives for these ids with the
    catalogue's texts and tags supplied for the items the vocabulary lacks."""
    codes = corpus.item[rows] + 1
    history_codes = histories[rows] + 1  # -1 padding -> 0, the zero row
    mask = (history_codes > 0).astype(np.float32)
    text_sum = catalogue.text[history_codes].sum(axis=1)
    norms = np.linalg.norm(text_sum, axis=1, keepdims=True)
    return {
        "user": space.user_index([corpus.user_ids[u] for u in corpus.user[rows].tolist()]),
        "item": catalogue.to_space[codes],
        "item_tags": catalogue.tags[codes],
        "item_text": catalogue.text[codes],
        "history": catalogue.to_space[history_codes] * (history_codes > 0),
        "history_mask": mask,
        "history_text": np.where(norms > 0, text_sum / np.where(norms > 0, norms, 1.0), 0.0).astype(np.float32),
    }


# ---- retrieval -------------------------------------------------------------------------------------------------------


def _retrieve_examples(corpus: Corpus, histories: np.ndarray, catalogue: _Catalogue, space: FeatureSpace,
                       pool_rows: np.ndarray, pool_cot: list[np.ndarray | None], splits: list[Split], cache_dir: Path,
                       step: _Stepper) -> ExamplePool:
    """Index the pool, retrieve K examples for every split row through `ExampleRetriever`, and return the encoded
    examples (`ExamplePool`); each split gets its `slots`. Cached on disk by the pool's and the rows' fingerprint."""
    from storage.vectors.edge import EdgeIndex

    keys = [corpus.sample_key(r) for r in pool_rows.tolist()]
    pool_id = fingerprint(keys, [c is None for c in pool_cot], MODEL_NAME)
    retrieval_id = fingerprint(pool_id, *[s.rows for s in splits], space.user_ids[:50])
    cached = cache_dir / "retrieval" / f"{retrieval_id}.npz"
    if cached.is_file():
        stored = np.load(cached)
        for split in splits:
            split.slots = stored[f"slots_{split.name}"]
        step(f"in-context examples: loaded from cache {cached.name}")
        return ExamplePool(**{name: stored[f"pool_{name}"] for name in ExamplePool.__dataclass_fields__})

    def vectors(rows: np.ndarray) -> dict[str, np.ndarray]:
        return _sample_arrays(corpus, histories, catalogue, space, rows)

    with EdgeIndex(cache_dir / "pools" / pool_id, SAMPLE_DIMENSION) as index:
        if index.count() != len(keys):
            _index_pool(index, corpus, histories, vectors, pool_rows, pool_cot, keys)
        step(f"example index: {index.count():,} pool samples")
        retriever = ExampleRetriever(index, item_cache_ttl_s=None)
        records: dict[str, int] = {}
        record_list = []
        started = time.perf_counter()
        for split in splits:
            split.slots = np.full((len(split.rows), 4), -1, dtype=np.int64)
            for start in range(0, len(split.rows), RETRIEVAL_CHUNK):
                rows = split.rows[start : start + RETRIEVAL_CHUNK]
                sample = vectors(rows)
                queries = [
                    ExampleQuery(
                        user_id=corpus.user_ids[corpus.user[r]], item_id=corpus.item_ids[corpus.item[r]],
                        ts_ms=int(corpus.ts_ms[r]), history_vector=sample["history_text"][i],
                        target_vector=sample["item_text"][i], exclude_key=corpus.sample_key(r),
                    )
                    for i, r in enumerate(rows.tolist())
                ]
                found = retriever.retrieve(queries)
                remap = np.array([records.setdefault(rec.key, len(records)) for rec in found.records] + [-1], dtype=np.int64)
                for rec in found.records:
                    if records[rec.key] == len(record_list):
                        record_list.append(rec)
                split.slots[start : start + len(rows)] = remap[found.slots]
        elapsed = time.perf_counter() - started
        total = sum(len(s.rows) for s in splits)
        step(f"in-context examples: {total:,} samples, {retriever.index_queries:,} index queries, "
             f"{elapsed / total * 1000:.2f} ms/sample, {np.mean(np.concatenate([s.slots for s in splits]) >= 0):.1%} "
             f"slots filled")
    pool = space.encode_examples(record_list)
    cached.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cached, **{f"slots_{s.name}": s.slots for s in splits},
             **{f"pool_{name}": getattr(pool, name) for name in ExamplePool.__dataclass_fields__})
    return pool


def _index_pool(index: Any, corpus: Corpus, histories: np.ndarray, vectors: Callable[[np.ndarray], dict[str, np.ndarray]],
                pool_rows: np.ndarray, pool_cot: list[np.ndarray | None], keys: list[str]) -> None:
    """Upsert the pool as the stream worker does: [h; t]/sqrt(2), payload user, item, label, ts, status, history,
    and the CoT embedding once generated."""
    sample = vectors(pool_rows)
    points = []
    for i, (key, row, cot) in enumerate(zip(keys, pool_rows.tolist(), pool_cot, strict=False)):
        vector = np.concatenate([sample["history_text"][i], sample["item_text"][i]]) / math.sqrt(2.0)
        payload: dict[str, Any] = {
            "user_id": corpus.user_ids[corpus.user[row]], "item_id": corpus.item_ids[corpus.item[row]],
            "label": int(corpus.label[row]), "ts": int(corpus.ts_ms[row]),
            "status": "pending" if cot is None else "generated",
            "history": encode_history([corpus.item_ids[c] for c in histories[row].tolist() if c >= 0]),
        }
        if cot is not None:
            payload["cot_embedding"] = [float(x) for x in cot]
        points.append(Point(key, vector, payload))
    for start in range(0, len(points), 2_000):
        index.upsert(points[start : start + 2_000])
    index.flush()


# ---- training --------------------------------------------------------------------------------------------------------


class _Batches:
    """Builds model inputs for corpus rows on the fly (keeps memory flat: examples are gathered per batch)."""

    def __init__(self, corpus: Corpus, histories: np.ndarray, catalogue: _Catalogue, pool: ExamplePool,
                 space: FeatureSpace) -> None:
        self.corpus, self.histories, self.catalogue, self.pool, self.space = corpus, histories, catalogue, pool, space

    def arrays(self, split: Split, positions: np.ndarray) -> dict[str, np.ndarray]:
        rows = split.rows[positions]
        arrays = _sample_arrays(self.corpus, self.histories, self.catalogue, self.space, rows)
        if split.slots is not None:
            arrays.update(gather_examples(self.pool, split.slots[positions]))
        return arrays

    def tensors(self, split: Split, positions: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        arrays = self.arrays(split, positions)
        labels = torch.from_numpy(self.corpus.label[split.rows[positions]].astype(np.float32))
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, labels


def _fit(model: RankerModel, batches: _Batches, train_split: Split, valid_split: Split, options: TrainOptions,
         step: _Stepper) -> list[dict[str, float]]:
    optimizer = torch.optim.Adam(model.parameters(), lr=options.learning_rate)
    rng = np.random.default_rng(options.seed + 2)
    history: list[dict[str, float]] = []
    best_auc, best_state, stale = -1.0, copy.deepcopy(model.state_dict()), 0
    for epoch in range(1, options.max_epochs + 1):
        epoch_started = time.perf_counter()
        model.train()
        order = rng.permutation(len(train_split.rows))
        totals = np.zeros(3)
        steps = 0
        for start in range(0, len(order), options.batch_size):
            inputs, labels = batches.tensors(train_split, order[start : start + options.batch_size])
            total, bce, reconstruction = model.loss(inputs, labels, options.reconstruction_weight)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            totals += [total.item(), bce.item(), reconstruction.item()]
            steps += 1
        valid = _evaluate(model, batches, valid_split)
        record = {"epoch": epoch, "loss": totals[0] / steps, "bce": totals[1] / steps, "l_rec": totals[2] / steps,
                  "valid_auc": valid["auc"], "valid_logloss": valid["logloss"],
                  "seconds": time.perf_counter() - epoch_started}
        history.append(record)
        step(f"epoch {epoch:2d}: loss {record['loss']:.4f} (BCE {record['bce']:.4f}, L_rec {record['l_rec']:.4f}), "
             f"valid AUC {valid['auc']:.4f}, LogLoss {valid['logloss']:.4f}, {record['seconds']:.1f} s")
        if valid["auc"] > best_auc:
            best_auc, best_state, stale = valid["auc"], copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= options.patience:
                step(f"early stop: no validation AUC gain for {options.patience} epochs; keeping epoch "
                     f"{int(np.argmax([h['valid_auc'] for h in history])) + 1}")
                break
    model.load_state_dict(best_state)
    return history


def predict(model: RankerModel, batches: _Batches, split: Split) -> np.ndarray:
    model.eval()
    scores = []
    with torch.inference_mode():
        for start in range(0, len(split.rows), EVAL_BATCH):
            inputs, _ = batches.tensors(split, np.arange(start, min(start + EVAL_BATCH, len(split.rows))))
            scores.append(torch.sigmoid(model(inputs).logit).numpy())
    return np.concatenate(scores)


def _evaluate(model: RankerModel, batches: _Batches, split: Split) -> dict[str, float]:
    scores = predict(model, batches, split)
    labels = batches.corpus.label[split.rows]
    return {"auc": auc(labels, scores), "logloss": _logloss(labels, scores)}


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half."""
    labels = np.asarray(labels)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("AUC needs both labels")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    boundaries = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1, len(scores)]
    for low, high in zip(boundaries[:-1], boundaries[1:], strict=False):
        ranks[order[low:high]] = (low + high + 1) / 2.0  # average 1-based rank of the tie group
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _logloss(labels: np.ndarray, scores: np.ndarray) -> float:
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


# ---- export ----------------------------------------------------------------------------------------------------------


def _export_and_register(model: RankerModel, space: FeatureSpace, batches: _Batches, test_split: Split,
                         metrics: dict[str, Any], history: list[dict[str, float]], options: TrainOptions,
                         settings: Settings, corpus: Corpus) -> TrainResult:
    created_at = datetime.now(timezone.utc)
    staging = settings.home / "models" / f".staging-{created_at:%Y%m%dT%H%M%S%fZ}"
    onnx_path = export_onnx(model, staging / MODEL_ONNX)
    real = batches.arrays(test_split, np.arange(min(512, len(test_split.rows))))
    metrics = {**metrics, "onnx_parity_max_abs_diff": check_parity(model, onnx_path, [real])}
    checksum = sha256_file(onnx_path)
    version_id = f"{model.config.kind.replace('+', '-')}-{created_at:%Y%m%dT%H%M%SZ}-{checksum[:8]}"
    manifest = {
        "version_id": version_id, "created_at": created_at.isoformat(), "metrics": metrics, "epochs": history,
        "options": asdict(options), "data": {"source": corpus.source, "split": SPLIT},
        "cot_pool": {"backend": metrics["cot_backend"], "size": metrics["pool_size"], "embedding_model": MODEL_NAME,
                     "note": "template = deterministic rationale from the request's data, not an LLM"
                     if metrics["cot_backend"] == "template" else None} if options.ict else None,
    }
    save_artifact(staging, model, space, manifest)
    directory = settings.home / "models" / version_id
    staging.rename(directory)
    onnx_path = directory / MODEL_ONNX
    if options.register:
        import migrations
        from storage.repository import ModelVersionRecord, Repository

        migrations.upgrade(settings.database_url)
        with Repository.from_settings(settings) as repository:
            repository.record_model_version(ModelVersionRecord(
                version_id=version_id, kind=model.config.kind, artifact_path=str(onnx_path), checksum=checksum,
                created_at=created_at, metrics={k: v for k, v in metrics.items() if v is not None},
                notes=f"llmcf train on {corpus.source}" + (f"; CoT pool: {metrics['cot_backend']}" if options.ict else ""),
            ))
    return TrainResult(version_id, model.config.kind, directory, onnx_path, checksum, metrics, history)


class _Stepper:
    """Prints progress lines with the elapsed time."""

    def __init__(self, log: Callable[[str], None], started: float) -> None:
        self.log, self.started = log, started

    def __call__(self, message: str) -> None:
        self.log(f"[{time.perf_counter() - self.started:7.1f} s] {message}")
