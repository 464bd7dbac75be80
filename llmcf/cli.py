"""The `llmcf` command line: one entry point for every process and operation.

Each sub-command imports its stage lazily, so `llmcf --help` stays instant and a process loads only what it runs.
Settings come from the environment (`llmcf config` lists them); flags override them for one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone

from llmcf.errors import UserFacingError
from llmcf.settings import SETTINGS, Settings, SettingsError


def _date(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (use YYYY-MM-DD or an ISO 8601 timestamp)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return value


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


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from llmcf.demo import run_demo

    return run_demo(settings, dataset=args.dataset, limit=args.limit)


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

    p = sub.add_parser("demo", help="the main job end to end on the embedded defaults")
    p.add_argument("--dataset", choices=["ml-100k", "ml-1m"], default="ml-100k")
    p.add_argument("--limit", type=_positive_int, default=20_000, help="interactions to replay (default 20000)")
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
