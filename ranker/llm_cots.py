"""The LLM-written CoT file of the offline evaluation: which training rows it covers, writing it with a generator
backend (resumably), and reading it back.

The rows are a fixed, seeded sample (`fraction`, default 1%) of the training split of `llmcf train` / `llmcf evaluate`
(the time-ordered 80/10/10 split over the whole corpus). Each CoT is written from the stream's own prompt
(`ranker.cot_pool.cot_prompts`, the request a stream worker would build for that row) by the generator pool's backend
(`generators.backends`: SmolLM2-135M on CPU by default, or an OpenAI-compatible server); the template backend is
refused, since this file is the evaluation's LLM evidence.

The file is versioned in the repository (`data/cots/`): gzip-compressed JSON lines, one per CoT (key, ids, time,
label, text, token counts), appended one gzip member per chunk, so a run that stops (Ctrl-C, kill, power) resumes
where it stopped: the rows already in the file are skipped, and a chunk cut off mid-write is dropped. Beside it,
`<name>.json` is the manifest: the sample, the backend, model and decoding settings, the command that wrote it and
the time it took. Embeddings are not stored; a reader embeds the texts (cached by text, `ranker.data.EmbeddingCache`).
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import shlex
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from llmcf.errors import UserFacingError
from llmcf.files import write_atomically

COTS_DIR = Path(__file__).resolve().parents[1] / "data" / "cots"
DEFAULT_FRACTION = 0.01
CHUNK_BATCHES = 4  # backend batches per appended chunk: what a stop may cost, against one gzip member per chunk


def default_path(dataset: str) -> Path:
    return COTS_DIR / f"{dataset}-llm-cots.jsonl.gz"


def manifest_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".gz").removesuffix(".jsonl") + ".json")


@dataclass(frozen=True)
class WriteOptions:
    """What `llmcf cots` writes: the sample (`dataset`, `fraction`, `seed`), the backend and its settings, and at
    most `limit` new CoTs this run (None = all that are missing)."""

    dataset: str = "ml-1m"
    fraction: float = DEFAULT_FRACTION
    seed: int = 0
    backend: str = "transformers"
    model: str | None = None
    openai_base_url: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None
    max_batch: int | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    limit: int | None = None


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the CoT file at `path` (sample, generator, command); one naming an unknown model when the file
    has none."""
    manifest = manifest_path(path)
    return json.loads(manifest.read_text()) if manifest.is_file() else {"generator": {"model": "unknown model"}}


def sample_rows(train_rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The CoT file's rows: a uniform `fraction` of `train_rows` (at least one), drawn with `seed`, in corpus order."""
    size = max(1, round(len(train_rows) * fraction))
    return np.sort(np.random.default_rng([seed, 0xC07]).choice(train_rows, size, replace=False))


def _complete_members(data: bytes) -> Iterator[tuple[bytes, int]]:
    """Each complete gzip member of `data`, decompressed, with the byte offset where it ends; stops at a member cut off
    mid-write (or anything that is not gzip)."""
    view, end = memoryview(data), 0  # a view: slicing it does not copy the file once per member
    while end < len(data):
        member = zlib.decompressobj(wbits=31)  # one gzip member
        try:
            text = member.decompress(view[end:])
        except zlib.error:
            return
        if not member.eof:
            return
        end = len(data) - len(member.unused_data)
        yield text, end


def read_cots(path: Path) -> dict[str, dict[str, Any]]:
    """The file's records by key; a last chunk cut off mid-write (a stopped run) is left out."""
    records: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for text, _ in _complete_members(path.read_bytes()):
            for line in text.decode().splitlines():
                record = json.loads(line)
                records[record["key"]] = record
    return records


def _complete_length(path: Path) -> int:
    """Bytes of `path` made of complete gzip members (a cut-off last member is truncated away before appending)."""
    if not path.is_file():
        return 0
    return max((end for _, end in _complete_members(path.read_bytes())), default=0)


def write_cots(options: WriteOptions, home: Path, path: Path | None = None,
               log: Callable[[str], None] = print) -> Path:
    """Write the CoTs of `options`' sample that `path` (default `data/cots/<dataset>-llm-cots.jsonl.gz`) lacks, chunk by
    chunk, with progress lines; update the manifest after every chunk. Returns the file's path."""
    if options.backend == "template":
        raise UserFacingError("the template backend writes no LLM text: this file is the evaluation's LLM evidence; "
                              "use --backend transformers (SmolLM2-135M on this machine) or openai (a served LLM)")
    if not 0 < options.fraction <= 1:
        raise UserFacingError(f"--fraction must be in (0, 1], not {options.fraction:g}")
    from generators.backends import create_backend
    from ranker.cot_pool import cot_prompts
    from ranker.data import movielens_corpus
    from ranker.dataset import SPLIT, Samples, time_split

    path = path or default_path(options.dataset)
    manifest_file = manifest_path(path)
    previous = read_manifest(path) if manifest_file.is_file() else None
    sample = {"dataset": options.dataset, "fraction": options.fraction, "seed": options.seed}
    if previous is not None and previous["sample"] | {"rows": None} != sample | {"rows": None}:
        raise UserFacingError(f"{path} holds another sample ({previous['sample']}); choose another --out")

    corpus = movielens_corpus(options.dataset)
    samples = Samples.of(corpus, home / "cache" / "ranker")
    train = time_split(corpus, None, None, seed=0)[0]
    rows = sample_rows(train.rows, options.fraction, options.seed)
    done = read_cots(path)
    todo = [row for row in rows.tolist() if corpus.sample_key(row) not in done]
    if options.limit is not None:
        todo = todo[: options.limit]
    log(f"{options.dataset}: {len(rows):,} rows ({options.fraction:g} of the {len(train.rows):,} training rows of the "
        f"time split {'/'.join(str(int(s * 100)) for s in SPLIT)}, seed {options.seed}); {len(done):,} in {path}, "
        f"writing {len(todo):,}")
    if not todo:
        return path

    backend_options = _backend_options(options)
    path.parent.mkdir(parents=True, exist_ok=True)
    with create_backend(options.backend, **backend_options) as backend:
        settings = {"backend": backend.name, "model": backend.model, "max_batch": backend.max_batch,
                    "dtype": getattr(backend, "dtype_name", options.dtype), "device": options.device,
                    "decoding": asdict(backend.options)}
        if previous is not None and {k: previous["generator"].get(k) for k in ("backend", "model", "decoding")} != {
                k: settings[k] for k in ("backend", "model", "decoding")}:
            raise UserFacingError(f"{path} was written by {previous['generator']}; resuming with {settings} would mix "
                                  "two generators in one file: use the same settings, or another --out")
        seconds = float(previous["generation_seconds"]) if previous else 0.0
        with path.open("r+b" if path.exists() else "wb") as handle:
            handle.truncate(_complete_length(path))
        chunk = backend.max_batch * CHUNK_BATCHES
        started = time.monotonic()
        written = 0
        for start in range(0, len(todo), chunk):
            part = np.asarray(todo[start : start + chunk], dtype=np.int64)
            chunk_started = time.monotonic()
            generations = backend.generate(cot_prompts(samples, part))
            seconds += time.monotonic() - chunk_started
            lines = [json.dumps({
                "key": corpus.sample_key(row), "user_id": corpus.user_ids[corpus.user[row]],
                "item_id": corpus.item_ids[corpus.item[row]], "ts_ms": int(corpus.ts_ms[row]),
                "label": int(corpus.label[row]), "cot": g.text, "prompt_tokens": g.prompt_tokens,
                "completion_tokens": g.completion_tokens,
            }, ensure_ascii=False) for row, g in zip(part.tolist(), generations, strict=True)]
            with path.open("ab") as handle:
                handle.write(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
                handle.flush()
                os.fsync(handle.fileno())
            written += len(part)
            total = len(done) + written
            _write_manifest(manifest_file, sample | {"rows": len(rows)}, settings, command_of(options, settings, path),
                            total, seconds)
            elapsed = time.monotonic() - started
            rate = written / elapsed
            left = (len(todo) - written) / rate if rate else float("inf")
            log(f"  {total:,}/{len(rows):,} CoTs ({100 * total / len(rows):.1f}%), {rate:.2f} CoTs/s this run, "
                f"{left / 60:.0f} min left")
    return path


def _backend_options(options: WriteOptions) -> dict[str, Any]:
    """The generator backend's arguments for `options` (those left unset keep the backend's defaults)."""
    backend_options: dict[str, Any] = {"max_new_tokens": options.max_new_tokens, "temperature": options.temperature,
                                       "seed": options.seed}
    if options.backend == "openai":
        if not options.openai_base_url or not options.model:
            raise UserFacingError("the openai backend needs --openai-base-url (LLMCF_OPENAI_BASE_URL) and --model "
                                  "(LLMCF_GENERATOR_MODEL, the served model's name)")
        backend_options |= {"base_url": options.openai_base_url, "model": options.model,
                            "concurrency": options.max_batch or 16}
    else:
        backend_options |= {"model": options.model, "device": options.device, "dtype": options.dtype,
                            "threads": options.threads, "max_batch": options.max_batch}
    return {name: value for name, value in backend_options.items() if value is not None}


def command_of(options: WriteOptions, generator: dict[str, Any], path: Path) -> str:
    """The `llmcf cots` command that writes this file again with the same sample, generator and decoding."""
    args = ["llmcf", "cots", "--dataset", options.dataset, "--fraction", f"{options.fraction:g}", "--seed",
            str(options.seed), "--backend", generator["backend"], "--max-batch", str(generator["max_batch"]),
            "--max-new-tokens", str(generator["decoding"]["max_new_tokens"]),
            "--temperature", f"{generator['decoding']['temperature']:g}"]
    if generator["backend"] == "transformers":
        args += ["--dtype", str(generator["dtype"])]
    if options.model:
        args += ["--model", options.model]
    if path != default_path(options.dataset):
        args += ["--out", str(path)]
    return shlex.join(args)


def _write_manifest(path: Path, sample: dict[str, Any], generator: dict[str, Any], command: str, written: int,
                    seconds: float) -> None:
    import torch
    import transformers

    manifest = {
        "sample": sample,
        "split": "ranker.dataset.time_split over the whole corpus (time-ordered 80/10/10), training rows",
        "prompt": "ranker.cot_pool.cot_prompts: generators.prompt.build_prompt(feedback='rating'), the stream's prompt",
        "generator": generator,
        "written": written,
        "generation_seconds": round(seconds, 1),
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores visible",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "embeddings": "not stored: readers embed the texts with llmcf.embeddings.MODEL_NAME",
    }
    write_atomically(path, json.dumps(manifest, indent=2) + "\n")
