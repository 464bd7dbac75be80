"""What every sub-command provides: a builder that adds its parser, and the handler `llmcf.cli.main` runs."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Protocol, TypeAlias

if TYPE_CHECKING:
    from llmcf.settings import Settings

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""The `add_subparsers()` action of the top-level parser, which each builder adds its command to."""


class Handler(Protocol):
    """Runs one sub-command with its parsed flags; returns the process's exit status."""

    def __call__(self, args: argparse.Namespace, settings: Settings, /) -> int: ...


class Builder(Protocol):
    """Adds one sub-command's parser to `sub`, with its handler set as the parser's `func` default."""

    def __call__(self, sub: Subcommands, /) -> None: ...
