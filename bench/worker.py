"""Interactions/s through one `llmcf worker` vs a bare Faust agent that only counts `stream.take(2000, within=0.2)`
batches, on the same broker in the same run (the issue's target: worker >= 70% of the bare agent, >= 3,000/s).

Run from the repository root: `python -m bench.worker [--interactions 20000]`. It starts an embedded Tansu broker
(or uses KAFKA_BOOTSTRAP_SERVERS) and a throwaway PostgreSQL (or DATABASE_URL, where it creates and drops a scratch
database). Both consumers run as subprocesses, already subscribed and idle, when the clock starts; the clock starts when
the MovieLens-100k interactions (pre-serialised, so the producer is never the bottleneck) begin to be published to
their topic, and stops when the last one is counted (bare agent) or when the worker reports, on its /metrics, the last
batch's whole lifecycle done (interactions and samples stored, samples indexed, requests published, histories merged:
`llmcf_events_total{outcome="ok"}` is counted last). The worker's item catalogue is loaded (items stored and
embedded once) before its clock starts: embedding is a one-off per item, not per interaction.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

WAIT_S = 300.0


def bare_agent(bootstrap: str, prefix: str, progress: Path) -> None:
    """The baseline: one Faust agent on `interactions` that counts events in take(2000, 0.2) batches."""
    import faust

    app = faust.App(
        f"{prefix}bench-bare", broker=f"kafka://{bootstrap}", store="memory://", web_enabled=False,
        datadir=str(progress.parent / "faust-bare"), broker_heartbeat_interval=0.5, broker_session_timeout=6.0,
        consumer_auto_offset_reset="earliest", topic_partitions=4, autodiscover=False,
    )
    topic = app.topic(f"{prefix}interactions", key_type=bytes, value_type=bytes, key_serializer="raw",
                      value_serializer="raw")

    @app.agent(topic)
    async def count(stream: faust.StreamT) -> None:
        seen = 0
        async for batch in stream.take(2000, within=0.2):
            seen += len(batch)
            with progress.open("a") as out:
                out.write(f"{seen} {time.time()}\n")

    faust.Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False, override_logging=False).execute_from_commandline()


def last_progress(progress: Path) -> tuple[int, float]:
    lines = progress.read_text().split() if progress.exists() else []
    return (int(lines[-2]), float(lines[-1])) if lines else (0, 0.0)


def publish(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10, "batch.size": 1_000_000,
                         "compression.type": "lz4", "enable.idempotence": True})
    for key, value in records:
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(60):
        sys.exit(f"could not publish to {topic}")


def wait_for(what: str, done, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        if process.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            sys.exit(f"gave up waiting for {what}; consumer log:\n{tail}")
        time.sleep(0.05)


def processed(metrics_port: int, topic: str) -> float:
    """Records of `topic` the worker has processed to the end of their batch, from its /metrics (0 until it serves)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            exposition = response.read().decode()
    except OSError:
        return 0.0
    for line in exposition.splitlines():
        if line.startswith("llmcf_events_total{") and f'topic="{topic}"' in line and 'outcome="ok"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def start_profiler(output: Path | None, pid: int) -> subprocess.Popen | None:
    """py-spy sampling the worker over the timed window only (`--py-spy`): raw collapsed stacks, only threads that hold
    the GIL (the resource the worker and Faust compete for), one stack per thread."""
    if output is None:
        return None
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--gil",
                             "--threads", "--nonblocking", "--output", str(output)], stdout=subprocess.DEVNULL)


def stop_profiler(profiler: subprocess.Popen | None) -> None:
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        profiler.wait(60)


def run(args: argparse.Namespace, bootstrap: str, database_url: str, home: Path) -> None:
    from llmcf import movielens
    from llmcf.events import InteractionEvent, ItemEvent
    from llmcf.infra import free_port
    from llmcf.kafka import ensure_topics
    from llmcf.settings import Settings
    from storage.repository import Repository

    window = list(movielens.events("ml-100k", limit=args.interactions))
    items = [(e.item_id.encode(), e.to_bytes()) for e in window if isinstance(e, ItemEvent)]
    interactions = [(e.user_id.encode(), e.to_bytes()) for e in window if isinstance(e, InteractionEvent)]
    n = len(interactions)
    bare_prefix, worker_prefix = f"b{uuid.uuid4().hex[:8]}.", f"w{uuid.uuid4().hex[:8]}."
    for prefix in (bare_prefix, worker_prefix):
        ensure_topics(Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "LLMCF_TOPIC_PREFIX": prefix}), bootstrap)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMCF_", "KAFKA_", "QDRANT_"))}

    # Bare agent: warm up with one record (group joined, fetching), then time n.
    progress, bare_log = home / "bare.progress", home / "bare.log"
    with bare_log.open("wb") as log:
        bare = subprocess.Popen([sys.executable, "-m", "bench.worker", "--bare-agent", bootstrap, bare_prefix,
                                 str(progress)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        publish(bootstrap, f"{bare_prefix}interactions", interactions[:1])
        wait_for("the bare agent to start", lambda: last_progress(progress)[0] >= 1, bare, bare_log)
        started = time.time()
        publish(bootstrap, f"{bare_prefix}interactions", interactions)
        wait_for("the bare agent to count every event", lambda: last_progress(progress)[0] >= n + 1, bare, bare_log)
        bare_s = last_progress(progress)[1] - started
    finally:
        bare.terminate()
        bare.wait(30)

    # Worker: load the catalogue (items stored and embedded), then time n interactions.
    worker_log = home / "worker.log"
    metrics_port = free_port()
    worker_env = {**env, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "LLMCF_TOPIC_PREFIX": worker_prefix,
                  "LLMCF_HOME": str(home / "worker"), "DATABASE_URL": database_url, "LLMCF_METRICS_PORT": str(metrics_port)}
    with worker_log.open("wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "llmcf.cli", "worker"], stdout=log, stderr=subprocess.STDOUT,
                                  env=worker_env)
    try:
        with Repository.from_url(database_url) as repository:
            publish(bootstrap, f"{worker_prefix}items", items)
            loaded = time.monotonic()
            wait_for("the catalogue", lambda: repository.counts()["item_embeddings"] >= len(items), worker, worker_log)
            catalogue_s = time.monotonic() - loaded
            profiler = start_profiler(args.py_spy, worker.pid)
            started = time.time()
            publish(bootstrap, f"{worker_prefix}interactions", interactions)
            # Scraping /metrics costs the worker ~4% of its GIL time at 20/s: poll the database until the last batch
            # is being written, then the metrics until its lifecycle is done.
            wait_for("the worker to store every interaction", lambda: repository.counts()["interactions"] >= n,
                     worker, worker_log)
            wait_for("the worker to process every interaction",
                     lambda: processed(metrics_port, f"{worker_prefix}interactions") >= n, worker, worker_log)
            worker_s = time.time() - started
            stop_profiler(profiler)
            samples = repository.counts()["cot_samples"]
    finally:
        worker.terminate()
        worker.wait(60)

    bare_rate, worker_rate = n / bare_s, n / worker_s
    print(f"worker benchmark: ml-100k, {n:,} interactions, {len(items):,} items, broker {bootstrap}")
    print(f"  catalogue pre-load (not timed): {len(items):,} items stored and embedded in {catalogue_s:.1f} s")
    print(f"  bare Faust agent (take 2000/0.2 s, count only): {bare_rate:8,.0f} events/s ({bare_s:.2f} s)")
    print(f"  llmcf worker (store, history, decide, index, publish): {worker_rate:8,.0f} interactions/s "
          f"({worker_s:.2f} s; {samples:,} CoT samples stored, indexed and requested)")
    print(f"  ratio worker / bare agent: {worker_rate / bare_rate:.0%} (target >= 70%, and >= 3,000 interactions/s)")


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--bare-agent":
        bare_agent(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--interactions", type=int, default=20_000, help="MovieLens-100k interactions (default 20000)")
    parser.add_argument("--py-spy", type=Path, metavar="FILE",
                        help="profile the worker's timed window with py-spy (pip install py-spy) into FILE")
    args = parser.parse_args()

    import migrations
    from bench.sql_upsert import postgres_server_url, scratch_database
    from llmcf.infra.broker import bootstrap_servers

    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        home = Path(tmp)
        with (
            bootstrap_servers(home / "broker.log") as bootstrap,
            postgres_server_url() as server_url,
            scratch_database("postgresql", server_url, home) as database_url,
        ):
            migrations.upgrade(database_url)
            run(args, bootstrap, database_url, home)


if __name__ == "__main__":
    main()
