"""Generator throughput THROUGH THE POOL: CoTs/s and tokens/s by backend and batch size, Kafka and embedding included.

    python -m bench.generator_pool [--template-requests 300] [--template-batches 16,64] [--prompts 16] [--batches 1,16]
                                   [--max-new-tokens 64] [--device cpu] [--skip-transformers]

`bench.generators` measures the backends alone; this one publishes the same real MovieLens requests
(`bench.generators.movielens_requests`) to `cot-requests` on a real broker (an embedded Tansu on a free port, or
KAFKA_BOOTSTRAP_SERVERS), runs one `GeneratorPool` with `--max-batch` = the batch size, and times from the member's
partition assignment to the last result published (decode, prompt, generation, all-MiniLM-L6-v2 embedding, publish +
flush, commit). Every run gets fresh topics. The template backend is NOT an LLM: its figures measure the pool and the
embedder. The embedder alone on the same texts is printed too, since on CPU it bounds the template runs. The load
average is printed before each run: other processes on the machine skew every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka import Producer

from bench.generators import load_average, movielens_requests
from generators.backends import create_backend
from generators.backends.base import CotBackend, GenerationOptions
from generators.config import PoolConfig
from generators.pool import GeneratorPool
from generators.prompt import build_prompt
from llmcf.embeddings import TextEmbedder
from llmcf.infra.broker import bootstrap_servers
from llmcf.kafka import ensure_topics, producer_config
from llmcf.settings import Settings
from llmcf.topics import Topics
from testkit.threads import running


def fresh_settings(bootstrap: str, home: Path) -> Settings:
    environ = {name: value for name, value in os.environ.items() if name.startswith("KAFKA_")}
    settings = Settings.from_env({**environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "LLMCF_HOME": str(home),
                                  "LLMCF_TOPIC_PREFIX": f"bench{uuid.uuid4().hex[:8]}."})
    ensure_topics(settings, bootstrap)
    return settings


def run_through_pool(bootstrap: str, home: Path, backend: CotBackend, embedder: TextEmbedder, count: int,
                     batch: int) -> dict:
    settings = fresh_settings(bootstrap, home)
    producer = Producer(producer_config(settings, bootstrap))
    topic = Topics.from_settings(settings).cot_requests
    for request in movielens_requests(count):
        producer.produce(topic, key=request.request_id.encode(), value=request.to_bytes())
    if producer.flush(30):
        raise SystemExit("could not publish the benchmark's requests")

    pool = GeneratorPool(settings, bootstrap, backend, embedder, PoolConfig(max_batch=batch, max_wait_ms=200))
    with running(pool) as failure:
        if not pool.assigned.wait(60):
            raise SystemExit("the pool got no partition within 60 s")
        started = time.perf_counter()
        next_progress = started + 10
        while pool.stats.published + pool.stats.dead_lettered < count:
            if failure:
                raise SystemExit(f"the pool failed: {failure[0]}")
            time.sleep(0.05)
            if time.perf_counter() >= next_progress:
                print(f"  {pool.stats.published}/{count} CoTs, {time.perf_counter() - started:.0f} s", flush=True)
                next_progress += 10
        seconds = time.perf_counter() - started
    stats = pool.stats
    return {"backend": backend.name, "batch": batch, "cots": stats.published, "dead_lettered": stats.dead_lettered,
            "seconds": seconds, "cots_per_s": stats.published / seconds,
            "tokens_per_s": stats.completion_tokens / seconds, "mean_batch": stats.published / max(1, stats.batches)}


def embedder_alone(embedder: TextEmbedder, count: int) -> float:
    """Texts/s of the embedder alone on the template backend's texts for the benchmark's requests."""
    texts = [g.text for g in create_backend("template").generate([build_prompt(r) for r in movielens_requests(count)])]
    embedder.embed(texts[:8])
    started = time.perf_counter()
    embedder.embed(texts)
    return len(texts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--template-requests", type=int, default=300, help="requests per template run (default 300)")
    parser.add_argument("--template-batches", default="16,64", help="template batch sizes (default 16,64)")
    parser.add_argument("--prompts", type=int, default=16, help="requests per transformers run (default 16)")
    parser.add_argument("--batches", default="1,16", help="transformers batch sizes (default 1,16)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (generation and embedding)")
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-generator-pool-"))
    with bootstrap_servers(workdir / "broker.log") as bootstrap:
        print(f"broker {bootstrap}; loading the embedder on {args.device} (load avg {load_average()})", flush=True)
        embedder = TextEmbedder.load(args.device)
        rows = []
        embed_per_s = embedder_alone(embedder, min(args.template_requests, 128))
        print(f"  embedder alone: {embed_per_s:.1f} template texts/s", flush=True)
        template = create_backend("template")
        for batch in (int(b) for b in args.template_batches.split(",")):
            print(f"template through the pool, batch {batch}: {args.template_requests} requests "
                  f"(load avg {load_average()})", flush=True)
            rows.append(run_through_pool(bootstrap, workdir, template, embedder, args.template_requests, batch))
        if not args.skip_transformers:
            batches = [int(b) for b in args.batches.split(",")]
            options = GenerationOptions(temperature=0.6, max_new_tokens=args.max_new_tokens, seed=1234)
            backend = create_backend("transformers", model=args.model, device=args.device, options=options,
                                     max_batch=max(batches))
            backend.generate([build_prompt(movielens_requests(1)[0])])  # warm-up, as in bench.generators
            try:
                for batch in batches:
                    print(f"transformers through the pool, batch {batch}: {args.prompts} requests, "
                          f"{args.max_new_tokens} new tokens max (load avg {load_average()})", flush=True)
                    rows.append(run_through_pool(bootstrap, workdir, backend, embedder, args.prompts, batch))
            finally:
                backend.close()

    print("\n## CoT generation through the pool (Kafka in and out, embedding included; template is not an LLM)")
    print(f"{'backend':<13} {'batch':>5} {'mean batch':>10} {'CoTs':>5} {'seconds':>8} {'CoTs/s':>8} {'tokens/s':>9}")
    for r in rows:
        print(f"{r['backend']:<13} {r['batch']:>5} {r['mean_batch']:>10.1f} {r['cots']:>5} {r['seconds']:>8.2f} "
              f"{r['cots_per_s']:>8.2f} {r['tokens_per_s']:>9.1f}")
    print(f"(template 'tokens' are words; the embedder alone does {embed_per_s:.1f} template texts/s here)")
    by_batch = {r["batch"]: r for r in rows if r["backend"] == "transformers"}
    if 1 in by_batch and len(by_batch) > 1:
        largest = max(by_batch)
        print(f"\ntransformers batch {largest} vs batch 1 through the pool: CoTs/s "
              f"x{by_batch[largest]['cots_per_s'] / by_batch[1]['cots_per_s']:.2f} (target: x4)")
    print("\n" + json.dumps({"pool": rows, "embedder_texts_per_s": embed_per_s, "load_average": load_average(),
                             "argv": sys.argv[1:]}))


if __name__ == "__main__":
    main()
