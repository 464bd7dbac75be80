"""The retry schedule: doubling from the first wait, capped, jitter within the schedule."""

import random

import pytest

from llmcf.retries import backoff_s, jittered_backoff_s


def test_backoff_doubles_from_the_first_wait_up_to_the_cap():
    assert [backoff_s(n, 0.1, 5.0) for n in range(1, 9)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert backoff_s(10_000, 0.5, 30.0) == 30.0  # no overflow after a long outage


def test_attempts_count_from_one():
    with pytest.raises(ValueError, match="start at 1"):
        backoff_s(0, 0.1, 5.0)


def test_jitter_stays_within_the_schedule_and_spreads():
    rng = random.Random(7)
    waits = [jittered_backoff_s(3, 0.5, 10.0, rng) for _ in range(200)]
    assert all(0.0 <= w <= 2.0 for w in waits) and max(waits) - min(waits) > 1.0
