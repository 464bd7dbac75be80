"""Flag values shared by the sub-commands: argparse types that say what is wrong, topic choices, the /metrics port,
the torch threads of CPU-bound commands."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import fields
from datetime import datetime, timezone

from llmcf.settings import Settings
from llmcf.topics import Topics

TOPIC_CHOICES = tuple(field.name.replace("_", "-") for field in fields(Topics))
"""The pipeline's topics as flags name them (without LLMCF_TOPIC_PREFIX): `Topics`' fields, `_` written `-`."""


def number(convert: Callable[[str], float], noun: str, *, zero_allowed: bool) -> Callable[[str], float]:
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


positive_int = number(int, "a whole number", zero_allowed=False)
positive_float = number(float, "a number", zero_allowed=False)
non_negative_int = number(int, "a whole number", zero_allowed=True)
non_negative_float = number(float, "a number", zero_allowed=True)


def date(text: str) -> datetime:
    """An argparse `type` for a date or ISO 8601 timestamp; one without a zone is read as UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (use YYYY-MM-DD or an ISO 8601 timestamp)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def topic_attribute(flag: str) -> str:
    """The `Topics` field a topic flag value (one of `TOPIC_CHOICES`) names."""
    return flag.replace("-", "_")


def metrics_port(args: argparse.Namespace, settings: Settings, default: int) -> int:
    """--metrics-port, else LLMCF_METRICS_PORT, else the command's own default port."""
    if args.metrics_port is not None:
        return int(args.metrics_port)
    return settings.metrics_port if settings.metrics_port is not None else default


THREADS_HELP = "torch threads (pinned; default: the cores free now less one, at least 1: 1 on 2 cores)"


def pin_threads(requested: int | None) -> int:
    """A CPU-bound command's threads, pinned before numpy and torch load: `requested` (`--threads`), else
    `llmcf.threads.free_threads()`. Two threads fighting other work on two cores ran 10-18x slower than one."""
    from llmcf.threads import free_threads, pin_native_threads

    threads = requested or free_threads()
    pin_native_threads(threads)
    return threads
