"""The CoT budget under overload: one generator member fed at N times its capacity for minutes (issue 14).

    python -m bench.cot_budget [--backend transformers] [--overload 10] [--minutes 3] [--ttl-s 120]
                               [--max-backlog 1000] [--capacity-requests 96] [--device cpu]

On a real broker (an embedded Tansu on a free port, or KAFKA_BOOTSTRAP_SERVERS), fresh topics per phase, with the
real MovieLens-100k LLM-CF requests of `bench.generators.movielens_requests` in stream order:
1. Capacity: `--capacity-requests` requests published at once, one `GeneratorPool` with the backend's default
   configuration (as `llmcf generate` runs it: for transformers on CPU, bfloat16 where native, the compact prompt,
   batches of 48); capacity = results / seconds from the member's assignment to the last result
   (`bench.generator_pool.run_through_pool`).
2. Overload: an open-loop publisher sends `--overload` x capacity requests per second for `--minutes` (request i at
   start + i / rate, `requested_at` = when it is sent) to a fresh pool with `LLMCF_COT_TTL_S` = `--ttl-s` and
   `LLMCF_COT_MAX_BACKLOG` = `--max-backlog`; the backlog, the requests consumed and the member's own capacity
   estimate are sampled every 0.5 s.
3. Drain: once publishing stops, wait until every request is accounted for (at most the TTL plus 2 minutes).
It prints requested, generated, skipped by reason, dead-lettered and their sum; the largest backlog against its bound;
the largest consumer lag (requests sent, not yet consumed); the request-to-result latency of the generated CoTs (p50,
p99, max, from each request's `requested_at` to its result's `generated_at`) against the TTL; and duplicate results.
Each check prints PASS or FAIL (and the exit status is 1 if one fails). The template backend (NOT an LLM) runs the
same protocol in a minute or two and measures the machinery only. Other processes skew every figure: the load average
is printed per phase.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import Producer

from bench.generator_pool import fresh_settings, run_through_pool
from bench.generators import load_average, movielens_requests
from bench.overload import percentile
from generators.backends import create_backend
from generators.backends.base import CotBackend
from generators.config import PoolConfig
from generators.pool import GeneratorPool
from llmcf.embeddings import TextEmbedder
from llmcf.events import CotRequest, CotResult, decode
from llmcf.infra.broker import bootstrap_servers
from llmcf.kafka import producer_config, read_to_end
from llmcf.settings import Settings
from llmcf.topics import Topics

SAMPLE_EVERY_S = 0.5


class Member:
    """A pool on a thread of its own; `stop()` ends it and re-raises what it raised."""

    def __init__(self, settings: Settings, bootstrap: str, backend: CotBackend, embedder: TextEmbedder,
                 config: PoolConfig):
        self.pool = GeneratorPool(settings, bootstrap, backend, embedder, config)
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="bench-pool", daemon=True)
        self.thread.start()
        if not self.pool.assigned.wait(60):
            raise SystemExit("the pool got no partition within 60 s")

    def _run(self) -> None:
        try:
            self.pool.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.failure.append(exc)

    def check(self) -> None:
        if self.failure:
            raise SystemExit(f"the pool failed: {self.failure[0]}")

    def stop(self) -> None:
        self.pool.stop()
        self.thread.join(120)
        self.check()


class Publisher(threading.Thread):
    """Open loop: request i is sent at start + i / rate, whatever the pool does; records when each was sent."""

    def __init__(self, settings: Settings, bootstrap: str, requests: list[CotRequest], rate: float):
        super().__init__(name="bench-publisher", daemon=True)
        self.producer = Producer(producer_config(settings, bootstrap))
        self.topic = Topics.from_settings(settings).cot_requests
        self.requests, self.rate = requests, rate
        self.sent: dict[str, CotRequest] = {}
        self.late_s = 0.0  # how far behind its schedule the publisher itself fell at most

    def run(self) -> None:
        start = time.monotonic()
        for i, request in enumerate(self.requests):
            due = start + i / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                self.late_s = max(self.late_s, -delay)
            request = request.model_copy(update={"requested_at": datetime.now(UTC)})
            self.producer.produce(self.topic, key=request.request_id.encode(), value=request.to_bytes())
            self.producer.poll(0)
            self.sent[request.request_id] = request
        if self.producer.flush(60):
            raise RuntimeError("requests undelivered after 60 s")


def overload(bootstrap: str, home: Path, backend: CotBackend, embedder: TextEmbedder, args: argparse.Namespace,
             capacity: float, max_batch: int) -> dict:
    settings = fresh_settings(bootstrap, home)
    rate = args.overload * capacity
    count = max(1, round(rate * args.minutes * 60))
    requests = movielens_requests(count)
    config = PoolConfig(max_batch=max_batch, ttl_s=args.ttl_s, max_backlog=args.max_backlog)
    member = Member(settings, bootstrap, backend, embedder, config)
    publisher = Publisher(settings, bootstrap, requests, rate)
    print(f"overload: {count:,} requests at {rate:.2f}/s ({args.overload:g} x {capacity:.2f} CoTs/s) for "
          f"{args.minutes:g} min, TTL {args.ttl_s:g} s, max backlog {args.max_backlog} (load avg {load_average()})",
          flush=True)
    started = time.monotonic()
    publisher.start()
    most_backlog = most_lag = 0
    estimates: list[float] = []
    next_progress = started + 30
    stats = member.pool.stats
    drain_deadline = None
    while stats.published + stats.skipped + stats.dead_lettered < count:
        member.check()
        time.sleep(SAMPLE_EVERY_S)
        most_backlog = max(most_backlog, member.pool.backlog_size)
        most_lag = max(most_lag, len(publisher.sent) - stats.consumed)
        if member.pool.capacity:
            estimates.append(member.pool.capacity)
        now = time.monotonic()
        if not publisher.is_alive() and drain_deadline is None:
            drain_deadline = now + args.ttl_s + 120
        if drain_deadline is not None and now > drain_deadline:
            print("  drain timed out: some requests are not accounted for", flush=True)
            break
        if now >= next_progress:
            print(f"  [{now - started:4.0f} s] sent {len(publisher.sent):,}, consumed {stats.consumed:,}, generated "
                  f"{stats.published:,}, skipped {stats.skipped:,}, backlog {member.pool.backlog_size}", flush=True)
            next_progress += 30
    seconds = time.monotonic() - started
    member.stop()
    publisher.join(60)

    results = [decode(CotResult, m.value())
               for m in read_to_end(settings, bootstrap, Topics.from_settings(settings).cot_results)]
    latencies = [(r.generated_at - publisher.sent[r.request_id].requested_at).total_seconds() for r in results]
    return {
        "backend": backend.name, "model": backend.model, "capacity_cots_per_s": capacity, "offered_per_s": rate,
        "overload": args.overload, "minutes": args.minutes, "ttl_s": args.ttl_s, "max_backlog": args.max_backlog,
        "max_batch": max_batch, "seconds": seconds, "requested": count, "sent": len(publisher.sent),
        "generated": stats.published, "skipped_ttl": stats.skipped_ttl + stats.skipped_in_queue,
        "skipped_backlog": stats.skipped_backlog, "skipped_duplicate": stats.skipped_duplicate,
        "dead_lettered": stats.dead_lettered,
        "accounted": stats.published + stats.skipped + stats.dead_lettered,
        "results": len(results), "distinct_results": len({r.request_id for r in results}),
        "most_backlog": most_backlog, "most_lag": most_lag,
        "publisher_late_s": publisher.late_s,
        "latency_p50_s": percentile(latencies, 0.5), "latency_p99_s": percentile(latencies, 0.99),
        "latency_max_s": max(latencies, default=float("nan")),
        "member_capacity_estimate": statistics.median(estimates) if estimates else None,
        "cots_per_s_under_load": stats.published / seconds,
    }


def report(row: dict) -> bool:
    print("\n## The CoT budget at {overload:g}x capacity ({backend}, {model})".format(**row))
    print(f"protocol: MovieLens-100k LLM-CF requests in stream order (20-item histories), one member, max batch "
          f"{row['max_batch']}, TTL {row['ttl_s']:g} s, max backlog {row['max_backlog']}; capacity "
          f"{row['capacity_cots_per_s']:.2f} CoTs/s measured first, offered {row['offered_per_s']:.2f} requests/s for "
          f"{row['minutes']:g} min (open loop; the publisher fell at most {row['publisher_late_s']:.2f} s behind)")
    print(f"requested {row['requested']:,} = generated {row['generated']:,} + skipped {row['skipped_ttl']:,} (ttl) "
          f"+ {row['skipped_backlog']:,} (backlog full) + {row['skipped_duplicate']:,} (duplicate) + dead-lettered "
          f"{row['dead_lettered']:,}  ->  accounted {row['accounted']:,}")
    print(f"generated under load: {row['cots_per_s_under_load']:.2f} CoTs/s over {row['seconds']:.0f} s (the member's "
          f"own estimate: {row['member_capacity_estimate'] or float('nan'):.2f}); results on "
          f"cot-results {row['results']:,}, distinct {row['distinct_results']:,}")
    print(f"backlog: at most {row['most_backlog']:,} waiting (bound {row['max_backlog']:,}); consumer lag at most "
          f"{row['most_lag']:,} requests sent and not yet consumed")
    print(f"request-to-result latency of generated CoTs: p50 {row['latency_p50_s']:.1f} s, p99 "
          f"{row['latency_p99_s']:.1f} s, max {row['latency_max_s']:.1f} s (TTL {row['ttl_s']:g} s)")
    checks = {
        "every request accounted for (generated + skipped + dead-lettered = requested)":
            row["accounted"] == row["requested"],
        "one result per generated request": row["results"] == row["distinct_results"] == row["generated"],
        "backlog under its bound": row["most_backlog"] <= row["max_backlog"],
        "p99 latency of generated CoTs under the TTL": row["latency_p99_s"] <= row["ttl_s"],
        "skipped requests counted": row["skipped_ttl"] + row["skipped_backlog"] > 0,
    }
    for what, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {what}")
    return all(checks.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="transformers", choices=("transformers", "template"),
                        help="transformers (the default SmolLM2 configuration) or template (NOT an LLM: the machinery)")
    parser.add_argument("--overload", type=float, default=10.0, help="offered load as a multiple of capacity (10)")
    parser.add_argument("--minutes", type=float, default=3.0, help="how long the overload lasts (3)")
    parser.add_argument("--ttl-s", type=float, default=120.0, help="LLMCF_COT_TTL_S of the overloaded member (120)")
    parser.add_argument("--max-backlog", type=int, default=1000, help="LLMCF_COT_MAX_BACKLOG (1000, the default)")
    parser.add_argument("--capacity-requests", type=int, default=0,
                        help="requests of the capacity phase (default: 2 batches; 400 for the template backend)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (generation and embedding)")
    args = parser.parse_args()
    if args.overload <= 1 or args.minutes <= 0 or args.ttl_s <= 0 or args.max_backlog < 1:
        parser.error("--overload must exceed 1, --minutes and --ttl-s be positive, --max-backlog at least 1")

    workdir = Path(tempfile.mkdtemp(prefix="bench-cot-budget-"))
    with bootstrap_servers(workdir / "broker.log") as bootstrap:
        print(f"broker {bootstrap}; loading the {args.backend} backend and the embedder on {args.device} "
              f"(load avg {load_average()})", flush=True)
        embedder = TextEmbedder.load(args.device)
        backend = create_backend(args.backend, **({"device": args.device} if args.backend == "transformers" else {}))
        try:
            max_batch = backend.max_batch if args.backend == "transformers" else 16
            count = args.capacity_requests or (2 * max_batch if args.backend == "transformers" else 400)
            print(f"capacity: {count} requests at once, max batch {max_batch} (load avg {load_average()})", flush=True)
            capacity = run_through_pool(bootstrap, workdir, backend, embedder, count, max_batch)["cots_per_s"]
            print(f"  capacity {capacity:.2f} CoTs/s", flush=True)
            row = overload(bootstrap, workdir, backend, embedder, args, capacity, max_batch)
        finally:
            close = getattr(backend, "close", None)
            if close is not None:
                close()
    ok = report(row)
    print("\n" + json.dumps({**row, "load_average": load_average(), "argv": sys.argv[1:]}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
