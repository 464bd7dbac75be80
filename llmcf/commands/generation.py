"""`llmcf generate` and `cots`: a member of the CoT generator pool, and the evaluation's LLM CoT file."""

from __future__ import annotations

import argparse

from generators.backends.base import GenerationOptions
from generators.config import PoolConfig
from generators.service import GenerateOptions
from llmcf.backend_names import BACKEND_NAMES, LLM_BACKEND_NAMES
from llmcf.commands.arguments import THREADS_HELP, non_negative_float, non_negative_int, pin_threads, positive_float, positive_int
from llmcf.commands.interface import Subcommands
from llmcf.ports import GENERATOR_METRICS_PORT
from llmcf.settings import Settings
from ranker.llm_cots import WriteOptions

# `generators.backends.model_loading.DTYPES`, which imports torch: too slow for `--help`; tests/llmcf/test_cli.py keeps
# the two equal.
WEIGHT_TYPES = ("float32", "bfloat16", "float16", "int8")


def add_generate(sub: Subcommands) -> None:
    p = sub.add_parser(
        "generate",
        help="run a member of the CoT generator pool (consumes cot-requests, publishes cot-results); one per GPU",
        description="Joins the generator consumer group on cot-requests, generates chains of thought in micro-batches "
        "with the chosen backend, embeds them and publishes cot-results; offsets are committed only after the results "
        "are delivered. Stops cleanly on SIGTERM / Ctrl-C (in-flight work is finished and committed). Defaults come "
        "from LLMCF_GENERATOR_* and LLMCF_OPENAI_* (`llmcf config --catalogue`).",
    )
    p.add_argument("--backend", choices=BACKEND_NAMES,
                   help="transformers (local model), openai (OpenAI-compatible server) or template (a deterministic "
                   "rationale, NOT an LLM; for load tests); default LLMCF_GENERATOR_BACKEND")
    _add_llm_flags(p, model_default="LLMCF_GENERATOR_MODEL", device_note="; also used by the embedder")
    p.add_argument("--max-wait-ms", type=non_negative_int, default=GenerateOptions.max_wait_ms,
                   help="longest wait for a batch to fill after its first request (default %(default)s)")
    p.add_argument("--max-attempts", type=positive_int, default=GenerateOptions.max_attempts,
                   help="attempts per request before it goes to dead-letters (default %(default)s)")
    p.add_argument("--draft-tokens", type=non_negative_int, default=GenerateOptions.draft_tokens,
                   help="transformers on CPU: speculative decoding with up to N draft tokens per step, retrieved from "
                   "the prompt and the CoTs already written (default %(default)s = off: on 2 cores at batch 16 it measured "
                   "1.2x greedy and slower than plain sampling, see `python -m bench.generators --drafts`)")
    p.add_argument("--draft-acceptance", choices=["lossless", "relaxed"], default=GenerateOptions.draft_acceptance,
                   help="lossless: the model's own text (greedy) or distribution (sampling); relaxed: DARE's rule, a "
                   "draft token in the model's top 2 with probability >= 0.1 is kept (the text changes)")
    p.add_argument("--metrics-port", type=non_negative_int,
                   help=f"port of /metrics; 0 = none (default LLMCF_METRICS_PORT, else {GENERATOR_METRICS_PORT})")
    p.set_defaults(func=_cmd_generate)


def _add_llm_flags(p: argparse.ArgumentParser, model_default: str, device_note: str = "") -> None:
    """The flags `generate` and `cots` share: which LLM, on what, and how it decodes."""
    p.add_argument("--model", help=f"transformers: model directory or .gguf; openai: served model name (default {model_default})")
    p.add_argument("--device", help=f"transformers: cpu, cuda:N or auto (default LLMCF_GENERATOR_DEVICE){device_note}")
    p.add_argument("--openai-base-url", help="openai backend: server URL (default LLMCF_OPENAI_BASE_URL)")
    p.add_argument("--max-batch", type=positive_int,
                   help=f"prompts per batch (default: transformers 48 on a CPU, 64 on a GPU; other backends {PoolConfig.max_batch})")
    p.add_argument("--max-new-tokens", type=positive_int, help="tokens per chain of thought (default: the backend's)")
    p.add_argument("--temperature", type=non_negative_float,
                   help=f"sampling temperature, 0 = greedy (default {GenerationOptions.temperature})")
    p.add_argument("--dtype", choices=WEIGHT_TYPES,
                   help="transformers: the weights' type (default bfloat16 where the CPU or GPU computes it natively: "
                   "AVX512-BF16 or AMX, CUDA with bf16; else float32 on a CPU, float16 on a GPU); int8: CPU only, "
                   "dynamically quantized linear layers, other text (see `python -m bench.generators --drafts`)")


def _cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from generators.service import run_generator

    return run_generator(
        settings,
        GenerateOptions(
            backend=args.backend or settings.generator_backend,
            model=args.model or settings.generator_model,
            device=args.device or settings.generator_device,
            openai_base_url=args.openai_base_url or settings.openai_base_url,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            max_attempts=args.max_attempts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            draft_tokens=args.draft_tokens,
            draft_acceptance=args.draft_acceptance,
            dtype=args.dtype,
            metrics_port=args.metrics_port if args.metrics_port is not None else settings.metrics_port,
        ),
    )


def add_cots(sub: Subcommands) -> None:
    p = sub.add_parser(
        "cots",
        help="write the evaluation's LLM CoT file: CoTs for a fixed, seeded sample of MovieLens training rows",
        description="Writes, with the generator pool's backend and the stream's prompt, the chains of thought of a "
        f"uniform --fraction (default {WriteOptions.fraction:.0%}) of the training rows of the time split that `llmcf "
        "evaluate` uses (seed --seed) into a gzip JSON-lines file (default data/cots/<dataset>-llm-cots.jsonl.gz, versioned in the "
        "repository) and its manifest (<name>.json: sample, model, decoding, command, time). Resumable: rows already "
        "in the file are skipped, so stop it any time (Ctrl-C) and run the same command again. SmolLM2-135M on 2 CPU "
        "cores writes about 2 CoTs/s (about 70 minutes for ml-1m's 8,002 rows); on a GPU (--device cuda:0) or a "
        "served LLM (--backend openai) much faster. The template backend is refused: it is not an LLM.",
    )
    p.add_argument("--dataset", choices=["ml-100k", "ml-1m"], default=WriteOptions.dataset, help="default %(default)s")
    p.add_argument("--fraction", type=positive_float, default=WriteOptions.fraction,
                   help="share of the training rows to write CoTs for (default %(default)s)")
    p.add_argument("--seed", type=int, default=WriteOptions.seed,
                   help="seed of the row sample and of sampled decoding (default %(default)s)")
    p.add_argument("--out", help="the CoT file (default data/cots/<dataset>-llm-cots.jsonl.gz in the repository)")
    p.add_argument("--limit", type=positive_int, help="write at most N new CoTs in this run (default: all missing)")
    p.add_argument("--backend", choices=LLM_BACKEND_NAMES,
                   help="transformers (local model) or openai (OpenAI-compatible server); default transformers, or "
                   "openai when LLMCF_GENERATOR_BACKEND says so")
    _add_llm_flags(p, model_default="transformers: SmolLM2-135M-Instruct; openai: LLMCF_GENERATOR_MODEL")
    p.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    p.set_defaults(func=_cmd_cots)


def _cmd_cots(args: argparse.Namespace, settings: Settings) -> int:
    args.threads = pin_threads(args.threads)  # before numpy and torch load
    from pathlib import Path

    from generators.service import resolve_device
    from ranker.llm_cots import write_cots

    backend = args.backend or ("openai" if settings.generator_backend == "openai" else "transformers")
    options = WriteOptions(
        dataset=args.dataset, fraction=args.fraction, seed=args.seed, backend=backend,
        model=args.model or settings.generator_model, openai_base_url=args.openai_base_url or settings.openai_base_url,
        device=resolve_device(args.device or settings.generator_device) if backend == "transformers" else "remote",
        dtype=args.dtype, threads=args.threads, max_batch=args.max_batch, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, limit=args.limit,
    )
    path = write_cots(options, settings.home, Path(args.out) if args.out else None,
                      log=lambda line: print(line, flush=True))
    print(f"wrote {path}")
    return 0
