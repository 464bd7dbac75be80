"""The command line's shared pieces: flag types, topic choices, the /metrics port, and the commands it lists."""

from __future__ import annotations

import argparse
import dataclasses
from datetime import datetime, timezone

import pytest

from llmcf.cli import build_parser
from llmcf.commands.arguments import (
    TOPIC_CHOICES,
    date,
    metrics_port,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    topic_attribute,
)
from llmcf.settings import Settings
from llmcf.topics import Topics


def test_number_types_accept_their_range_and_name_what_is_wrong():
    assert positive_int("3") == 3 and positive_float("0.5") == 0.5
    assert non_negative_int("0") == 0 and non_negative_float("0") == 0.0
    for parse, text, message in ((positive_int, "0", "0 must be greater than 0"),
                                 (non_negative_float, "-1", "-1.0 must not be negative"),
                                 (positive_int, "1.5", "'1.5' is not a whole number"),
                                 (positive_float, "x", "'x' is not a number")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)


def test_dates_without_a_zone_are_utc_and_bad_ones_say_how_to_write_them():
    assert date("2024-05-01") == datetime(2024, 5, 1, tzinfo=timezone.utc)
    assert date("2024-05-01T12:00:00+02:00").utcoffset().total_seconds() == 7200
    with pytest.raises(argparse.ArgumentTypeError, match="YYYY-MM-DD"):
        date("May 1st")


def test_topic_choices_are_the_pipelines_topics_and_name_their_fields():
    topics = Topics.from_settings(Settings.from_env({}))
    assert TOPIC_CHOICES == ("items", "interactions", "cot-requests", "cot-results", "dead-letters")
    assert [getattr(topics, topic_attribute(choice)) for choice in TOPIC_CHOICES] == list(dataclasses.astuple(topics))


def test_the_metrics_port_is_the_flag_else_the_setting_else_the_commands_default():
    unset, set_to_9200 = Settings.from_env({}), Settings.from_env({"LLMCF_METRICS_PORT": "9200"})
    assert metrics_port(argparse.Namespace(metrics_port=0), set_to_9200, 9101) == 0
    assert metrics_port(argparse.Namespace(metrics_port=None), set_to_9200, 9101) == 9200
    assert metrics_port(argparse.Namespace(metrics_port=None), unset, 9101) == 9101


def test_every_command_is_listed_once_in_the_help_order_and_has_a_handler():
    parser = build_parser()
    sub = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    assert list(sub.choices) == ["config", "schemas", "infra", "db", "replay", "tail", "generate", "cots", "worker",
                                 "train", "update", "evaluate", "tune", "serve", "demo"]
    for name, command in sub.choices.items():
        assert callable(command.get_default("func")), name


def test_the_weight_type_choices_are_the_backends():
    from generators.backends.model_loading import DTYPES
    from llmcf.commands.generation import WEIGHT_TYPES

    assert WEIGHT_TYPES == DTYPES


def test_flag_defaults_are_the_options_defaults():
    """A flag that states a default states its options class's (None means: taken from the settings or the options)."""
    import argparse
    import dataclasses

    from generators.config import PoolConfig
    from generators.service import GenerateOptions
    from llmcf.cli import build_parser
    from llmcf.demo import DemoOptions
    from llmcf.replay import ReplayOptions
    from ranker.evaluation_options import EvaluationOptions
    from ranker.llm_cots import WriteOptions
    from ranker.options import FitOptions, TrainOptions, UpdateOptions
    from ranker.serving.server import ServeOptions
    from streams.options import WorkerOptions

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    options = {"train": [TrainOptions, FitOptions], "update": [UpdateOptions], "cots": [WriteOptions], "serve": [ServeOptions],
               "generate": [GenerateOptions, PoolConfig], "replay": [ReplayOptions], "worker": [WorkerOptions],
               "demo": [DemoOptions], "evaluate": [EvaluationOptions]}
    compared, drifted = 0, []
    for command, classes in options.items():
        for cls in classes:
            defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
            for action in commands[command]._actions:
                if action.dest in defaults and action.default is not None:
                    stated = tuple(action.default) if isinstance(action.default, list) else action.default
                    compared += 1
                    if stated != defaults[action.dest]:
                        drifted.append(f"llmcf {command} {action.option_strings[0]}: {stated!r} vs "
                                       f"{cls.__name__}.{action.dest} = {defaults[action.dest]!r}")
    assert not drifted, drifted
    assert compared >= 25, "the flags no longer map onto the options classes by name: this test checks nothing"
