"""Benchmark of the ranker's scoring path in-process: the model alone (onnxruntime vs eager torch), then the served
request path on real MovieLens-1M pools.

    python -m bench.ranker_model [--pools 300,100000 --requests 300 --candidates 100 --threads 1]

1. Model: the four variants at MovieLens-1M vocabulary sizes, one batch of `--candidates` rows, eager torch
   (inference mode) vs onnxruntime on the same inputs, both pinned to `--threads`; p50/p99 over repeated runs.
2. Request path, per pool size: a pool of that many ML-1M training rows (uniform, seed 1; CoTs pending: retrieval and
   the example tokens cost the same either way) in the server's `SamplePool`, its tokens encoded once by an untrained
   DeepFM+ICT's example encoder; then `--requests` requests (a test row's user and 20-item history, `--candidates`
   items drawn by popularity), each: features, exact 2+2 retrieval for every candidate, token gather and the query
   scorer, against the backbone's features and ONNX run on the same requests; the requests run once untimed first,
   as a running server's similarity-row cache holds its catalogue's items. No HTTP: `bench.serving` has it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ranker.export import export_onnx, export_split, onnx_session, random_inputs, torch_scores
from ranker.model import ModelConfig, RankerModel

USERS, ITEMS, TAGS = 6040, 3706, 18


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


def bench_request_path(args: argparse.Namespace, workdir: Path) -> list[tuple[str, str, str]]:
    from datetime import datetime, timezone

    from ranker.cot_pool import CotPool
    from ranker.data import movielens_corpus
    from ranker.dataset import Samples, build_feature_space, time_split
    from ranker.examples import sample_pool
    from ranker.retrieval import LATEST_SEQ, ExactRetriever, seed_of, shuffle_slots
    from ranker.serving.examples import EncodedExamples
    from ranker.serving.models import ModelBundle
    from ranker.serving.scoring import encode_request

    corpus = movielens_corpus("ml-1m")
    samples = Samples.of(corpus, args.home / "cache")
    train, _, test = time_split(corpus, None, 5_000, seed=0)
    space = build_feature_space(samples, train.rows)
    bundles = {}
    for ict in (False, True):
        torch.manual_seed(0)
        model = RankerModel(ModelConfig("deepfm", ict, space.n_users, space.n_items, space.n_tags)).eval()
        directory = workdir / ("ict" if ict else "backbone")
        session = onnx_session(export_onnx(model, directory / "model.onnx"), args.threads)
        split = [onnx_session(p, args.threads) for p in export_split(model, directory)] if ict else [None, None]
        bundles[ict] = ModelBundle(f"bench-{ict}", model.config.kind, datetime.now(timezone.utc), model.config, session,
                                   space, {}, *split)
    rng = np.random.default_rng(3)
    popularity = np.bincount(corpus.item[train.rows], minlength=len(corpus.item_ids)).astype(np.float64)
    popularity /= popularity.sum()
    requests = []
    for row in rng.choice(test.rows, args.requests, replace=False).tolist():
        history = [corpus.item_ids[c] for c in samples.histories[row].tolist() if c >= 0]
        items = [corpus.item_ids[i] for i in rng.choice(len(corpus.item_ids), args.candidates, replace=False, p=popularity)]
        requests.append((corpus.user_ids[corpus.user[row]], history, items))

    def features(request: tuple[str, list[str], list[str]]) -> dict[str, np.ndarray]:
        user, history, items = request
        return encode_request(space, user, items, history)

    rows: list[tuple[str, str, str]] = []
    base = [timed(lambda r=r: bundles[False].run(features(r)), 1)[0] for r in requests]
    b50, b99 = percentiles(base)
    rows.append(("deepfm: features + ONNX", "", f"p50 {b50:.2f} ms, p99 {b99:.2f} ms"))
    for size in args.pools:
        pool_rows = np.sort(np.random.default_rng(1).choice(train.rows, min(size, len(train.rows)), replace=False))
        started = time.perf_counter()
        pool = sample_pool(samples, CotPool(pool_rows, [None] * len(pool_rows), None))
        encoded = EncodedExamples(bundles[True])
        encoded.extend(pool.view)
        rows.append((f"pool of {len(pool):,}: built and its tokens encoded", "", f"{time.perf_counter() - started:.1f} s"))
        retriever, ict, retrieval = ExactRetriever(pool), bundles[True], []

        def score(request: tuple[str, list[str], list[str]], split: list[float], pool=pool,  # type: ignore[no-untyped-def]
                  retriever=retriever, encoded=encoded, ict=ict) -> None:
            user, _, items = request
            inputs = features(request)
            started = time.perf_counter()
            view = pool.view
            found = retriever.top_rows_for_history(view, view.user_code(user), 10**13, LATEST_SEQ,
                                                   inputs["history_text"][0], items, inputs["item_text"])
            slots = shuffle_slots(found, [seed_of(user, item, 10**13) for item in items])
            tokens, present = encoded.tokens(view, slots)
            split.append((time.perf_counter() - started) * 1000)
            ict.run_with_tokens(inputs, tokens, present)

        for request in requests:  # a running server's similarity-row cache holds the catalogue's candidates
            score(request, [])
        scanned = retriever.rows_scored
        with_ict = [timed(lambda r=r, out=retrieval: score(r, out), 1)[0] for r in requests]
        i50, i99 = percentiles(with_ict)
        r50, r99 = percentiles(retrieval)
        rows.append((f"  retrieval + token gather ({args.candidates} cand.)",
                     f"{(retriever.rows_scored - scanned) / len(requests):,.0f} rows/req", f"p50 {r50:.2f} ms, p99 {r99:.2f} ms"))
        rows.append(("  deepfm+ict: features + retrieval + scorer", f"{i50 / b50:.1f}x backbone (p50)",
                     f"p50 {i50:.2f} ms, p99 {i99:.2f} ms"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", type=lambda v: [int(x) for x in v.split(",")], default=[300, 100_000],
                        help="pool sizes, comma-separated (default 300,100000)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--home", type=Path, default=Path(tempfile.gettempdir()) / "llmcf-bench-retrieval",
                        help="where the item embeddings are cached (default $TMPDIR/llmcf-bench-retrieval)")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads (pinned)")
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
        print(f"the request path, MovieLens-1M pools, {args.requests} requests of {args.candidates} candidates, "
              f"{args.threads} thread(s)")
        for name, detail, value in bench_request_path(args, workdir):
            print(f"{name:<52} {detail:>22}  {value}")


if __name__ == "__main__":
    main()
