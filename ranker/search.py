"""`llmcf tune`: the backbones' hyper-parameters searched on the validation split only.

A grid (every combination of the values given per hyper-parameter) is trained on the split `llmcf evaluate` uses (the
same caps, seed 0), each trial with early stopping on validation AUC; trials are ranked by their best validation AUC
and the test split is never read, so the chosen values can be handed to `llmcf evaluate` without tuning on its test
rows. The budget is the grid's size times one run (printed per trial); every trial is cached beside the evaluation's
runs, so a stopped search resumes. Reports: `tune.md` / `tune.csv` under `out`.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from llmcf.errors import UserFacingError
from llmcf.model_kinds import ModelKind
from llmcf.settings import Settings
from ranker.data import fingerprint, movielens_corpus
from ranker.dataset import Samples, build_feature_space, time_split
from ranker.evaluation import training_code_fingerprint
from ranker.evaluation_options import EvaluationOptions
from ranker.fitting import Batches, fit
from ranker.model import ModelConfig, RankerModel
from ranker.options import FitOptions
from ranker.progress import Stepper

GridValue = int | float | bool

SEARCHABLE: dict[str, Callable[[str], GridValue]] = {
    "learning_rate": float,
    "weight_decay": float,
    "batch_size": int,
    "field_dim": int,
    "user_tags": lambda value: {"on": True, "off": False}[value],
    "history_labels": lambda value: {"on": True, "off": False}[value],
}
"""Hyper-parameter -> parser of one value on the command line (`user_tags`, `history_labels`: on / off, the
demographics and liked-history fields)."""


@dataclass(frozen=True)
class Trial:
    backbone: str
    values: dict[str, GridValue]
    valid_auc: float
    epochs: int
    best_epoch: int
    seconds: float


def parse_grid(items: Sequence[str]) -> dict[str, list[GridValue]]:
    """["learning_rate=1e-3,3e-3", "user_tags=on,off"] -> {"learning_rate": [0.001, 0.003], "user_tags": [True, False]}."""
    grid: dict[str, list[GridValue]] = {}
    for item in items:
        name, _, values = item.partition("=")
        if name not in SEARCHABLE or not values:
            raise UserFacingError(f"grid entry {item!r}: write NAME=V1,V2,... with NAME one of {', '.join(SEARCHABLE)}")
        try:
            grid[name] = [SEARCHABLE[name](v) for v in values.split(",")]
        except (ValueError, KeyError) as error:
            raise UserFacingError(f"grid entry {item!r}: {error}") from None
    return grid


def search(options: EvaluationOptions, backbones: Sequence[str], grid: Mapping[str, Sequence[GridValue]], settings: Settings,
           out: Path, log: Callable[[str], None] = print) -> list[Trial]:
    """Train every combination of `grid` for each backbone with `options` (an `EvaluationOptions`: dataset, caps,
    epochs, the defaults of what the grid leaves out); write `tune.md`/`tune.csv` under `out`; best first."""
    step = Stepper(log)
    torch.set_num_threads(options.threads)
    samples = Samples.of(movielens_corpus(options.dataset), settings.home / "cache" / "ranker")
    train_split, valid_split, _ = time_split(samples.corpus, options.max_train_samples, options.max_eval_samples, seed=0)
    space = build_feature_space(samples, train_split.rows)
    batches = Batches(samples, space, [], with_examples=False)
    combinations = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    step(f"search: {len(backbones)} backbone(s) x {len(combinations)} combination(s), train {len(train_split.rows):,} "
         f"rows, validation {len(valid_split.rows):,} rows (the test split is not read)")
    base = options.fit
    setup = fingerprint(Path(__file__).read_text(), training_code_fingerprint(), options.dataset, train_split.rows,
                        valid_split.rows, repr(asdict(base)), options.field_dim, options.user_tags, options.history_labels)
    trials = []
    for backbone in backbones:
        for values in combinations:
            cached = settings.home / "cache" / "ranker" / "search" / f"{fingerprint(setup, backbone, repr(values))}.json"
            if cached.is_file():
                trials.append(Trial(**json.loads(cached.read_text())))
                step(f"{backbone} {_describe(values)}: valid AUC {trials[-1].valid_auc:.4f} (cached)")
                continue
            started = time.perf_counter()
            torch.manual_seed(0)
            config = ModelConfig(ModelKind.parse(backbone).backbone, False, space.n_users, space.n_items, space.n_tags,
                                 n_user_tags=space.n_user_tags if values.get("user_tags", options.user_tags) else 0,
                                 field_dim=int(values.get("field_dim", options.field_dim)),
                                 history_labels=bool(values.get("history_labels", options.history_labels)))
            history = fit(RankerModel(config), batches, train_split, valid_split, _fit_options(base, values),
                          Stepper(lambda _line: None))
            aucs = [h["valid_auc"] for h in history]
            trials.append(Trial(backbone, values, max(aucs), len(history), int(np.argmax(aucs)) + 1,
                                time.perf_counter() - started))
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(asdict(trials[-1])))
            step(f"{backbone} {_describe(values)}: valid AUC {trials[-1].valid_auc:.4f} ({trials[-1].epochs} epochs, "
                 f"best {trials[-1].best_epoch}, {trials[-1].seconds:.0f} s)")
    trials.sort(key=lambda t: (t.backbone, -t.valid_auc))
    _write(trials, grid, options, out)
    return trials


def _fit_options(base: FitOptions, values: Mapping[str, GridValue]) -> FitOptions:
    """`base` with the fitting hyper-parameters of a grid point (`SEARCHABLE`'s optimiser ones)."""
    return dataclasses.replace(base, learning_rate=float(values.get("learning_rate", base.learning_rate)),
                               weight_decay=float(values.get("weight_decay", base.weight_decay)),
                               batch_size=int(values.get("batch_size", base.batch_size)))


def _describe(values: Mapping[str, GridValue]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "(defaults)"


def _write(trials: Sequence[Trial], grid: Mapping[str, Sequence[GridValue]], options: EvaluationOptions, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    names = list(grid)
    with (out / "tune.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["backbone", *names, "valid_auc", "epochs", "best_epoch", "seconds"])
        for t in trials:
            writer.writerow([t.backbone, *(t.values[n] for n in names), f"{t.valid_auc:.6f}", t.epochs, t.best_epoch,
                             f"{t.seconds:.1f}"])
    lines = [f"## Validation-only search: {options.dataset}",
             "", f"Caps and defaults of what the grid leaves out: {options.caps()}. Seed 0; ranked by the best "
             f"validation AUC; the test split is not read. Budget: {len(trials)} runs, "
             f"{sum(t.seconds for t in trials):,.0f} s.", "",
             f"| backbone | {' | '.join(names)} | valid AUC | epochs (best) | s |",
             f"| --- | {' | '.join('---' for _ in names)} | --- | --- | --- |"]
    lines += [f"| {t.backbone} | {' | '.join(str(t.values[n]) for n in names)} | {t.valid_auc:.4f} | {t.epochs} "
              f"({t.best_epoch}) | {t.seconds:.0f} |" for t in trials]
    (out / "tune.md").write_text("\n".join(lines) + "\n")
