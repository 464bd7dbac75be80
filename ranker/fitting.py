"""Fitting a ranker: model inputs per mini-batch (`Batches`), Adam on BCE + lambda * L_rec with early stopping on
validation AUC (`fit`), and scoring a split (`predict`, `evaluate`)."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Callable

import numpy as np
import torch

from ranker.data import Corpus
from ranker.dataset import Catalogue, Samples, Split, sample_arrays
from ranker.features import ExamplePool, FeatureSpace, gather_examples
from ranker.metrics import auc, logloss
from ranker.model import RankerModel
from ranker.options import FitOptions
from ranker.sample_pool import ExampleRecord

EVAL_BATCH = 4_096


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
    # Coupled L2 (Adam's weight_decay), as the LLM-CF authors' configs train their backbones.
    optimizer = torch.optim.Adam(model.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay)
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
