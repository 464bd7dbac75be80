"""Benchmark of the ranker's scoring path: the model alone (onnxruntime vs eager torch) and in-context example retrieval.

    python -m bench.ranker_model [--pool 20000 --requests 200 --candidates 100 --threads 1 --optimize]

1. Model: the four variants at MovieLens-1M vocabulary sizes, one batch of `--candidates` rows, eager torch
   (inference mode) vs onnxruntime on the same inputs, both pinned to `--threads`; p50/p99 over repeated runs.
2. Retrieval: a Qdrant Edge shard of `--pool` samples shaped like the live index (768-d [h; t]/sqrt(2) vectors clustered
   around 3,706 item directions, payloads with 20 history ids and a 384-d CoT embedding), then `--requests` ranking
   requests (one user, `--candidates` items drawn by popularity) through `ExampleRetriever`: cold (empty item cache,
   a new retriever per request) and warm (the item cache filled by earlier requests, within its TTL). Then the whole
   scoring path per request: features + ONNX for the backbone alone vs retrieval + features + ONNX for +ICT.
Exact scan (no `--optimize`) is what a freshly written shard does; `--optimize` builds HNSW first (minutes per 100k).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llmcf.samples import SAMPLE_DIMENSION, sample_vector
from ranker.export import export_onnx, onnx_session, random_inputs, torch_scores
from ranker.features import FeatureSpace, gather_examples
from ranker.model import ModelConfig, RankerModel
from ranker.retrieval import ExampleQuery, ExampleRetriever
from storage.vectors import Point
from storage.vectors.edge import EdgeIndex

USERS, ITEMS, TAGS, DIM = 6040, 3706, 18, 384
START_MS = 1_000_000_000_000


def percentiles(samples_ms: list[float]) -> tuple[float, float]:
    ordered = sorted(samples_ms)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]


def timed(function, repeat: int) -> list[float]:  # type: ignore[no-untyped-def]
    durations = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        durations.append((time.perf_counter() - started) * 1000)
    return durations


def bench_models(candidates: int, threads: int, workdir: Path) -> list[tuple[str, str, str, str]]:
    rows = []
    for backbone in ("deepfm", "din"):
        for ict in (False, True):
            config = ModelConfig(backbone, ict, USERS + 1, ITEMS + 1, TAGS + 1)  # type: ignore[arg-type]
            model = RankerModel(config).eval()
            path = export_onnx(model, workdir / f"{config.kind}.onnx")
            session = onnx_session(path, threads)
            inputs = random_inputs(config, candidates, seed=1)
            feeds = {n: inputs[n] for n in config.input_names}
            torch_ms = percentiles(timed(lambda m=model, x=inputs: torch_scores(m, x), 200))
            onnx_ms = percentiles(timed(lambda s=session, f=feeds: s.run(["score"], f), 500))
            rows.append((config.kind, f"{torch_ms[0]:.2f} / {torch_ms[1]:.2f}", f"{onnx_ms[0]:.2f} / {onnx_ms[1]:.2f}",
                         f"{torch_ms[0] / onnx_ms[0]:.1f}x"))
    return rows


class Workload:
    """Items as clustered directions, users as tastes; samples = (user, item, label, ts) with 20-item histories."""

    def __init__(self, pool: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.item_vectors = _unit(rng.standard_normal((ITEMS, DIM)).astype(np.float32))
        popularity = 1.0 / np.arange(1, ITEMS + 1) ** 0.8
        self.popularity = popularity / popularity.sum()
        self.pool = pool

    def history(self) -> np.ndarray:
        return self.rng.choice(ITEMS, 20, p=self.popularity)

    def points(self) -> list[Point]:
        points = []
        for n in range(self.pool):
            history = self.history()
            item = int(self.rng.choice(ITEMS, p=self.popularity))
            vector = sample_vector(self.item_vectors[history], self.item_vectors[item])
            points.append(Point(f"s{n}", vector, {
                "user_id": f"u{self.rng.integers(USERS)}", "item_id": f"i{item}", "label": int(self.rng.random() < 0.57),
                "ts": START_MS + n * 1000, "status": "generated", "history": [f"i{h}" for h in history],
                "cot_embedding": _unit(self.rng.standard_normal((1, DIM)).astype(np.float32))[0].round(6).tolist(),
            }))
        return points

    def request(self, candidates: int) -> tuple[str, np.ndarray, list[str]]:
        history = self.history()
        items = self.rng.choice(ITEMS, candidates, replace=False, p=self.popularity)
        return f"u{self.rng.integers(USERS)}", history, [f"i{i}" for i in items]


def bench_retrieval(args: argparse.Namespace, workdir: Path) -> list[tuple[str, str, str]]:
    workload = Workload(args.pool)
    space = FeatureSpace.build([f"u{u}" for u in range(USERS)], [f"i{i}" for i in range(ITEMS)], workload.item_vectors,
                               [("tag",)] * ITEMS)
    rows: list[tuple[str, str, str]] = []
    with EdgeIndex(workdir / "shard", SAMPLE_DIMENSION) as index:
        started = time.perf_counter()
        points = workload.points()
        for start in range(0, len(points), 2000):
            index.upsert(points[start : start + 2000])
        rows.append(("index build", f"{len(points):,} points", f"{time.perf_counter() - started:.1f} s"))
        if args.optimize:
            started = time.perf_counter()
            index.optimize()
            rows.append(("optimize (HNSW)", "", f"{time.perf_counter() - started:.1f} s"))

        requests = [workload.request(args.candidates) for _ in range(args.requests)]

        def queries(user: str, history: np.ndarray, items: list[str]) -> list[ExampleQuery]:
            h = _unit(workload.item_vectors[history].sum(axis=0, keepdims=True))[0]
            now = START_MS + args.pool * 1000
            return [ExampleQuery(user, item, now, h, space.item_vector(item)) for item in items]

        cold, cold_queries = [], []
        for request in requests[: min(30, len(requests))]:
            retriever, request_queries = ExampleRetriever(index), queries(*request)
            cold.extend(timed(lambda r=retriever, q=request_queries: r.retrieve(q), 1))
            cold_queries.append(retriever.index_queries)
        p50, p99 = percentiles(cold)
        rows.append((f"retrieval, cold item cache ({args.candidates} cand.)", f"{np.mean(cold_queries):.0f} queries/req",
                     f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"))

        shared = ExampleRetriever(index, item_cache_ttl_s=3600.0)
        for request in requests:
            shared.retrieve(queries(*request))  # fill the item cache (popular items recur)
        before = shared.index_queries
        warm = [timed(lambda q=q: shared.retrieve(q), 1)[0] for q in [queries(*r) for r in requests]]
        p50, p99 = percentiles(warm)
        rows.append((f"retrieval, warm item cache ({args.candidates} cand.)",
                     f"{(shared.index_queries - before) / len(requests):.1f} queries/req", f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"))

        for backbone in ("deepfm", "din"):
            sessions = {}
            for ict in (False, True):
                config = ModelConfig(backbone, ict, space.n_users, space.n_items, space.n_tags)  # type: ignore[arg-type]
                sessions[ict] = (config, onnx_session(export_onnx(RankerModel(config).eval(), workdir / f"e2e-{config.kind}.onnx"),
                                                      args.threads))

            def score(request: tuple[str, np.ndarray, list[str]], ict: bool, sessions: dict = sessions) -> None:
                user, history, items = request
                config, session = sessions[ict]
                inputs = space.encode_samples([user] * len(items), items, [[f"i{h}" for h in history]] * len(items))
                if ict:
                    found = shared.retrieve(queries(*request))
                    inputs |= gather_examples(space.encode_examples(found.records), found.slots)
                session.run(["score"], {n: inputs[n] for n in config.input_names})

            base = [timed(lambda r=r: score(r, False), 1)[0] for r in requests]
            with_ict = [timed(lambda r=r: score(r, True), 1)[0] for r in requests]
            b50, b99 = percentiles(base)
            i50, i99 = percentiles(with_ict)
            rows.append((f"{backbone}: features + ONNX", "", f"p50 {b50:.1f} ms, p99 {b99:.1f} ms"))
            rows.append((f"{backbone}+ict: retrieval (warm) + features + ONNX", f"{i50 / b50:.1f}x backbone (p50)",
                         f"p50 {i50:.1f} ms, p99 {i99:.1f} ms"))
    return rows


def _unit(matrix: np.ndarray) -> np.ndarray:
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, default=20_000, help="samples in the example index (default 20000)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads (pinned)")
    parser.add_argument("--optimize", action="store_true", help="build HNSW before measuring retrieval")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-ranker-") as tmp:
        workdir = Path(tmp)
        print(f"model, batch of {args.candidates} candidates, {args.threads} thread(s), ml-1m vocabulary sizes "
              "(p50 / p99 ms)")
        print(f"{'variant':<12} {'eager torch':>16} {'onnxruntime':>16} {'speed-up':>9}")
        for kind, eager, onnx, ratio in bench_models(args.candidates, args.threads, workdir):
            print(f"{kind:<12} {eager:>16} {onnx:>16} {ratio:>9}")
        print()
        print(f"retrieval and scoring per request, pool {args.pool:,} samples "
              f"({'HNSW' if args.optimize else 'exact scan'}), {args.requests} requests")
        for name, detail, value in bench_retrieval(args, workdir):
            print(f"{name:<52} {detail:>22}  {value}")


if __name__ == "__main__":
    main()
