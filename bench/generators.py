"""Generator pool throughput: CoTs/s and tokens/s by backend and batch size, and the embedder's sentences/s.

    python -m bench.generators [--prompts 16] [--max-new-tokens 64] [--batches 1,4,16] [--threads N] [--device cpu]

Transformer runs use the same prompts at every batch size, in two sets: "llmcf" (the real LLM-CF prompt over synthetic
MovieLens-like requests with 20-item histories, ~750 tokens) and "short" (the same requests cut to 2 history items,
~350 tokens), with the production decoding (sampling at T=0.6, one candidate, fixed seed); tokens/s counts the tokens
actually generated. The figure to read is the batch-16 / batch-1 ratio per set: a decoding step is memory-bound, so a batch
shares the weight reads, while the prompt prefill is compute-bound and gains nothing from batching; the longer the prompt,
the smaller the ratio. Other processes on the machine skew every figure: the load average is printed before each run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from datetime import UTC, datetime

from generators.backends import GenerationOptions, create_backend
from generators.prompt import Prompt, build_prompt
from llmcf.events import CotRequest, HistoryEntry, ItemSnapshot

GENRES = [
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
WORDS = [
    "Night",
    "River",
    "Last",
    "Secret",
    "City",
    "Summer",
    "Dark",
    "Love",
    "King",
    "Road",
    "Star",
    "Game",
    "House",
    "Winter",
    "Lost",
    "Blue",
    "Wild",
    "Heart",
    "Shadow",
    "Dream",
]


def synthetic_requests(count: int, seed: int = 7) -> list[CotRequest]:
    """MovieLens-shaped requests: titles with years, 1-3 genres, 20 history items, labels from a 60/40 like rate."""
    rng = random.Random(seed)
    now = datetime(2024, 5, 1, tzinfo=UTC)

    def item(prefix: str, i: int) -> dict:
        title = f"{rng.choice(WORDS)} {rng.choice(WORDS)} ({rng.randint(1950, 2000)})"
        return {"item_id": f"{prefix}{i}", "title": title, "tags": rng.sample(GENRES, rng.randint(1, 3))}

    requests = []
    for r in range(count):
        history = [HistoryEntry(**item("h", i), label=int(rng.random() < 0.6)) for i in range(20)]
        target = ItemSnapshot(**item("t", r), text="A film about " + " ".join(rng.choices(WORDS, k=12)).lower() + ".")
        requests.append(
            CotRequest(
                request_id=f"bench-{r}",
                user_id=f"u{r}",
                item_id=target.item_id,
                label=int(rng.random() < 0.5),
                ts=now,
                requested_at=now,
                target=target,
                history=history,
            )
        )
    return requests


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_backend(backend, prompts: list[Prompt], batch: int, prompt_set: str = "llmcf") -> dict:
    started = time.perf_counter()
    prompt_tokens = completion_tokens = 0
    for start in range(0, len(prompts), batch):
        for generation in backend.generate(prompts[start : start + batch]):
            prompt_tokens += generation.prompt_tokens
            completion_tokens += generation.completion_tokens
        done = min(start + batch, len(prompts))
        print(
            f"  {backend.name} {prompt_set} batch {batch}: {done}/{len(prompts)} CoTs, {time.perf_counter() - started:.1f} s",
            flush=True,
        )
    seconds = time.perf_counter() - started
    return {
        "backend": backend.name,
        "prompts": prompt_set,
        "batch": batch,
        "cots": len(prompts),
        "seconds": seconds,
        "cots_per_s": len(prompts) / seconds,
        "tokens_per_s": completion_tokens / seconds,
        "prompt_tokens": prompt_tokens / len(prompts),
        "completion_tokens": completion_tokens / len(prompts),
    }


def bench_embedder(sentences: int, threads: int | None) -> list[dict]:
    import numpy as np

    from llmcf.embeddings import TextEmbedder

    texts = [
        f"{r.target.title}; {', '.join(r.target.tags)}. {r.target.text}" for r in synthetic_requests(sentences, seed=11)
    ]
    rows, reference = [], None
    for runtime in ("torch", "onnx"):
        print(f"embedder {runtime}: loading (load avg {load_average()})", flush=True)
        started = time.perf_counter()
        embedder = TextEmbedder.load("cpu", runtime=runtime, threads=threads)
        load_s = time.perf_counter() - started
        embedder.embed(texts[:64])
        started = time.perf_counter()
        vectors = embedder.embed(texts, batch_size=64)
        seconds = time.perf_counter() - started
        max_diff = 0.0 if reference is None else float(np.abs(vectors - reference).max())
        reference = vectors if reference is None else reference
        rows.append(
            {
                "runtime": runtime,
                "sentences": len(texts),
                "load_s": load_s,
                "per_s": len(texts) / seconds,
                "max_diff": max_diff,
            }
        )
        print(f"  {runtime}: {len(texts) / seconds:.0f} sentences/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16, help="prompts per transformer run (default 16)")
    parser.add_argument("--batches", default="1,4,16", help="transformer batch sizes (default 1,4,16)")
    parser.add_argument("--prompt-sets", default="llmcf,short", help="llmcf and/or short (default both)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--template-prompts", type=int, default=5000)
    parser.add_argument("--sentences", type=int, default=1000, help="sentences for the embedder benchmark")
    parser.add_argument("--skip-embedder", action="store_true")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    requests = synthetic_requests(max(args.prompts, args.template_prompts))
    prompts = [build_prompt(r, feedback="rating") for r in requests]
    prompt_sets = {
        "llmcf": prompts[: args.prompts],
        "short": [build_prompt(r, feedback="rating", max_history=2) for r in requests[: args.prompts]],
    }
    chosen_sets = args.prompt_sets.split(",")
    rows = []

    print(f"template backend: {args.template_prompts} CoTs (load avg {load_average()})", flush=True)
    rows.append(run_backend(create_backend("template"), prompts[: args.template_prompts], args.template_prompts))

    print(f"transformers backend: loading on {args.device} (load avg {load_average()})", flush=True)
    options = GenerationOptions(temperature=0.6, max_new_tokens=args.max_new_tokens, seed=1234)
    started = time.perf_counter()
    backend = create_backend(
        "transformers",
        model=args.model,
        device=args.device,
        options=options,
        threads=args.threads,
        max_batch=max(batches),
    )
    startup_s = time.perf_counter() - started
    print(
        f"  model {backend.model} ready in {startup_s:.1f} s (load from disk {backend.load_seconds:.1f} s, "
        f"{backend.threads} threads)",
        flush=True,
    )
    backend.generate(prompts[:1])  # warm-up: first-call allocations and kernel selection are not throughput
    for prompt_set in chosen_sets:
        for batch in batches:
            print(
                f"transformers {prompt_set} prompts, batch {batch}: {args.prompts} CoTs, {args.max_new_tokens} new "
                f"tokens max (load avg {load_average()})",
                flush=True,
            )
            rows.append(run_backend(backend, prompt_sets[prompt_set], batch, prompt_set))
    backend.close()

    embedder_rows = [] if args.skip_embedder else bench_embedder(args.sentences, args.threads)

    print("\n## CoT generation (SmolLM2-135M-Instruct Q4_1 -> float32 for transformers; template is not an LLM)")
    print(
        f"{'backend':<13} {'prompts':<7} {'batch':>5} {'CoTs':>5} {'seconds':>8} {'CoTs/s':>9} {'tokens/s':>9} "
        f"{'prompt tok/CoT':>14} {'new tok/CoT':>11}"
    )
    for r in rows:
        batch = "all" if r["backend"] == "template" else str(r["batch"])
        prompt_set = "-" if r["backend"] == "template" else r["prompts"]
        print(
            f"{r['backend']:<13} {prompt_set:<7} {batch:>5} {r['cots']:>5} {r['seconds']:>8.2f} {r['cots_per_s']:>9.2f} "
            f"{r['tokens_per_s']:>9.1f} {r['prompt_tokens']:>14.0f} {r['completion_tokens']:>11.1f}"
        )
    print("(template 'tokens' are words: it has no tokenizer)\n")
    for prompt_set in chosen_sets:
        by_batch = {r["batch"]: r for r in rows if r["backend"] == "transformers" and r["prompts"] == prompt_set}
        if 1 in by_batch and len(by_batch) > 1:
            largest, base = by_batch[max(by_batch)], by_batch[1]
            print(
                f"{prompt_set} prompts (~{base['prompt_tokens']:.0f} tokens): batch {largest['batch']} vs batch 1 = "
                f"CoTs/s x{largest['cots_per_s'] / base['cots_per_s']:.2f}, "
                f"tokens/s x{largest['tokens_per_s'] / base['tokens_per_s']:.2f} (target: x4 CoTs/s)"
            )
    if embedder_rows:
        print(f"\n## Embedder ({embedder_rows[0]['sentences']} item texts, batch 64)")
        print(f"{'runtime':<8} {'load s':>7} {'sentences/s':>12} {'max |diff| vs torch':>20}")
        for r in embedder_rows:
            print(f"{r['runtime']:<8} {r['load_s']:>7.1f} {r['per_s']:>12.0f} {r['max_diff']:>20.1e}")
    print(
        "\n"
        + json.dumps(
            {"generation": rows, "embedder": embedder_rows, "load_average": load_average(), "argv": sys.argv[1:]}
        )
    )


if __name__ == "__main__":
    main()
