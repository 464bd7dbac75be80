"""The exact retrieval engine against a brute-force reference: the LLM-CF rule written plainly.

Vectors are drawn from a small dyadic grid (components k/4 in 8 dimensions), so every dot product and score is exact
in float32 and float64 alike: ties are real ties (same item, same history, empty histories) and the reference and the
engine must agree on every one of them, tie-breaking included.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ranker.features import FeatureSpace, gather_examples
from ranker.retrieval import LATEST_SEQ, ExactRetriever, seed_of, shuffle_slots
from ranker.sample_pool import PoolSample, SamplePool

DIM = 8
GRID = st.lists(st.integers(-2, 2), min_size=DIM, max_size=DIM).map(lambda v: np.asarray(v, dtype=np.float32) / 4)


@dataclass(frozen=True)
class Q:
    user: str
    item: str
    ts: int
    seq: int
    h: np.ndarray
    t: np.ndarray


def reference(samples: list[PoolSample], q: Q) -> list[str | None]:
    """Keys of the 2 best positives then the 2 best negatives (None where fewer): score 0.5<h,H> + 0.5<t,T>, never the
    same user at or after (ts, seq), ties to the later (ts, seq); none for a query without h and t."""
    chosen: list[str | None] = []
    if not q.h.any() and not q.t.any():
        return [None] * 4  # similar to nothing
    for label in (1, 0):
        eligible = [s for s in samples if s.label == label
                    and not (s.user_id == q.user and (s.ts_ms, s.seq) >= (q.ts, q.seq))]
        ranked = sorted(eligible, key=lambda s: (-(0.5 * float(q.h @ s.history_vector) + 0.5 * float(q.t @ s.target_vector)),
                                                 -s.ts_ms, -s.seq))
        keys = [s.key for s in ranked[:2]]
        chosen += keys + [None] * (2 - len(keys))
    return chosen


@st.composite
def pools(draw: st.DrawFn) -> tuple[list[PoolSample], dict[str, np.ndarray]]:
    n_items = draw(st.integers(1, 6))
    items = {f"i{n}": draw(GRID) for n in range(n_items)}
    histories = draw(st.lists(GRID, min_size=1, max_size=4)) + [np.zeros(DIM, dtype=np.float32)]
    size = draw(st.integers(0, 30))
    samples = []
    for n in range(size):
        item = f"i{draw(st.integers(0, n_items - 1))}"
        samples.append(PoolSample(
            key=f"s{n}", user_id=f"u{draw(st.integers(0, 3))}", item_id=item, label=draw(st.integers(0, 1)),
            ts_ms=draw(st.integers(0, 4)), seq=n, history_vector=histories[draw(st.integers(0, len(histories) - 1))],
            target_vector=items[item]))
    return samples, items


def keys_of(pool: SamplePool, rows: np.ndarray) -> list[str | None]:
    return [pool.view.keys[r] if r >= 0 else None for r in rows.tolist()]


def build(samples: list[PoolSample], batches: int = 1, dim: int = DIM) -> SamplePool:
    pool = SamplePool(dim=dim, capacity=4)
    for part in np.array_split(np.arange(len(samples)), batches):
        pool.add([samples[i] for i in part.tolist()])
    return pool


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pools(), st.data())
def test_per_target_queries_equal_brute_force(drawn: tuple[list[PoolSample], dict[str, np.ndarray]], data: st.DataObject) -> None:
    samples, items = drawn
    queries = []
    for sample in samples:  # every pool sample as a training query: never itself, never its user's later samples
        queries.append(Q(sample.user_id, sample.item_id, sample.ts_ms, sample.seq, sample.history_vector, sample.target_vector))
    targets = {**items, "new": data.draw(GRID)}  # an item id names one target vector
    for _ in range(data.draw(st.integers(1, 5))):  # and outsiders, an item the pool lacks and a cold user among them
        item = data.draw(st.sampled_from(sorted(targets)))
        queries.append(Q(f"u{data.draw(st.integers(0, 5))}", item, data.draw(st.integers(0, 5)),
                         data.draw(st.sampled_from([LATEST_SEQ, 3, 7])), data.draw(GRID), targets[item]))
    pool = build(samples, batches=data.draw(st.integers(1, 3)))
    view = pool.view
    rows = ExactRetriever(pool).top_rows(
        view, np.array([view.user_code(q.user) for q in queries]), [q.item for q in queries],
        np.stack([q.t for q in queries]), np.stack([q.h for q in queries]), np.array([q.ts for q in queries]),
        np.array([q.seq for q in queries]))
    for q, got in zip(queries, rows, strict=True):
        assert keys_of(pool, got) == reference(samples, q), q


@pytest.mark.parametrize("full_scan_cells", [0, 10**9], ids=["bounded-scan", "whole-pool"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pools(), st.data())
def test_one_history_many_targets_equals_brute_force(full_scan_cells: int, drawn: tuple[list[PoolSample], dict[str, np.ndarray]],
                                                     data: st.DataObject) -> None:
    samples, items = drawn
    user = f"u{data.draw(st.integers(0, 5))}"
    ts, seq = data.draw(st.integers(0, 5)), data.draw(st.sampled_from([LATEST_SEQ, 0, 9]))
    h = data.draw(st.one_of(GRID, st.just(np.zeros(DIM, dtype=np.float32))))
    targets = data.draw(st.lists(st.sampled_from([*items, "new1", "new2"]), min_size=1, max_size=8))
    fresh = {name: data.draw(GRID) for name in ("new1", "new2")}
    vectors = np.stack([items.get(t, fresh.get(t)) for t in targets])
    pool = build(samples)
    view = pool.view
    rows = ExactRetriever(pool, full_scan_cells=full_scan_cells).top_rows_for_history(
        view, view.user_code(user), ts, seq, h, targets, vectors)
    for target, vector, got in zip(targets, vectors, rows, strict=True):
        assert keys_of(pool, got) == reference(samples, Q(user, target, ts, seq, h, vector)), target


def served(pool: SamplePool, user: str, ts: int, h: np.ndarray, items: list[str], vectors: np.ndarray) -> np.ndarray:
    """What the server feeds the model for one request: each candidate's 2+2 pool rows, shuffled per sample."""
    view = pool.view
    rows = ExactRetriever(pool).top_rows_for_history(view, view.user_code(user), ts, LATEST_SEQ, h, items, vectors)
    return shuffle_slots(rows, [seed_of(user, item, ts) for item in items])


def test_retrieve_shuffles_two_positives_and_two_negatives_and_returns_their_records() -> None:
    rng = np.random.default_rng(0)
    items = {f"i{n}": rng.standard_normal(DIM).astype(np.float32) for n in range(3)}
    samples = [PoolSample(f"s{n}", f"u{n % 4}", f"i{n % 3}", n % 2, 1000 + n, n, rng.standard_normal(DIM).astype(np.float32),
                          items[f"i{n % 3}"], history=(f"i{(n + 1) % 3}",),
                          cot=rng.standard_normal(DIM).astype(np.float32) if n % 5 else None) for n in range(40)]
    pool = build(samples)
    h = rng.standard_normal(DIM).astype(np.float32)
    names = list(items)

    slots = served(pool, "me", 10_000, h, names, np.stack(list(items.values())))

    assert slots.shape == (3, 4)
    view = pool.view
    for row, item in enumerate(names):
        picked = view.records(slots[row].tolist())
        assert sorted(r.label for r in picked) == [0, 0, 1, 1]
        expected = reference(samples, Q("me", item, 10_000, LATEST_SEQ, h, items[item]))
        assert {r.key for r in picked} == set(expected)
    for record in view.records(np.unique(slots).tolist()):
        source = samples[int(record.key[1:])]
        assert record.generated == (source.cot is not None) and record.history == source.history
        if source.cot is not None:
            np.testing.assert_array_equal(record.cot, source.cot)
    again = served(pool, "me", 10_000, h, names, np.stack(list(items.values())))
    np.testing.assert_array_equal(again, slots)  # the shuffle is a function of the sample


def test_a_label_with_fewer_than_two_samples_leaves_empty_slots_that_encode_as_absent() -> None:
    t = np.full(DIM, 0.25, dtype=np.float32)
    pool = build([PoolSample("only-positive", "u1", "i1", 1, 5, 0, t, t)])

    slots = served(pool, "me", 10, t, ["i1"], t[None, :])

    assert sorted(slots[0].tolist()) == [-1, -1, -1, 0]
    space = FeatureSpace.build(["u1"], ["i1"], np.zeros((1, 384), np.float32), [("drama",)])
    records = [r.__class__(**{**r.__dict__, "history_vector": np.zeros(384, np.float32),
                              "target_vector": np.zeros(384, np.float32)}) for r in pool.view.records([0])]
    examples = gather_examples(space.encode_examples(records), slots)
    assert examples["ex_present"].sum() == 1.0


def test_a_pending_cot_lands_later_and_the_next_retrieval_sees_it() -> None:
    t = np.full(DIM, 0.25, dtype=np.float32)
    pool = build([PoolSample("pending", "u1", "i1", 1, 5, 0, t, t), PoolSample("ready", "u2", "i1", 0, 6, 1, t, t, cot=t)])
    before = pool.view

    def picked() -> dict[str, object]:
        slots = served(pool, "me", 10, t, ["i1"], t[None, :])
        return {r.key: r for r in pool.view.records(slots[slots >= 0].tolist())}

    first = picked()
    pool.add([PoolSample("pending", "u1", "i1", 1, 5, 0, t, t, cot=2 * t)])
    later = picked()

    assert first["pending"].cot is None and not first["pending"].generated
    np.testing.assert_array_equal(later["pending"].cot, 2 * t)
    assert len(pool) == 2 and before.n == 2  # a CoT landing adds no row


def test_compaction_keeps_the_newest_and_stays_exact() -> None:
    rng = np.random.default_rng(3)
    items = {f"i{n}": (rng.integers(-2, 3, DIM) / 4).astype(np.float32) for n in range(4)}
    samples = [PoolSample(f"s{n}", f"u{n % 3}", f"i{n % 4}", int(rng.integers(2)), n // 3, n,
                          (rng.integers(-2, 3, DIM) / 4).astype(np.float32), items[f"i{n % 4}"]) for n in range(60)]
    pool = build(samples)
    retriever = ExactRetriever(pool, full_scan_cells=0)
    h = (rng.integers(-2, 3, DIM) / 4).astype(np.float32)
    retriever.top_rows_for_history(pool.view, -1, 99, LATEST_SEQ, h, list(items), np.stack(list(items.values())))

    assert pool.compact(keep=25) == 35
    kept = samples[35:]
    view = pool.view
    rows = retriever.top_rows_for_history(view, -1, 99, LATEST_SEQ, h, list(items), np.stack(list(items.values())))
    for (name, vector), got in zip(items.items(), rows, strict=True):
        assert keys_of(pool, got) == reference(kept, Q("me", name, 99, LATEST_SEQ, h, vector))


def test_samples_arriving_while_requests_are_served_give_exact_answers_on_each_snapshot() -> None:
    rng = np.random.default_rng(11)
    items = {f"i{n}": (rng.integers(-2, 3, DIM) / 4).astype(np.float32) for n in range(8)}
    samples = [PoolSample(f"s{n}", f"u{n % 7}", f"i{int(rng.integers(8))}", int(rng.integers(2)), n // 4, n,
                          (rng.integers(-2, 3, DIM) / 4).astype(np.float32), np.zeros(DIM, np.float32)) for n in range(3000)]
    for s in samples:
        s.target_vector = items[s.item_id]
    pool = SamplePool(dim=DIM, capacity=8)
    retriever = ExactRetriever(pool, full_scan_cells=0)
    stop = threading.Event()

    def write() -> None:
        for start in range(0, len(samples), 50):
            pool.add(samples[start : start + 50])
        stop.set()

    writer = threading.Thread(target=write)
    writer.start()
    checked = 0
    h = (rng.integers(-2, 3, DIM) / 4).astype(np.float32)
    while not stop.is_set() or checked < 3:
        view = pool.view
        rows = retriever.top_rows_for_history(view, view.user_code("u3"), 10_000, LATEST_SEQ, h, list(items),
                                              np.stack(list(items.values())))
        for (name, vector), got in zip(items.items(), rows, strict=True):
            assert [view.keys[r] if r >= 0 else None for r in got] == reference(
                samples[: view.n], Q("u3", name, 10_000, LATEST_SEQ, h, vector))
        checked += 1
    writer.join()
    assert len(pool) == len(samples)


@pytest.mark.parametrize("dim", [384])
def test_the_real_dimension_and_float_vectors_agree_with_float64_brute_force(dim: int) -> None:
    rng = np.random.default_rng(5)

    def unit(n: int) -> np.ndarray:
        v = rng.standard_normal((n, dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    item_vectors = unit(50)
    samples = [PoolSample(f"s{n}", f"u{n % 40}", f"i{n % 50}", n % 2, n // 10, n, h, item_vectors[n % 50])
               for n, h in enumerate(unit(2000))]
    pool = build(samples, batches=4, dim=dim)
    queries = [Q(f"u{n}", f"i{n % 50}", 150, LATEST_SEQ, h, item_vectors[n % 50]) for n, h in enumerate(unit(60))]
    view = pool.view
    rows = ExactRetriever(pool).top_rows(view, np.array([view.user_code(q.user) for q in queries]), [q.item for q in queries],
                                         np.stack([q.t for q in queries]), np.stack([q.h for q in queries]),
                                         np.array([q.ts for q in queries]), np.array([q.seq for q in queries]))
    for q, got in zip(queries, rows, strict=True):
        assert keys_of(pool, got) == reference(samples, q)
