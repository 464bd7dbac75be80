"""Replaying MovieLens into a real broker, read back record by record; and the CLI as an operator runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from llmcf import kafka
from llmcf.errors import UserFacingError
from llmcf.events import InteractionEvent, ItemEvent, decode
from llmcf.infra import free_port
from llmcf.replay import ReplayOptions, TokenBucket, replay
from llmcf.settings import Settings
from llmcf.topics import Topics


def read_topic(settings: Settings, bootstrap: str, topic: str) -> list[tuple[int, str, bytes]]:
    """Every record of `topic` as (partition, key, value), read up to each partition's end."""
    return [(m.partition(), m.key().decode(), m.value()) for m in kafka.read_to_end(settings, bootstrap, topic)]


def check_published(settings: Settings, bootstrap: str, interactions_expected: int) -> None:
    """The contract of a replay, checked on what the topics hold."""
    topics = Topics.from_settings(settings)
    item_records = read_topic(settings, bootstrap, topics.items)
    interaction_records = read_topic(settings, bootstrap, topics.interactions)
    assert len(interaction_records) == interactions_expected

    items = [(p, key, decode(ItemEvent, value)) for p, key, value in item_records]
    interactions = [(p, key, decode(InteractionEvent, value)) for p, key, value in interaction_records]
    assert all(key == event.item_id for _, key, event in items)
    assert all(key == event.user_id for _, key, event in interactions)
    rated = {event.item_id for _, _, event in interactions}
    assert {event.item_id for _, _, event in items} == rated and len(items) == len(rated)

    last_time: dict[tuple[int, str], datetime] = {}
    for partition, key, event in interactions:
        assert last_time.setdefault((partition, key), event.ts) <= event.ts, f"user {key} out of order"
        last_time[(partition, key)] = event.ts

    created = {event.item_id: event.created_at for _, _, event in items}
    first_rating: dict[str, datetime] = {}
    for _, _, event in interactions:
        first_rating[event.item_id] = min(first_rating.get(event.item_id, event.ts), event.ts)
    assert all(created[item] <= first_rating[item] for item in rated)


def test_replay_publishes_a_window_in_order(kafka_settings, kafka_broker):
    summary = replay(kafka_settings, ReplayOptions(dataset="ml-100k", limit=5_000, progress=False))
    assert summary.interactions == 5_000 and not summary.interrupted
    assert 0 < summary.positives < 5_000
    assert summary.first_event_at <= summary.last_event_at
    check_published(kafka_settings, kafka_broker, 5_000)
    assert summary.items == len(read_topic(kafka_settings, kafka_broker, Topics.from_settings(kafka_settings).items))
    text = summary.render()
    assert "5,000 interactions" in text and kafka_broker in text


def test_now_timestamps_are_publish_times_in_order(kafka_settings, kafka_broker):
    before = datetime.now().astimezone()
    summary = replay(kafka_settings, ReplayOptions(dataset="ml-100k", limit=300, timestamps="now", progress=False))
    assert before <= summary.first_event_at <= summary.last_event_at <= datetime.now().astimezone()
    check_published(kafka_settings, kafka_broker, 300)


def test_rate_limit_is_respected(kafka_settings):
    summary = replay(kafka_settings, ReplayOptions(dataset="ml-100k", limit=400, rate=1_000, progress=False))
    assert summary.events >= 500  # 400 interactions and their items
    # Not faster than the rate (the token bucket's own test checks its pace exactly); a busy machine may be slower.
    assert summary.duration_s >= summary.events / 1_000 * 0.8


class FakeClock:
    """`monotonic` and `sleep` on a clock of its own. A sleep lasts at least a microsecond, as a real one does (the
    timer's slack), and overshoots by `overshoot_s`, as a busy machine's does."""

    def __init__(self, overshoot_s: float = 0.0):
        self.now = 1_000.0
        self.overshoot_s = overshoot_s

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 1e-6) + self.overshoot_s


@pytest.mark.parametrize("rate", [1_000.0, 20_000.0])
@pytest.mark.parametrize("overshoot_s", [0.0, 0.004])
def test_token_bucket_holds_its_rate(rate, overshoot_s):
    """Half a second of tokens takes half a second, also when every sleep oversleeps: the bucket pays it back."""
    clock = FakeClock(overshoot_s)
    bucket = TokenBucket(rate, clock=clock.monotonic)
    count = int(rate * 0.5)
    for _ in range(count):
        bucket.wait(clock.sleep)
    elapsed = clock.now - 1_000.0
    assert 0.5 - 1 / rate - bucket.capacity / rate <= elapsed <= 0.5 + overshoot_s + 2 / rate, elapsed


def test_cli_infra_up_replay_down(tmp_path):
    """The operator's path: `llmcf infra up`, `llmcf replay`, `llmcf infra status`, `llmcf infra down`."""
    llmcf = Path(sys.executable).with_name("llmcf")
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "LLMCF_"))},
        "LLMCF_HOME": str(tmp_path / "home"),
        "LLMCF_BROKER_PORT": str(free_port()),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(llmcf), *args], env=environ, capture_output=True, text=True, timeout=120)

    up = run("infra", "up")
    try:
        assert up.returncode == 0, up.stderr
        assert f"broker: 127.0.0.1:{environ['LLMCF_BROKER_PORT']} (embedded)" in up.stdout
        assert up.stdout.count("topic:") == 5

        replayed = run("replay", "--dataset", "ml-100k", "--limit", "5000", "--quiet")
        assert replayed.returncode == 0, replayed.stderr
        assert "5,000 interactions" in replayed.stdout
        assert "replay ml-100k" not in replayed.stderr  # --quiet: no progress bar

        assert run("infra", "status").returncode == 0
        tailed = run("tail", "interactions", "--max", "3")
        assert tailed.returncode == 0, tailed.stderr
        lines = tailed.stdout.splitlines()
        assert len(lines) == 3 and "3 records from interactions" in tailed.stderr
        position, key, value = lines[0].split(" ", 2)
        assert decode(InteractionEvent, value.encode()).user_id == key
        settings = Settings.from_env(environ)
        check_published(settings, kafka.resolve_bootstrap(settings), 5_000)
    finally:
        down = run("infra", "down")
    assert down.returncode == 0 and "broker stopped" in down.stdout
    status = run("infra", "status")
    assert status.returncode == 1 and '"reachable": false' in status.stdout
    failed = run("replay", "--limit", "10", "--quiet")
    assert failed.returncode == 1 and "llmcf infra up" in failed.stderr


def test_failed_deliveries_fail_the_replay_loudly(tmp_path, monkeypatch):
    """A broker that never takes the records: delivery reports fail, and replay says so instead of returning."""
    dead = f"127.0.0.1:{free_port()}"
    settings = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": dead, "LLMCF_HOME": str(tmp_path)})
    monkeypatch.setattr(kafka, "ensure_topics", lambda settings, bootstrap: [])
    impatient = kafka.producer_config
    monkeypatch.setattr(
        kafka, "producer_config", lambda *args: {**impatient(*args), "message.timeout.ms": 1000}
    )
    with pytest.raises(UserFacingError, match=rf"were not delivered to {dead}"):
        replay(settings, ReplayOptions(dataset="ml-100k", limit=50, progress=False))


def test_resumed_replay_publishes_the_rest_with_the_same_identities(kafka_settings, kafka_broker):
    """A replay stopped at a checkpoint and resumed from it publishes every event at least once, each restamped
    interaction keeping the id it would have had, so consumers store each rating once."""
    checkpoints: list[int] = []
    first = replay(kafka_settings, ReplayOptions(dataset="ml-100k", limit=300, timestamps="now", progress=False,
                                                 checkpoint_every=100, on_checkpoint=checkpoints.append))
    assert checkpoints[-1] == first.events and checkpoints[:-1] == list(range(100, first.events, 100))

    resumed_at = checkpoints[1]
    second = replay(kafka_settings, ReplayOptions(dataset="ml-100k", limit=300, timestamps="now", progress=False,
                                                  skip=resumed_at))
    assert second.events == first.events - resumed_at

    topics = Topics.from_settings(kafka_settings)
    published = [decode(InteractionEvent, value) for _, _, value in read_topic(kafka_settings, kafka_broker, topics.interactions)]
    ids = [event.interaction_id for event in published]
    original_ids = {event.interaction_id for event in replay_window_interactions(300)}
    assert set(ids) == original_ids
    assert len(ids) == len(original_ids) + second.interactions


def replay_window_interactions(limit: int) -> list[InteractionEvent]:
    from llmcf import movielens

    return [event for event in movielens.events("ml-100k", limit=limit) if isinstance(event, InteractionEvent)]
