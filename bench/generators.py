"""Generator pool throughput: CoTs/s and tokens/s by backend and batch size, and the embedder's sentences/s.

    python -m bench.generators [--prompts 16] [--max-new-tokens N] [--batches 1,4,16] [--repeats 1] [--threads N]
                               [--device cpu]
    python -m bench.generators --drafts [--temperature 0] [--draft-tokens 4] [--draft-warmup 32] [--batches 1,4,16]
                               [--dtypes float32,bfloat16] [--prompt-forms tags,compact] [--modes plain,lossless,relaxed]

Transformer runs use the same prompts at every batch size, in two sets: "llmcf" (the real LLM-CF prompt over real
MovieLens-100k samples with 20-item histories, `movielens_requests`: ~435 tokens, of which ~165 are the shared
instructions that the CPU backend prefills once per process) and "short" (the same requests cut to 2 history items),
with the production decoding (sampling at T=0.6, one candidate, fixed seed, and by default the backend's own
`max_new_tokens`: 96 on CPU, 256 on a GPU, as `llmcf generate` runs); tokens/s counts the tokens actually generated.
`--repeats` interleaves the batch sizes. The figure to read is the batch-16 / batch-1 ratio per set: a batch
shares each decoding step's weight reads, while each prompt's own prefill is compute-bound and gains nothing from
batching, so the longer a prompt's own part against its completion, the smaller the ratio. Other processes on the
machine skew every figure: the load average is printed before each run, and each row's process CPU time beside its
wall time.

`--drafts` (issue 14) compares generator configurations in one process, on the same requests (MovieLens-100k in
stream order, after `--draft-warmup` earlier ones whose CoTs fill each backend's draft index): per weight type
(`--dtypes`, the first is the reference), prompt form (`--prompt-forms`: "tags", each history line with its item's
tags as before issue 14, and "compact", the default, titles only) and batch size, each decoding mode (`--modes`: plain,
lossless drafts, relaxed DARE drafts: top 2, p >= 0.1). It prints the prefill and decode seconds (the decoder's own
timers), decode tokens/s, the acceptance rate, tokens per verifying pass, how many texts equal plain decoding's, the
mean `heuristic_rationale_score` and the quality delta against plain decoding with the first weight type (mean cosine
similarity of the CoTs' all-MiniLM-L6-v2 embeddings, same prompts and batch; `--dtypes bfloat16,int8` gives int8's);
then the default configuration (`llmcf generate` on this machine: its weight type,
the compact prompt, no drafts, batch 48) against today's (the first weight type, the tags prompt, no drafts, batch 16),
with the gain split into weights, prompt and batch size. `--temperature 0` (greedy) is where lossless drafts must give
identical text; the production decoding samples at 0.6.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict, deque
from datetime import UTC, datetime

import numpy as np

from generators.backends import create_backend
from generators.backends.base import GenerationOptions
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
    """Generator configurations A/B in one process (issue 14): per weight type, prompt form and batch size, plain
    decoding, lossless drafts and relaxed (DARE) drafts on the same requests, each backend's draft index first filled
    with the CoTs it writes for earlier requests (the warm-up)."""
    from generators.backends.sampling import Acceptance

    requests = movielens_requests(args.draft_warmup + args.prompts)
    forms = args.prompt_forms.split(",")
    prompts = {form: [build_prompt(r, feedback="rating", history_tags=form == "tags") for r in requests] for form in forms}
    all_modes = {"plain": None, "lossless": Acceptance(),
                 "relaxed": Acceptance(top_k=args.relaxed_top_k, min_probability=args.relaxed_min_probability)}
    modes = {mode: all_modes[mode] for mode in args.modes.split(",")}
    rows = [row for dtype in args.dtypes.split(",") for row in _bench_dtype(args, dtype, batches, prompts, modes)]
    reference = rows[0]["dtype"]
    _add_similarity(rows, reference)
    _print_draft_rows(args, rows)
    _print_draft_speedups(rows, forms, modes)
    _print_default_against_today(rows, reference, forms)
    print("(targets, issue 14: lossless drafts >= 2x the decode tokens/s of plain decoding, each at its best batch, with "
          "identical greedy text; relaxed >= 3x; the default configuration >= 2x today's CoTs/s. 'x plain': against "
          "plain decoding of the same weights, prompt and batch; 'same text': outputs equal to it, guaranteed for "
          "lossless drafts only when greedy; 'score': mean heuristic_rationale_score, the quality proxy; 'sim ref': "
          f"mean cosine similarity (all-MiniLM-L6-v2) of the CoTs to those of plain decoding with {reference} weights "
          "on the same prompts and batch, the quality delta of drafts and weight types (1 = the same meaning; two "
          "sampled runs differ even with the same weights); 'tokens': prompt tokens per request, the shared "
          "instructions included)")
    for r in rows:
        del r["texts"], r["vectors"]
    print("\n" + json.dumps({"drafts": rows, "load_average": load_average(), "argv": sys.argv[1:]}))


def _bench_dtype(args: argparse.Namespace, dtype: str, batches: list[int], prompts: dict[str, list[Prompt]],
                 modes: dict) -> list[dict]:
    """One weight type's rows: a backend whose draft index is warmed first, then every prompt form, batch and mode."""
    from generators.backends.drafts import DraftConfig

    forms = list(prompts)
    print(f"transformers backend, {dtype}: loading, temperature {args.temperature}, drafts of {args.draft_tokens} "
          f"tokens (load avg {load_average()})", flush=True)
    options = GenerationOptions(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=1234)
    backend = create_backend("transformers", model=args.model, device="cpu", threads=args.threads,
                             max_batch=max(batches), options=options, dtype=dtype,
                             drafts=DraftConfig(draft_tokens=args.draft_tokens))
    index = backend.drafts
    warmup = prompts[forms[-1]][: args.draft_warmup]
    backend.drafts = None  # first-call allocations are not throughput; the index must not learn a measured CoT
    backend.generate(prompts[forms[0]][-1:])
    backend.drafts = index
    started = time.perf_counter()
    for start in range(0, len(warmup), max(batches)):
        backend.generate(warmup[start : start + max(batches)])
    print(f"  draft index warmed with {len(warmup)} CoTs of earlier requests ({time.perf_counter() - started:.0f} s)",
          flush=True)
    rows = []
    for form in forms:
        for batch in batches:
            for mode, acceptance in modes.items():
                row = _bench_mode(backend, index, prompts[form][args.draft_warmup :], batch, acceptance)
                rows.append({"dtype": dtype, "prompt": form, "batch": batch, "mode": mode, **row})
                print(f"  {dtype} {form} prompt, batch {batch} {mode}: {row['seconds']:.1f} s, decode "
                      f"{row['decode_tokens_per_s']:.1f} tokens/s", flush=True)
    backend.close()
    return rows


def _bench_mode(backend, index, measured: list[Prompt], batch: int, acceptance) -> dict:
    """The measured prompts `batch` at a time, plain (`acceptance` None) or with drafts from `index`: one row."""
    from generators.backends.best_of_n import heuristic_rationale_score
    from generators.backends.sampling import Acceptance

    decoder = backend._prefix_decoder
    backend.drafts, backend.acceptance = (None, Acceptance()) if acceptance is None else (index, acceptance)
    backend.draft_stats.__init__()
    decoder.seconds = {"prefill": 0.0, "decode": 0.0}
    started, tokens, prompt_tokens, texts = time.perf_counter(), 0, 0, []
    for start in range(0, len(measured), batch):
        for generation in backend.generate(measured[start : start + batch]):
            tokens += generation.completion_tokens
            prompt_tokens += generation.prompt_tokens
            texts.append(generation.text)
    seconds = time.perf_counter() - started
    stats = backend.draft_stats
    return {
        "seconds": seconds, "tokens": tokens, "prompt_tokens": prompt_tokens / len(measured),
        "prefill_s": decoder.seconds["prefill"], "decode_s": decoder.seconds["decode"],
        "decode_tokens_per_s": tokens / decoder.seconds["decode"], "cots_per_s": len(measured) / seconds,
        "acceptance": stats.acceptance_rate, "tokens_per_pass": stats.tokens_per_pass or 1.0,
        "texts": texts,
        "score": sum(heuristic_rationale_score(p, t) for p, t in zip(measured, texts, strict=True)) / len(measured),
    }


def _row_of(rows: list[dict], dtype: str, form: str, mode: str, batch: int) -> dict | None:
    return next((r for r in rows if (r["dtype"], r["prompt"], r["mode"], r["batch"]) == (dtype, form, mode, batch)),
                None)


def _add_similarity(rows: list[dict], reference: str) -> None:
    """Quality delta, besides the heuristic score: how close each row's CoTs are in meaning to those of plain decoding
    with the reference weights, on the same prompts (prompt form and batch): mean cosine of their embeddings."""
    from llmcf.embeddings import TextEmbedder

    embedder = TextEmbedder.load("cpu")
    for r in rows:
        r["vectors"] = embedder.embed(r["texts"])
    for r in rows:
        base = _row_of(rows, reference, r["prompt"], "plain", r["batch"])
        r["similarity"] = float(np.mean([
            float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) or 1.0))
            for a, b in zip(r["vectors"], base["vectors"], strict=True)
        ])) if base else float("nan")


def _print_draft_rows(args: argparse.Namespace, rows: list[dict]) -> None:
    count = args.prompts
    print(f"\n## Generator configurations, SmolLM2-135M on CPU ({args.threads or 'all'} threads), {count} LLM-CF prompts "
          f"(MovieLens-100k, stream order, 20-item histories), temperature {args.temperature}, "
          f"<= {args.max_new_tokens or 'the backend default'} new tokens, drafts <= {args.draft_tokens} tokens, "
          f"index warmed with {args.draft_warmup} CoTs")
    print(f"{'dtype':<9} {'prompt':<8} {'tokens':>6} {'batch':>5} {'mode':<9} {'seconds':>8} {'CoTs/s':>7} "
          f"{'prefill s':>9} {'decode s':>8} {'decode tok/s':>12} {'x plain':>7} {'accepted':>8} {'tok/pass':>8} "
          f"{'same text':>9} {'score':>6} {'sim ref':>7}")
    for r in rows:
        plain = _row_of(rows, r["dtype"], r["prompt"], "plain", r["batch"])
        same = sum(a == b for a, b in zip(r["texts"], plain["texts"], strict=True)) if plain else 0
        ratio = f"{r['decode_tokens_per_s'] / plain['decode_tokens_per_s']:>7.2f}" if plain else f"{'-':>7}"
        print(f"{r['dtype']:<9} {r['prompt']:<8} {r['prompt_tokens']:>6.0f} {r['batch']:>5} {r['mode']:<9} "
              f"{r['seconds']:>8.1f} {r['cots_per_s']:>7.2f} {r['prefill_s']:>9.1f} {r['decode_s']:>8.1f} "
              f"{r['decode_tokens_per_s']:>12.1f} {ratio} {r['acceptance']:>8.2f} {r['tokens_per_pass']:>8.2f} "
              f"{same:>5}/{count:<3} {r['score']:>6.3f} {r['similarity']:>7.3f}")


def _print_draft_speedups(rows: list[dict], forms: list[str], modes: dict) -> None:
    """Per weight type, prompt form and mode: the best decode tokens/s against plain decoding's best."""

    def best(key: str, **where: object) -> dict | None:
        chosen = [r for r in rows if all(r[k] == v for k, v in where.items())]
        return max(chosen, key=lambda r: r[key]) if chosen else None

    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for form in forms:
            plain = best("decode_tokens_per_s", dtype=dtype, prompt=form, mode="plain")
            for mode in modes:
                fastest = best("decode_tokens_per_s", dtype=dtype, prompt=form, mode=mode)
                if plain and fastest:
                    print(f"{dtype} {form} {mode:<8}: decode tokens/s x{fastest['decode_tokens_per_s'] / plain['decode_tokens_per_s']:.2f} "
                          f"plain's (best batches {fastest['batch']} vs {plain['batch']})")


def _print_default_against_today(rows: list[dict], reference: str, forms: list[str]) -> None:
    """Today's configuration (before issue 14) against the default `llmcf generate` runs now, and where the gain comes
    from."""
    from generators.backends.model_loading import default_dtype_name
    from generators.backends.transformers_backend import CPU_MAX_BATCH

    today = _row_of(rows, reference, forms[0], "plain", 16)
    default_dtype = default_dtype_name()
    steps = [("weights", _row_of(rows, default_dtype, forms[0], "plain", 16)),
             ("prompt", _row_of(rows, default_dtype, "compact", "plain", 16)),
             ("batch", _row_of(rows, default_dtype, "compact", "plain", CPU_MAX_BATCH))]
    if not (today and all(row for _, row in steps)):
        print(f"\n(the default configuration against today's needs --dtypes float32,{default_dtype} --prompt-forms "
              f"tags,compact --batches 16,{CPU_MAX_BATCH} with plain decoding)")
        return
    line, previous = [], today
    for name, row in steps:
        assert row is not None
        line.append(f"{name} ({row['dtype']}, {row['prompt']} prompt, batch {row['batch']}) "
                    f"x{row['cots_per_s'] / previous['cots_per_s']:.2f}")
        previous = row
    drafted = _row_of(rows, default_dtype, "compact", "lossless", CPU_MAX_BATCH)
    print(f"\ndefault configuration ({default_dtype}, compact prompt, no drafts, batch {CPU_MAX_BATCH}) against "
          f"today's ({reference}, {forms[0]} prompt, no drafts, batch 16): CoTs/s "
          f"x{previous['cots_per_s'] / today['cots_per_s']:.2f} = " + ", then ".join(line)
          + (f"; lossless drafts on top x{drafted['cots_per_s'] / previous['cots_per_s']:.2f}" if drafted else ""))


def main() -> None:
    args = _parse_args()
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

    print(f"template backend: {args.template_prompts} CoTs (load avg {load_average()})", flush=True)
    rows = [run_backend(create_backend("template"), template_prompts, args.template_prompts)]
    chosen = {name: prompt_sets[name] for name in chosen_sets}
    rows.extend(_bench_transformers(args, batches, chosen, warmup=prompt_sets["llmcf"][:1]))
    embedder_rows = [] if args.skip_embedder else bench_embedder(args.sentences, args.threads)
    _print_generation(rows, chosen_sets)
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


def _parse_args() -> argparse.Namespace:
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
    parser.add_argument("--prompt-forms", default="tags,compact",
                        help="--drafts only: prompt forms compared, the first is the reference: tags (each history "
                        "line with its item's tags, before issue 14) and compact (titles only, the default)")
    parser.add_argument("--modes", default="plain,lossless,relaxed",
                        help="--drafts only: decoding modes compared (plain, lossless and relaxed drafts)")
    parser.add_argument("--relaxed-top-k", type=int, default=2, help="relaxed acceptance: the model's top k (DARE: 2)")
    parser.add_argument("--relaxed-min-probability", type=float, default=0.1,
                        help="relaxed acceptance: minimum probability of a kept draft token (DARE: 0.1)")
    return parser.parse_args()


def _bench_transformers(args: argparse.Namespace, batches: list[int], prompt_sets: dict[str, list[Prompt]],
                        warmup: list[Prompt]) -> list[dict]:
    """The transformers backend over each prompt set at each batch size, the batch sizes taking turns per round;
    `warmup` is generated first, unmeasured."""
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
    backend.generate(warmup)  # first-call allocations and kernel selection are not throughput
    rows = []
    for prompt_set, prompts in prompt_sets.items():
        runs: dict[int, list[dict]] = {batch: [] for batch in batches}
        # Batch sizes take turns, so a change in the machine's load hits all of them alike.
        for round_number in range(1, args.repeats + 1):
            for batch in batches:
                print(
                    f"transformers {prompt_set} prompts, batch {batch}, round {round_number}/{args.repeats}: "
                    f"{args.prompts} CoTs, {backend.options.max_new_tokens} new tokens max (load avg {load_average()})",
                    flush=True,
                )
                runs[batch].append(run_backend(backend, prompts, batch, prompt_set))
        rows.extend(summarise(runs[batch]) for batch in batches)
    backend.close()
    return rows


def _print_generation(rows: list[dict], chosen_sets: list[str]) -> None:
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


if __name__ == "__main__":
    main()
