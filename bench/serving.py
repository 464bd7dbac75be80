"""Benchmark of `llmcf serve`: `/v1/rank` latency at a fixed request rate, DeepFM+ICT (exact retrieval from the
in-memory pool) vs DeepFM alone, on MovieLens-1M pools, while new CoT samples keep arriving.

    python -m bench.serving [--pools 300,100000 --rate 100 --duration 20 --candidates 100 --arrivals 100 --home DIR]

1. In `--home` (kept between runs, so a second run trains and writes nothing): a small DeepFM+ICT and a DeepFM trained
   on ML-1M (the latest 4,000 training rows, 2 epochs: latency does not depend on how well they rank), the ML-1M items
   and their MiniLM embeddings, and per pool size a database holding that many CoT samples: ML-1M training rows drawn
   uniformly (seed 1), with their 20-item histories, CoTs pending (the pool's tokens and retrieval cost the same).
2. Per pool size, per kind: `llmcf serve --kind K` as a subprocess (the ICT server loads the whole pool into memory and
   encodes its example tokens before it is ready), then `/v1/rank` OPEN LOOP: request i is sent at start + i / rate
   whatever the earlier ones do, latency counted from that scheduled moment, after `--warmup` seconds not counted.
   Each request is a test row's user with its 20-item history and `--candidates` items drawn by popularity. During the
   ICT run `--arrivals` new samples per second are written to storage (other training rows), and the server's
   `llmcf_ranker_pool_sync_lag_seconds` histogram gives the p99 from storage to the pool for those samples.
3. Prints p50 / p99 / max, shed (503) and other errors per kind, the ICT / backbone p99 ratio, the server's own split
   (`Server-Timing`: retrieval, ONNX) and the pool sync lag. Targets (issue 13): DeepFM+ICT p99 <= 30 ms and <= 2x
   DeepFM's p99 in the same run, 0 shed, 0 errors, sync lag p99 <= 1 s. The client shares the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

import migrations
from llmcf.infra import free_port
from llmcf.settings import Settings
from storage.repository import Repository
from testkit.processes import LlmcfProcess, wait_until_ready

KINDS = ("deepfm+ict", "deepfm")
_TIMING = re.compile(r"(\w+);dur=([0-9.]+)")
_BUCKET = re.compile(r'llmcf_ranker_pool_sync_lag_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)')


@dataclass
class Run:
    kind: str
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    retrieval_ms: list[float] = field(default_factory=list)
    model_ms: list[float] = field(default_factory=list)
    sync_lag_p99_s: float | None = None
    arrived: int = 0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


class Workload:
    """ML-1M as the bench uses it: the corpus with histories, the pool rows, the rows that arrive during a run."""

    def __init__(self, home: Path, pool: int) -> None:
        from ranker.data import movielens_corpus
        from ranker.dataset import Samples, time_split

        self.corpus = movielens_corpus("ml-1m")
        self.samples = Samples.of(self.corpus, home / "cache" / "ranker")
        self.train, _, self.test = time_split(self.corpus, None, 5_000, seed=0)
        order = np.random.default_rng(1).permutation(self.train.rows)
        self.pool_rows, self.arrival_rows = np.sort(order[:pool]), order[pool:]

    def request(self, row: int) -> object:
        """The CoT request the stream worker would have stored for a corpus row (history: its previous 20 items)."""
        from llmcf.events import CotRequest, HistoryEntry, ItemSnapshot, from_epoch_ms

        corpus = self.corpus

        def snapshot(code: int) -> dict[str, object]:
            title, _, text = corpus.item_texts[code].partition("; ")
            return {"item_id": corpus.item_ids[code], "title": title, "text": text, "tags": list(corpus.item_tags[code])}

        history = [HistoryEntry(**snapshot(int(c)), label=int(label)) for c, label in
                   zip(self.samples.histories[row], self.samples.history_labels[row], strict=True) if c >= 0]
        return CotRequest(
            request_id=f"bench-{row}", user_id=corpus.user_ids[corpus.user[row]], item_id=corpus.item_ids[corpus.item[row]],
            label=int(corpus.label[row]), ts=from_epoch_ms(int(corpus.ts_ms[row])),
            target=ItemSnapshot(**snapshot(int(corpus.item[row]))), history=history, reason="sampled",
            requested_at=datetime.now(timezone.utc))

    def bodies(self, count: int, candidates: int, seed: int = 0) -> list[dict[str, object]]:
        corpus = self.corpus
        rng = np.random.default_rng(seed)
        popularity = np.bincount(corpus.item[self.train.rows], minlength=len(corpus.item_ids)).astype(np.float64)
        popularity /= popularity.sum()
        bodies = []
        for row in rng.choice(self.test.rows, count).tolist():
            items = rng.choice(len(corpus.item_ids), size=candidates, replace=False, p=popularity)
            bodies.append({"user_id": corpus.user_ids[corpus.user[row]],
                           "candidates": [corpus.item_ids[int(i)] for i in items],
                           "history": [corpus.item_ids[c] for c in self.samples.histories[row].tolist() if c >= 0]})
        return bodies


def prepare(settings: Settings, workload: Workload) -> None:
    from llmcf import movielens
    from llmcf.embeddings import MODEL_NAME
    from ranker.data import EmbeddingCache, embedding_cache_path
    from ranker.options import FitOptions, TrainOptions
    from ranker.train import train

    migrations.upgrade(settings.database_url)
    with Repository.from_settings(settings) as repository:
        for kind in KINDS:
            if repository.latest_model_version(kind, "serving") or repository.latest_model_version(kind, "candidate"):
                continue
            started = time.perf_counter()
            result = train(TrainOptions(dataset="ml-1m", ict=kind.endswith("+ict"), max_train_samples=4_000,
                                        max_eval_samples=800, fit=FitOptions(max_epochs=2, batch_size=256), threads=1),
                           settings, log=lambda _line: None)
            print(f"trained {result.version_id} in {time.perf_counter() - started:.0f} s", flush=True)
        if repository.counts()["cot_samples"] >= len(workload.pool_rows):
            return
        started = time.perf_counter()
        epoch = datetime(2000, 1, 1, tzinfo=timezone.utc)
        repository.upsert_items([movie.to_event(created_at=epoch) for movie in movielens.load("ml-1m").movies])
        corpus = workload.corpus
        vectors = EmbeddingCache(embedding_cache_path(settings.home / "cache" / "ranker", "items")).embed(corpus.item_texts)
        repository.upsert_item_embeddings(dict(zip(corpus.item_ids, vectors, strict=True)), model=MODEL_NAME)
        rows = workload.pool_rows.tolist()
        for start in range(0, len(rows), 5_000):
            repository.upsert_cot_samples([workload.request(r) for r in rows[start : start + 5_000]])
        print(f"storage filled in {time.perf_counter() - started:.0f} s: {repository.counts()}", flush=True)


async def drive(url: str, bodies: list[dict[str, object]], rate: float, warmup: int, run: Run) -> None:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one(i: int, at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            try:
                answer = await client.post(f"{url}/v1/rank", json=bodies[i])
            except httpx.HTTPError as exc:
                if i >= warmup:
                    run.errors[type(exc).__name__] = run.errors.get(type(exc).__name__, 0) + 1
                return
            if i < warmup:
                return
            if answer.status_code != 200:
                run.errors[str(answer.status_code)] = run.errors.get(str(answer.status_code), 0) + 1
                return
            run.latencies_ms.append((time.perf_counter() - at) * 1000)
            timing = dict(_TIMING.findall(answer.headers.get("server-timing", "")))
            run.retrieval_ms.append(float(timing.get("retrieval", 0.0)))
            run.model_ms.append(float(timing.get("model", 0.0)))

        start = time.perf_counter() + 0.2
        await asyncio.gather(*(one(i, start + i / rate) for i in range(len(bodies))))


def lag_buckets(url: str) -> dict[float, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {float(le): float(count) for le, count in _BUCKET.findall(text)}


def p99_of(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The upper bound of the bucket holding the 99th percentile of the observations between two scrapes."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    return next(b for b, c in zip(bounds, counts, strict=True) if c >= 0.99 * counts[-1])


def arrive(settings: Settings, workload: Workload, per_second: float, stop: threading.Event, run: Run) -> None:
    """Write `per_second` new CoT samples per second, in batches every 0.1 s, until `stop`."""
    rows = iter(workload.arrival_rows.tolist())
    with Repository.from_settings(settings) as repository:
        started = time.perf_counter()
        while not stop.is_set():
            due = int((time.perf_counter() - started) * per_second) - run.arrived
            if due > 0:
                repository.upsert_cot_samples([workload.request(next(rows)) for _ in range(due)])
                run.arrived += due
            stop.wait(0.1)


def serve_and_drive(settings: Settings, kind: str, bodies: list[dict[str, object]], args: argparse.Namespace,
                    workload: Workload, log_dir: Path) -> Run:
    port = free_port()
    process = LlmcfProcess("serve", settings, log_dir / f"serve-{kind}.log", "--kind", kind, "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    run = Run(kind)
    try:
        wait_until_ready(url, process, timeout_s=600)
        stop = threading.Event()
        writer = None
        if kind.endswith("+ict") and args.arrivals > 0:
            before = lag_buckets(url)
            writer = threading.Thread(target=arrive, args=(settings, workload, args.arrivals, stop, run), daemon=True)
            writer.start()
        try:
            asyncio.run(drive(url, bodies, args.rate, int(args.warmup * args.rate), run))
        finally:
            stop.set()
            if writer is not None:
                writer.join(timeout=30)
        if writer is not None:
            time.sleep(2 * settings.ranker_pool_sync_s + 0.5)  # the last arrivals reach the pool
            run.sync_lag_p99_s = p99_of(before, lag_buckets(url))
        return run
    finally:
        process.stop(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", type=lambda v: [int(x) for x in v.split(",")], default=[300, 100_000],
                        help="CoT samples in storage, comma-separated (default 300,100000)")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second (default 100)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per kind (default 20)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds sent first and not counted (default 3)")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--arrivals", type=float, default=100.0, help="new CoT samples per second during the ICT run")
    parser.add_argument("--home", type=Path, default=Path(tempfile.gettempdir()) / "llmcf-bench-serving-ml1m",
                        help="LLMCF_HOME kept between runs (default $TMPDIR/llmcf-bench-serving-ml1m)")
    args = parser.parse_args()

    report = []
    for pool in args.pools:
        settings = Settings.from_env({"LLMCF_HOME": str(args.home), "LLMCF_LOG_LEVEL": "WARNING",
                                      "DATABASE_URL": f"sqlite:///{args.home / f'pool-{pool}.db'}"})
        workload = Workload(args.home, pool)
        prepare(settings, workload)
        bodies = workload.bodies(int((args.warmup + args.duration) * args.rate), args.candidates)
        runs = {kind: serve_and_drive(settings, kind, bodies, args, workload, args.home) for kind in KINDS}
        report.append((pool, runs))

    print(f"\n/v1/rank, ML-1M, {args.candidates} candidates, open loop at {args.rate:g} requests/s for {args.duration:g} s "
          f"per kind (after {args.warmup:g} s warm-up); {args.arrivals:g} new CoT samples/s during the ICT run")
    print(f"{'pool':>8} {'kind':<12} {'ok':>6} {'shed/errors':<18} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'retrieval ms':>13} {'onnx ms':>8}")
    for pool, runs in report:
        for kind, run in runs.items():
            errors = ", ".join(f"{k}: {v}" for k, v in sorted(run.errors.items())) or "0"
            print(f"{pool:>8,} {kind:<12} {len(run.latencies_ms):>6} {errors:<18} {run.percentile(0.5):>8.1f} "
                  f"{run.percentile(0.99):>8.1f} {max(run.latencies_ms, default=float('nan')):>8.1f} "
                  f"{_mean(run.retrieval_ms):>13.2f} {_mean(run.model_ms):>8.2f}")
        ict, backbone = runs["deepfm+ict"], runs["deepfm"]
        lag = "n/a" if ict.sync_lag_p99_s is None else f"<= {ict.sync_lag_p99_s:g} s"
        print(f"{'':>8} pool {pool:,}: ICT / backbone p99 {ict.percentile(0.99) / backbone.percentile(0.99):.2f}x "
              f"(target <= 2x); ICT p99 {ict.percentile(0.99):.1f} ms (target <= 30 ms); {ict.arrived:,} samples arrived, "
              f"sync lag p99 {lag} (target <= 1 s)")


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


if __name__ == "__main__":
    main()
