"""The ranker server's Prometheus metrics (names are a contract: the Grafana dashboard is built on them).

Process-wide, like every prometheus_client metric: one server per process. Latency buckets are fine around the 30 ms
SLO of `/v1/rank` (100 candidates) and still show a stall of seconds.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from llmcf.metrics import FRESHNESS_BUCKETS

LATENCY_BUCKETS = (0.002, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25,
                   0.5, 1.0, 2.5, 5.0)
CANDIDATE_BUCKETS = (1, 5, 10, 20, 50, 100, 200, 300, 500, 750, 1000)

REQUESTS = Counter("llmcf_ranker_requests_total", "`/v1/rank` requests answered, by HTTP status code.", ["status"])
REQUEST_SECONDS = Histogram("llmcf_ranker_request_seconds", "`/v1/rank` latency, from the request's arrival to its answer.",
                            buckets=LATENCY_BUCKETS)
CANDIDATES = Histogram("llmcf_ranker_candidates", "Candidates per scored `/v1/rank` request.", buckets=CANDIDATE_BUCKETS)
EXAMPLE_AGE = Histogram("llmcf_ranker_example_age_seconds",
                        "Event-time age (now - ts) of the freshest in-context example used, per scored request.",
                        buckets=FRESHNESS_BUCKETS)
EXAMPLES = Counter("llmcf_ranker_examples_total",
                   "In-context examples served, by their CoT: llm (written by a language model), template (the "
                   "non-LLM fallback) or pending (not written yet: the placeholder token). llm / all = CoT coverage.",
                   ["cot"])
MODEL_AGE = Gauge("llmcf_ranker_model_age_seconds", "Seconds since the serving model version was created (0 when none).")
MODEL_INFO = Gauge("llmcf_ranker_model_info", "1 for the model version this process serves.", ["version", "kind"])
MODEL_SWAPS = Counter("llmcf_ranker_model_swaps_total", "Model version loads: ok (swapped in) or failed (old model kept).",
                      ["outcome"])
SHED = Counter("llmcf_ranker_shed_total", "Requests refused with 503 to keep latency bounded, by reason.", ["reason"])
INFLIGHT = Gauge("llmcf_ranker_inflight", "`/v1/rank` requests being scored now.")
LOOP_LAG = Gauge("llmcf_ranker_loop_lag_seconds", "How late the server's event loop ran its last 20-ms probe (queueing in "
                 "the loop: over LLMCF_RANKER_MAX_WAIT_MS, new requests are shed).")
POOL_SYNC_LAG = Histogram("llmcf_ranker_pool_sync_lag_seconds",
                          "Seconds from a CoT sample's storage (or its CoT's) to its arrival in the ranker's example pool.",
                          buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0))
POOL_SYNC_FAILURES = Counter("llmcf_ranker_pool_sync_failures_total", "Failed syncs of the ranker's example pool (retried).")
POOL_SAMPLES = Gauge("llmcf_ranker_pool_samples", "CoT samples in the ranker's in-memory example pool.")
