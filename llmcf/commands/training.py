"""`llmcf train`, `update`, `evaluate` and `tune`: training, continuously updating, comparing and tuning rankers."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from llmcf.backend_names import BACKEND_NAMES
from llmcf.commands.arguments import (
    THREADS_HELP,
    metrics_port,
    non_negative_float,
    non_negative_int,
    pin_threads,
    positive_float,
    positive_int,
)
from llmcf.commands.interface import Subcommands
from llmcf.model_kinds import BACKBONES, MODEL_KINDS
from llmcf.ports import UPDATER_METRICS_PORT
from llmcf.settings import Settings
from ranker.evaluation_options import EvaluationOptions
from ranker.options import FitOptions, TrainOptions, UpdateOptions

DEFAULT = "default %(default)s"


def add_train(sub: Subcommands) -> None:
    train = TrainOptions()
    fit = train.fit
    p = sub.add_parser(
        "train",
        help="train a ranker (DeepFM/DIN, +ICT by default), export it to ONNX and register it in model_versions",
        description=f"Time-ordered split (80/10/10), a CoT pool (offline: a uniform {train.pool_rate:g} of the training rows with "
        "CoTs from --cot-backend, `template` by default, which is NOT an LLM), in-context examples retrieved through "
        "the serving retriever, early stopping on validation AUC, ONNX export with a parity check (<= 1e-5), and a "
        "model_versions row. Artifacts go to $LLMCF_HOME/models/<version_id>/. Defaults keep ml-1m to minutes on 2 "
        f"cores: the latest {train.max_train_samples:,} training rows and at most {train.max_eval_samples:,} "
        "validation and test rows (0 = no cap).",
    )
    p.add_argument("--source", choices=["dataset", "database"], default="dataset",
                   help="dataset: MovieLens straight from its package; database: interactions and CoT samples in DATABASE_URL")
    p.add_argument("--dataset", choices=["ml-100k", "ml-1m"], default=train.dataset, help=DEFAULT)
    p.add_argument("--backbone", choices=BACKBONES, default=train.backbone, help=DEFAULT)
    p.add_argument("--no-ict", action="store_true", help="the backbone alone, without the ICT module")
    p.add_argument("--max-train-samples", type=non_negative_int, default=train.max_train_samples,
                   help="latest N training rows (default %(default)s; 0 = all)")
    p.add_argument("--max-eval-samples", type=non_negative_int, default=train.max_eval_samples,
                   help="uniform sample of N validation and N test rows (default %(default)s; 0 = all)")
    p.add_argument("--epochs", type=positive_int, default=fit.max_epochs,
                   help=f"at most N epochs (early stopping, patience {fit.patience}; default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=fit.batch_size, help=DEFAULT)
    p.add_argument("--lr", type=positive_float, default=fit.learning_rate, help="Adam learning rate (default %(default)s)")
    p.add_argument("--rec-weight", type=float, default=fit.reconstruction_weight,
                   help="lambda of the reconstruction loss (default %(default)s)")
    p.add_argument("--pool-rate", type=positive_float, default=train.pool_rate,
                   help="share of training rows in the CoT pool (offline; default %(default)s)")
    p.add_argument("--cot-backend", choices=BACKEND_NAMES, default=train.cot_backend,
                   help="CoT backend for the offline pool (default %(default)s: deterministic, not an LLM)")
    p.add_argument("--seed", type=int, default=fit.seed, help="seed of the pool sample, the initialisation and the "
                   "shuffling (default %(default)s)")
    p.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    args.threads = pin_threads(args.threads)  # before numpy and torch load
    from ranker.train import train

    options = TrainOptions(
        dataset=None if args.source == "database" else args.dataset,
        backbone=args.backbone,
        ict=not args.no_ict,
        max_train_samples=args.max_train_samples or None,
        max_eval_samples=args.max_eval_samples or None,
        pool_rate=args.pool_rate,
        cot_backend=args.cot_backend,
        fit=FitOptions(max_epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                       reconstruction_weight=args.rec_weight, seed=args.seed),
        threads=args.threads,
    )
    result = train(options, settings, log=lambda line: print(line, flush=True))
    print(json.dumps({"version_id": result.version_id, "kind": result.kind, "artifact": str(result.onnx_path),
                      "checksum": result.checksum, "metrics": result.metrics}, indent=2, default=str))
    return 0


def add_update(sub: Subcommands) -> None:
    p = sub.add_parser(
        "update",
        help="continuous updates: fine-tune the serving ranker on the newest stored data, validate, promote or reject",
        description="Every --interval-s (LLMCF_UPDATE_INTERVAL_S), one round: skip if nothing new is stored; with no "
        "serving version, train from scratch on the database; otherwise fine-tune the serving version (vocabulary "
        "grown) on the newest window (LLMCF_UPDATE_WINDOW_S, at most LLMCF_UPDATE_MAX_SAMPLES rows), compare it with "
        "the serving model on the window's newest LLMCF_UPDATE_HOLDOUT_FRACTION (never trained on), and record it as "
        "'rejected' if its AUC is lower by more than LLMCF_UPDATE_MAX_AUC_DROP, else promote it (model_versions: "
        "'serving', the previous one 'retired'). A failed round is logged and counted; the loop goes on. "
        f"/metrics on LLMCF_METRICS_PORT (default {UPDATER_METRICS_PORT}).",
    )
    p.add_argument("--once", action="store_true", help="one round, then exit (exit code 1 if it failed)")
    p.add_argument("--interval-s", type=positive_float, help="seconds between rounds (default LLMCF_UPDATE_INTERVAL_S)")
    p.add_argument("--window-s", type=positive_float, help="event-time span of the window (default LLMCF_UPDATE_WINDOW_S)")
    p.add_argument("--max-samples", type=positive_int, help="latest N rows of the window at most (default LLMCF_UPDATE_MAX_SAMPLES)")
    p.add_argument("--holdout-fraction", type=positive_float, help="newest share held out (default LLMCF_UPDATE_HOLDOUT_FRACTION)")
    p.add_argument("--max-auc-drop", type=non_negative_float,
                   help="largest tolerated holdout AUC drop (default LLMCF_UPDATE_MAX_AUC_DROP)")
    p.add_argument("--kind", choices=MODEL_KINDS, help="model kind to update (default LLMCF_RANKER_KIND)")
    fit = UpdateOptions.fit
    p.add_argument("--epochs", type=positive_int, default=fit.max_epochs,
                   help=f"at most N fine-tuning epochs (early stopping, patience {fit.patience}; default %(default)s)")
    p.add_argument("--scratch-epochs", type=positive_int, default=UpdateOptions.scratch_max_epochs,
                   help="at most N epochs when no version serves yet and the round trains from scratch (default %(default)s)")
    p.add_argument("--lr", type=positive_float, default=fit.learning_rate, help="fine-tuning Adam learning rate (default %(default)s)")
    p.add_argument("--seed", type=int, default=fit.seed, help=DEFAULT)
    p.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    p.add_argument("--metrics-port", type=non_negative_int,
                   help=f"port of /metrics; 0 = none (default LLMCF_METRICS_PORT, else {UPDATER_METRICS_PORT})")
    p.set_defaults(func=_cmd_update)


def _cmd_update(args: argparse.Namespace, settings: Settings) -> int:
    args.threads = pin_threads(args.threads)  # before numpy and torch load
    from ranker.updates.service import run_updater

    options = UpdateOptions(
        kind=args.kind or settings.ranker_kind,
        window_s=args.window_s if args.window_s is not None else settings.update_window_s,
        max_samples=args.max_samples or settings.update_max_samples,
        holdout_fraction=args.holdout_fraction if args.holdout_fraction is not None else settings.update_holdout_fraction,
        max_auc_drop=args.max_auc_drop if args.max_auc_drop is not None else settings.update_max_auc_drop,
        fit=dataclasses.replace(UpdateOptions.fit, max_epochs=args.epochs, learning_rate=args.lr, seed=args.seed),
        scratch_max_epochs=args.scratch_epochs,
        threads=args.threads,
    )
    port = metrics_port(args, settings, UPDATER_METRICS_PORT)
    interval = args.interval_s if args.interval_s is not None else settings.update_interval_s
    return run_updater(settings, options, interval, args.once, port, log=lambda line: print(line, flush=True))


def add_evaluate(sub: Subcommands) -> None:
    full, quick = EvaluationOptions(), EvaluationOptions.quick()  # a flag left out keeps its value here, or --quick's
    p = sub.add_parser(
        "evaluate",
        help="offline comparison of DeepFM / DIN with and without ICT over seeds, and the streaming replay on new items",
        description="Offline: MovieLens, the time-ordered split of `llmcf train`, DeepFM, DeepFM+ICT, DIN, DIN+ICT x "
        "--seeds; AUC and LogLoss mean and std, overall, on new items and on unseen users. Pool and retrieved examples "
        f"are built once and shared by every run. Defaults are the full-scale table: {full.dataset}, {full.seeds} "
        f"seeds, {full.caps()} (--cot-pool llm for the LLM's CoTs). --quick runs a small configuration in about a "
        f"minute ({quick.dataset}, {quick.seeds} seeds, {quick.days} replay days, {quick.caps()}); a flag given with "
        "--quick overrides its value. "
        "--streaming adds a day-by-day replay from the day the data passes --start-fraction: AUC on interactions "
        "with recently introduced items (first seen at most --new-item-window-days before) for (a) frozen model + "
        "frozen pool, (b) frozen model + live pool, (c) daily fine-tuned model (the code of `llmcf update`) + live "
        "pool. Markdown and CSV reports go to --out (default $LLMCF_HOME/reports/) and the tables are printed. Each "
        "finished offline run is cached ($LLMCF_HOME/cache/ranker/runs/), so a stopped table resumes when run again.",
    )
    p.add_argument("--quick", action="store_true", help="the small configuration the test suite runs (see above)")
    p.add_argument("--dataset", choices=["ml-100k", "ml-1m"], help=f"default {full.dataset}")
    p.add_argument("--seeds", type=positive_int, help=f"seeds per variant (default {full.seeds})")
    p.add_argument("--variants", nargs="+", choices=MODEL_KINDS, help=f"default all {len(full.variants)}")
    p.add_argument("--max-train-samples", type=non_negative_int,
                   help=f"latest N training rows (default {_cap(full.max_train_samples)})")
    p.add_argument("--max-eval-samples", type=non_negative_int,
                   help=f"uniform sample of N validation and N test rows (default {_cap(full.max_eval_samples)})")
    p.add_argument("--epochs", type=positive_int, help=f"at most N epochs per run (early stopping, patience "
                   f"{full.fit.patience}; default {full.fit.max_epochs})")
    p.add_argument("--lr", type=positive_float, help=f"Adam learning rate (default {full.fit.learning_rate:g})")
    p.add_argument("--weight-decay", type=non_negative_float, help=f"Adam's L2 weight decay (default {full.fit.weight_decay:g})")
    p.add_argument("--field-dim", type=positive_int, help=f"size of each field embedding (default {full.field_dim})")
    p.add_argument("--no-user-tags", action="store_true",
                   help="leave the users' demographics out of the models (default: used where the dataset has them)")
    p.add_argument("--no-history-labels", action="store_true",
                   help="leave the liked-history field out of the models (default: used)")
    p.add_argument("--pool-rate", type=positive_float, help=f"share of training rows in the CoT pool (default {full.pool_rate:g})")
    p.add_argument("--cot-backend", choices=BACKEND_NAMES, help=f"CoT backend of the pool (default {full.cot_backend}: "
                   "deterministic, not an LLM; transformers is slow on CPU)")
    p.add_argument("--cot-pool", nargs="+", choices=["uniform", "llm", "llm-rows-template", "llm-rows-no-cot"],
                   help="offline pool(s), each +ICT variant runs with each: uniform (--pool-rate of the training "
                   "rows, --cot-backend CoTs; default), llm (the rows of the LLM CoT file written by `llmcf cots`, "
                   "with its CoTs), llm-rows-template (the same rows with template CoTs: the control that isolates the "
                   "LLM's text) or llm-rows-no-cot (the same rows without CoTs: the control that isolates any CoT); "
                   "the last three retrieve the same examples. Runs are cached, so calls that split the pools between "
                   "processes share the backbones and a last call with every pool writes the whole table")
    p.add_argument("--cot-file", help="the LLM CoT file of --cot-pool llm (default data/cots/<dataset>-llm-cots.jsonl.gz)")
    p.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    p.add_argument("--out", help="report directory (default $LLMCF_HOME/reports/)")
    p.add_argument("--streaming", action="store_true", help="also run the streaming replay")
    p.add_argument("--streaming-only", action="store_true", help="only the streaming replay")
    p.add_argument("--days", type=positive_int, help=f"days replayed (default {full.days})")
    p.add_argument("--start-fraction", type=positive_float,
                   help=f"day 0 = the day the data passes this share of its interactions (default {full.start_fraction:g})")
    p.add_argument("--new-item-window-days", type=positive_float, help="an item is recently introduced for this many "
                   f"days after its first interaction (default {full.new_item_window_days:g})")
    p.add_argument("--update-max-samples", type=positive_int, help=f"streaming (c): latest N rows of the "
                   f"{full.update_window_days:g}-day window per daily fine-tune (default {full.update_max_samples})")
    p.add_argument("--max-day-rows", type=positive_int, help="streaming: score a uniform sample of N of each day's rows "
                   f"(plus every recent-item row; default {full.max_day_rows})")
    p.add_argument("--update-epochs", type=positive_int,
                   help=f"streaming (c): epochs per daily fine-tune (default {full.update_epochs})")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    args.threads = pin_threads(args.threads)  # before numpy and torch load
    from pathlib import Path

    from ranker.evaluation import run_evaluation

    options = _evaluation_options(args)
    report = run_evaluation(options, settings, Path(args.out) if args.out else None, log=lambda line: print(line, flush=True))
    print()
    print(report.markdown)
    print()
    for path in report.files:
        print(f"wrote {path}")
    return 0


def _cap(value: int | None) -> str:
    return "0 = all" if value is None else f"{value}; 0 = all"


# `llmcf evaluate` flag -> EvaluationOptions field; a flag left out keeps the field's default (or `--quick`'s).
_EVALUATION_FLAGS = {
    "dataset": "dataset", "seeds": "seeds", "variants": "variants", "max_train_samples": "max_train_samples",
    "max_eval_samples": "max_eval_samples", "field_dim": "field_dim", "pool_rate": "pool_rate",
    "cot_backend": "cot_backend", "cot_pool": "cot_pools", "cot_file": "cot_file", "threads": "threads", "days": "days",
    "start_fraction": "start_fraction", "new_item_window_days": "new_item_window_days",
    "update_max_samples": "update_max_samples", "update_epochs": "update_epochs", "max_day_rows": "max_day_rows",
}
# The same for the fitting flags, onto `EvaluationOptions.fit`.
_FIT_FLAGS = {"epochs": "max_epochs", "lr": "learning_rate", "weight_decay": "weight_decay"}


def _evaluation_options(args: argparse.Namespace) -> EvaluationOptions:
    from pathlib import Path

    given: dict[str, Any] = {field: getattr(args, flag) for flag, field in _EVALUATION_FLAGS.items()
                             if getattr(args, flag, None) is not None}  # `llmcf tune` has only some of the flags
    for field in ("max_train_samples", "max_eval_samples"):  # 0 = no cap
        if field in given:
            given[field] = given[field] or None
    for field in ("variants", "cot_pools"):
        if field in given:
            given[field] = tuple(dict.fromkeys(given[field]))
    if "cot_file" in given:
        given["cot_file"] = Path(given["cot_file"])
    if getattr(args, "no_user_tags", False):
        given["user_tags"] = False
    if getattr(args, "no_history_labels", False):
        given["history_labels"] = False
    base = EvaluationOptions.quick() if args.quick else EvaluationOptions()
    fit = {field: getattr(args, flag) for flag, field in _FIT_FLAGS.items() if getattr(args, flag, None) is not None}
    streaming_only = getattr(args, "streaming_only", False)
    return dataclasses.replace(base, offline=not streaming_only, streaming=getattr(args, "streaming", False) or streaming_only,
                               fit=dataclasses.replace(base.fit, **fit), **given)


def add_tune(sub: Subcommands) -> None:
    p = sub.add_parser(
        "tune",
        help="search the backbones' hyper-parameters on the validation split only (for `llmcf evaluate`)",
        description="Train every combination of --grid for each backbone on the split `llmcf evaluate` uses (its caps "
        "and defaults, seed 0, early stopping), rank by the best validation AUC and write tune.md/tune.csv to --out "
        "(default $LLMCF_HOME/reports/). The test split is never read. Each trial is cached, so a stopped search "
        "resumes. Example: llmcf tune --grid learning_rate=1e-3,3e-3 weight_decay=0,1e-5 user_tags=on,off",
    )
    p.add_argument("--grid", nargs="+", required=True, metavar="NAME=V1,V2",
                   help="values per hyper-parameter: learning_rate, weight_decay, batch_size, field_dim, user_tags and "
                   "history_labels (on/off)")
    p.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    p.add_argument("--quick", action="store_true", help="`llmcf evaluate --quick`'s dataset and caps")
    full = EvaluationOptions()
    for flag, kind, text in (("--dataset", None, f"default {full.dataset}"),
                             ("--max-train-samples", non_negative_int, f"default {_cap(full.max_train_samples)}"),
                             ("--max-eval-samples", non_negative_int, f"default {_cap(full.max_eval_samples)}"),
                             ("--epochs", positive_int, f"at most N epochs per trial (default {full.fit.max_epochs})"),
                             ("--threads", positive_int, THREADS_HELP)):
        if kind is None:
            p.add_argument(flag, choices=["ml-100k", "ml-1m"], help=text)
        else:
            p.add_argument(flag, type=kind, help=text)
    p.add_argument("--out", help="report directory (default $LLMCF_HOME/reports/)")
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(args: argparse.Namespace, settings: Settings) -> int:
    args.threads = pin_threads(args.threads)  # before numpy and torch load
    from pathlib import Path

    from ranker.search import parse_grid, search

    grid = parse_grid(args.grid)
    out = Path(args.out) if args.out else settings.home / "reports"
    trials = search(_evaluation_options(args), tuple(dict.fromkeys(args.backbones)), grid, settings, out,
                    log=lambda line: print(line, flush=True))
    print()
    print((out / "tune.md").read_text())
    for backbone in dict.fromkeys(t.backbone for t in trials):
        best = next(t for t in trials if t.backbone == backbone)
        print(f"best {backbone} on validation: {', '.join(f'{k}={v}' for k, v in best.values.items())} "
              f"(valid AUC {best.valid_auc:.4f})")
    print(f"wrote {out / 'tune.md'}\nwrote {out / 'tune.csv'}")
    return 0
