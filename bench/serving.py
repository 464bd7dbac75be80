"""Benchmark of `llmcf serve`: `/v1/rank` latency at a fixed request rate, DeepFM+ICT (with retrieval) vs DeepFM alone.

    python -m bench.serving [--rate 100 --duration 20 --candidates 100 --pool 2000 --home DIR]

1. In `--home` (kept between runs, so a second run trains and embeds nothing): train a small DeepFM+ICT and a DeepFM on
   ml-100k (the test configuration), and fill the database as the pipeline would (items, MiniLM embeddings,
   interactions, `--pool` CoT samples with `template` rationales, NOT an LLM).
2. For each kind in turn, in the same run: start `llmcf serve --kind K` as a subprocess (the ICT server builds its
   embedded Qdrant Edge replica of the pool from storage), wait for /readyz, then drive `/v1/rank` OPEN LOOP: request
   i is sent at start + i / rate whatever the earlier ones do, latency counted from that scheduled moment (so a stall
   is not hidden by sending less), `--warmup` seconds first, not counted. Users are drawn from those with a stored
   history, candidates by popularity.
3. Print p50 / p99 / max latency and errors per kind, the ICT / backbone ratio, and the server's own split from its
   `Server-Timing` header (retrieval, ONNX, the rest: features, storage reads, HTTP).
Targets (issue 4): p99 <= 30 ms for 100 candidates at 100 requests/s on the embedded index; ICT at most 2x the backbone.
The client runs on the same machine as the server: its CPU use is in the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

import migrations
from llmcf.infra import free_port
from llmcf.settings import Settings
from storage.repository import Repository
from tests.fixtures.processes import LlmcfProcess, wait_while_running
from tests.ranker.serving.support import STORED_INTERACTIONS, populate_storage, train_version

KINDS = ("deepfm+ict", "deepfm")
_TIMING = re.compile(r"(\w+);dur=([0-9.]+)")


@dataclass
class Run:
    kind: str
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    retrieval_ms: list[float] = field(default_factory=list)
    model_ms: list[float] = field(default_factory=list)
    sent: int = 0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def prepare(settings: Settings, pool: int) -> None:
    migrations.upgrade(settings.database_url)
    with Repository.from_settings(settings) as repository:
        for kind in KINDS:
            if repository.latest_model_version(kind, "serving") or repository.latest_model_version(kind, "candidate"):
                continue
            started = time.perf_counter()
            result = train_version(settings, ict=kind.endswith("+ict"))
            print(f"trained {result.version_id} in {time.perf_counter() - started:.0f} s", flush=True)
        if repository.counts()["cot_samples"] < pool:
            started = time.perf_counter()
            populate_storage(repository, settings, samples=pool)
            print(f"storage filled in {time.perf_counter() - started:.0f} s: {repository.counts()}", flush=True)


def requests(settings: Settings, count: int, candidates: int, seed: int = 0) -> list[dict[str, object]]:
    from llmcf import movielens

    ratings = movielens.load("ml-100k")
    stored = slice(0, STORED_INTERACTIONS)
    rng = np.random.default_rng(seed)
    users = np.unique(ratings.user_codes[stored][-20_000:])
    popularity = np.bincount(ratings.item_codes[stored], minlength=len(ratings.movies)).astype(np.float64)
    popularity /= popularity.sum()
    bodies = []
    for _ in range(count):
        user = ratings.user_ids[int(rng.choice(users))]
        items = rng.choice(len(ratings.movies), size=candidates, replace=False, p=popularity)
        bodies.append({"user_id": user, "candidates": [ratings.movies[int(i)].item_id for i in items]})
    return bodies


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
            run.sent += 1
            if answer.status_code != 200:
                run.errors[str(answer.status_code)] = run.errors.get(str(answer.status_code), 0) + 1
                return
            run.latencies_ms.append((time.perf_counter() - at) * 1000)
            timing = dict(_TIMING.findall(answer.headers.get("server-timing", "")))
            run.retrieval_ms.append(float(timing.get("retrieval", 0.0)))
            run.model_ms.append(float(timing.get("model", 0.0)))

        start = time.perf_counter() + 0.2
        await asyncio.gather(*(one(i, start + i / rate) for i in range(len(bodies))))


def serve_and_drive(settings: Settings, kind: str, bodies: list[dict[str, object]], rate: float, warmup: int,
                    log_dir: Path) -> Run:
    port = free_port()
    process = LlmcfProcess("serve", settings, log_dir / f"serve-{kind}.log", "--kind", kind, "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_while_running(ready, [process], timeout_s=300, what=f"llmcf serve --kind {kind}")
        run = Run(kind)
        asyncio.run(drive(url, bodies, rate, warmup, run))
        return run
    finally:
        process.stop(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second (default 100)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per kind (default 20)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds sent first and not counted (default 3)")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--pool", type=int, default=2000, help="CoT samples in storage (default 2000)")
    parser.add_argument("--home", type=Path, default=Path(tempfile.gettempdir()) / "llmcf-bench-serving",
                        help="LLMCF_HOME kept between runs (default $TMPDIR/llmcf-bench-serving)")
    args = parser.parse_args()

    settings = Settings.from_env({"LLMCF_HOME": str(args.home), "LLMCF_LOG_LEVEL": "WARNING"})
    prepare(settings, args.pool)
    warmup = int(args.warmup * args.rate)
    bodies = requests(settings, warmup + int(args.duration * args.rate), args.candidates)
    runs = {kind: serve_and_drive(settings, kind, bodies, args.rate, warmup, args.home) for kind in KINDS}

    print(f"\n/v1/rank, {args.candidates} candidates, open loop at {args.rate:g} requests/s for {args.duration:g} s per kind "
          f"(after {args.warmup:g} s warm-up), pool {args.pool:,} CoT samples, embedded Qdrant Edge replica")
    print(f"{'kind':<12} {'ok':>6} {'errors':<18} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'retrieval ms':>13} {'onnx ms':>8}")
    for kind, run in runs.items():
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(run.errors.items())) or "0"
        print(f"{kind:<12} {len(run.latencies_ms):>6} {errors:<18} {run.percentile(0.5):>8.1f} {run.percentile(0.99):>8.1f} "
              f"{max(run.latencies_ms, default=float('nan')):>8.1f} {_mean(run.retrieval_ms):>13.2f} {_mean(run.model_ms):>8.2f}")
    ict, backbone = runs["deepfm+ict"], runs["deepfm"]
    print(f"ICT / backbone: p50 {ict.percentile(0.5) / backbone.percentile(0.5):.2f}x, "
          f"p99 {ict.percentile(0.99) / backbone.percentile(0.99):.2f}x (target <= 2x); "
          f"ICT p99 {ict.percentile(0.99):.1f} ms (target <= 30 ms)")
    if ict.latencies_ms:
        mean = _mean(ict.latencies_ms)
        print(f"ICT time split (server-side means): retrieval {_mean(ict.retrieval_ms):.2f} ms "
              f"({_mean(ict.retrieval_ms) / mean:.0%} of the mean latency {mean:.1f} ms), ONNX {_mean(ict.model_ms):.2f} ms "
              f"({_mean(ict.model_ms) / mean:.0%}), the rest (features, storage reads, HTTP, client) "
              f"{mean - _mean(ict.retrieval_ms) - _mean(ict.model_ms):.2f} ms")


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


if __name__ == "__main__":
    main()
