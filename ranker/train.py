"""`llmcf train`: fit a ranker (DeepFM or DIN, with or without ICT), export it to ONNX, check parity, register it; and
the reusable pieces every other fit is made of (`llmcf update` fine-tunes and `llmcf evaluate` compares with them).

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
   the same user's later samples. The retrieved examples are cached on disk too, as raw records (ids, vectors, CoT), so
   any feature space can encode them.
4. Adam, mini-batches, BCE + lambda * L_rec, early stopping (patience 2) on validation AUC; the best epoch is kept.
5. Export to ONNX, parity onnxruntime vs torch (max abs diff <= 1e-5, else the run fails), artifact under
   `$LLMCF_HOME/models/<version_id>/`, and a `model_versions` row (status 'candidate') with metrics and the sha256.

The pieces (`Samples`, `time_split`, `build_cot_pool`, `retrieve_examples`, `Batches`, `fit`, `evaluate`,
`export_artifact`, `register_version`) take explicit inputs and keep no state, so one prepared corpus, pool and retrieval
serve many fits (several variants and seeds, or daily fine-tuning).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from llmcf.embeddings import EMBEDDING_DIMENSION, MODEL_NAME
from llmcf.errors import UserFacingError
from llmcf.events import CotRequest, HistoryEntry, ItemSnapshot, from_epoch_ms
from llmcf.samples import SAMPLE_DIMENSION, decode_history, encode_history
from llmcf.settings import Settings
from ranker.data import Corpus, EmbeddingCache, database_corpus, embedding_cache_path, fingerprint, movielens_corpus, user_histories
from ranker.export import MODEL_ONNX, check_parity, export_onnx, save_artifact, sha256_file, worst_parity
from ranker.features import HISTORY_LENGTH, MAX_TAGS, ExamplePool, FeatureSpace, gather_examples
from ranker.model import ModelConfig, RankerModel
from ranker.retrieval import ExampleQuery, ExampleRecord, ExampleRetriever
from storage.vectors import Point, VectorIndex

SPLIT = (0.8, 0.1, 0.1)
DEFAULT_MAX_TRAIN_SAMPLES = 100_000
DEFAULT_MAX_EVAL_SAMPLES = 20_000
RETRIEVAL_CHUNK = 2_048
EVAL_BATCH = 4_096
PARITY_ROWS = 512


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


@dataclass(frozen=True)
class FitOptions:
    """What `fit` needs: the optimiser, the epochs and early stopping, and the seed of the shuffling."""

    max_epochs: int = 20
    patience: int = 2
    batch_size: int = 512
    learning_rate: float = 1e-3
    reconstruction_weight: float = 1.0
    seed: int = 0

    @classmethod
    def of(cls, options: Any) -> FitOptions:
        """The fit options of any options object with the same field names (`TrainOptions`, update options)."""
        return cls(**{name: getattr(options, name) for name in cls.__dataclass_fields__})


@dataclass
class Split:
    """Rows of the corpus for one split, their retrieved example slots (into the run's example records)."""

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
    created_at: datetime | None = None
    notes: str = ""


def train(options: TrainOptions, settings: Settings, log: Callable[[str], None] = print,
          corpus: Corpus | None = None) -> TrainResult:
    """Run the whole pipeline (module docstring); returns where the artifact went and its metrics. `corpus` skips
    loading one (the updater already read the database)."""
    torch.set_num_threads(options.threads)
    started = time.perf_counter()
    cache_dir = settings.home / "cache" / "ranker"
    step = Stepper(log, started)

    corpus = corpus if corpus is not None else load_corpus(options, settings)
    train_split, valid_split, test_split = time_split(corpus, options.max_train_samples, options.max_eval_samples,
                                                      options.seed)
    step(f"samples from {corpus.source}: {len(corpus):,} interactions; train {len(train_split.rows):,}, "
         f"valid {len(valid_split.rows):,}, test {len(test_split.rows):,} (time-ordered split "
         f"{'/'.join(str(int(s * 100)) for s in SPLIT)})")
    samples = Samples.of(corpus, cache_dir)

    pool = CotPool.empty()
    records: list[ExampleRecord] = []
    if options.ict:  # the backbone alone needs no CoT pool and no examples
        pool = build_cot_pool(samples, train_split.rows, options.pool_rate, options.cot_backend, options.seed,
                              cache_dir, step)
        records = retrieve_examples(samples, pool, [train_split, valid_split, test_split], cache_dir, step)

    space = build_feature_space(samples, train_split.rows)
    step(f"features: {space.n_users - 1:,} users, {space.n_items - 1:,} items, {space.n_tags - 1} tags in the vocabulary")

    torch.manual_seed(options.seed)
    model = RankerModel(ModelConfig(options.backbone, options.ict, space.n_users, space.n_items, space.n_tags))  # type: ignore[arg-type]
    batches = Batches(samples, space, records, with_examples=options.ict)
    history = fit(model, batches, train_split, valid_split, FitOptions.of(options), step)

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


# ---- data ------------------------------------------------------------------------------------------------------------


def load_corpus(options: TrainOptions, settings: Settings) -> Corpus:
    if options.dataset is not None:
        return movielens_corpus(options.dataset)
    from storage.repository import Repository

    with Repository.from_settings(settings) as repository:
        return database_corpus(repository)


@dataclass
class Samples:
    """A corpus with what every model over it needs: each row's history (item codes, -1 padded) and its labels, and
    every item's text embedding (row = code + 1; row 0 = zeros). Independent of any feature space."""

    corpus: Corpus
    histories: np.ndarray
    history_labels: np.ndarray
    item_text: np.ndarray

    @classmethod
    def of(cls, corpus: Corpus, cache_dir: Path) -> Samples:
        histories, history_labels = user_histories(corpus, HISTORY_LENGTH)
        return cls(corpus, histories, history_labels, item_vectors(corpus, cache_dir))

    def text_vectors(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(history_text, item_text) of rows: h = the normalised mean of the history items' texts, t = the target's."""
        history_codes = self.histories[rows] + 1  # -1 padding -> 0, the zero row
        text_sum = self.item_text[history_codes].sum(axis=1)
        norms = np.linalg.norm(text_sum, axis=1, keepdims=True)
        history_text = np.where(norms > 0, text_sum / np.where(norms > 0, norms, 1.0), 0.0).astype(np.float32)
        return history_text, self.item_text[self.corpus.item[rows] + 1]


def time_split(corpus: Corpus, max_train_samples: int | None, max_eval_samples: int | None, seed: int,
               rows: np.ndarray | None = None) -> tuple[Split, Split, Split]:
    """Train / validation / test by time (`SPLIT`) over `rows` (default: the whole corpus, which is time-ordered)."""
    rows = np.arange(len(corpus)) if rows is None else rows
    n = len(rows)
    train_end, valid_end = int(n * SPLIT[0]), int(n * (SPLIT[0] + SPLIT[1]))
    rng = np.random.default_rng(seed)
    train_rows = rows[:train_end]
    if max_train_samples is not None:
        train_rows = train_rows[-max_train_samples:]

    def evaluation(low: int, high: int) -> np.ndarray:
        chosen = rows[low:high]
        if max_eval_samples is not None and len(chosen) > max_eval_samples:
            chosen = np.sort(rng.choice(chosen, max_eval_samples, replace=False))
        return chosen

    splits = Split("train", train_rows), Split("valid", evaluation(train_end, valid_end)), Split("test", evaluation(valid_end, n))
    for split in splits:
        require_both_labels(corpus, split)
    return splits


class NotEnoughData(UserFacingError):
    """A split has no rows or a single label: nothing can be learnt or measured on it yet."""


def require_both_labels(corpus: Corpus, split: Split) -> None:
    if len(split.rows) == 0 or len(np.unique(corpus.label[split.rows])) < 2:
        raise NotEnoughData(f"the {split.name} split has no rows or a single label: use more data")


@dataclass
class CotPool:
    """The samples that serve as in-context examples: corpus rows, their CoT embeddings (None = pending), and which
    backend wrote the CoTs (`database` = whatever the generator pool stored)."""

    rows: np.ndarray
    cots: list[np.ndarray | None]
    backend: str | None

    @classmethod
    def empty(cls) -> CotPool:
        return cls(np.zeros(0, dtype=np.int64), [], None)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "size": len(self.rows), "embedding_model": MODEL_NAME,
                "note": "template = deterministic rationale from the request's data, not an LLM"
                if self.backend == "template" else None}


def build_cot_pool(samples: Samples, candidate_rows: np.ndarray, pool_rate: float, cot_backend: str, seed: int,
                   cache_dir: Path, step: Callable[[str], None]) -> CotPool:
    """The pool over `candidate_rows`: the stored CoT samples among them (database corpus), else a uniform
    `pool_rate` of them with CoTs generated by `cot_backend` and embedded (cached)."""
    corpus = samples.corpus
    if corpus.stored_cot:
        rows, cots = stored_cot_rows(corpus, candidate_rows)
        step(f"CoT pool from the database: {len(rows):,} samples ({sum(c is None for c in cots):,} pending)")
        return CotPool(rows, cots, "database")

    rng = np.random.default_rng(seed + 1)
    size = max(1, round(len(candidate_rows) * pool_rate))
    rows = np.sort(rng.choice(candidate_rows, size, replace=False))
    vectors = generate_cot_vectors(samples, rows, cot_backend, cache_dir)
    label = "template (deterministic rationale, not an LLM)" if cot_backend == "template" else cot_backend
    step(f"CoT pool: {len(rows):,} samples (uniform {pool_rate:g} of train), backend {label}, embedded with {MODEL_NAME}")
    return CotPool(rows, list(vectors), cot_backend)


def stored_cot_rows(corpus: Corpus, candidate_rows: np.ndarray) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """The candidate rows that have a stored CoT sample, and their CoT embeddings (None while pending)."""
    rows, cots = [], []
    for row in candidate_rows.tolist():
        stored = corpus.stored_cot.get((int(corpus.user[row]), int(corpus.item[row]), int(corpus.ts_ms[row])))
        if stored is not None:
            rows.append(row)
            cots.append(stored[1])
    return np.asarray(rows, dtype=np.int64), cots


def generate_cot_vectors(samples: Samples, rows: np.ndarray, backend_name: str, cache_dir: Path) -> np.ndarray:
    """CoTs for corpus rows from a generator backend, with the stream's prompt, embedded (both cached by text)."""
    texts = _generate_cots(samples, rows, backend_name)
    return EmbeddingCache(embedding_cache_path(cache_dir, "cot")).embed(texts)


def _generate_cots(samples: Samples, rows: np.ndarray, backend_name: str) -> list[str]:
    from generators.backends import create_backend
    from generators.prompt import build_prompt

    corpus = samples.corpus

    def snapshot(code: int) -> dict[str, Any]:
        return {"item_id": corpus.item_ids[code], "title": corpus.item_texts[code].split(";")[0],
                "text": corpus.item_texts[code], "tags": list(corpus.item_tags[code])}

    prompts = []
    requested_at = datetime.now(timezone.utc)
    for row in rows.tolist():
        history = [HistoryEntry(**snapshot(int(code)), label=int(label))
                   for code, label in zip(samples.histories[row], samples.history_labels[row], strict=False) if code >= 0]
        request = CotRequest(
            request_id=corpus.sample_key(row), user_id=corpus.user_ids[corpus.user[row]],
            item_id=corpus.item_ids[corpus.item[row]], label=int(corpus.label[row]), ts=from_epoch_ms(int(corpus.ts_ms[row])),
            target=ItemSnapshot(**snapshot(int(corpus.item[row]))), history=history, requested_at=requested_at,
        )
        prompts.append(build_prompt(request, feedback="rating"))
    if not prompts:
        return []
    with create_backend(backend_name) as backend:
        texts: list[str] = []
        for start in range(0, len(prompts), backend.max_batch):
            texts.extend(g.text for g in backend.generate(prompts[start : start + backend.max_batch]))
    return texts


def item_vectors(corpus: Corpus, cache_dir: Path) -> np.ndarray:
    """(n_items + 1, 384): row c + 1 = item c's text embedding (the stored one when the worker stored it); row 0 = zeros."""
    table = np.zeros((len(corpus.item_ids) + 1, EMBEDDING_DIMENSION), dtype=np.float32)
    to_embed = [c for c in range(len(corpus.item_ids)) if c not in corpus.stored_item_vectors]
    for code, vector in corpus.stored_item_vectors.items():
        table[code + 1] = vector
    if to_embed:
        table[np.asarray(to_embed) + 1] = EmbeddingCache(embedding_cache_path(cache_dir, "items")).embed(
            [corpus.item_texts[c] for c in to_embed]
        )
    return table


def build_feature_space(samples: Samples, train_rows: np.ndarray) -> FeatureSpace:
    """A vocabulary of the users of `train_rows` and the items they and their histories show."""
    corpus = samples.corpus
    users = np.unique(corpus.user[train_rows])
    seen = np.unique(np.concatenate([corpus.item[train_rows], samples.histories[train_rows].ravel()]))
    items = seen[seen >= 0]
    return FeatureSpace.build(
        [corpus.user_ids[u] for u in users.tolist()],
        [corpus.item_ids[i] for i in items.tolist()],
        samples.item_text[items + 1],
        [corpus.item_tags[i] for i in items.tolist()],
    )


@dataclass
class Catalogue:
    """Every corpus item as one feature space sees it: text (row = code + 1), tags in the space's vocabulary, and its
    index in the space (0 for items the space lacks: scored as cold-start items, by their text, as serving does)."""

    text: np.ndarray
    tags: np.ndarray
    to_space: np.ndarray

    @classmethod
    def of(cls, samples: Samples, space: FeatureSpace) -> Catalogue:
        corpus = samples.corpus
        to_space = np.zeros(len(corpus.item_ids) + 1, dtype=np.int64)
        to_space[1:] = space.item_index(corpus.item_ids)
        tag_index = {t: i + 1 for i, t in enumerate(space.tags)}
        tags = np.zeros((len(corpus.item_ids) + 1, MAX_TAGS), dtype=np.int64)
        for code, item_tags in enumerate(corpus.item_tags):
            known = [tag_index[t] for t in dict.fromkeys(item_tags) if t in tag_index][:MAX_TAGS]
            tags[code + 1, : len(known)] = known
        return cls(samples.item_text, tags, to_space)


def sample_arrays(samples: Samples, catalogue: Catalogue, space: FeatureSpace, rows: np.ndarray) -> dict[str, np.ndarray]:
    """`SAMPLE_INPUTS` for corpus rows; the same numbers `FeatureSpace.encode_samples` gives for these ids with the
    catalogue's texts and tags supplied for the items the vocabulary lacks."""
    corpus = samples.corpus
    codes = corpus.item[rows] + 1
    history_codes = samples.histories[rows] + 1
    history_text, item_text = samples.text_vectors(rows)
    return {
        "user": space.user_index([corpus.user_ids[u] for u in corpus.user[rows].tolist()]),
        "item": catalogue.to_space[codes],
        "item_tags": catalogue.tags[codes],
        "item_text": item_text,
        "history": catalogue.to_space[history_codes] * (history_codes > 0),
        "history_mask": (history_codes > 0).astype(np.float32),
        "history_text": history_text,
    }


# ---- retrieval -------------------------------------------------------------------------------------------------------


class ExampleTable:
    """Retrieved example records, each once, and the slots of every query into them."""

    def __init__(self) -> None:
        self.records: list[ExampleRecord] = []
        self._position: dict[str, int] = {}

    def retrieve(self, retriever: ExampleRetriever, samples: Samples, rows: np.ndarray) -> np.ndarray:
        """(len(rows), 4) slots into `records` (-1 = none found) for corpus rows, through the serving retriever."""
        corpus = samples.corpus
        slots = np.full((len(rows), 4), -1, dtype=np.int64)
        for start in range(0, len(rows), RETRIEVAL_CHUNK):
            chunk = rows[start : start + RETRIEVAL_CHUNK]
            history_text, item_text = samples.text_vectors(chunk)
            queries = [
                ExampleQuery(
                    user_id=corpus.user_ids[corpus.user[r]], item_id=corpus.item_ids[corpus.item[r]],
                    ts_ms=int(corpus.ts_ms[r]), history_vector=history_text[i], target_vector=item_text[i],
                    exclude_key=corpus.sample_key(r),
                )
                for i, r in enumerate(chunk.tolist())
            ]
            found = retriever.retrieve(queries)
            remap = np.array([self._add(record) for record in found.records] + [-1], dtype=np.int64)
            slots[start : start + len(chunk)] = remap[found.slots]
        return slots

    def _add(self, record: ExampleRecord) -> int:
        position = self._position.get(record.key)
        if position is None:
            position = self._position[record.key] = len(self.records)
            self.records.append(record)
        return position


def index_pool(index: VectorIndex, samples: Samples, pool: CotPool) -> None:
    """Upsert the pool as the stream worker does: [h; t]/sqrt(2), payload user, item, label, ts, status, history,
    and the CoT embedding once generated."""
    corpus = samples.corpus
    history_text, item_text = samples.text_vectors(pool.rows)
    points = []
    for i, (row, cot) in enumerate(zip(pool.rows.tolist(), pool.cots, strict=True)):
        vector = np.concatenate([history_text[i], item_text[i]]) / math.sqrt(2.0)
        payload: dict[str, Any] = {
            "user_id": corpus.user_ids[corpus.user[row]], "item_id": corpus.item_ids[corpus.item[row]],
            "label": int(corpus.label[row]), "ts": int(corpus.ts_ms[row]),
            "status": "pending" if cot is None else "generated",
            "history": encode_history([corpus.item_ids[c] for c in samples.histories[row].tolist() if c >= 0]),
        }
        if cot is not None:
            payload["cot_embedding"] = [float(x) for x in cot]
        points.append(Point(corpus.sample_key(row), vector, payload))
    for start in range(0, len(points), 2_000):
        index.upsert(points[start : start + 2_000])
    index.flush()


def retrieve_examples(samples: Samples, pool: CotPool, splits: Sequence[Split], cache_dir: Path,
                      step: Callable[[str], None], cache: bool = True) -> list[ExampleRecord]:
    """Index the pool (a private Qdrant Edge shard under `cache_dir/pools/`), retrieve K examples for every split row
    through `ExampleRetriever`, set each split's `slots`, and return the records they point into. With `cache`, the
    shard is kept and the result stored under `cache_dir/retrieval/` by the pool's and the rows' fingerprint;
    without, the shard is deleted afterwards (a one-off pool, as in each update round)."""
    import shutil

    from storage.vectors.edge import EdgeIndex

    corpus = samples.corpus
    keys = [corpus.sample_key(r) for r in pool.rows.tolist()]
    pool_id = fingerprint(keys, [c is None for c in pool.cots], MODEL_NAME)
    cached = cache_dir / "retrieval" / f"{fingerprint(pool_id, *[s.rows for s in splits])}.npz"
    if cache and cached.is_file():
        records, slots = _load_retrieval(cached)
        for split in splits:
            split.slots = slots[split.name]
        step(f"in-context examples: loaded from cache {cached.name}")
        return records

    index_dir = cache_dir / "pools" / pool_id
    table = ExampleTable()
    try:
        with EdgeIndex(index_dir, SAMPLE_DIMENSION) as index:
            if index.count() != len(keys):
                index_pool(index, samples, pool)
            step(f"example index: {index.count():,} pool samples")
            retriever = ExampleRetriever(index, item_cache_ttl_s=None)
            started = time.perf_counter()
            for split in splits:
                split.slots = table.retrieve(retriever, samples, split.rows)
            elapsed = time.perf_counter() - started
    finally:
        if not cache:
            shutil.rmtree(index_dir, ignore_errors=True)
    total = sum(len(s.rows) for s in splits)
    filled = np.mean(np.concatenate([s.slots for s in splits if s.slots is not None]) >= 0) if total else 0.0
    step(f"in-context examples: {total:,} samples, {retriever.index_queries:,} index queries, "
         f"{elapsed / max(total, 1) * 1000:.2f} ms/sample, {filled:.1%} slots filled")
    if cache:
        _save_retrieval(cached, table.records, {s.name: s.slots for s in splits if s.slots is not None})
    return table.records


def _save_retrieval(path: Path, records: list[ExampleRecord], slots: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cot = np.zeros((len(records), EMBEDDING_DIMENSION), dtype=np.float32)
    has_cot = np.zeros(len(records), dtype=bool)
    for i, record in enumerate(records):
        if record.cot is not None:
            cot[i], has_cot[i] = record.cot, True
    empty = np.zeros((0, EMBEDDING_DIMENSION), dtype=np.float32)
    staging = path.with_suffix(".tmp.npz")
    np.savez(
        staging,
        keys=np.array([r.key for r in records], dtype=str), users=np.array([r.user_id for r in records], dtype=str),
        items=np.array([r.item_id for r in records], dtype=str), labels=np.array([r.label for r in records], dtype=np.int64),
        ts=np.array([r.ts_ms for r in records], dtype=np.int64), generated=np.array([r.generated for r in records], dtype=bool),
        histories=np.array([encode_history(list(r.history)) for r in records], dtype=str),
        history_vectors=np.stack([r.history_vector for r in records]) if records else empty,
        target_vectors=np.stack([r.target_vector for r in records]) if records else empty,
        cot=cot, has_cot=has_cot, split_names=np.array(list(slots), dtype=str), **{f"slots_{k}": v for k, v in slots.items()},
    )
    staging.replace(path)


def _load_retrieval(path: Path) -> tuple[list[ExampleRecord], dict[str, np.ndarray]]:
    stored = np.load(path)
    records = [
        ExampleRecord(key=str(key), user_id=str(user), item_id=str(item), label=int(label), ts_ms=int(ts),
                      history_vector=hv, target_vector=tv, generated=bool(generated), history=decode_history(str(history)),
                      cot=cot if has_cot else None)
        for key, user, item, label, ts, hv, tv, generated, history, cot, has_cot in zip(
            stored["keys"], stored["users"], stored["items"], stored["labels"], stored["ts"], stored["history_vectors"],
            stored["target_vectors"], stored["generated"], stored["histories"], stored["cot"], stored["has_cot"], strict=True)
    ]
    return records, {str(name): stored[f"slots_{name}"] for name in stored["split_names"]}


# ---- training --------------------------------------------------------------------------------------------------------


class Batches:
    """Builds one feature space's model inputs for corpus rows on the fly (keeps memory flat: examples are gathered
    per batch). The example records are encoded in this space, so two spaces can share one retrieval."""

    def __init__(self, samples: Samples, space: FeatureSpace, records: Sequence[ExampleRecord], with_examples: bool) -> None:
        self.samples, self.space, self.with_examples = samples, space, with_examples
        self.catalogue = Catalogue.of(samples, space)
        self.pool: ExamplePool = space.encode_examples(list(records) if with_examples else [])

    @property
    def corpus(self) -> Corpus:
        return self.samples.corpus

    def arrays(self, split: Split, positions: np.ndarray) -> dict[str, np.ndarray]:
        rows = split.rows[positions]
        arrays = sample_arrays(self.samples, self.catalogue, self.space, rows)
        if self.with_examples:
            if split.slots is None:
                raise ValueError(f"the {split.name} split has no retrieved examples")
            arrays.update(gather_examples(self.pool, split.slots[positions]))
        return arrays

    def tensors(self, split: Split, positions: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        arrays = self.arrays(split, positions)
        labels = torch.from_numpy(self.corpus.label[split.rows[positions]].astype(np.float32))
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, labels


def fit(model: RankerModel, batches: Batches, train_split: Split, valid_split: Split, options: FitOptions,
        step: Callable[[str], None]) -> list[dict[str, float]]:
    """Adam on BCE + lambda * L_rec with early stopping on validation AUC; the model ends with its best epoch's
    weights. Returns one record per epoch."""
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
        valid = evaluate(model, batches, valid_split)
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


def predict(model: RankerModel, batches: Batches, split: Split) -> np.ndarray:
    model.eval()
    scores = []
    with torch.inference_mode():
        for start in range(0, len(split.rows), EVAL_BATCH):
            inputs, _ = batches.tensors(split, np.arange(start, min(start + EVAL_BATCH, len(split.rows))))
            scores.append(torch.sigmoid(model(inputs).logit).numpy())
    return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)


def evaluate(model: RankerModel, batches: Batches, split: Split) -> dict[str, float]:
    """AUC and LogLoss of the model on a split (which must hold both labels)."""
    scores = predict(model, batches, split)
    labels = batches.corpus.label[split.rows]
    return {"auc": auc(labels, scores), "logloss": logloss(labels, scores)}


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


def logloss(labels: np.ndarray, scores: np.ndarray) -> float:
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


# ---- export ----------------------------------------------------------------------------------------------------------


@dataclass
class Artifact:
    version_id: str
    directory: Path
    onnx_path: Path
    checksum: str
    created_at: datetime
    metrics: dict[str, Any]


def export_artifact(model: RankerModel, space: FeatureSpace, parity_inputs: dict[str, np.ndarray],
                    metrics: dict[str, Any], manifest: dict[str, Any], settings: Settings,
                    require_parity: bool = True) -> Artifact:
    """ONNX export, the parity check on random and the given real inputs (raises `ParityError` above the tolerance:
    nothing is left under models/ then but a staging directory), and the artifact directory
    `$LLMCF_HOME/models/<version_id>/` (moved into place only once complete). The metrics gain the parity figure.

    `require_parity=False` (a candidate already refused, kept for the record) measures the figure without enforcing
    it: a model wrecked by a destructive step has logits of 1e4 and more, and near the decision boundary the float32
    rounding of such sums differs between the two runtimes by more than the tolerance. The server refuses to load a
    version whose recorded figure is above the tolerance (`ranker.serving.models.load_bundle`)."""
    created_at = datetime.now(timezone.utc)
    staging = settings.home / "models" / f".staging-{created_at:%Y%m%dT%H%M%S%fZ}"
    onnx_path = export_onnx(model, staging / MODEL_ONNX)
    measure = check_parity if require_parity else worst_parity
    metrics = {**metrics, "onnx_parity_max_abs_diff": measure(model, onnx_path, [parity_inputs])}
    checksum = sha256_file(onnx_path)
    version_id = f"{model.config.kind.replace('+', '-')}-{created_at:%Y%m%dT%H%M%SZ}-{checksum[:8]}"
    save_artifact(staging, model, space, {"version_id": version_id, "created_at": created_at.isoformat(),
                                          "metrics": metrics, **manifest})
    directory = settings.home / "models" / version_id
    staging.rename(directory)
    return Artifact(version_id, directory, directory / MODEL_ONNX, checksum, created_at, metrics)


def register_version(settings: Settings, result: TrainResult, status: str = "candidate",
                     parent_version: str | None = None, notes: str | None = None) -> None:
    """Record the artifact as a `model_versions` row (migrating the database first)."""
    import migrations
    from storage.repository import ModelVersionRecord, Repository

    migrations.upgrade(settings.database_url)
    with Repository.from_settings(settings) as repository:
        repository.record_model_version(ModelVersionRecord(
            version_id=result.version_id, kind=result.kind, artifact_path=str(result.onnx_path), checksum=result.checksum,
            created_at=result.created_at or datetime.now(timezone.utc),
            metrics={k: v for k, v in result.metrics.items() if v is not None},
            parent_version=parent_version, status=status, notes=notes if notes is not None else result.notes,  # type: ignore[arg-type]
        ))


class Stepper:
    """Prints progress lines with the elapsed time."""

    def __init__(self, log: Callable[[str], None], started: float | None = None) -> None:
        self.log, self.started = log, time.perf_counter() if started is None else started

    def __call__(self, message: str) -> None:
        self.log(f"[{time.perf_counter() - self.started:7.1f} s] {message}")
