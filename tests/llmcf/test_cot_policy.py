"""The CoT decision: deterministic, cold start first, sampling at the configured rate."""

from __future__ import annotations

from llmcf.cot_policy import CotPolicy, cot_request_id, sample_fraction
from llmcf.events import deterministic_id

DAY_MS = 86_400_000


def test_interactions_on_new_items_always_get_a_cot() -> None:
    policy = CotPolicy(rate=0.0, cold_start_window_s=86_400)
    assert policy.reason("i1", ts_ms=10 * DAY_MS, item_created_ms=10 * DAY_MS - 1) == "cold_start"
    assert policy.reason("i1", ts_ms=10 * DAY_MS, item_created_ms=9 * DAY_MS) is None  # exactly one day old


def test_sampling_is_a_function_of_the_interaction_id_at_the_configured_rate() -> None:
    policy = CotPolicy(rate=0.1, cold_start_window_s=0)
    ids = [f"interaction-{n}" for n in range(20_000)]
    decisions = [policy.reason(i, ts_ms=DAY_MS, item_created_ms=0) for i in ids]
    assert decisions == [policy.reason(i, ts_ms=DAY_MS, item_created_ms=0) for i in ids]  # same answer every time
    share = sum(d == "sampled" for d in decisions) / len(ids)
    assert 0.09 < share < 0.11
    assert all(0.0 <= sample_fraction(i) < 1.0 for i in ids[:100])


def test_rate_bounds() -> None:
    assert CotPolicy(rate=1.0, cold_start_window_s=0).reason("x", DAY_MS, 0) == "sampled"
    assert CotPolicy(rate=0.0, cold_start_window_s=0).reason("x", DAY_MS, 0) is None


def test_request_ids_are_deterministic_and_distinct() -> None:
    assert cot_request_id("a") == cot_request_id("a")
    assert cot_request_id("a") != cot_request_id("b")


def test_request_ids_are_the_deterministic_ids_of_the_interactions() -> None:
    for interaction_id in ("a", "e-1", "ü\x1f", "0" * 128):
        assert cot_request_id(interaction_id) == deterministic_id("cot-request", interaction_id)
