"""Benchmark of `llmcf serve` overloaded: load shedding at twice its capacity, and recovery once the load drops.

    python -m bench.overload [--kind deepfm+ict --candidates 100 --overload-s 20 --recovery-s 10 --home DIR]

1. Prepare the home as `bench.serving` does (same default home and an ML-1M pool of `--pool` samples, so a run after
   it trains and writes nothing), start `llmcf serve --kind K` as a subprocess and wait for /readyz.
2. Capacity: a CLOSED loop of LLMCF_RANKER_MAX_INFLIGHT clients (each sends its next request when its answer comes)
   for `--capacity-s` seconds; capacity = the median over its whole seconds of the 200s answered in each, so that a
   second or two slowed by a neighbour on a shared machine does not size the 2x phase (the spread is printed).
3. Overload: OPEN loop at 2x capacity for `--overload-s` seconds (request i sent at start + i / rate whatever the
   earlier ones do; latency counted from that scheduled moment), then 0.5x capacity for `--recovery-s` seconds.
4. Print capacity, offered rates, answered 200 / shed 503 / other per phase, p50 / p99 / max latency of the 200s and of
   the 503s, and recovery: when the last request of the 0.5x phase that was not answered 200 was sent (the 2x phase's
   requests still in flight when the load drops are shed a moment longer) and the error rate after the 0.5x phase's
   first second, which should be 0; and the load held at 2x: 200s per second as a share of capacity, and the
   requests neither answered 200 nor shed with 503 (another status, a timeout, a broken connection), which should be 0.
The client runs on the same machine as the server: its CPU use is in the figures, which are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.serving import Workload, prepare
from llmcf.infra import free_port
from llmcf.settings import Settings
from testkit.processes import LlmcfProcess, wait_until_ready


@dataclass
class Phase:
    name: str
    rate: float
    outcomes: Counter[str] = field(default_factory=Counter)
    ok_ms: list[float] = field(default_factory=list)
    shed_ms: list[float] = field(default_factory=list)
    scheduled_at_s: list[float] = field(default_factory=list)
    """When each request is sent, in seconds from the phase's start; `failed_at_s` for those not answered 200."""
    failed_at_s: list[float] = field(default_factory=list)
    starts_at: float = 0.0

    def others(self) -> Counter[str]:
        """Outcomes neither answered 200 nor shed with 503: other statuses and client errors by exception name."""
        return Counter({outcome: count for outcome, count in self.outcomes.items() if outcome not in ("200", "503")})

    def after(self, seconds: float) -> tuple[int, int]:
        """(requests not answered 200, requests) among those sent `seconds` or more into the phase."""
        return (sum(1 for at in self.failed_at_s if at >= seconds), sum(1 for at in self.scheduled_at_s if at >= seconds))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


async def closed_loop(url: str, bodies: list[dict[str, object]], workers: int, seconds: float) -> list[int]:
    """200s answered in each whole second of a closed loop of `workers` clients running for `seconds`."""
    answered_at: list[float] = []
    sent = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while time.perf_counter() < deadline:
            sent += 1
            if (await client.post(url, json=bodies[sent % len(bodies)])).status_code == 200:
                answered_at.append(time.perf_counter() - started)

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(workers)))
    per_second = Counter(int(at) for at in answered_at)
    return [per_second[second] for second in range(max(1, int(seconds)))]


async def open_loop(url: str, bodies: list[dict[str, object]], phases: list[tuple[Phase, float]]) -> None:
    """Each phase in turn, `(phase, seconds)`, on one client: the next phase's schedule starts where the last one's ends."""
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one(phase: Phase, body: dict[str, object], at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            try:
                answer = await client.post(url, json=body)
            except httpx.HTTPError as exc:
                phase.outcomes[type(exc).__name__] += 1
                phase.failed_at_s.append(at - phase.starts_at)
                return
            latency_ms = (time.perf_counter() - at) * 1000
            phase.outcomes[str(answer.status_code)] += 1
            if answer.status_code == 200:
                phase.ok_ms.append(latency_ms)
                return
            phase.failed_at_s.append(at - phase.starts_at)
            if answer.status_code == 503 and answer.headers.get("retry-after") == "1":
                phase.shed_ms.append(latency_ms)

        schedule, at, index = [], time.perf_counter() + 0.2, 0
        for phase, seconds in phases:
            phase.starts_at = at
            for _ in range(int(phase.rate * seconds)):
                phase.scheduled_at_s.append(at - phase.starts_at)
                schedule.append(one(phase, bodies[index % len(bodies)], at))
                at += 1 / phase.rate
                index += 1
        await asyncio.gather(*schedule)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="deepfm+ict", choices=["deepfm+ict", "deepfm"], help="kind served (default deepfm+ict)")
    parser.add_argument("--candidates", type=int, default=100, help="candidates scored per request (default 100)")
    parser.add_argument("--capacity-s", type=int, default=10,
                        help="closed-loop seconds measuring capacity, the median second counts (default 10)")
    parser.add_argument("--overload-s", type=float, default=20.0, help="seconds at 2x capacity (default 20)")
    parser.add_argument("--recovery-s", type=float, default=10.0, help="seconds at 0.5x capacity (default 10)")
    parser.add_argument("--pool", type=int, default=2000, help="CoT samples in storage (default 2000)")
    parser.add_argument("--home", type=Path, default=Path(tempfile.gettempdir()) / "llmcf-bench-serving-ml1m",
                        help="LLMCF_HOME kept between runs, shared with bench.serving")
    args = parser.parse_args()

    settings = Settings.from_env({"LLMCF_HOME": str(args.home), "LLMCF_LOG_LEVEL": "WARNING",
                                  "DATABASE_URL": f"sqlite:///{args.home / f'pool-{args.pool}.db'}"})
    workload = Workload(args.home, args.pool)
    prepare(settings, workload)
    bodies = workload.bodies(2000, args.candidates)
    port = free_port()
    process = LlmcfProcess("serve", settings, args.home / "serve-overload.log", "--kind", args.kind, "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, process, timeout_s=300)
        url = f"{base}/v1/rank"
        asyncio.run(closed_loop(url, bodies, settings.ranker_max_inflight, 1.0))  # warm-up, not counted
        capacity_seconds = asyncio.run(closed_loop(url, bodies, settings.ranker_max_inflight, args.capacity_s))
        capacity = float(statistics.median(capacity_seconds))
        overload, recovery = Phase("2x", 2 * capacity), Phase("0.5x", 0.5 * capacity)
        asyncio.run(open_loop(url, bodies, [(overload, args.overload_s), (recovery, args.recovery_s)]))
    finally:
        process.stop(timeout=60)

    print(f"\n/v1/rank overload, kind {args.kind}, {args.candidates} candidates, LLMCF_RANKER_MAX_INFLIGHT="
          f"{settings.ranker_max_inflight}: capacity {capacity:.1f} requests/s (closed loop, median of {args.capacity_s} "
          f"seconds, which ranged {min(capacity_seconds)}-{max(capacity_seconds)})")
    print(f"{'phase':<6} {'offered/s':>9} {'s':>4} {'200':>6} {'503':>6} {'other':<16} {'200 p50':>8} {'p99':>7} {'max':>7} "
          f"{'503 p50':>8} {'p99':>7} {'max':>7}  (ms, from the scheduled send)")
    for phase, seconds in ((overload, args.overload_s), (recovery, args.recovery_s)):
        other = ", ".join(f"{k}: {v}" for k, v in sorted(phase.others().items())) or "0"
        print(f"{phase.name:<6} {phase.rate:>9.1f} {seconds:>4g} {phase.outcomes['200']:>6} {phase.outcomes['503']:>6} {other:<16} "
              f"{percentile(phase.ok_ms, 0.5):>8.1f} {percentile(phase.ok_ms, 0.99):>7.1f} {max(phase.ok_ms, default=float('nan')):>7.1f} "
              f"{percentile(phase.shed_ms, 0.5):>8.1f} {percentile(phase.shed_ms, 0.99):>7.1f} "
              f"{max(phase.shed_ms, default=float('nan')):>7.1f}")
    last_failure = f", the last sent {max(recovery.failed_at_s):.2f} s after the load dropped" if recovery.failed_at_s else ""
    failed_later, sent_later = recovery.after(1.0)
    print(f"recovery: {len(recovery.failed_at_s)} of {len(recovery.scheduled_at_s)} requests in the 0.5x phase not answered "
          f"200{last_failure}; after its first second {failed_later} of {sent_later} (target 0)")
    held = overload.outcomes["200"] / args.overload_s
    print(f"load held at 2x: {held:.1f} requests/s answered 200 ({held / capacity:.0%} of capacity), "
          f"{overload.outcomes['503']} shed with 503; {overload.others().total()} of {overload.outcomes.total()} "
          f"requests neither 200 nor 503 (target 0)")


if __name__ == "__main__":
    main()
