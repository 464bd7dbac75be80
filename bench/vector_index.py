"""Benchmark of the vector index backends: upsert rate and top-4 search latency at LLM-CF scale.

    python -m bench.vector_index [--points 100000 --dim 384 --client-points 20000 --optimize auto]

For each backend: upsert random normalised vectors with realistic payloads in batches of 2,000, then time top-4 queries,
one at a time and in batches of 32, without a filter and with the LLM-CF retrieval filter (label match plus the
"not the same user later" group). The Edge shard is measured with plain (exact) segments, then `optimize()` runs in a
(blocking) while a ticker thread measures how long the rest of the process is frozen (the binding holds the GIL), then
HNSW search is measured with its recall@4 against the exact results. Vectors are clustered around 3,883 item directions
by default (like text embeddings); `--data random` is the worst case for HNSW recall. qdrant-client's local mode scans every point in
Python per query and warns past 20,000 points, so it is measured at `--client-points` and the table says so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.vectors import Filter, Match, Point, Range, VectorIndex, all_of

BATCH_QUERIES = 32
USERS = 6040
ITEMS = 3883
START_MS = 1_700_000_000_000
SPAN_MS = 180 * 24 * 3600 * 1000


@dataclass
class Row:
    backend: str
    points: int
    measure: str
    value: str


@dataclass
class Workload:
    """Random unit vectors and payloads shaped like CoT examples (ids, label, event time, a few hundred chars of CoT)."""

    vectors: np.ndarray
    users: np.ndarray
    items: np.ndarray
    ts: np.ndarray
    labels: np.ndarray

    @classmethod
    def generate(cls, points: int, dim: int, data: str, seed: int = 0) -> Workload:
        """`clustered`: each vector is its item's random direction plus noise (cosine ~0.85 to the item), like text
        embeddings of samples about the same movie; `random`: independent directions, the worst case for HNSW."""
        rng = np.random.default_rng(seed)
        items = rng.integers(0, ITEMS, size=points)
        noise = rng.normal(size=(points, dim)).astype(np.float32)
        if data == "clustered":
            centres = rng.normal(size=(ITEMS, dim)).astype(np.float32)
            centres /= np.linalg.norm(centres, axis=1, keepdims=True)
            vectors = centres[items] + noise * (0.6 / np.sqrt(dim))
        else:
            vectors = noise
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return cls(
            vectors=vectors,
            users=rng.integers(0, USERS, size=points),
            items=items,
            ts=START_MS + rng.integers(0, SPAN_MS, size=points),
            labels=rng.integers(0, 2, size=points),
        )

    def batches(self, limit: int, size: int) -> Iterator[list[Point]]:
        for start in range(0, limit, size):
            yield [self.point(i) for i in range(start, min(start + size, limit))]

    def point(self, i: int) -> Point:
        user, item = f"u{self.users[i]}", f"m{self.items[i]}"
        return Point(
            key=f"{user}:{item}:{self.ts[i]}",
            vector=self.vectors[i],
            payload={
                "user_id": user,
                "item_id": item,
                "label": int(self.labels[i]),
                "ts": int(self.ts[i]),
                "status": "ready",
                "cot_text": f"The user {user} mostly watches dramas; {item} is a comedy. " * 8,
            },
        )


def no_leak_filter(user: str, ts: int, label: int) -> Filter:
    return Filter(must=[Match("label", label)], must_not=[all_of(Match("user_id", user), Range("ts", gt=ts))])


class Queries:
    """Query vectors near indexed points (perturbed copies), each with the LLM-CF filter of the sample it stands for."""

    def __init__(self, workload: Workload, indexed: int, count: int, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, indexed, size=count)
        dim = workload.vectors.shape[1]
        vectors = workload.vectors[picks] + rng.normal(size=(count, dim)).astype(np.float32) * (0.3 / np.sqrt(dim))
        self.vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        self.filters = [no_leak_filter(f"u{workload.users[i]}", int(workload.ts[i]), 1) for i in picks]


def percentiles(samples_s: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples_s)
    p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
    return f"p50 {statistics.median(ms):8.2f} ms   p99 {p99:8.2f} ms   (n={len(ms)})"


def time_calls(call: Callable[[int], object], repeats: int) -> list[float]:
    call(0)  # warm-up: first query pages in segments
    samples = []
    for i in range(repeats):
        started = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - started)
    return samples


def measure_search(index: VectorIndex, queries: Queries, singles: int, batches: int, label: str) -> list[tuple[str, str]]:
    q, f = queries.vectors, queries.filters
    n = len(q)

    def batch(i: int, filtered: bool) -> object:
        rows = [(i * BATCH_QUERIES + j) % n for j in range(BATCH_QUERIES)]
        return index.search(q[rows], k=4, filter=[f[r] for r in rows] if filtered else None)

    results = []
    for filtered in (False, True):
        name = "LLM-CF filter" if filtered else "no filter"
        single = time_calls(lambda i, filtered=filtered: index.search(q[i % n][None], k=4, filter=f[i % n] if filtered else None), singles)
        batched = time_calls(lambda i, filtered=filtered: batch(i, filtered), batches)
        per_query = statistics.median(batched) / BATCH_QUERIES * 1000
        results.append((f"{label}, top-4 single, {name}", percentiles(single)))
        results.append(
            (f"{label}, top-4 batch of {BATCH_QUERIES}, {name}", f"{percentiles(batched)}  = {per_query:.2f} ms/query")
        )
        progress(f"  searched ({label}, {name})")
    return results


def load(index: VectorIndex, workload: Workload, points: int, batch_size: int) -> float:
    """Upsert `points` in batches; returns points per second."""
    started = time.perf_counter()
    report_every = max(1, points // batch_size // 10)
    for n, batch in enumerate(workload.batches(points, batch_size), start=1):
        index.upsert(batch)
        if n % report_every == 0:
            done = min(n * batch_size, points)
            progress(f"  upserted {done:,}/{points:,} ({done / (time.perf_counter() - started):,.0f} points/s)")
    return points / (time.perf_counter() - started)


class StallMeter:
    """A daemon thread that wakes every 10 ms; the longest gap between wake-ups is how long Python was blocked."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def _tick(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(0.01):
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now

    def __enter__(self) -> StallMeter:
        self._thread.start()
        time.sleep(0.05)  # let the ticker start before the measured call takes the GIL
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def recall(exact: list[list[str]], approx: list[list[str]]) -> float:
    found = sum(len(set(e) & set(a)) for e, a in zip(exact, approx, strict=True))
    return found / max(1, sum(len(e) for e in exact))


def bench_edge(args: argparse.Namespace, workload: Workload, workdir: Path) -> list[Row]:
    from storage.vectors.edge import EdgeIndex

    rows: list[Row] = []
    name, n = "qdrant-edge", args.points

    def add(measure: str, value: str) -> None:
        rows.append(Row(name, n, measure, value))

    progress(f"[edge] upserting {n:,} x {args.dim}-d into {workdir / 'edge'}")
    with EdgeIndex(workdir / "edge", args.dim) as index:
        add(f"upsert, batches of {args.batch:,}", f"{load(index, workload, n, args.batch):,.0f} points/s")
        started = time.perf_counter()
        index.flush()
        add("flush after load", f"{time.perf_counter() - started:.2f} s")
        queries = Queries(workload, n, args.queries)
        exact = [[h.key for h in hits] for hits in index.search(queries.vectors, k=4, filter=queries.filters)]
        exact_plain = [[h.key for h in hits] for hits in index.search(queries.vectors, k=4)]
        for measure, value in measure_search(index, queries, args.queries, args.query_batches, "plain segments (exact)"):
            add(measure, value)

        if args.optimize == "no":
            add("optimize()", "skipped (--optimize no)")
            return rows
        progress("[edge] optimize(): building HNSW (a ticker thread measures how long other Python threads stall)")
        with StallMeter() as stalls:
            started = time.perf_counter()
            index.optimize()
            took = time.perf_counter() - started
        add("optimize() (HNSW build)", f"{took:.1f} s")
        add("longest stall of other Python threads meanwhile", f"{stalls.longest:.1f} s")
        approx_plain = [[h.key for h in hits] for hits in index.search(queries.vectors, k=4)]
        add("recall@4 of HNSW vs exact, no filter", f"{recall(exact_plain, approx_plain):.3f}")
        approx = [[h.key for h in hits] for hits in index.search(queries.vectors, k=4, filter=queries.filters)]
        add("recall@4 of HNSW vs exact, LLM-CF filter", f"{recall(exact, approx):.3f}")
        for measure, value in measure_search(index, queries, args.queries, args.query_batches, "HNSW"):
            add(measure, value)
    started = time.perf_counter()
    with EdgeIndex(workdir / "edge", args.dim) as reopened:
        add("reopen (load) after close", f"{time.perf_counter() - started:.2f} s, {reopened.count():,} points")
    return rows


def bench_client(args: argparse.Namespace, workload: Workload) -> list[Row]:
    from qdrant_client import QdrantClient

    from storage.vectors.qdrant_server import QdrantServerIndex

    rows: list[Row] = []
    n = min(args.client_points, args.points)
    name = "qdrant-client :memory:"

    def add(measure: str, value: str) -> None:
        rows.append(Row(name, n, measure, value))

    progress(f"[client] local mode, capped at {n:,} points (--client-points): it scans every point in Python per query")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Local mode is not recommended for collections with more than")
        with QdrantServerIndex(QdrantClient(":memory:"), "bench", args.dim) as index:
            add(f"upsert, batches of {args.batch:,}", f"{load(index, workload, n, args.batch):,.0f} points/s")
            queries = Queries(workload, n, args.queries)
            singles, batches = max(10, args.queries // 10), max(3, args.query_batches // 10)  # ~1 s per filtered query at 20k
            for measure, value in measure_search(index, queries, singles, batches, "brute force"):
                add(measure, value)
    return rows


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_table(rows: list[Row]) -> None:
    widths = [max(len(r.backend) for r in rows), 9, max(len(r.measure) for r in rows)]
    header = f"{'backend':<{widths[0]}}  {'points':>{widths[1]}}  {'measure':<{widths[2]}}  result"
    print(header)
    print("-" * (len(header) + 60))
    for r in rows:
        print(f"{r.backend:<{widths[0]}}  {r.points:>{widths[1]},}  {r.measure:<{widths[2]}}  {r.value}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.vector_index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=100_000, help="points for the Edge shard (default 100,000)")
    parser.add_argument("--dim", type=int, default=384, help="vector dimension (default 384, all-MiniLM-L6-v2)")
    parser.add_argument("--client-points", type=int, default=20_000, help="cap for qdrant-client local mode")
    parser.add_argument("--batch", type=int, default=2_000, help="points per upsert call (default 2,000)")
    parser.add_argument("--queries", type=int, default=200, help="single queries timed per case (default 200)")
    parser.add_argument("--query-batches", type=int, default=20, help="batches of 32 timed per case (default 20)")
    parser.add_argument(
        "--optimize",
        choices=["auto", "yes", "no"],
        default="auto",
        help="build HNSW on the Edge shard; auto = only up to 150,000 points (~3 min per 100k on 2 cores)",
    )
    parser.add_argument(
        "--data", choices=["clustered", "random"], default="clustered", help="vector distribution (default clustered)"
    )
    parser.add_argument("--backends", default="edge,client", help="comma-separated: edge, client")
    parser.add_argument("--dir", type=Path, help="work directory for the Edge shard (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.optimize == "auto":
        args.optimize = "yes" if args.points <= 150_000 else "no"

    backends = {b.strip() for b in args.backends.split(",")}
    progress(f"generating {args.points:,} {args.data} unit vectors of {args.dim} dimensions")
    workload = Workload.generate(args.points, args.dim, args.data)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-vectors-", dir=args.dir) as workdir:
        if "edge" in backends:
            rows += bench_edge(args, workload, Path(workdir))
        if "client" in backends:
            rows += bench_client(args, workload)
    print()
    print(f"Vector index benchmark: {args.dim}-d cosine, top-4, {args.data} unit vectors, {USERS} users, batch of "
          f"{BATCH_QUERIES} per batched query; latencies are wall time per call from Python.")
    print_table(rows)


if __name__ == "__main__":
    main()
