"""Topic names and partition counts, derived from the settings; every producer and consumer takes names from here."""

from __future__ import annotations

from dataclasses import dataclass

from llmcf.settings import Settings


@dataclass(frozen=True)
class TopicSpec:
    """A topic as `llmcf infra up` creates it."""

    name: str
    partitions: int
    replication: int


@dataclass(frozen=True)
class Topics:
    """The five topics of the pipeline, with the deployment's prefix applied."""

    items: str
    interactions: str
    cot_requests: str
    cot_results: str
    dead_letters: str

    @classmethod
    def from_settings(cls, settings: Settings) -> "Topics":
        p = settings.topic_prefix
        return cls(
            items=f"{p}items",
            interactions=f"{p}interactions",
            cot_requests=f"{p}cot-requests",
            cot_results=f"{p}cot-results",
            dead_letters=f"{p}dead-letters",
        )

    def specs(self, settings: Settings) -> list[TopicSpec]:
        """Dead letters get one partition: they are few, and one ordered log is easiest to inspect and replay."""
        n, r = settings.topic_partitions, settings.topic_replication
        return [
            TopicSpec(self.items, n, r),
            TopicSpec(self.interactions, n, r),
            TopicSpec(self.cot_requests, n, r),
            TopicSpec(self.cot_results, n, r),
            TopicSpec(self.dead_letters, 1, r),
        ]
