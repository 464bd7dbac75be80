"""The Prometheus metrics every stage shares; stage-specific ones live beside their stage and use the `llmcf_` prefix."""

from prometheus_client import Counter

DEAD_LETTERS = Counter(
    "llmcf_dead_letters_total",
    "Records sent to the dead-letter topic, by source topic and reason.",
    ["topic", "reason"],
)
