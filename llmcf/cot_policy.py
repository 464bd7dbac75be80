"""Which labelled samples get a chain of thought, and under which request id: a pure function of the interaction and
its item, nothing else. Shared by the stream worker (which asks for the CoTs) and the streaming evaluation (which
replays the worker's choice), so both choose the same samples.

Deterministic on purpose: a re-delivered interaction gets the same decision and the same request id in every process,
and a test can compute, from a replayed window alone, exactly which request ids the worker must produce.

- Cold start first: an interaction on an item younger than the cold-start window (event time: the interaction's `ts`
  minus the item's `created_at`) always gets one, so new items have in-context examples as soon as they are seen.
- Otherwise a uniform sample at `rate` (the paper: 1/10), decided by a hash of the interaction id, not by a random
  draw, so the decision survives redelivery and restarts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from llmcf.settings import Settings

CotReason = Literal["sampled", "cold_start"]

_HASH_SPACE = float(1 << 64)


@dataclass(frozen=True)
class CotPolicy:
    """The sampling rate and the cold-start window (seconds of event time)."""

    rate: float
    cold_start_window_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> "CotPolicy":
        return cls(rate=settings.cot_sample_rate, cold_start_window_s=settings.cold_start_window_s)

    def reason(self, interaction_id: str, ts_ms: int, item_created_ms: int) -> CotReason | None:
        """Why this sample gets a CoT ('cold_start' or 'sampled'), or None when it gets none."""
        if ts_ms - item_created_ms < self.cold_start_window_s * 1000:
            return "cold_start"
        if sample_fraction(interaction_id) < self.rate:
            return "sampled"
        return None


def sample_fraction(interaction_id: str) -> float:
    """A number in [0, 1) fixed by the interaction id, uniform over ids: the sample is drawn iff it is below the rate."""
    digest = hashlib.blake2b(interaction_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _HASH_SPACE


def cot_request_id(interaction_id: str) -> str:
    """The CoT request (and sample, and vector point) id of an interaction: one interaction, one request, ever.
    Equal to `deterministic_id("cot-request", interaction_id)`, spelt out because it runs for every sample."""
    return hashlib.sha256(("cot-request\x1f" + interaction_id).encode()).hexdigest()[:32]
