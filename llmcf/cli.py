"""The `llmcf` command line: one entry point for every process and operation.

Each sub-command imports its stage lazily, so `llmcf --help` stays instant and a process loads only what it runs.
Settings come from the environment (`llmcf config` lists them); flags override them for one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from llmcf.errors import UserFacingError
from llmcf.settings import SETTINGS, Settings, SettingsError

if TYPE_CHECKING:
    from ranker.evaluation import EvaluationOptions


def _number(convert: Callable[[str], float], noun: str, *, zero_allowed: bool) -> Callable[[str], float]:
    """An argparse `type` for a number that must be positive (or, with `zero_allowed`, not negative)."""

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if value < 0 or (value == 0 and not zero_allowed):
            raise argparse.ArgumentTypeError(f"{value} must not be negative" if zero_allowed else f"{value} must be greater than 0")
        return value

    return parse


_positive_int = _number(int, "a whole number", zero_allowed=False)
_positive_float = _number(float, "a number", zero_allowed=False)
_non_negative_int = _number(int, "a whole number", zero_allowed=True)
_non_negative_float = _number(float, "a number", zero_allowed=True)


def _date(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (use YYYY-MM-DD or an ISO 8601 timestamp)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    width = max(len(name) for name, _ in settings.describe())
    for name, value in settings.describe():
        print(f"{name:<{width}}  {value}")
    if args.catalogue:
        print()
        for s in SETTINGS:
            print(f"{s.env}  (default: {s.default if s.default is not None else 'unset'})\n    {s.help}")
    return 0


def _cmd_schemas(args: argparse.Namespace, settings: Settings) -> int:
    from llmcf.events import CONTRACTS

    schemas = {topic: model.model_json_schema() for topic, model in CONTRACTS.items()}
    if args.topic:
        schemas = {args.topic: schemas[args.topic]}
    print(json.dumps(schemas, indent=2))
    return 0


def _cmd_infra(args: argparse.Namespace, settings: Settings) -> int:
    from llmcf.infra import broker

    if args.action == "up":
        info = broker.up(settings)
        print(f"broker: {info.bootstrap} ({info.origin})")
        for name in info.topics:
            print(f"topic:  {name}")
        return 0
    if args.action == "down":
        stopped = broker.down(settings)
        print("broker stopped" if stopped else "no embedded broker was running")
        return 0
    info = broker.status(settings)
    print(json.dumps(info, indent=2, default=str))
    return 0 if info.get("reachable") else 1


def _cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    import migrations

    url = args.database_url or settings.database_url
    if args.action == "upgrade":
        migrations.upgrade(url, args.revision or "head")
    elif args.action == "downgrade":
        migrations.downgrade(url, args.revision or "-1")
    print(f"database revision: {migrations.current(url) or 'empty'}")
    return 0


def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from llmcf.replay import ReplayOptions, replay

    summary = replay(
        settings,
        ReplayOptions(
            dataset=args.dataset,
            limit=args.limit,
            rate=args.rate,
            start=args.start,
            end=args.end,
            timestamps=args.timestamps,
            progress=not args.quiet,
        ),
    )
    print(summary.render())
    return 130 if summary.interrupted else 0


def _cmd_tail(args: argparse.Namespace, settings: Settings) -> int:
    from llmcf.kafka import read_to_end, resolve_bootstrap
    from llmcf.topics import Topics

    topic = getattr(Topics.from_settings(settings), args.topic.replace("-", "_"))
    shown = 0
    for message in read_to_end(settings, resolve_bootstrap(settings), topic):
        if args.max is not None and shown >= args.max:
            break
        key = message.key().decode(errors="replace") if message.key() is not None else ""
        value = (message.value() or b"").decode(errors="replace")
        print(f"{message.partition()}:{message.offset()} {key} {value}")
        shown += 1
    print(f"{shown:,} records from {topic}", file=sys.stderr)
    return 0


WORKER_METRICS_PORT = 9101


def _metrics_port(args: argparse.Namespace, settings: Settings, default: int) -> int:
    """--metrics-port, else LLMCF_METRICS_PORT, else the command's own default port."""
    if args.metrics_port is not None:
        return int(args.metrics_port)
    return settings.metrics_port if settings.metrics_port is not None else default


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from streams.app import WorkerOptions, run_worker

    options = WorkerOptions(
        batch_size=args.batch_size,
        batch_within_s=args.batch_within,
        web_port=args.web_port,
        item_wait_s=args.item_wait,
    )
    return run_worker(settings, options, _metrics_port(args, settings, WORKER_METRICS_PORT))


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from llmcf.demo import DemoOptions, run_demo, stop_demo

    if args.stop:
        return stop_demo(settings)
    return run_demo(settings, DemoOptions(
        dataset=args.dataset, limit=args.limit, rate=args.rate, backend=args.backend, port=args.port,
        metrics_port_base=args.metrics_port_base, update_interval_s=args.update_interval, min_cots=args.min_cots,
        timeout_s=args.timeout, fresh=args.fresh, stop_at_end=args.stop_at_end,
    ))


def _cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from generators.service import GenerateOptions, run_generator

    return run_generator(
        settings,
        GenerateOptions(
            backend=args.backend or settings.generator_backend,
            model=args.model or settings.generator_model,
            device=args.device or settings.generator_device,
            openai_base_url=args.openai_base_url or settings.openai_base_url,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            max_attempts=args.max_attempts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            draft_tokens=args.draft_tokens,
            draft_acceptance=args.draft_acceptance,
            dtype=args.dtype,
            metrics_port=args.metrics_port if args.metrics_port is not None else settings.metrics_port,
        ),
    )


def _cmd_cots(args: argparse.Namespace, settings: Settings) -> int:
    from llmcf.threads import pin_native_threads

    pin_native_threads(args.threads)  # before numpy and torch load
    from pathlib import Path

    from generators.service import resolve_device
    from ranker.llm_cots import WriteOptions, write_cots

    backend = args.backend or ("openai" if settings.generator_backend == "openai" else "transformers")
    options = WriteOptions(
        dataset=args.dataset, fraction=args.fraction, seed=args.seed, backend=backend,
        model=args.model or settings.generator_model, openai_base_url=args.openai_base_url or settings.openai_base_url,
        device=resolve_device(args.device or settings.generator_device) if backend == "transformers" else "remote",
        dtype=args.dtype, threads=args.threads, max_batch=args.max_batch, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, limit=args.limit,
    )
    path = write_cots(options, settings.home, Path(args.out) if args.out else None,
                      log=lambda line: print(line, flush=True))
    print(f"wrote {path}")
    return 0


def _cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from llmcf.threads import pin_native_threads

    pin_native_threads(args.threads)  # before numpy and torch load
    from ranker.train import TrainOptions, train

    options = TrainOptions(
        dataset=None if args.source == "database" else args.dataset,
        backbone=args.backbone,
        ict=not args.no_ict,
        max_train_samples=args.max_train_samples or None,
        max_eval_samples=args.max_eval_samples or None,
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        reconstruction_weight=args.rec_weight,
        pool_rate=args.pool_rate,
        cot_backend=args.cot_backend,
        seed=args.seed,
        threads=args.threads,
    )
    result = train(options, settings, log=lambda line: print(line, flush=True))
    print(json.dumps({"version_id": result.version_id, "kind": result.kind, "artifact": str(result.onnx_path),
                      "checksum": result.checksum, "metrics": result.metrics}, indent=2, default=str))
    return 0


def _cmd_update(args: argparse.Namespace, settings: Settings) -> int:
    from llmcf.threads import pin_native_threads

    pin_native_threads(args.threads)  # before numpy and torch load
    from ranker.updates.metrics import UPDATER_METRICS_PORT
    from ranker.updates.rounds import UpdateOptions
    from ranker.updates.service import run_updater

    options = UpdateOptions(
        kind=args.kind or settings.ranker_kind,
        window_s=args.window_s if args.window_s is not None else settings.update_window_s,
        max_samples=args.max_samples or settings.update_max_samples,
        holdout_fraction=args.holdout_fraction if args.holdout_fraction is not None else settings.update_holdout_fraction,
        max_auc_drop=args.max_auc_drop if args.max_auc_drop is not None else settings.update_max_auc_drop,
        max_epochs=args.epochs,
        scratch_max_epochs=args.scratch_epochs,
        learning_rate=args.lr,
        seed=args.seed,
        threads=args.threads,
    )
    metrics_port = _metrics_port(args, settings, UPDATER_METRICS_PORT)
    interval = args.interval_s if args.interval_s is not None else settings.update_interval_s
    return run_updater(settings, options, interval, args.once, metrics_port, log=lambda line: print(line, flush=True))


def _cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from llmcf.threads import free_threads, pin_native_threads

    args.threads = args.threads or free_threads()
    pin_native_threads(args.threads)  # before numpy and torch load
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


# `llmcf evaluate` flag -> EvaluationOptions field; a flag left out keeps the field's default (or `--quick`'s).
_EVALUATION_FLAGS = {
    "dataset": "dataset", "seeds": "seeds", "variants": "variants", "max_train_samples": "max_train_samples",
    "max_eval_samples": "max_eval_samples", "epochs": "max_epochs", "lr": "learning_rate",
    "weight_decay": "weight_decay", "field_dim": "field_dim", "pool_rate": "pool_rate", "cot_backend": "cot_backend",
    "cot_pool": "cot_pools",
    "cot_file": "cot_file", "threads": "threads", "days": "days", "start_fraction": "start_fraction",
    "new_item_window_days": "new_item_window_days", "update_max_samples": "update_max_samples",
    "update_epochs": "update_epochs", "max_day_rows": "max_day_rows",
}


def _evaluation_options(args: argparse.Namespace) -> EvaluationOptions:
    import dataclasses
    from pathlib import Path

    from ranker.evaluation import EvaluationOptions

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
    streaming_only = getattr(args, "streaming_only", False)
    return dataclasses.replace(base, offline=not streaming_only, streaming=getattr(args, "streaming", False) or streaming_only,
                               **given)


def _cmd_tune(args: argparse.Namespace, settings: Settings) -> int:
    from llmcf.threads import free_threads, pin_native_threads

    args.threads = args.threads or free_threads()
    pin_native_threads(args.threads)  # before numpy and torch load
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


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from llmcf.threads import pin_native_threads

    pin_native_threads(args.threads or settings.ranker_threads)  # before numpy and onnxruntime load
    from ranker.serving.server import ServeOptions, run_server

    return run_server(settings, ServeOptions(host=args.host, port=args.port, kind=args.kind, version=args.version,
                                             threads=args.threads))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmcf",
        description="LLM-CF kept fresh in near real time. Settings come from environment variables: see `llmcf config`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="print the effective settings (secrets masked)")
    p.add_argument("--catalogue", action="store_true", help="also list every environment variable with its meaning")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("schemas", help="print the JSON Schemas of the topics' event contracts")
    p.add_argument("--topic", choices=["items", "interactions", "cot-requests", "cot-results", "dead-letters"])
    p.set_defaults(func=_cmd_schemas)

    p = sub.add_parser(
        "infra",
        help="start, stop or inspect the embedded broker and ensure the topics",
        description="`up` starts the embedded Tansu broker on 127.0.0.1:$LLMCF_BROKER_PORT (or, when "
        "KAFKA_BOOTSTRAP_SERVERS is set, starts nothing) and creates the topics; `down` stops it; `status` reports it.",
    )
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=_cmd_infra)

    p = sub.add_parser("db", help="apply or inspect the database migrations (DATABASE_URL)")
    p.add_argument("action", choices=["upgrade", "downgrade", "current"])
    p.add_argument("revision", nargs="?", help="target revision (upgrade: default head; downgrade: default -1, or base)")
    p.add_argument("--database-url", help="override DATABASE_URL for this run")
    p.set_defaults(func=_cmd_db)

    p = sub.add_parser(
        "replay",
        help="publish a MovieLens window to the items and interactions topics, in event-time order",
        description="Plays the platforms' part: each movie becomes an `items` event at its first rating, each rating an "
        "`interactions` event (rating >= 4 = positive), published in event-time order by an idempotent producer.",
    )
    p.add_argument("--dataset", choices=["ml-100k", "ml-1m"], default="ml-100k")
    p.add_argument("--limit", type=_positive_int, help="publish at most N interactions (plus their items)")
    p.add_argument("--rate", type=_positive_float, help="events per second (default: as fast as the broker takes them)")
    p.add_argument("--start", type=_date, help="first event time to include (YYYY-MM-DD)")
    p.add_argument("--end", type=_date, help="event time to stop before (YYYY-MM-DD)")
    p.add_argument(
        "--timestamps",
        choices=["original", "now"],
        default="original",
        help="original: MovieLens times; now: stamp each event with its publish time, so freshness reads as live",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser(
        "tail",
        help="print a topic's records from the beginning to its current end (a kcat -C -e for the project's topics)",
        description="Prints `partition:offset key value` per record, partition by partition, and stops at the end.",
    )
    p.add_argument("topic", choices=["items", "interactions", "cot-requests", "cot-results", "dead-letters"])
    p.add_argument("--max", type=_positive_int, help="stop after N records")
    p.set_defaults(func=_cmd_tail)

    p = sub.add_parser(
        "generate",
        help="run a member of the CoT generator pool (consumes cot-requests, publishes cot-results); one per GPU",
        description="Joins the generator consumer group on cot-requests, generates chains of thought in micro-batches "
        "with the chosen backend, embeds them and publishes cot-results; offsets are committed only after the results "
        "are delivered. Stops cleanly on SIGTERM / Ctrl-C (in-flight work is finished and committed). Defaults come "
        "from LLMCF_GENERATOR_* and LLMCF_OPENAI_* (`llmcf config --catalogue`).",
    )
    p.add_argument("--backend", choices=["transformers", "openai", "template"],
                   help="transformers (local model), openai (OpenAI-compatible server) or template (a deterministic "
                   "rationale, NOT an LLM; for load tests); default LLMCF_GENERATOR_BACKEND")
    p.add_argument("--model", help="transformers: model directory or .gguf; openai: served model name "
                   "(default LLMCF_GENERATOR_MODEL)")
    p.add_argument("--device", help="cpu, cuda:N or auto (default LLMCF_GENERATOR_DEVICE); also used by the embedder")
    p.add_argument("--openai-base-url", help="openai backend: server URL (default LLMCF_OPENAI_BASE_URL)")
    p.add_argument("--max-batch", type=_positive_int,
                   help="requests per batch (default: transformers 48 on a CPU, 64 on a GPU; other backends 16)")
    p.add_argument("--max-wait-ms", type=_non_negative_int, default=200,
                   help="longest wait for a batch to fill after its first request (default 200)")
    p.add_argument("--max-attempts", type=_positive_int, default=3,
                   help="attempts per request before it goes to dead-letters (default 3)")
    p.add_argument("--max-new-tokens", type=_positive_int, help="tokens per chain of thought (default: the backend's)")
    p.add_argument("--temperature", type=_non_negative_float, help="sampling temperature, 0 = greedy (default 0.6)")
    p.add_argument("--draft-tokens", type=_non_negative_int, default=0,
                   help="transformers on CPU: speculative decoding with up to N draft tokens per step, retrieved from "
                   "the prompt and the CoTs already written (default 0 = off: on 2 cores at batch 16 it measured "
                   "1.2x greedy and slower than plain sampling, see `python -m bench.generators --drafts`)")
    p.add_argument("--draft-acceptance", choices=["lossless", "relaxed"], default="lossless",
                   help="lossless: the model's own text (greedy) or distribution (sampling); relaxed: DARE's rule, a "
                   "draft token in the model's top 2 with probability >= 0.1 is kept (the text changes)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "int8"],
                   help="transformers: the weights' type (default bfloat16 where the CPU or GPU computes it natively: "
                   "AVX512-BF16 or AMX, CUDA with bf16; else float32 on a CPU, float16 on a GPU); int8: CPU only, "
                   "dynamically quantized linear layers, other text (see `python -m bench.generators --drafts`)")
    p.add_argument("--metrics-port", type=_non_negative_int,
                   help="port of /metrics; 0 = none (default LLMCF_METRICS_PORT, else 9102)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "cots",
        help="write the evaluation's LLM CoT file: CoTs for a fixed, seeded sample of MovieLens training rows",
        description="Writes, with the generator pool's backend and the stream's prompt, the chains of thought of a "
        "uniform --fraction (default 1%) of the training rows of the time split that `llmcf evaluate` uses (seed "
        "--seed) into a gzip JSON-lines file (default data/cots/<dataset>-llm-cots.jsonl.gz, versioned in the "
        "repository) and its manifest (<name>.json: sample, model, decoding, command, time). Resumable: rows already "
        "in the file are skipped, so stop it any time (Ctrl-C) and run the same command again. SmolLM2-135M on 2 CPU "
        "cores writes about 2 CoTs/s (about 70 minutes for ml-1m's 8,002 rows); on a GPU (--device cuda:0) or a "
        "served LLM (--backend openai) much faster. The template backend is refused: it is not an LLM.",
    )
    p.add_argument("--dataset", choices=["ml-100k", "ml-1m"], default="ml-1m")
    p.add_argument("--fraction", type=_positive_float, default=0.01,
                   help="share of the training rows to write CoTs for (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row sample and of sampled decoding (default 0)")
    p.add_argument("--out", help="the CoT file (default data/cots/<dataset>-llm-cots.jsonl.gz in the repository)")
    p.add_argument("--limit", type=_positive_int, help="write at most N new CoTs in this run (default: all missing)")
    p.add_argument("--backend", choices=["transformers", "openai"],
                   help="transformers (local model) or openai (OpenAI-compatible server); default transformers, or "
                   "openai when LLMCF_GENERATOR_BACKEND says so")
    p.add_argument("--model", help="transformers: model directory or .gguf (default SmolLM2-135M-Instruct); openai: "
                   "served model name (default LLMCF_GENERATOR_MODEL)")
    p.add_argument("--device", help="transformers: cpu, cuda:N or auto (default LLMCF_GENERATOR_DEVICE)")
    p.add_argument("--openai-base-url", help="openai backend: server URL (default LLMCF_OPENAI_BASE_URL)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "int8"],
                   help="transformers: the weights' type (default as `llmcf generate`)")
    p.add_argument("--max-batch", type=_positive_int, help="prompts per batch (default as `llmcf generate`)")
    p.add_argument("--max-new-tokens", type=_positive_int, help="tokens per chain of thought (default: the backend's)")
    p.add_argument("--temperature", type=_non_negative_float, help="sampling temperature, 0 = greedy (default 0.6)")
    p.add_argument("--threads", type=_positive_int, default=2, help="torch threads (pinned; default 2)")
    p.set_defaults(func=_cmd_cots)

    p = sub.add_parser(
        "worker",
        help="run the stream worker: items, interactions and cot-results into storage, CoT requests out",
        description="Consumes `items`, `interactions` and `cot-results` in batches (Faust), persists them to "
        "DATABASE_URL and the vector index, keeps user histories, and publishes CoT requests. Stops on SIGTERM/SIGINT "
        "after finishing the batch in hand.",
    )
    p.add_argument("--metrics-port", type=int,
                   help=f"port of /metrics (default: LLMCF_METRICS_PORT, else {WORKER_METRICS_PORT}; 0 = none)")
    p.add_argument("--batch-size", type=_positive_int, default=2000, help="records per batch at most (default 2000)")
    p.add_argument("--batch-within", type=_positive_float, default=0.2,
                   help="seconds to wait for a batch to fill (default 0.2)")
    p.add_argument("--web-port", type=_positive_int, help="port of Faust's web server (default: no web server)")
    p.add_argument("--item-wait", type=_positive_float, default=60.0,
                   help="seconds an interaction waits for its item to reach the catalogue before its sample is "
                   "dead-lettered (default 60)")
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser(
        "train",
        help="train a ranker (DeepFM/DIN, +ICT by default), export it to ONNX and register it in model_versions",
        description="Time-ordered split (80/10/10), a CoT pool (offline: a uniform 1/10 of the training rows with "
        "CoTs from --cot-backend, `template` by default, which is NOT an LLM), in-context examples retrieved through "
        "the serving retriever, early stopping on validation AUC, ONNX export with a parity check (<= 1e-5), and a "
        "model_versions row. Artifacts go to $LLMCF_HOME/models/<version_id>/. Defaults keep ml-1m to minutes on 2 "
        "cores: the latest 100,000 training rows and at most 20,000 validation and test rows (0 = no cap).",
    )
    p.add_argument("--source", choices=["dataset", "database"], default="dataset",
                   help="dataset: MovieLens straight from its package; database: interactions and CoT samples in DATABASE_URL")
    p.add_argument("--dataset", choices=["ml-100k", "ml-1m"], default="ml-1m")
    p.add_argument("--backbone", choices=["deepfm", "din"], default="deepfm")
    p.add_argument("--no-ict", action="store_true", help="the backbone alone, without the ICT module")
    p.add_argument("--max-train-samples", type=int, default=100_000, help="latest N training rows (default 100000; 0 = all)")
    p.add_argument("--max-eval-samples", type=int, default=20_000,
                   help="uniform sample of N validation and N test rows (default 20000; 0 = all)")
    p.add_argument("--epochs", type=_positive_int, default=20, help="at most N epochs (early stopping, patience 2)")
    p.add_argument("--batch-size", type=_positive_int, default=512)
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--rec-weight", type=float, default=1.0, help="lambda of the reconstruction loss (default 1.0)")
    p.add_argument("--pool-rate", type=_positive_float, default=0.1, help="share of training rows in the CoT pool (offline)")
    p.add_argument("--cot-backend", choices=["template", "transformers", "openai"], default="template",
                   help="CoT backend for the offline pool (default template: deterministic, not an LLM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, default=2, help="torch threads (pinned)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "update",
        help="continuous updates: fine-tune the serving ranker on the newest stored data, validate, promote or reject",
        description="Every --interval-s (LLMCF_UPDATE_INTERVAL_S), one round: skip if nothing new is stored; with no "
        "serving version, train from scratch on the database; otherwise fine-tune the serving version (vocabulary "
        "grown) on the newest window (LLMCF_UPDATE_WINDOW_S, at most LLMCF_UPDATE_MAX_SAMPLES rows), compare it with "
        "the serving model on the window's newest LLMCF_UPDATE_HOLDOUT_FRACTION (never trained on), and record it as "
        "'rejected' if its AUC is lower by more than LLMCF_UPDATE_MAX_AUC_DROP, else promote it (model_versions: "
        "'serving', the previous one 'retired'). A failed round is logged and counted; the loop goes on. "
        "/metrics on LLMCF_METRICS_PORT (default 9103).",
    )
    p.add_argument("--once", action="store_true", help="one round, then exit (exit code 1 if it failed)")
    p.add_argument("--interval-s", type=_positive_float, help="seconds between rounds (default LLMCF_UPDATE_INTERVAL_S)")
    p.add_argument("--window-s", type=_positive_float, help="event-time span of the window (default LLMCF_UPDATE_WINDOW_S)")
    p.add_argument("--max-samples", type=_positive_int, help="latest N rows of the window at most (default LLMCF_UPDATE_MAX_SAMPLES)")
    p.add_argument("--holdout-fraction", type=_positive_float, help="newest share held out (default LLMCF_UPDATE_HOLDOUT_FRACTION)")
    p.add_argument("--max-auc-drop", type=_non_negative_float,
                   help="largest tolerated holdout AUC drop (default LLMCF_UPDATE_MAX_AUC_DROP)")
    p.add_argument("--kind", choices=["deepfm", "deepfm+ict", "din", "din+ict"], help="model kind to update (default LLMCF_RANKER_KIND)")
    p.add_argument("--epochs", type=_positive_int, default=3, help="at most N fine-tuning epochs (early stopping, patience 1)")
    p.add_argument("--scratch-epochs", type=_positive_int, default=20,
                   help="at most N epochs when no version serves yet and the round trains from scratch (default 20)")
    p.add_argument("--lr", type=_positive_float, default=5e-4, help="fine-tuning Adam learning rate (default 5e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, default=2, help="torch threads (pinned)")
    p.add_argument("--metrics-port", type=_non_negative_int, help="port of /metrics; 0 = none (default LLMCF_METRICS_PORT, else 9103)")
    p.set_defaults(func=_cmd_update)

    p = sub.add_parser(
        "evaluate",
        help="offline comparison of DeepFM / DIN with and without ICT over seeds, and the streaming replay on new items",
        description="Offline: MovieLens, the time-ordered split of `llmcf train`, DeepFM, DeepFM+ICT, DIN, DIN+ICT x "
        "--seeds; AUC and LogLoss mean and std, overall, on new items and on unseen users. Pool and retrieved examples "
        "are built once and shared by every run. Defaults are the full-scale table: every training row of ml-1m "
        "(800,167), 20,000 validation and 20,000 test rows, at most 10 epochs (early stopping, patience 2), 5 seeds, "
        "CoT pool = uniform 0.1 of train with template CoTs (NOT an LLM; --cot-pool llm for the LLM's). --quick runs "
        "a small configuration (ml-100k, 1,500 training rows, 1 epoch, 2 seeds) in about a minute; a flag given "
        "with --quick overrides its value. "
        "--streaming adds a day-by-day replay from the day the data passes --start-fraction: AUC on interactions "
        "with recently introduced items (first seen at most --new-item-window-days before) for (a) frozen model + "
        "frozen pool, (b) frozen model + live pool, (c) daily fine-tuned model (the code of `llmcf update`) + live "
        "pool. Markdown and CSV reports go to --out (default $LLMCF_HOME/reports/) and the tables are printed. Each "
        "finished offline run is cached ($LLMCF_HOME/cache/ranker/runs/), so a stopped table resumes when run again.",
    )
    p.add_argument("--quick", action="store_true",
                   help="the small configuration the test suite runs (ml-100k, latest 1,500 training rows, 300 "
                   "validation and test rows, 1 epoch, 2 seeds, 2 replay days)")
    p.add_argument("--dataset", choices=["ml-100k", "ml-1m"], help="default ml-1m")
    p.add_argument("--seeds", type=_positive_int, help="seeds per variant (default 5)")
    p.add_argument("--variants", nargs="+", choices=["deepfm", "deepfm+ict", "din", "din+ict"],
                   help="default all four")
    p.add_argument("--max-train-samples", type=_non_negative_int, help="latest N training rows (default 0 = all)")
    p.add_argument("--max-eval-samples", type=_non_negative_int,
                   help="uniform sample of N validation and N test rows (default 20000; 0 = all)")
    p.add_argument("--epochs", type=_positive_int, help="at most N epochs per run (early stopping, patience 2; default 10)")
    p.add_argument("--lr", type=_positive_float, help="Adam learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=_non_negative_float, help="Adam's L2 weight decay (default 0)")
    p.add_argument("--field-dim", type=_positive_int, help="size of each field embedding (default 16)")
    p.add_argument("--no-user-tags", action="store_true",
                   help="leave the users' demographics out of the models (default: used where the dataset has them)")
    p.add_argument("--no-history-labels", action="store_true",
                   help="leave the liked-history field out of the models (default: used)")
    p.add_argument("--pool-rate", type=_positive_float, help="share of training rows in the CoT pool (default 0.1)")
    p.add_argument("--cot-backend", choices=["template", "transformers", "openai"],
                   help="CoT backend of the pool (default template: deterministic, not an LLM; transformers is slow on CPU)")
    p.add_argument("--cot-pool", nargs="+", choices=["uniform", "llm", "llm-rows-template", "llm-rows-no-cot"],
                   help="offline pool(s), each +ICT variant runs with each: uniform (--pool-rate of the training "
                   "rows, --cot-backend CoTs; default), llm (the rows of the LLM CoT file written by `llmcf cots`, "
                   "with its CoTs), llm-rows-template (the same rows with template CoTs: the control that isolates the "
                   "LLM's text) or llm-rows-no-cot (the same rows without CoTs: the control that isolates any CoT); "
                   "the last three retrieve the same examples. Runs are cached, so calls that split the pools between "
                   "processes share the backbones and a last call with every pool writes the whole table")
    p.add_argument("--cot-file", help="the LLM CoT file of --cot-pool llm (default data/cots/<dataset>-llm-cots.jsonl.gz)")
    p.add_argument("--threads", type=_positive_int,
                   help="torch threads (pinned; default: the cores free now less one, at least 1: 1 on 2 cores)")
    p.add_argument("--out", help="report directory (default $LLMCF_HOME/reports/)")
    p.add_argument("--streaming", action="store_true", help="also run the streaming replay")
    p.add_argument("--streaming-only", action="store_true", help="only the streaming replay")
    p.add_argument("--days", type=_positive_int, help="days replayed (default 7)")
    p.add_argument("--start-fraction", type=_positive_float,
                   help="day 0 = the day the data passes this share of its interactions (default 0.3)")
    p.add_argument("--new-item-window-days", type=_positive_float,
                   help="an item is recently introduced for this many days after its first interaction (default 30)")
    p.add_argument("--update-max-samples", type=_positive_int,
                   help="streaming (c): latest N rows of the 7-day window per daily fine-tune (default 20000)")
    p.add_argument("--max-day-rows", type=_positive_int,
                   help="streaming: score a uniform sample of N of each day's rows (plus every recent-item row; default 1000)")
    p.add_argument("--update-epochs", type=_positive_int, help="streaming (c): epochs per daily fine-tune (default 1)")
    p.set_defaults(func=_cmd_evaluate)

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
    p.add_argument("--backbones", nargs="+", choices=["deepfm", "din"], default=["deepfm", "din"])
    p.add_argument("--quick", action="store_true", help="`llmcf evaluate --quick`'s dataset and caps")
    for flag, kind, text in (("--dataset", None, "default ml-1m"), ("--max-train-samples", _non_negative_int, "default 0 = all"),
                             ("--max-eval-samples", _non_negative_int, "default 20000"),
                             ("--epochs", _positive_int, "at most N epochs per trial (default 10)"),
                             ("--threads", _positive_int, "torch threads (default: the cores free now less one)")):
        if kind is None:
            p.add_argument(flag, choices=["ml-100k", "ml-1m"], help=text)
        else:
            p.add_argument(flag, type=kind, help=text)
    p.add_argument("--out", help="report directory (default $LLMCF_HOME/reports/)")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser(
        "serve",
        help="serve the ranker over HTTP: POST /v1/rank, /healthz, /readyz, /metrics, /docs",
        description="Scores candidates with the newest 'serving' model version of the kind (the newest 'candidate' is "
        "promoted on a first deployment), swapping in newer versions as they are promoted (polled every "
        "LLMCF_RANKER_MODEL_POLL_S). ICT models retrieve their exact in-context examples from an example pool kept in "
        "memory, synced from the stored CoT samples every LLMCF_RANKER_POOL_SYNC_S. Stops cleanly on SIGTERM / Ctrl-C.",
    )
    p.add_argument("--host", help="listen address (default LLMCF_RANKER_HOST, 127.0.0.1)")
    p.add_argument("--port", type=_positive_int, help="port (default LLMCF_RANKER_PORT, 8000)")
    p.add_argument("--kind", choices=["deepfm", "deepfm+ict", "din", "din+ict"],
                   help="model kind to serve (default LLMCF_RANKER_KIND, deepfm+ict)")
    p.add_argument("--version", help="serve exactly this model version (any status; no hot swap)")
    p.add_argument("--threads", type=_positive_int, help="onnxruntime intra-op threads (default LLMCF_RANKER_THREADS, 1)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "demo", help="the main job end to end on the embedded defaults",
        description="Brings up the broker and the database, starts worker, generator, updater and ranker, replays a "
        "MovieLens window with event times set to publish times, prints a live status line, then a summary, a "
        "freshness plot and the URLs to try. Ctrl-C stops everything; running it again resumes where it stopped. "
        "The processes keep running after the summary (`llmcf demo --stop`).",
    )
    p.add_argument("--dataset", choices=["ml-100k", "ml-1m"], default="ml-100k")
    p.add_argument("--limit", type=_positive_int, default=20_000, help="interactions to replay (default 20000)")
    p.add_argument("--rate", type=_positive_float, default=200.0, help="events published per second (default 200)")
    p.add_argument("--backend", choices=["transformers", "openai", "template"], default="transformers",
                   help="CoT backend of the generator (default transformers: SmolLM2 on the CPU, or the first GPU; "
                   "template is a deterministic rationale, NOT an LLM)")
    p.add_argument("--port", type=_positive_int, default=8000, help="port of the ranker (default 8000)")
    p.add_argument("--metrics-port-base", type=_positive_int, default=9101,
                   help="/metrics of the worker on this port, the generator on the next, the updater on the one after "
                   "(default 9101)")
    p.add_argument("--update-interval", type=_positive_float, default=60.0,
                   help="seconds between the updater's rounds (default 60)")
    p.add_argument("--min-cots", type=_non_negative_int, default=3,
                   help="chains of thought to wait for before the summary (default 3)")
    p.add_argument("--timeout", type=_positive_float, default=1_800.0,
                   help="seconds after which the summary is printed anyway (default 1800)")
    p.add_argument("--fresh", action="store_true", help="replay the window from its start, not from the last position")
    p.add_argument("--stop-at-end", action="store_true", help="stop the processes after the summary")
    p.add_argument("--stop", action="store_true", help="stop the processes a previous demo left running, and exit")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        parser.exit(2, f"llmcf: configuration error: {exc}\n")
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return args.func(args, settings)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`llmcf tail ... | head`): stop quietly, as Unix tools do.
        sys.stderr.close()
        return 0
    except UserFacingError as exc:
        print(f"llmcf {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
