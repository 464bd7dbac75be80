"""`llmcf config`, `schemas`, `infra` and `db`: inspecting the settings and contracts, preparing broker and database."""

from __future__ import annotations

import argparse
import json

from llmcf.commands.arguments import TOPIC_CHOICES
from llmcf.commands.interface import Subcommands
from llmcf.settings import SETTINGS, Settings


def add_config(sub: Subcommands) -> None:
    p = sub.add_parser("config", help="print the effective settings (secrets masked)")
    p.add_argument("--catalogue", action="store_true", help="also list every environment variable with its meaning")
    p.set_defaults(func=_cmd_config)


def _cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    width = max(len(name) for name, _ in settings.describe())
    for name, value in settings.describe():
        print(f"{name:<{width}}  {value}")
    if args.catalogue:
        print()
        for s in SETTINGS:
            print(f"{s.env}  (default: {s.default if s.default is not None else 'unset'})\n    {s.help}")
    return 0


def add_schemas(sub: Subcommands) -> None:
    p = sub.add_parser("schemas", help="print the JSON Schemas of the topics' event contracts")
    p.add_argument("--topic", choices=list(TOPIC_CHOICES))
    p.set_defaults(func=_cmd_schemas)


def _cmd_schemas(args: argparse.Namespace, settings: Settings) -> int:
    from llmcf.events import CONTRACTS

    schemas = {topic: model.model_json_schema() for topic, model in CONTRACTS.items()}
    if args.topic:
        schemas = {args.topic: schemas[args.topic]}
    print(json.dumps(schemas, indent=2))
    return 0


def add_infra(sub: Subcommands) -> None:
    p = sub.add_parser(
        "infra",
        help="start, stop or inspect the embedded broker and ensure the topics",
        description="`up` starts the embedded Tansu broker on 127.0.0.1:$LLMCF_BROKER_PORT (or, when "
        "KAFKA_BOOTSTRAP_SERVERS is set, starts nothing) and creates the topics; `down` stops it; `status` reports it.",
    )
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=_cmd_infra)


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
    report = broker.status(settings)
    print(json.dumps(report, indent=2, default=str))
    return 0 if report.get("reachable") else 1


def add_db(sub: Subcommands) -> None:
    p = sub.add_parser("db", help="apply or inspect the database migrations (DATABASE_URL)")
    p.add_argument("action", choices=["upgrade", "downgrade", "current"])
    p.add_argument("revision", nargs="?", help="target revision (upgrade: default head; downgrade: default -1, or base)")
    p.add_argument("--database-url", help="override DATABASE_URL for this run")
    p.set_defaults(func=_cmd_db)


def _cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    import migrations

    url = args.database_url or settings.database_url
    if args.action == "upgrade":
        migrations.upgrade(url, args.revision or "head")
    elif args.action == "downgrade":
        migrations.downgrade(url, args.revision or "-1")
    print(f"database revision: {migrations.current(url) or 'empty'}")
    return 0
