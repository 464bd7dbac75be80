"""The transformers backend: a local causal LM (Hugging Face transformers) on the CPU or one CUDA device.

The model, its device and its weight type come from `model_loading` (local files only: nothing is downloaded at run
time).

Decoding on CPU, for Llama-architecture models (SmolLM2 included): `prefix_decoding.PrefixDecoder`. Every prompt opens
with the same instructions (`Prompt.instructions`); their KV cache is computed once per process (a few prefixes are
kept) and shared by every row of every batch, so a request pays only for its own part of the prompt (~270 of ~435
tokens for LLM-CF prompts on MovieLens), prefilled without padding, then the batch decodes together on a pre-allocated
cache. Greedy output is the same as transformers' `generate` on the full prompt (tested). Elsewhere (GPUs, other
architectures): transformers' `generate`, batched with LEFT padding, SDPA attention (on CPU `grouped_query_sdpa`, see
there). Both: the model's chat template, sampling at the options' temperature (greedy at 0), `max_new_tokens` (default
256 as in the paper on GPU, 96 on CPU where a 135M model writes ~15 tokens/s per sequence alone), `torch.inference_mode`.
Prompts are sorted by length before they are cut into batches of `max_batch`, so a batch pads little. With
`candidates > 1` each prompt gets n sampled continuations and the best by `best_of_n.heuristic_rationale_score` is kept.

Weights are bfloat16 where the hardware computes it natively (`model_loading.default_dtype_name`; on a CPU with AVX512-BF16 or AMX a
batch of SmolLM2 CoTs measured ~1.35x float32's CoTs/s, other rounding, so other text), float32 on other CPUs; int8
linear layers (`model_loading.quantize_int8`, CPU only) are opt-in: other text, its quality delta printed by `bench.generators`.
Speculative decoding (`drafts`: drafts retrieved from the prompt and from the CoTs this backend already wrote,
`drafts.py`; lossless by default) is an option of the CPU decoder, off by default: at the production temperature (0.6)
too few drafts are accepted for a verifying pass to pay (see `python -m bench.generators --drafts`).

Lifecycle: construct (loads the model, pins torch's intra-op threads), `generate` from one thread, `close()`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from generators import metrics
from generators.backends.base import CotBackend, Generation, GenerationOptions
from generators.backends.best_of_n import pick_best_candidate
from generators.backends.drafts import DraftConfig, DraftIndex, RequestDrafter
from generators.backends.model_loading import default_dtype_name, load_causal_lm, resolve_device, resolve_model_dir
from generators.backends.prefix_decoding import Prefix, PrefixDecoder
from generators.backends.sampling import Acceptance, Sampling
from generators.prompt import Prompt
from llmcf.errors import UserFacingError
from llmcf.settings import Settings

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

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
        from transformers import AutoTokenizer

        self.device = resolve_device(device)
        on_gpu = self.device.type == "cuda"
        self.threads = threads or len(os.sched_getaffinity(0))
        torch.set_num_threads(self.threads)
        models_home = Path(home).expanduser().resolve() if home else Settings.from_env().home
        model_dir, self.model = resolve_model_dir(model, models_home / "models")

        started = time.perf_counter()
        self.dtype_name = dtype_name = dtype or default_dtype_name(self.device)
        self._tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self._tokenizer.padding_side = "left"
        self._model = load_causal_lm(model_dir, dtype_name, self.device, "sdpa" if on_gpu else _cpu_attention())
        self.load_seconds = time.perf_counter() - started
        log.info("loaded %s from %s on %s (%s) in %.1f s", self.model, model_dir, self.device, dtype_name,
                 self.load_seconds)

        if not self._tokenizer.chat_template:
            raise UserFacingError(f"model {model_dir} has no chat template; use an instruction-tuned (chat) model")
        generation_config = cast("GenerationConfig", self._model.generation_config)
        self._eos_ids = _eos_token_ids(generation_config, self._tokenizer)
        self._pad_id = _pad_token_id(generation_config, self._tokenizer, self._eos_ids)
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
        chat_texts = [self._chat_text(p) for p in prompts]
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

    def _chat_text(self, prompt: Prompt) -> str:
        text = self._tokenizer.apply_chat_template(list(prompt.messages), add_generation_prompt=True, tokenize=False)
        assert isinstance(text, str)  # tokenize=False gives the text, not token ids
        return text

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
        decoder = self._prefix_decoder
        assert decoder is not None  # only the shared-prefix path caches prefixes
        prefix = self._prefixes.pop(prefix_ids, None) or decoder.prefix(list(prefix_ids))
        self._prefixes[prefix_ids] = prefix
        while len(self._prefixes) > MAX_CACHED_PREFIXES:
            del self._prefixes[next(iter(self._prefixes))]
        return prefix

    def _generate_with_prefix(self, prefix: Prefix, prompts: list[Prompt], token_ids: list[list[int]]) -> list[Generation]:
        options, decoder = self.options, self._prefix_decoder
        assert decoder is not None and options.max_new_tokens is not None  # the CPU path; the backend set its default
        candidates = 1 if options.greedy else options.candidates
        drafter = None
        if self.drafts is not None:
            drafter = RequestDrafter(self.drafts, [ids for ids in token_ids for _ in range(candidates)],
                                     [p.request.target.item_id for p in prompts for _ in range(candidates)])
        outputs = decoder.generate(
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
        text = self._tokenizer.decode(sequence[:length], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert isinstance(text, str)  # one sequence decodes to one text
        return text.strip()

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
        # transformers types a loaded model's `generate` for its generative classes only, not for a plain module.
        generate = cast(Callable[..., torch.Tensor], self._model.generate)
        with torch.inference_mode():
            output = generate(
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


def _eos_token_ids(generation_config: GenerationConfig, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    configured = generation_config.eos_token_id
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        raise UserFacingError("the model defines no end-of-sequence token; generation could never stop")
    return [configured] if isinstance(configured, int) else list(configured)


def _pad_token_id(generation_config: GenerationConfig, tokenizer: PreTrainedTokenizerBase, eos_ids: list[int]) -> int:
    for candidate in (tokenizer.pad_token_id, generation_config.pad_token_id):
        if candidate is not None:
            return int(candidate)
    return eos_ids[0]


def _completion_length(sequence: list[int], eos_ids: list[int]) -> int:
    """Generated tokens up to and including the first end-of-sequence token (the padding after it is not generated)."""
    for position, token in enumerate(sequence):
        if token in eos_ids:
            return position + 1
    return len(sequence)
