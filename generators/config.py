"""How a generator-pool member is set up and how it gives up: `PoolConfig` (batching, retries, budget, stopping), the
consumer group of a deployment, and `PoolFailure`, the error that stops a member without committing unfinished work."""

from __future__ import annotations

from dataclasses import dataclass

from llmcf.settings import Settings


def group_id(settings: Settings) -> str:
    """The consumer group of every generator process of a deployment (the topic prefix keeps deployments apart)."""
    return f"{settings.topic_prefix}llmcf-generators"


@dataclass(frozen=True)
class PoolConfig:
    """How the pool batches, retries and stops. The defaults are the CLI's."""

    max_batch: int = 16  # requests per batch, but for the transformers backend, which sizes its own batches
    max_wait_ms: int = 200
    max_attempts: int = 3
    max_queued_batches: int = 1  # batches formed ahead of the generation thread: a later one reflects newer priorities
    max_backlog: int = 1000  # requests waiting for a batch (a few MB); the lowest-priority one is skipped beyond it
    retry_backoff_s: float = 0.5
    revoke_grace_s: float = 5.0
    drain_timeout_s: float = 120.0
    flush_timeout_s: float = 30.0
    publish_attempts: int = 3
    ttl_s: float = 0.0  # a request older than this (since requested_at) when its batch comes up is skipped; 0 = never

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_attempts", "max_queued_batches", "publish_attempts", "max_backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("max_wait_ms", "retry_backoff_s", "revoke_grace_s", "drain_timeout_s", "flush_timeout_s", "ttl_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


class PoolFailure(RuntimeError):
    """The pool stopped because it could not go on safely (results undeliverable, embedder or consumer failure).
    Nothing unfinished was committed: a restart resumes from the committed offsets."""
