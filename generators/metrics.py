"""Prometheus metrics of the generator pool (the shared ones, freshness and consumer lag, live in `llmcf.metrics`).

Read them as: CoTs/s = rate(llmcf_generator_cots_total{outcome="ok"}), tokens/s =
rate(llmcf_generator_tokens_total{kind="completion"}); a pool that keeps `llmcf_generator_paused` at 1 is limited by its
backend, not by Kafka.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# From one request to a large GPU batch.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# A template batch takes milliseconds, a CPU LLM batch minutes.
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)

BATCH_SIZE = Histogram(
    "llmcf_generator_batch_size",
    "Requests per batch handed to the generation thread.",
    buckets=BATCH_SIZE_BUCKETS,
)
BATCH_SECONDS = Histogram(
    "llmcf_generator_batch_seconds",
    "Wall time of one batch's generation (backend calls, retries and backpressure waits included), by backend.",
    ["backend"],
    buckets=SECONDS_BUCKETS,
)
TOKENS = Counter(
    "llmcf_generator_tokens_total",
    "Tokens processed by the backend, by backend and kind (prompt, completion); rate() of completion = tokens/s.",
    ["backend", "kind"],
)
COTS = Counter(
    "llmcf_generator_cots_total",
    "Requests finished by the pool, by backend and outcome (ok = result published; not generated: skipped_ttl = "
    "would be older than LLMCF_COT_TTL_S, skipped_backlog = ranked last in a full backlog (LLMCF_COT_MAX_BACKLOG), "
    "skipped_duplicate = its sample is generating or was generated; retries_exhausted = dead-lettered).",
    ["backend", "outcome"],
)
QUEUE_DEPTH = Gauge(
    "llmcf_generator_queue_depth",
    "Requests consumed and not yet finished: in the backlog, queued for generation, or generating.",
)
BACKLOG = Gauge(
    "llmcf_generator_backlog",
    "Requests waiting in the backlog for a batch (at most LLMCF_COT_MAX_BACKLOG).",
)
CAPACITY = Gauge(
    "llmcf_generator_capacity_cots_per_second",
    "CoTs per second of a batch's turn (generation, embedding, publication) over recent batches: what the member "
    "writes when its backlog never empties.",
)
REQUEST_LATENCY = Histogram(
    "llmcf_generator_request_latency_seconds",
    "From a request's requested_at to its result being published on cot-results.",
    buckets=SECONDS_BUCKETS,
)
PAUSED = Gauge(
    "llmcf_generator_paused",
    "1 while the pool has paused consumption (backend saturated), else 0.",
)
PAUSES = Counter(
    "llmcf_generator_pauses_total",
    "Times the pool paused consumption, by reason (backend_saturated).",
    ["reason"],
)
DRAFT_TOKENS = Counter(
    "llmcf_generator_draft_tokens_total",
    "Speculative decoding (transformers on CPU, --draft-tokens): draft tokens proposed and accepted; "
    "accepted / proposed = acceptance rate.",
    ["outcome"],
)
DECODE_PASSES = Counter(
    "llmcf_generator_decode_passes_total",
    "Per-sequence decoding passes and the tokens they emitted (kind = passes, tokens); tokens / passes = tokens per "
    "forward pass (1 without drafts).",
    ["kind"],
)
