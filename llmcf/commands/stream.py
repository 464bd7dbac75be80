"""`llmcf replay`, `tail` and `worker`: publishing events, reading a topic back, running the stream worker."""

from __future__ import annotations

import argparse
import sys

from llmcf.commands.arguments import TOPIC_CHOICES, date, metrics_port, positive_float, positive_int, topic_attribute
from llmcf.commands.interface import Subcommands
from llmcf.ports import WORKER_METRICS_PORT
from llmcf.replay import ReplayOptions
from llmcf.settings import Settings
from streams.options import WorkerOptions


def add_replay(sub: Subcommands) -> None:
    p = sub.add_parser(
        "replay",
        help="publish a MovieLens window to the items and interactions topics, in event-time order",
        description="Plays the platforms' part: each movie becomes an `items` event at its first rating, each rating an "
        "`interactions` event (rating >= 4 = positive), published in event-time order by an idempotent producer.",
    )
    p.add_argument("--dataset", choices=["ml-100k", "ml-1m"], default=ReplayOptions.dataset, help="default %(default)s")
    p.add_argument("--limit", type=positive_int, help="publish at most N interactions (plus their items)")
    p.add_argument("--rate", type=positive_float, help="events per second (default: as fast as the broker takes them)")
    p.add_argument("--start", type=date, help="first event time to include (YYYY-MM-DD)")
    p.add_argument("--end", type=date, help="event time to stop before (YYYY-MM-DD)")
    p.add_argument(
        "--timestamps",
        choices=["original", "now"],
        default=ReplayOptions.timestamps,
        help="original: MovieLens times (the default); now: stamp each event with its publish time, so freshness reads as live",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_replay)


def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from llmcf.replay import replay

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


def add_tail(sub: Subcommands) -> None:
    p = sub.add_parser(
        "tail",
        help="print a topic's records from the beginning to its current end (a kcat -C -e for the project's topics)",
        description="Prints `partition:offset key value` per record, partition by partition, and stops at the end.",
    )
    p.add_argument("topic", choices=list(TOPIC_CHOICES))
    p.add_argument("--max", type=positive_int, help="stop after N records")
    p.set_defaults(func=_cmd_tail)


def _cmd_tail(args: argparse.Namespace, settings: Settings) -> int:
    from llmcf.kafka import read_to_end, resolve_bootstrap
    from llmcf.topics import Topics

    topic = getattr(Topics.from_settings(settings), topic_attribute(args.topic))
    shown = 0
    for message in read_to_end(settings, resolve_bootstrap(settings), topic):
        if args.max is not None and shown >= args.max:
            break
        raw_key = message.key()
        key = raw_key.decode(errors="replace") if raw_key is not None else ""
        value = (message.value() or b"").decode(errors="replace")
        print(f"{message.partition()}:{message.offset()} {key} {value}")
        shown += 1
    print(f"{shown:,} records from {topic}", file=sys.stderr)
    return 0


def add_worker(sub: Subcommands) -> None:
    p = sub.add_parser(
        "worker",
        help="run the stream worker: items, interactions and cot-results into storage, CoT requests out",
        description="Consumes `items`, `interactions` and `cot-results` in batches (Faust), persists them to "
        "DATABASE_URL and the vector index, keeps user histories, and publishes CoT requests. Stops on SIGTERM/SIGINT "
        "after finishing the batch in hand.",
    )
    p.add_argument("--metrics-port", type=int,
                   help=f"port of /metrics (default: LLMCF_METRICS_PORT, else {WORKER_METRICS_PORT}; 0 = none)")
    p.add_argument("--batch-size", type=positive_int, default=WorkerOptions.batch_size,
                   help="records per batch at most (default %(default)s)")
    p.add_argument("--batch-within", type=positive_float, default=WorkerOptions.batch_within_s,
                   help="seconds to wait for a batch to fill (default %(default)s)")
    p.add_argument("--web-port", type=positive_int, help="port of Faust's web server (default: no web server)")
    p.add_argument("--item-wait", type=positive_float, default=WorkerOptions.item_wait_s,
                   help="seconds an interaction waits for its item to reach the catalogue before its sample is "
                   "dead-lettered (default %(default)s)")
    p.set_defaults(func=_cmd_worker)


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from streams.app import run_worker

    options = WorkerOptions(
        batch_size=args.batch_size,
        batch_within_s=args.batch_within,
        web_port=args.web_port,
        item_wait_s=args.item_wait,
    )
    return run_worker(settings, options, metrics_port(args, settings, WORKER_METRICS_PORT))
