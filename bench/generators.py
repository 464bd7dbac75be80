"""Generator pool throughput: CoTs/s and tokens/s by backend and batch size, and the embedder's sentences/s.

    python -m bench.generators [--prompts 16] [--max-new-tokens N] [--batches 1,4,16] [--repeats 1] [--threads N]
                               [--device cpu]
    python -m bench.generators --drafts [--temperature 0] [--draft-tokens 4] [--draft-warmup 32] [--batches 1,4,16]
                               [--dtypes float32,bfloat16]

Transformer runs use the same prompts at every batch size, in two sets: "llmcf" (the real LLM-CF prompt over real
MovieLens-100k samples with 20-item histories, `movielens_requests`: ~530 tokens, of which ~160 are the shared
instructions that the CPU backend prefills once per process) and "short" (the same requests cut to 2 history items),
with the production decoding (sampling at T=0.6, one candidate, fixed seed, and by default the backend's own
`max_new_tokens`: 96 on CPU, 256 on a GPU, as `llmcf generate` runs); tokens/s counts the tokens actually generated.
`--repeats` interleaves the batch sizes. The figure to read is the batch-16 / batch-1 ratio per set: a batch
shares each decoding step's weight reads, while each prompt's own prefill is compute-bound and gains nothing from
batching, so the longer a prompt's own part against its completion, the smaller the ratio. Other processes on the
machine skew every figure: the load average is printed before each run, and each row's process CPU time beside its
wall time.

`--drafts` (issue 14) compares, in one process and on the same prompts (MovieLens-100k requests in stream order, after
`--draft-warmup` earlier ones whose CoTs fill each backend's draft index), per weight type (`--dtypes`, the first is the
reference) and batch size: plain decoding, lossless drafts and relaxed (DARE: top 2, p >= 0.1) drafts. It prints the
prefill and decode seconds (the decoder's own timers), decode tokens/s, the acceptance rate, tokens per verifying pass,
how many texts equal plain decoding's and the mean `heuristic_rationale_score`. `--temperature 0` (greedy) is where
lossless drafts must give identical text; the production decoding samples at 0.6.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict, deque
from datetime import UTC, datetime

from generators.backends import GenerationOptions, create_backend
from generators.prompt import DEFAULT_MAX_HISTORY, Prompt, build_prompt
from llmcf import movielens
from llmcf.events import CotRequest, HistoryEntry, ItemSnapshot


def movielens_requests(count: int, dataset: str = "ml-100k") -> list[CotRequest]:
    """Real LLM-CF samples: MovieLens ratings in time order, each user's last 20 earlier ratings as the history (oldest
    first, as the stream worker keeps it), items as the replay publishes them (title, "Title (year); genres", genres).
    Ratings whose user already has 20 earlier ones are eligible; every `stride`-th becomes a request, so the samples
    spread over users and time. The same `count` gives the same requests."""
    data = movielens.load(dataset)
    stride = max(1, int(len(data) * 0.7) // count)
    created = datetime(1998, 1, 1, tzinfo=UTC)
    items = [movie.to_event(created) for movie in data.movies]
    histories: dict[int, deque[tuple[int, int]]] = defaultdict(lambda: deque(maxlen=DEFAULT_MAX_HISTORY))
    requests: list[CotRequest] = []
    eligible = 0
    for user, item, rating, second in zip(
        data.user_codes.tolist(), data.item_codes.tolist(), data.ratings.tolist(), data.seconds.tolist(), strict=True
    ):
        label = int(rating >= movielens.POSITIVE_RATING)
        history = histories[user]
        if len(history) == DEFAULT_MAX_HISTORY:
            if eligible % stride == 0:
                ts = datetime.fromtimestamp(second, tz=UTC)
                target = items[item]
                requests.append(
                    CotRequest(
                        request_id=f"bench-{len(requests)}",
                        user_id=data.user_ids[user],
                        item_id=target.item_id,
                        label=label,
                        ts=ts,
                        requested_at=ts,
                        target=ItemSnapshot(item_id=target.item_id, title=target.title, text=target.text, tags=target.tags),
                        history=[
                            HistoryEntry(
                                item_id=items[code].item_id,
                                title=items[code].title,
                                text=items[code].text,
                                tags=items[code].tags,
                                label=past_label,
                            )
                            for code, past_label in history
                        ],
                    )
                )
                if len(requests) == count:
                    break
            eligible += 1
        history.append((item, label))
    if len(requests) < count:
        raise SystemExit(f"{dataset} gives only {len(requests)} requests with 20-item histories; ask for fewer")
    return requests


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_backend(backend, prompts: list[Prompt], batch: int, prompt_set: str = "llmcf") -> dict:
    """Generate every prompt, `batch` at a time: wall and process CPU seconds and token counts (`summarise` adds rates)."""
    started, cpu_started = time.perf_counter(), time.process_time()
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
    return summarise(
        [
            {
                "backend": backend.name,
                "prompts": prompt_set,
                "batch": batch,
                "cots": len(prompts),
                "seconds": time.perf_counter() - started,
                "cpu_seconds": time.process_time() - cpu_started,
                "prompt_tokens_total": prompt_tokens,
                "completion_tokens_total": completion_tokens,
            }
        ]
    )


def summarise(runs: list[dict]) -> dict:
    """Runs of one backend, prompt set and batch size (repeats) as one row: totals, then rates over the total time."""
    row = {key: runs[0][key] for key in ("backend", "prompts", "batch")}
    for key in ("cots", "seconds", "cpu_seconds", "prompt_tokens_total", "completion_tokens_total"):
        row[key] = sum(run[key] for run in runs)
    row["repeats"] = len(runs)
    row["cots_per_s"] = row["cots"] / row["seconds"]
    row["tokens_per_s"] = row["completion_tokens_total"] / row["seconds"]
    row["prompt_tokens"] = row["prompt_tokens_total"] / row["cots"]
    row["completion_tokens"] = row["completion_tokens_total"] / row["cots"]
    return row


def bench_embedder(sentences: int, threads: int | None) -> list[dict]:
    import numpy as np

    from llmcf.embeddings import TextEmbedder

    texts = [r.target.text for r in movielens_requests(sentences)]
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


def bench_drafts(args: argparse.Namespace, batches: list[int]) -> None:
    """Speculative decoding and bfloat16 A/B in one process (issue 14): per weight type and batch size, plain decoding,
    lossless drafts and relaxed (DARE) drafts on the same prompts, each backend's draft index first filled with the CoTs
    it writes for earlier requests (the warm-up)."""
    from generators.backends import heuristic_rationale_score
    from generators.backends.drafts import DraftConfig
    from generators.backends.prefix_decoding import Acceptance

    requests = movielens_requests(args.draft_warmup + args.prompts)
    prompts = [build_prompt(r, feedback="rating") for r in requests]
    warmup, measured = prompts[: args.draft_warmup], prompts[args.draft_warmup :]
    modes = {"plain": None, "lossless": Acceptance(),
             "relaxed": Acceptance(top_k=args.relaxed_top_k, min_probability=args.relaxed_min_probability)}
    rows = []
    for dtype in args.dtypes.split(","):
        print(f"transformers backend, {dtype}: loading, temperature {args.temperature}, drafts of {args.draft_tokens} "
              f"tokens (load avg {load_average()})", flush=True)
        options = GenerationOptions(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=1234)
        backend = create_backend("transformers", model=args.model, device="cpu", threads=args.threads,
                                 max_batch=max(batches), options=options, dtype=dtype,
                                 drafts=DraftConfig(draft_tokens=args.draft_tokens))
        index, decoder = backend.drafts, backend._prefix_decoder
        backend.generate(measured[:1])
        started = time.perf_counter()
        for start in range(0, len(warmup), max(batches)):
            backend.generate(warmup[start : start + max(batches)])
        print(f"  draft index warmed with {len(warmup)} CoTs of earlier requests ({time.perf_counter() - started:.0f} s)",
              flush=True)
        for batch in batches:
            for mode, acceptance in modes.items():
                backend.drafts, backend.acceptance = (None, Acceptance()) if acceptance is None else (index, acceptance)
                backend.draft_stats.__init__()
                decoder.seconds = {"prefill": 0.0, "decode": 0.0}
                started, tokens, texts = time.perf_counter(), 0, []
                for start in range(0, len(measured), batch):
                    for generation in backend.generate(measured[start : start + batch]):
                        tokens += generation.completion_tokens
                        texts.append(generation.text)
                stats = backend.draft_stats
                rows.append({
                    "dtype": dtype, "batch": batch, "mode": mode, "seconds": time.perf_counter() - started,
                    "tokens": tokens, "prefill_s": decoder.seconds["prefill"], "decode_s": decoder.seconds["decode"],
                    "decode_tokens_per_s": tokens / decoder.seconds["decode"], "cots_per_s": len(measured) / (
                        time.perf_counter() - started),
                    "acceptance": stats.acceptance_rate, "tokens_per_pass": stats.tokens_per_pass or 1.0,
                    "texts": texts,
                    "score": sum(heuristic_rationale_score(p, t) for p, t in zip(measured, texts, strict=True))
                    / len(measured),
                })
                print(f"  {dtype} batch {batch} {mode}: {rows[-1]['seconds']:.1f} s, decode "
                      f"{rows[-1]['decode_tokens_per_s']:.1f} tokens/s", flush=True)
        backend.close()

    def plain_of(row: dict, dtype: str) -> dict:
        return next(r for r in rows if r["batch"] == row["batch"] and r["mode"] == "plain" and r["dtype"] == dtype)

    reference = rows[0]["dtype"]
    print(f"\n## Speculative decoding and weight types, SmolLM2-135M on CPU ({args.threads or 'all'} threads), "
          f"{len(measured)} LLM-CF prompts (MovieLens-100k, stream order, 20-item histories), temperature "
          f"{args.temperature}, drafts <= {args.draft_tokens} tokens, index warmed with {len(warmup)} CoTs")
    print(f"{'dtype':<9} {'batch':>5} {'mode':<9} {'seconds':>8} {'CoTs/s':>7} {'prefill s':>9} {'decode s':>8} "
          f"{'decode tok/s':>12} {'x plain':>7} {'x ' + reference:>9} {'accepted':>8} {'tok/pass':>8} {'same text':>9} "
          f"{'score':>6}")
    for r in rows:
        plain, base = plain_of(r, r["dtype"]), plain_of(r, reference)
        same = sum(a == b for a, b in zip(r["texts"], plain["texts"], strict=True))
        print(f"{r['dtype']:<9} {r['batch']:>5} {r['mode']:<9} {r['seconds']:>8.1f} {r['cots_per_s']:>7.2f} "
              f"{r['prefill_s']:>9.1f} {r['decode_s']:>8.1f} {r['decode_tokens_per_s']:>12.1f} "
              f"{r['decode_tokens_per_s'] / plain['decode_tokens_per_s']:>7.2f} "
              f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:>9.2f} {r['acceptance']:>8.2f} "
              f"{r['tokens_per_pass']:>8.2f} {same:>5}/{len(measured):<3} {r['score']:>6.3f}")

    def best(dtype: str, mode: str, key: str) -> dict:
        return max((r for r in rows if r["mode"] == mode and r["dtype"] == dtype), key=lambda r: r[key])

    today = best(reference, "plain", "cots_per_s")
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        plain = best(dtype, "plain", "decode_tokens_per_s")
        for mode in modes:
            fastest = best(dtype, mode, "decode_tokens_per_s")
            print(f"{dtype} {mode:<8}: decode tokens/s x{fastest['decode_tokens_per_s'] / plain['decode_tokens_per_s']:.2f} "
                  f"{dtype} plain's (best batches {fastest['batch']} vs {plain['batch']}), "
                  f"x{fastest['decode_tokens_per_s'] / best(reference, 'plain', 'decode_tokens_per_s')['decode_tokens_per_s']:.2f} "
                  f"{reference} plain's; CoTs/s x{best(dtype, mode, 'cots_per_s')['cots_per_s'] / today['cots_per_s']:.2f} "
                  f"{reference} plain's best (batch {today['batch']})")
    print("(targets, issue 14: lossless drafts >= 2x the decode tokens/s of plain decoding, each at its best batch, with "
          "identical greedy text; relaxed >= 3x. 'x plain': against plain decoding of the same weights and batch; 'same "
          "text': outputs equal to it, guaranteed for lossless drafts only when greedy; 'score': mean "
          "heuristic_rationale_score, the quality proxy)")
    for r in rows:
        del r["texts"]
    print("\n" + json.dumps({"drafts": rows, "load_average": load_average(), "argv": sys.argv[1:]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16, help="prompts per transformer run (default 16)")
    parser.add_argument("--batches", default="1,4,16", help="transformer batch sizes (default 1,4,16)")
    parser.add_argument("--prompt-sets", default="llmcf,short", help="llmcf and/or short (default both)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None,
        help="completion length cap (default: the backend's own, as `llmcf generate` uses: 96 on CPU, 256 on a GPU)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds over the batch sizes, interleaved (1, 4, 16, 1, 4, 16, ...)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--template-prompts", type=int, default=5000)
    parser.add_argument("--sentences", type=int, default=1000, help="sentences for the embedder benchmark")
    parser.add_argument("--skip-embedder", action="store_true")
    parser.add_argument("--drafts", action="store_true",
                        help="speculative decoding A/B instead: plain vs lossless vs relaxed drafts, per batch size")
    parser.add_argument("--draft-tokens", type=int, default=4, help="draft tokens per step at most (default 4)")
    parser.add_argument("--draft-warmup", type=int, default=32,
                        help="CoTs written first, for earlier requests, to fill the draft index (default 32)")
    parser.add_argument("--temperature", type=float, default=0.6,
                        help="--drafts only: 0 = greedy (lossless text must be identical), default 0.6 (production)")
    parser.add_argument("--dtypes", default="float32",
                        help="--drafts only: weight types compared, the first is the reference (e.g. float32,bfloat16)")
    parser.add_argument("--relaxed-top-k", type=int, default=2, help="relaxed acceptance: the model's top k (DARE: 2)")
    parser.add_argument("--relaxed-min-probability", type=float, default=0.1,
                        help="relaxed acceptance: minimum probability of a kept draft token (DARE: 0.1)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.drafts:
        bench_drafts(args, batches)
        return

    requests = movielens_requests(args.prompts)
    prompt_sets = {
        "llmcf": [build_prompt(r, feedback="rating") for r in requests],
        "short": [build_prompt(r, feedback="rating", max_history=2) for r in requests],
    }
    template_prompts = [build_prompt(r, feedback="rating") for r in movielens_requests(args.template_prompts)]
    chosen_sets = args.prompt_sets.split(",")
    rows = []

    print(f"template backend: {args.template_prompts} CoTs (load avg {load_average()})", flush=True)
    rows.append(run_backend(create_backend("template"), template_prompts, args.template_prompts))

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
    backend.generate(prompt_sets["llmcf"][:1])  # warm-up: first-call allocations and kernel selection are not throughput
    for prompt_set in chosen_sets:
        runs: dict[int, list[dict]] = {batch: [] for batch in batches}
        # Batch sizes take turns, so a change in the machine's load hits all of them alike.
        for round_number in range(1, args.repeats + 1):
            for batch in batches:
                print(
                    f"transformers {prompt_set} prompts, batch {batch}, round {round_number}/{args.repeats}: "
                    f"{args.prompts} CoTs, {backend.options.max_new_tokens} new tokens max (load avg {load_average()})",
                    flush=True,
                )
                runs[batch].append(run_backend(backend, prompt_sets[prompt_set], batch, prompt_set))
        rows.extend(summarise(runs[batch]) for batch in batches)
    backend.close()

    embedder_rows = [] if args.skip_embedder else bench_embedder(args.sentences, args.threads)

    print("\n## CoT generation (SmolLM2-135M-Instruct Q4_1 -> float32 for transformers; template is not an LLM)")
    print(
        f"{'backend':<13} {'prompts':<7} {'batch':>5} {'CoTs':>5} {'seconds':>8} {'cpu s':>8} {'CoTs/s':>9} "
        f"{'tokens/s':>9} {'prompt tok/CoT':>14} {'new tok/CoT':>11}"
    )
    for r in rows:
        batch = "all" if r["backend"] == "template" else str(r["batch"])
        prompt_set = "-" if r["backend"] == "template" else r["prompts"]
        print(
            f"{r['backend']:<13} {prompt_set:<7} {batch:>5} {r['cots']:>5} {r['seconds']:>8.2f} {r['cpu_seconds']:>8.2f} "
            f"{r['cots_per_s']:>9.2f} {r['tokens_per_s']:>9.1f} {r['prompt_tokens']:>14.0f} {r['completion_tokens']:>11.1f}"
        )
    print(
        "(template 'tokens' are words: it has no tokenizer; 'cpu s' is this process's CPU time: with T threads, far less "
        "than T x seconds means other processes held the cores)\n"
    )
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
