"""The vector index contract, run against both backends: the embedded Qdrant Edge shard (in tmp_path) and qdrant-client's
local mode (`:memory:`), which stands in for a Qdrant server."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from llmcf.settings import Settings
from storage.vectors import (
    KEY_FIELD,
    Filter,
    Match,
    Point,
    Range,
    VectorIndex,
    VectorIndexClosed,
    VectorIndexInUse,
    all_of,
    hit_from_stored,
    open_vector_index,
)
from storage.vectors.edge import EdgeIndex
from storage.vectors.qdrant_server import QdrantServerIndex

DIM = 8
REPO = Path(__file__).resolve().parents[2]


def unit(i: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[i] = 1.0
    return v


def toward(i: int, j: int, weight: float) -> np.ndarray:
    """A unit vector between axes i and j: the larger `weight`, the closer to axis j."""
    v = (1 - weight) * unit(i) + weight * unit(j)
    return v / np.linalg.norm(v)


@pytest.fixture(params=["edge", "client"])
def make_index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], VectorIndex]]:
    opened: list[VectorIndex] = []

    def make() -> VectorIndex:
        if request.param == "edge":
            index: VectorIndex = EdgeIndex(tmp_path / "shard", DIM)
        else:
            index = QdrantServerIndex(QdrantClient(":memory:"), "cot_examples", DIM)
        opened.append(index)
        return index

    yield make
    for index in opened:
        index.close()


@pytest.fixture
def index(make_index: Callable[[], VectorIndex]) -> VectorIndex:
    return make_index()


def keys(hits) -> list[str]:
    return [h.key for h in hits]


def test_upserting_a_key_again_replaces_the_point(index: VectorIndex) -> None:
    index.upsert([Point("a", unit(0), {"status": "pending"}), Point("b", unit(1), {"status": "pending"})])
    index.upsert([Point("a", unit(2), {"status": "ready", "label": 1})])

    assert index.count() == 2
    [[hit]] = index.search(unit(2)[None], k=1)
    assert hit.key == "a"
    assert hit.payload == {"status": "ready", "label": 1}
    assert hit.score == pytest.approx(1.0, abs=1e-5)


def test_a_repeated_key_within_one_batch_keeps_the_last(index: VectorIndex) -> None:
    index.upsert([Point("a", unit(0), {"v": 1}), Point("a", unit(1), {"v": 2})])

    assert index.count() == 1
    [[hit]] = index.search(unit(1)[None], k=1)
    assert (hit.key, hit.payload) == ("a", {"v": 2})


def test_top_k_returns_the_exact_nearest_first_in_score_order(index: VectorIndex) -> None:
    index.upsert(
        [
            Point("far", toward(0, 1, 0.9), {}),
            Point("exact", unit(0), {}),
            Point("near", toward(0, 1, 0.1), {}),
            Point("middle", toward(0, 1, 0.5), {}),
            Point("orthogonal", unit(3), {}),
        ]
    )

    [hits] = index.search(unit(0)[None], k=4)

    assert keys(hits) == ["exact", "near", "middle", "far"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_vectors_are_normalised_by_the_index(index: VectorIndex) -> None:
    index.upsert([Point("long", 10 * unit(0), {}), Point("short", 0.1 * toward(0, 1, 0.5), {})])

    [hits] = index.search((3 * unit(0))[None], k=2)

    assert keys(hits) == ["long", "short"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[1].score == pytest.approx(float(np.dot(unit(0), toward(0, 1, 0.5))), abs=1e-5)


def test_label_match_splits_positives_from_negatives(index: VectorIndex) -> None:
    index.upsert([Point(f"s{i}", toward(0, 1, i / 10), {"label": i % 2}) for i in range(10)])

    [positives] = index.search(unit(0)[None], k=2, filter=Filter(must=[Match("label", 1)]))
    [negatives] = index.search(unit(0)[None], k=2, filter=Filter(must=[Match("label", 0)]))

    assert keys(positives) == ["s1", "s3"]
    assert keys(negatives) == ["s0", "s2"]


def test_range_on_ts(index: VectorIndex) -> None:
    index.upsert([Point(f"t{ts}", toward(0, 1, ts / 1000), {"ts": ts}) for ts in (100, 200, 300, 400)])

    [hits] = index.search(unit(0)[None], k=10, filter=Filter(must=[Range("ts", gte=200, lt=400)]))
    [strict] = index.search(unit(0)[None], k=10, filter=Filter(must=[Range("ts", gt=200, lte=400)]))

    assert keys(hits) == ["t200", "t300"]
    assert keys(strict) == ["t300", "t400"]


def test_no_leak_group_excludes_only_the_same_user_later(index: VectorIndex) -> None:
    now = 1_700_000_000_000
    index.upsert(
        [
            Point("u-earlier", toward(0, 1, 0.1), {"user_id": "u", "ts": now - 1, "label": 1}),
            Point("u-same-time", toward(0, 1, 0.2), {"user_id": "u", "ts": now, "label": 1}),
            Point("u-later", unit(0), {"user_id": "u", "ts": now + 1, "label": 1}),
            Point("v-later", toward(0, 1, 0.3), {"user_id": "v", "ts": now + 1, "label": 1}),
            Point("v-negative", toward(0, 1, 0.05), {"user_id": "v", "ts": now - 5, "label": 0}),
        ]
    )
    no_leak = Filter(must=[Match("label", 1)], must_not=[all_of(Match("user_id", "u"), Range("ts", gt=now))])

    [hits] = index.search(unit(0)[None], k=10, filter=no_leak)

    assert keys(hits) == ["u-earlier", "u-same-time", "v-later"]
    assert index.count(no_leak) == 3


def test_each_query_of_a_batch_can_have_its_own_filter(index: VectorIndex) -> None:
    index.upsert([Point(f"{u}{ts}", toward(0, 1, ts / 10), {"user_id": u, "ts": ts}) for u in "ab" for ts in (1, 2)])
    no_later = [Filter(must_not=[all_of(Match("user_id", u), Range("ts", gt=1))]) for u in "ab"]

    for_a, for_b = index.search(np.stack([unit(0), unit(0)]), k=4, filter=no_later)

    assert sorted(keys(for_a)) == ["a1", "b1", "b2"]
    assert sorted(keys(for_b)) == ["a1", "a2", "b1"]
    with pytest.raises(ValueError, match="got 1 filters for 2 query vectors"):
        index.search(np.stack([unit(0), unit(1)]), k=1, filter=no_later[:1])


def test_delete_removes_points_and_ignores_unknown_keys(index: VectorIndex) -> None:
    index.upsert([Point("a", unit(0), {}), Point("b", toward(0, 1, 0.1), {}), Point("c", unit(2), {})])

    index.delete(["a", "never-indexed"])

    assert index.count() == 2
    [hits] = index.search(unit(0)[None], k=3)
    assert "a" not in keys(hits)
    assert keys(hits)[0] == "b"


def test_count_with_filter(index: VectorIndex) -> None:
    index.upsert([Point(f"p{i}", toward(0, 1, i / 20), {"label": int(i < 3), "status": "ready"}) for i in range(7)])

    assert index.count() == 7
    assert index.count(Filter(must=[Match("label", 1)])) == 3
    assert index.count(Filter(must=[Match("status", "ready")], must_not=[Match("label", 1)])) == 4
    assert index.count(Filter(must=[Match("status", "pending")])) == 0


def test_batch_search_gives_one_list_per_query(index: VectorIndex) -> None:
    index.upsert([Point(f"p{i}", unit(i), {}) for i in range(3)])
    queries = np.stack([unit(i % DIM) for i in range(5)])

    results = index.search(queries, k=2)

    assert len(results) == 5
    assert all(len(hits) == 2 for hits in results)
    assert [hits[0].key for hits in results[:3]] == ["p0", "p1", "p2"]
    assert [len(hits) for hits in index.search(queries[:2], k=10)] == [3, 3]
    assert index.search(np.empty((0, DIM), dtype=np.float32), k=2) == []


def test_search_on_an_empty_index_returns_empty_lists(index: VectorIndex) -> None:
    assert index.search(np.stack([unit(0), unit(1), unit(2)]), k=4) == [[], [], []]
    assert index.count() == 0


def test_wrong_dimension_is_a_clear_value_error(index: VectorIndex) -> None:
    with pytest.raises(ValueError, match="expects 8, got 7"):
        index.upsert([Point("a", np.ones(7, dtype=np.float32), {})])
    with pytest.raises(ValueError, match="expects 8, got 9"):
        index.search(np.ones((2, 9), dtype=np.float32), k=1)
    with pytest.raises(ValueError, match="expects 8, got 3"):
        index.search([[1.0, 0.0, 0.0]], k=1)
    assert index.count() == 0


def test_unusable_input_is_refused_before_reaching_the_engine(index: VectorIndex) -> None:
    with pytest.raises(ValueError, match="all zeros"):
        index.upsert([Point("zero", np.zeros(DIM, dtype=np.float32), {})])
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, DIM), np.nan, dtype=np.float32), k=1)
    with pytest.raises(ValueError, match="reserved"):
        index.upsert([Point("a", unit(0), {"key": "b"})])
    with pytest.raises(ValueError, match="k must be at least 1"):
        index.search(unit(0)[None], k=0)


def test_a_closed_index_refuses_calls(index: VectorIndex) -> None:
    index.close()
    index.close()
    with pytest.raises(VectorIndexClosed):
        index.count()
    with pytest.raises(VectorIndexClosed):
        index.upsert([Point("a", unit(0), {})])


def test_edge_shard_persists_across_close_and_reopen(tmp_path: Path) -> None:
    with EdgeIndex(tmp_path / "shard", DIM) as index:
        index.upsert([Point("a", unit(0), {"label": 1, "user_id": "u"}), Point("b", unit(1), {"label": 0})])
        index.delete(["b"])

    with EdgeIndex(tmp_path / "shard", DIM) as reopened:
        assert reopened.count() == 1
        [[hit]] = reopened.search(unit(0)[None], k=2, filter=Filter(must=[Match("label", 1)]))
        assert (hit.key, hit.payload) == ("a", {"label": 1, "user_id": "u"})


def test_edge_shard_recovers_writes_of_a_process_that_died_without_closing(tmp_path: Path) -> None:
    crash = f"""
        import os
        from pathlib import Path
        from storage.vectors import Point
        from storage.vectors.edge import EdgeIndex
        index = EdgeIndex(Path({str(tmp_path / 'shard')!r}), {DIM})
        index.upsert([Point(f"k{{i}}", [1.0] + [float(i)] * {DIM - 1}, {{"i": i}}) for i in range(50)])
        os._exit(0)
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(crash)], cwd=REPO, check=True, timeout=120)

    with EdgeIndex(tmp_path / "shard", DIM) as reopened:
        assert reopened.count() == 50


def test_edge_shard_has_one_owner_at_a_time(tmp_path: Path) -> None:
    probe = f"""
        from pathlib import Path
        from storage.vectors import VectorIndexInUse
        from storage.vectors.edge import EdgeIndex
        try:
            EdgeIndex(Path({str(tmp_path / 'shard')!r}), {DIM})
        except VectorIndexInUse as exc:
            print("in use:", exc)
    """
    with EdgeIndex(tmp_path / "shard", DIM) as owner:
        owner.upsert([Point("a", unit(0), {})])
        with pytest.raises(VectorIndexInUse, match="already open"):
            EdgeIndex(tmp_path / "shard", DIM)
        other = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(probe)], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert "in use:" in other.stdout, other.stderr
        assert owner.count() == 1

    with EdgeIndex(tmp_path / "shard", DIM) as next_owner:
        assert next_owner.count() == 1


def test_edge_shard_refuses_a_different_dimension(tmp_path: Path) -> None:
    EdgeIndex(tmp_path / "shard", DIM).close()

    with pytest.raises(ValueError, match="does not hold 4-d"):
        EdgeIndex(tmp_path / "shard", 4)
    with EdgeIndex(tmp_path / "shard", DIM) as index:  # the failed open released the lock
        assert index.count() == 0


def test_edge_search_is_the_same_before_and_after_optimize(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(300, DIM)).astype(np.float32)
    with EdgeIndex(tmp_path / "shard", DIM) as index:
        index.upsert([Point(f"p{i}", v, {"label": i % 2}) for i, v in enumerate(vectors)])
        queries = vectors[:5]
        before = index.search(queries, k=4, filter=Filter(must=[Match("label", 1)]))
        index.optimize()
        after = index.search(queries, k=4, filter=Filter(must=[Match("label", 1)]))

    assert [keys(h) for h in before] == [keys(h) for h in after]
    assert [keys(h)[0] for h in before[1::2]] == ["p1", "p3"]


def test_server_collection_of_another_dimension_is_refused() -> None:
    client = QdrantClient(":memory:")
    QdrantServerIndex(client, "cot_examples", DIM)

    with pytest.raises(ValueError, match="holds 8-d Cosine vectors; expected 4-d"):
        QdrantServerIndex(client, "cot_examples", 4)


def test_factory_opens_the_edge_shard_under_home_without_qdrant_url(tmp_path: Path) -> None:
    settings = Settings.from_env({"LLMCF_HOME": str(tmp_path), "LLMCF_QDRANT_COLLECTION": "examples"})

    with open_vector_index(settings, DIM) as index:
        assert isinstance(index, EdgeIndex)
        assert index.path == tmp_path / "qdrant" / "examples"
        index.upsert([Point("a", unit(0), {})])
    assert (tmp_path / "qdrant" / "examples" / "edge_config.json").exists()


def test_factory_connects_to_the_server_at_qdrant_url(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_client(url: str, api_key: str | None) -> QdrantClient:
        seen.update(url=url, api_key=api_key)
        return QdrantClient(":memory:")

    monkeypatch.setattr("storage.vectors.qdrant_server.QdrantClient", fake_client)
    settings = Settings.from_env({"QDRANT_URL": "http://qdrant:6333", "QDRANT_API_KEY": "secret"})

    with open_vector_index(settings, DIM) as index:
        assert isinstance(index, QdrantServerIndex)
        assert index.collection == "cot_examples"
    assert seen == {"url": "http://qdrant:6333", "api_key": "secret"}


def test_set_payload_merges_fields_and_keeps_the_vector(index: VectorIndex) -> None:
    index.upsert([Point("a", unit(0), {"status": "pending", "label": 1}), Point("b", unit(1), {"status": "pending"})])
    index.set_payload({"a": {"status": "generated", "cot_embedding": [0.5, 0.25]}, "missing": {"status": "generated"}})

    assert index.count() == 2
    [[hit]] = index.search(unit(0)[None], k=1)
    assert hit.key == "a"
    assert hit.score == pytest.approx(1.0)
    assert hit.payload == {"status": "generated", "label": 1, "cot_embedding": [0.5, 0.25]}
    assert index.count(Filter(must=[Match("status", "pending")])) == 1


def test_set_payload_refuses_the_reserved_key_field(index: VectorIndex) -> None:
    index.upsert([Point("a", unit(0))])
    with pytest.raises(ValueError, match="reserved"):
        index.set_payload({"a": {"key": "b"}})


def test_with_vectors_returns_the_stored_normalised_vectors(index: VectorIndex) -> None:
    index.upsert([Point("a", 3 * unit(0), {"label": 1}), Point("b", toward(0, 1, 0.5), {"label": 0})])

    [hits] = index.search(unit(0)[None], k=2, with_vectors=True)
    [plain] = index.search(unit(0)[None], k=2)

    assert keys(hits) == ["a", "b"]
    np.testing.assert_allclose(hits[0].vector, unit(0), atol=1e-6)
    np.testing.assert_allclose(hits[1].vector, toward(0, 1, 0.5), atol=1e-6)
    assert hits[0].vector.dtype == np.float32
    assert all(h.vector is None for h in plain)


def test_payload_fields_limit_search_payloads_and_get_payloads_reads_by_key(index: VectorIndex) -> None:
    index.upsert([Point("a", unit(0), {"label": 1, "big": [0.5] * 4}), Point("b", unit(1), {"label": 0, "big": [1.0]})])

    [hits] = index.search(unit(0)[None], k=1, payload_fields=["label"])
    payloads = index.get_payloads(["b", "a", "never-indexed"], payload_fields=["big"])

    assert (hits[0].key, hits[0].payload) == ("a", {"label": 1})
    assert payloads == {"a": {"big": [0.5] * 4}, "b": {"big": [1.0]}}
    assert index.get_payloads(["a"]) == {"a": {"label": 1, "big": [0.5] * 4}}
    assert index.get_payloads([]) == {}


def test_a_hit_takes_the_key_from_the_payload_and_only_a_dense_vector() -> None:
    hit = hit_from_stored(0.5, {KEY_FIELD: "k", "label": 1}, [1.0, 0.0])
    assert (hit.key, hit.score, hit.payload, hit.vector.dtype, hit.vector.tolist()) == ("k", 0.5, {"label": 1}, np.float32, [1.0, 0.0])
    assert hit_from_stored(0.5, {KEY_FIELD: "k"}).vector is None
    with pytest.raises(TypeError, match="one dense vector"):
        hit_from_stored(0.5, {KEY_FIELD: "k"}, {"named": [1.0, 0.0]})
