"""The generation thread's work on one batch: decode the records (bad ones to the dead letters), build the prompts,
call the backend (a failed batch retried request by request, saturation waited out), embed the chains of thought and
hand the `CotResult`s to the publisher; `Pace` is what it measures on the way and the polling thread plans with."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from generators.backends.base import BackendError, BackendSaturated, CotBackend, Generation
from generators.config import PoolConfig
from generators.delivery import BatchDeadLetters, ResultPublisher
from generators.offsets import Ownership
from generators.progress import PoolStats
from generators.prompt import Prompt, build_prompt
from generators.sensor import PoolSensor
from generators.work import Prepared, Work
from llmcf.dead_letters import decode_batch
from llmcf.events import CotRequest, CotResult
from llmcf.retries import backoff_s

if TYPE_CHECKING:
    from llmcf.embeddings import TextEmbedder

log = logging.getLogger(__name__)
_MAX_RETRY_WAIT_S = 30.0  # however many attempts failed, a retry waits no longer than this

MAX_COT_CHARS = 16384  # CotResult.cot_text's limit: a runaway generation is cut, not dead-lettered


@dataclass
class Pace:
    """What the generation thread measures and the polling thread plans with; written by the generation thread only."""

    batch_seconds: float = 0.0  # a batch's turn: generation, embedding, publication (moving average)
    capacity: float = 0.0  # CoTs per second of a batch's turn (moving average)
    saturated_until: float = 0.0  # monotonic: the backend asked for a pause until then

    def measure(self, requests: int, seconds: float) -> None:
        """A batch of `requests` took `seconds` for its whole turn; recent batches weigh most."""
        self.batch_seconds = seconds if not self.batch_seconds else 0.7 * self.batch_seconds + 0.3 * seconds
        rate = requests / max(seconds, 1e-9)
        self.capacity = rate if not self.capacity else 0.7 * self.capacity + 0.3 * rate


@dataclass(frozen=True)
class GenerationFailed:
    """A request that failed `attempts` times alone; `error` is the last failure."""

    error: str
    attempts: int


class Abandoned(Exception):
    """The drain timeout passed during shutdown: the current batch is dropped unfinished (and stays uncommitted)."""


def sleep_unless_abandoned(abandon: threading.Event, seconds: float) -> None:
    """Wait `seconds`, or raise `Abandoned` as soon as `abandon` is set."""
    if abandon.wait(seconds):
        raise Abandoned()


class BatchGenerator:
    """Turns batches of `Work` into published results, on the generation thread (the only user of `backend` and
    `embedder`). Setting `abandon` makes any wait inside raise `Abandoned`."""

    def __init__(self, backend: CotBackend, embedder: TextEmbedder, config: PoolConfig, *, ownership: Ownership,
                 publisher: ResultPublisher, dead_letters: BatchDeadLetters, stats: PoolStats, sensor: PoolSensor,
                 abandon: threading.Event):
        self.backend = backend
        self.embedder = embedder
        self.config = config
        self.pace = Pace()
        self._ownership = ownership
        self._publisher = publisher
        self._dead_letters = dead_letters
        self._stats = stats
        self._sensor = sensor
        self._abandon = abandon

    def process(self, batch: list[Work]) -> None:
        """Generate and publish the batch's owned requests; each `Work` generated is marked so."""
        owned = [work for work in batch if self._ownership.owns(work.record.partition, work.epoch)]
        if len(owned) < len(batch):
            log.info("skipping %d requests of revoked partitions (their new owner handles them)", len(batch) - len(owned))
        policy = self._dead_letters
        policy.batch_letters = []
        prepared = self._prepare(owned)
        if prepared:
            self._sensor.on_batch_started(len(prepared))
            self._stats.batches += 1
        started = time.perf_counter()
        outcomes = self._generate(prepared)
        self._sensor.on_batch_generated(time.perf_counter() - started)
        succeeded = self._dead_letter_failures(prepared, outcomes)
        results = self._results(succeeded)
        self._publisher.deliver(results, policy)
        if prepared:
            # What the budget plans with: a batch's whole turn (generation, embedding, publication).
            self.pace.measure(len(prepared), time.perf_counter() - started)
            self._sensor.on_capacity(self.pace.capacity)
        self._sensor.on_results_delivered(results, [item.request.requested_at for item, _ in succeeded], time.time())
        for item, generation in succeeded:
            self._stats.completion_tokens += generation.completion_tokens
            item.work.generated = True
        self._stats.published += len(results)
        self._stats.dead_lettered += len(policy.batch_letters)

    def _prepare(self, batch: list[Work]) -> list[Prepared]:
        prepared = []
        policy = self._dead_letters
        now, skipped = datetime.now(timezone.utc), 0
        for work in batch:
            decoded = decode_batch(CotRequest, [work.record], policy)
            if not decoded:
                self._sensor.on_request_decoded(ok=False)
                continue
            request = decoded[0]
            try:
                prompt = build_prompt(request)
            except Exception as exc:  # noqa: BLE001 - one unusable request must not stop the stream
                policy(work.record, "processing_failed", f"building the prompt failed: {type(exc).__name__}: {exc}")
                self._sensor.on_request_decoded(ok=False)
                continue
            self._sensor.on_request_decoded(ok=True)
            if self.config.ttl_s and self._too_old(request, now):
                skipped += 1
                continue
            prepared.append(Prepared(work, request, prompt))
        if skipped:
            # Not generated, not an error: the sample stays retrievable with the pending placeholder. The offset is
            # committed with the batch's.
            self._sensor.on_expired_in_queue(skipped)
            self._stats.skipped_in_queue += skipped
            log.info("skipped %d CoT requests that would be older than the TTL (%g s) when generated (a batch takes "
                     "%.1f s): the pool is behind its inflow", skipped, self.config.ttl_s, self.pace.batch_seconds)
        return prepared

    def _too_old(self, request: CotRequest, now: datetime) -> bool:
        """Its result would be published after the TTL: its age plus its own batch's generation time (a recent
        batch's, measured) exceed it."""
        return (now - request.requested_at).total_seconds() + self.pace.batch_seconds > self.config.ttl_s

    def _dead_letter_failures(self, prepared: list[Prepared],
                              outcomes: list[Generation | GenerationFailed]) -> list[tuple[Prepared, Generation]]:
        """The requests that got a generation; the others go to the dead letters."""
        succeeded: list[tuple[Prepared, Generation]] = []
        for item, outcome in zip(prepared, outcomes, strict=True):
            if isinstance(outcome, Generation):
                succeeded.append((item, outcome))
            else:
                self._dead_letters(item.work.record, "retries_exhausted",
                                   f"generation failed {outcome.attempts} times; last error: {outcome.error}")
                self._sensor.on_generation_failed()
        return succeeded

    def _results(self, succeeded: list[tuple[Prepared, Generation]]) -> list[CotResult]:
        """The generations as results, each chain of thought embedded."""
        texts = [generation.text[:MAX_COT_CHARS] for _, generation in succeeded]
        vectors = self.embedder.embed(texts)
        generated_at = datetime.now(timezone.utc)
        return [
            CotResult(
                request_id=item.request.request_id,
                user_id=item.request.user_id,
                item_id=item.request.item_id,
                label=item.request.label,
                ts=item.request.ts,
                cot_text=text,
                cot_embedding=[float(x) for x in vector],
                backend=self.backend.name,
                model=self.backend.model,
                generated_at=generated_at,
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
            )
            for (item, generation), text, vector in zip(succeeded, texts, vectors, strict=True)
        ]

    def _generate(self, prepared: list[Prepared]) -> list[Generation | GenerationFailed]:
        """One outcome per request: the batch in one backend call, then each failed request alone."""
        if not prepared:
            return []
        try:
            generations = self._call_backend([item.prompt for item in prepared])
        except BackendError as exc:
            if len(prepared) == 1:
                return [self._retry_alone(prepared[0], attempts=1, error=str(exc))]
            # A batch failure cannot be pinned on one request, so it costs none of them an attempt.
            log.warning("batch of %d failed (%s); retrying each request alone", len(prepared), exc)
            return [self._retry_alone(item, attempts=0, error=str(exc)) for item in prepared]
        return [
            generation if generation.text.strip() else self._retry_alone(item, attempts=1, error="empty text")
            for item, generation in zip(prepared, generations, strict=True)
        ]

    def _retry_alone(self, item: Prepared, attempts: int, error: str) -> Generation | GenerationFailed:
        while attempts < self.config.max_attempts:
            if attempts:
                sleep_unless_abandoned(self._abandon, backoff_s(attempts, self.config.retry_backoff_s, _MAX_RETRY_WAIT_S))
            attempts += 1
            try:
                [generation] = self._call_backend([item.prompt])
            except BackendError as exc:
                error = str(exc)
                log.warning("request %s failed (attempt %d/%d): %s", item.request.request_id, attempts,
                            self.config.max_attempts, error)
                continue
            if generation.text.strip():
                return generation
            error = "empty text"
        return GenerationFailed(error=error, attempts=attempts)

    def _call_backend(self, prompts: list[Prompt]) -> list[Generation]:
        """`backend.generate`, waiting out saturation (which is backpressure, not a failed attempt)."""
        while True:
            try:
                generations = self.backend.generate(prompts)
            except BackendSaturated as exc:
                wait_s = max(exc.retry_after_s, self.config.retry_backoff_s)
                self.pace.saturated_until = time.monotonic() + wait_s
                log.info("backend saturated (%s): consumption paused, retrying in %.1f s", exc, wait_s)
                sleep_unless_abandoned(self._abandon, wait_s)
                continue
            if len(generations) != len(prompts):
                raise BackendError(f"backend returned {len(generations)} generations for {len(prompts)} prompts")
            return generations
