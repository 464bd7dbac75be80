"""The generator pool's backlog on its own: priority order, the bound, duplicates, the TTL sweep, revokes."""

from __future__ import annotations

from datetime import timedelta

import pytest

from generators.backlog import Backlog
from llmcf.events import CotRequest
from tests.generators import NOW, make_request


def request(request_id: str, *, minutes: int = 0, cold: bool = False, requested_ago_s: float = 0.0) -> CotRequest:
    """A request whose event time is `minutes` after NOW, requested `requested_ago_s` before NOW."""
    return make_request(request_id=request_id, requested_at=NOW - timedelta(seconds=requested_ago_s)).model_copy(
        update={"ts": NOW + timedelta(minutes=minutes), "reason": "cold_start" if cold else "sampled"})


def test_requests_come_out_undecodable_first_then_cold_start_then_newest_event_time():
    backlog: Backlog[str] = Backlog(capacity=10)
    for name, offered in [("old", request("old", minutes=1)), ("cold-old", request("cold-old", minutes=0, cold=True)),
                          ("new", request("new", minutes=9)), ("bad", None), ("mid", request("mid", minutes=5)),
                          ("cold-new", request("cold-new", minutes=8, cold=True)), ("mid-later", request("mid2", minutes=5))]:
        assert backlog.offer(name, offered, now_s=0.0) == []
    assert backlog.take(3) == ["bad", "cold-new", "cold-old"]
    assert backlog.take(10) == ["new", "mid", "mid-later", "old"]  # equal event times: arrival order
    assert len(backlog) == 0


def test_a_full_backlog_skips_whatever_ranks_last_the_newcomer_or_the_one_it_displaces():
    backlog: Backlog[str] = Backlog(capacity=2)
    backlog.offer("a", request("a", minutes=5), now_s=0.0)
    backlog.offer("b", request("b", minutes=3), now_s=0.0)
    assert backlog.offer("older", request("older", minutes=1), now_s=0.0) == [("older", "backlog_full")]
    assert backlog.offer("cold", request("cold", minutes=0, cold=True), now_s=0.0) == [("b", "backlog_full")]
    assert len(backlog) == 2
    # the displaced request's id is free again: a later copy is not a duplicate
    assert backlog.offer("b again", request("b", minutes=9), now_s=0.0) == [("a", "backlog_full")]
    assert backlog.take(5) == ["cold", "b again"]


def test_a_request_waiting_in_flight_or_generated_is_a_duplicate_but_one_not_generated_is_not():
    backlog: Backlog[str] = Backlog(capacity=10, remember=2)
    backlog.offer("x", request("x"), now_s=0.0)
    assert backlog.offer("x2", request("x"), now_s=0.0) == [("x2", "duplicate")]  # waiting
    assert backlog.take(1) == ["x"]
    assert backlog.offer("x3", request("x"), now_s=0.0) == [("x3", "duplicate")]  # in flight
    backlog.finished("x", generated=True)
    assert backlog.offer("x4", request("x"), now_s=0.0) == [("x4", "duplicate")]  # generated
    backlog.offer("y", request("y"), now_s=0.0)
    backlog.take(1)
    backlog.finished("y", generated=False)  # dead-lettered or skipped in the queue: a new copy may try again
    assert backlog.offer("y2", request("y"), now_s=0.0) == []
    for name in ("p", "q"):  # only the last `remember` generated ids are remembered
        backlog.offer(name, request(name), now_s=0.0)
        backlog.take(5)
        backlog.finished(name, generated=True)
    assert backlog.offer("x5", request("x"), now_s=0.0) == []


def test_the_ttl_sweep_skips_the_requests_that_would_be_published_too_late_at_their_position():
    backlog: Backlog[str] = Backlog(capacity=10)
    backlog.offer("fresh-low", request("fresh-low", minutes=0, requested_ago_s=0), now_s=0.0)
    backlog.offer("aged-high", request("aged-high", minutes=9, requested_ago_s=50), now_s=0.0)
    backlog.offer("aged-low", request("aged-low", minutes=1, requested_ago_s=50), now_s=0.0)
    backlog.offer("bad", None, now_s=0.0)  # never expires: the generation thread dead-letters it
    # positions 0..3 = bad, aged-high, aged-low, fresh-low; each position publishes 5 s later than the one before
    expired = backlog.expire(NOW.timestamp(), ttl_s=60, publish_after_s=lambda position: 5.0 * (position + 1))
    assert expired == ["aged-low"]  # 50 + 15 > 60, while aged-high (50 + 10) and fresh-low (0 + 20) make it
    assert backlog.take(5) == ["bad", "aged-high", "fresh-low"]


def test_remove_drops_waiting_requests_without_a_reason_and_frees_their_ids():
    backlog: Backlog[tuple[int, str]] = Backlog(capacity=10)
    for partition, name in [(0, "a"), (1, "b"), (0, "c")]:
        backlog.offer((partition, name), request(name), now_s=float(partition))
    assert backlog.oldest_arrival_s() == 0.0
    assert sorted(backlog.remove(lambda item: item[0] == 0)) == [(0, "a"), (0, "c")]
    assert backlog.oldest_arrival_s() == 1.0
    assert backlog.offer((2, "a"), request("a"), now_s=2.0) == []
    assert len(backlog) == 2


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        Backlog(capacity=0)
