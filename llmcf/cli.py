"""The `llmcf` command line: one entry point for every process and operation.

This module owns the top-level parser and `main`; each sub-command's parser and handler live in `llmcf.commands`.
Each sub-command imports its stage lazily, so `llmcf --help` stays instant and a process loads only what it runs.
Settings come from the environment (`llmcf config` lists them); flags override them for one run.
"""

from __future__ import annotations

import argparse
import logging
import sys

from llmcf.commands import admin, generation, serving, stream, training
from llmcf.commands.interface import Builder, Handler
from llmcf.errors import UserFacingError
from llmcf.settings import Settings, SettingsError

COMMANDS: tuple[Builder, ...] = (
    admin.add_config, admin.add_schemas, admin.add_infra, admin.add_db,
    stream.add_replay, stream.add_tail,
    generation.add_generate, generation.add_cots,
    stream.add_worker,
    training.add_train, training.add_update, training.add_evaluate, training.add_tune,
    serving.add_serve, serving.add_demo,
)
"""Every sub-command's builder, in the order `llmcf --help` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmcf",
        description="LLM-CF kept fresh in near real time. Settings come from environment variables: see `llmcf config`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(sub)
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
    handler: Handler = args.func
    try:
        return handler(args, settings)
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
