"""ExampleRetriever over a real Qdrant Edge shard: balanced 2+2, no leakage, batching and caching, pending CoTs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llmcf.samples import SAMPLE_DIMENSION, encode_history, sample_vector
from ranker.features import FeatureSpace, gather_examples
from ranker.retrieval import ExampleQuery, ExampleRetriever
from storage.vectors import Point
from storage.vectors.edge import EdgeIndex

DIM = 384
NOW = 1_700_000_000_000


def direction(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


ITEMS = {f"i{n}": direction(n) for n in range(10)}
TASTE = direction(100)


def point(key: str, user: str, item: str, label: int, ts: int, generated: bool = True, taste: np.ndarray = TASTE) -> Point:
    history = np.stack([taste, ITEMS["i0"]])
    payload: dict = {"user_id": user, "item_id": item, "label": label, "ts": ts, "status": "pending", "history": encode_history(["i0"])}
    if generated:
        payload |= {"status": "generated", "cot_embedding": direction(hash(key) % 1000).tolist()}
    return Point(key, sample_vector(history, ITEMS[item]), payload)


def query(user: str, item: str, ts: int = NOW, exclude: str | None = None) -> ExampleQuery:
    h = TASTE + ITEMS["i0"]
    return ExampleQuery(user, item, ts, (h / np.linalg.norm(h)).astype(np.float32), ITEMS[item], exclude)


@pytest.fixture
def index(tmp_path: Path) -> Iterator[EdgeIndex]:
    with EdgeIndex(tmp_path / "shard", SAMPLE_DIMENSION) as shard:
        yield shard


def test_two_positives_and_two_negatives_nearest_first_then_shuffled(index: EdgeIndex) -> None:
    index.upsert([point(f"p{n}", f"u{n}", f"i{n % 3}", n % 2, NOW - 1000 * n) for n in range(40)])
    retriever = ExampleRetriever(index)

    found = retriever.retrieve([query("me", "i1"), query("me", "i2")])

    assert found.slots.shape == (2, 4)
    for row in range(2):
        labels = sorted(found.records[i].label for i in found.slots[row])
        assert labels == [0, 0, 1, 1]
    # the nearest by the full similarity share the target item
    assert {found.records[i].item_id for i in found.slots[0]} == {"i1"}
    assert {found.records[i].item_id for i in found.slots[1]} == {"i2"}
    again = ExampleRetriever(index).retrieve([query("me", "i1"), query("me", "i2")])
    assert [[r.key for r in again.records]] == [[r.key for r in found.records]]
    np.testing.assert_array_equal(again.slots, found.slots)


def test_never_the_sample_itself_nor_the_same_user_later(index: EdgeIndex) -> None:
    index.upsert(
        [point("self", "me", "i1", 1, NOW), point("me-later-pos", "me", "i1", 1, NOW + 1),
         point("me-later-neg", "me", "i1", 0, NOW + 5), point("me-earlier", "me", "i1", 1, NOW - 5)]
        + [point(f"other{n}", f"u{n}", "i1", n % 2, NOW + 10_000, taste=direction(200)) for n in range(6)]
    )

    found = ExampleRetriever(index).retrieve([query("me", "i1", ts=NOW, exclude="self")])

    keys = {found.records[i].key for i in found.slots[0] if i >= 0}
    assert "self" not in keys and "me-later-pos" not in keys and "me-later-neg" not in keys
    assert "me-earlier" in keys  # the same user's past is allowed; other users' later samples too (as in LLM-CF)
    assert sorted(found.records[i].label for i in found.slots[0]) == [0, 0, 1, 1]


def test_missing_examples_are_empty_slots(index: EdgeIndex) -> None:
    index.upsert([point("only-positive", "u1", "i1", 1, NOW - 1)])

    found = ExampleRetriever(index).retrieve([query("me", "i1")])

    assert sorted(found.slots[0].tolist()) == [-1, -1, -1, 0]
    space = FeatureSpace.build(["u1"], ["i1"], ITEMS["i1"][None], [("drama",)])
    examples = gather_examples(space.encode_examples(found.records), found.slots)
    assert examples["ex_present"].sum() == 1.0
    assert examples["ex_item"][found.slots == 0].tolist() == [1]


def test_pending_examples_have_no_cot_and_details_are_read_for_the_picked(index: EdgeIndex) -> None:
    index.upsert([point("pending", "u1", "i1", 1, NOW - 1, generated=False), point("ready", "u2", "i1", 0, NOW - 2)])

    found = ExampleRetriever(index).retrieve([query("me", "i1")])

    by_key = {r.key: r for r in found.records}
    assert by_key["pending"].cot is None and not by_key["pending"].generated
    assert by_key["ready"].cot is not None and by_key["ready"].cot.shape == (DIM,)
    assert by_key["ready"].history == ("i0",)
    pool = FeatureSpace.build([], ["i0"], ITEMS["i0"][None], [()]).encode_examples(found.records)
    assert sorted(pool.cot_ready.tolist()) == [0.0, 1.0]
    # the CoT lands later: the next retrieval sees it
    index.set_payload({"pending": {"status": "generated", "cot_embedding": direction(7).tolist()}})
    later = {r.key: r for r in ExampleRetriever(index).retrieve([query("me", "i1")]).records}
    np.testing.assert_allclose(later["pending"].cot, direction(7), atol=1e-6)


def test_one_request_costs_two_history_queries_plus_one_per_uncached_item(index: EdgeIndex) -> None:
    index.upsert([point(f"p{n}", f"u{n}", f"i{n % 10}", n % 2, NOW - n) for n in range(200)])
    clock = [0.0]
    retriever = ExampleRetriever(index, item_cache_ttl_s=5.0, clock=lambda: clock[0])
    candidates = [query("me", f"i{n % 10}") for n in range(100)]  # 100 candidates, 10 distinct items

    first = retriever.retrieve(candidates)
    assert retriever.index_queries == 2 + 10
    retriever.retrieve(candidates)
    assert retriever.index_queries == 2 + 10 + 2  # items cached
    clock[0] = 6.0
    retriever.retrieve(candidates)
    assert retriever.index_queries == 2 + 10 + 2 + 2 + 10  # cache expired: fresh examples can appear

    assert (first.slots >= 0).all()
    freshest = max(r.ts_ms for r in first.records)
    assert first.freshest_ts_ms == freshest
    assert first.freshest_age_s(freshest + 1500) == pytest.approx(1.5)


def test_a_cold_start_user_without_history_still_gets_examples_by_item(index: EdgeIndex) -> None:
    index.upsert([point(f"p{n}", f"u{n}", "i3", n % 2, NOW - n) for n in range(8)])
    cold = ExampleQuery("new-user", "i3", NOW, np.zeros(DIM, dtype=np.float32), ITEMS["i3"])
    nothing = ExampleQuery("new-user", "unknown", NOW, np.zeros(DIM, dtype=np.float32), np.zeros(DIM, dtype=np.float32))

    retriever = ExampleRetriever(index)
    found = retriever.retrieve([cold, nothing])

    assert sorted(found.records[i].label for i in found.slots[0]) == [0, 0, 1, 1]
    assert found.slots[1].tolist() == [-1, -1, -1, -1]
    assert retriever.index_queries == 1


def reference_choice(q: ExampleQuery, pool: list[Point], retriever: ExampleRetriever) -> list[tuple[str, ...]]:
    """The LLM-CF rule written plainly, over the candidates the retriever saw: per label, the best by the full
    similarity, leak-free, never the sample itself."""
    chosen = []
    for label, wanted in ((1, retriever.positives), (0, retriever.negatives)):
        eligible = [p for p in pool if p.payload["label"] == label and p.key != q.exclude_key
                    and not (p.payload["user_id"] == q.user_id and p.payload["ts"] > q.ts_ms)]
        h = lambda p: p.vector[:DIM] / np.linalg.norm(p.vector[:DIM])  # noqa: E731
        t = lambda p: p.vector[DIM:] / np.linalg.norm(p.vector[DIM:])  # noqa: E731
        eligible.sort(key=lambda p: -(0.5 * h(p) @ q.history_vector + 0.5 * t(p) @ q.target_vector))
        chosen.append(tuple(sorted(p.key for p in eligible[:wanted])))
    return chosen


def test_batched_choice_equals_the_plain_rule_when_every_sample_is_a_candidate(index: EdgeIndex) -> None:
    rng = np.random.default_rng(7)
    users = [f"u{n}" for n in range(6)]
    pool = []
    for n in range(40):  # few enough that both searches return every sample: the choice is then exact
        history = np.stack([direction(200 + n % 7), ITEMS[f"i{n % 10}"]])
        pool.append(Point(f"s{n}", sample_vector(history, ITEMS[f"i{n % 5}"]),
                          {"user_id": users[n % 6], "item_id": f"i{n % 5}", "label": int(rng.integers(2)),
                           "ts": NOW - 1000 * int(rng.integers(100)), "status": "pending", "history": encode_history(["i0"])}))
    index.upsert(pool)
    retriever = ExampleRetriever(index, history_candidates=40, item_candidates=40)
    queries = []
    for n in range(30):
        h = direction(300 + n % 4)
        queries.append(ExampleQuery(users[n % 6], f"i{n % 5}", NOW - 1000 * int(rng.integers(100)), h, ITEMS[f"i{n % 5}"],
                                    exclude_key=f"s{n}" if n % 3 == 0 else None))

    found = retriever.retrieve(queries)

    for row, q in enumerate(queries):
        picked = [found.records[i] for i in found.slots[row] if i >= 0]
        got = [tuple(sorted(r.key for r in picked if r.label == label)) for label in (1, 0)]
        assert got == reference_choice(q, pool, retriever), row
