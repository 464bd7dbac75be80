"""The retry schedule every stage uses: capped exponential backoff (optionally with full jitter).

Who retries what, and how many times, is each caller's own contract (the worker retries a write until it succeeds,
the generator pool a request `max_attempts` times, the OpenAI backend a call `max_retries` times); how long to wait
before the next attempt is decided here.
"""

from __future__ import annotations

import random


def backoff_s(attempt: int, first_s: float, max_s: float) -> float:
    """The wait after failed attempt number `attempt` (1-based): `first_s`, doubling with each failure, at most `max_s`."""
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    return min(max_s, first_s * 2.0 ** min(attempt - 1, 64))


def jittered_backoff_s(attempt: int, first_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, `backoff_s(...)`], so many clients that failed together do not retry together."""
    return (rng or random).uniform(0.0, backoff_s(attempt, first_s, max_s))
