"""LLM backends of the generator pool: one interface (`CotBackend`), one module per backend.

- `transformers` (`transformers_backend.py`): a local causal LM through Hugging Face transformers, CPU or one CUDA device.
- `openai` (`openai_backend.py`): any OpenAI-compatible server (vLLM, TGI, SGLang) over HTTP.
- `template` (`template_backend.py`): a deterministic rationale from the request's data, NOT an LLM (load tests, CI).

Lifecycle contract: build a backend once per process (`create_backend`), call `generate` any number of times from ONE
thread (backends are not thread-safe; the OpenAI backend parallelises inside a call), then `close()` (or use it as a context
manager). `generate` returns one `Generation` per prompt, in order, or raises: `BackendSaturated` means "the server is
overloaded, pause consumption for `retry_after_s` and retry the same batch"; any other `BackendError` means the batch failed.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar

from llmcf.errors import UserFacingError

if TYPE_CHECKING:
    from generators.prompt import Prompt

BACKEND_NAMES = ("transformers", "openai", "template")


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding settings; the defaults are the paper's (sampling at T=0.6, best of 3 candidates in the paper, 1 here).

    `max_new_tokens=None` lets the backend choose: 256 (the paper's) except the transformers backend on CPU (96).
    `temperature=0` means greedy decoding. `seed` makes sampling repeatable for a given batch composition.
    """

    temperature: float = 0.6
    max_new_tokens: int | None = None
    top_p: float = 1.0
    candidates: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.candidates < 1:
            raise ValueError("candidates must be at least 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_max_new_tokens_default(self, max_new_tokens: int) -> GenerationOptions:
        """These options, with the backend's own `max_new_tokens` where none was asked for."""
        return self if self.max_new_tokens is not None else replace(self, max_new_tokens=max_new_tokens)


@dataclass(frozen=True)
class Generation:
    """One prompt's chain of thought. `completion_tokens` counts every token generated for the prompt, all candidates
    included (it is the cost); `prompt_tokens` counts the prompt once."""

    text: str
    prompt_tokens: int
    completion_tokens: int


class BackendError(RuntimeError):
    """A batch could not be generated (server error after retries, bad response, model failure)."""


class BackendSaturated(BackendError):
    """The server keeps answering "busy" (HTTP 429/503): the caller should pause for `retry_after_s`, then retry."""

    def __init__(self, retry_after_s: float, message: str = ""):
        super().__init__(message or f"LLM server saturated; retry after {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class CotBackend(ABC):
    """Turns prompts into chains of thought. `name` goes into `CotResult.backend`, `model` into `CotResult.model`.

    `max_batch` is a hint: the largest number of prompts worth passing to one `generate` call (larger lists are accepted
    and split).
    """

    name: ClassVar[str]
    model: str
    max_batch: int
    options: GenerationOptions

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]:
        """One `Generation` per prompt, in the same order."""

    def close(self) -> None:  # noqa: B027 - a no-op default: a backend that holds nothing need not override it
        """Release the model or connections; the backend is unusable afterwards."""

    def __enter__(self) -> CotBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def create_backend(name: str, **options: Any) -> CotBackend:
    """Build a backend by name. Keyword options go to its constructor; `GenerationOptions` fields (temperature,
    max_new_tokens, top_p, candidates, seed) may be given flat and are folded into its `options`."""
    option_names = {f.name for f in fields(GenerationOptions)}
    flat = {k: options.pop(k) for k in list(options) if k in option_names and options[k] is not None}
    if flat:
        base = options.pop("options", None) or GenerationOptions()
        options["options"] = GenerationOptions(**{**{f.name: getattr(base, f.name) for f in fields(base)}, **flat})
    if name == "transformers":
        from generators.backends.transformers_backend import TransformersBackend

        return TransformersBackend(**options)
    if name == "openai":
        from generators.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(**options)
    if name == "template":
        from generators.backends.template_backend import TemplateBackend

        return TemplateBackend(**options)
    raise UserFacingError(f"unknown CoT backend {name!r}; choose one of: {', '.join(BACKEND_NAMES)}")


# ---- best-of-n selection ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9']+")
_SENTENCE_END = re.compile(r"[.!?)\"']\s*$")
_MIN_WORDS, _MAX_WORDS = 30, 400


def heuristic_rationale_score(prompt: Prompt, text: str) -> float:
    """A cheap stand-in for the paper's candidate judge: the mean of four proxies in [0, 1], equal weights.

    - relevance: share of the target title's words (3+ letters) that the text mentions;
    - consistency: the text states the true label's direction (e.g. "clicked") and not the opposite ("did not click");
    - completeness: length within 30-400 words, and the last sentence finished (not cut by the token limit);
    - coherence: share of distinct word trigrams (repetition loops score low).
    It is a heuristic, not a model of quality: it only ranks candidates of the same prompt.
    """
    lowered = text.lower()
    words = _WORD.findall(lowered)
    title_words = {w for w in _WORD.findall(prompt.request.target.title.lower()) if len(w) >= 3 and not w.isdigit()}
    relevance = len(title_words & set(words)) / len(title_words) if title_words else 1.0

    label = prompt.request.label
    right = _mentions(lowered, prompt.wording.verb(label))
    wrong = _mentions(lowered, prompt.wording.verb(1 - label))
    consistency = {(True, False): 1.0, (False, False): 0.5, (True, True): 0.25, (False, True): 0.0}[(right, wrong)]

    length_ok = min(1.0, len(words) / _MIN_WORDS) if len(words) < _MAX_WORDS else _MAX_WORDS / len(words)
    completeness = 0.5 * length_ok + 0.5 * (1.0 if _SENTENCE_END.search(text) else 0.0)

    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    coherence = len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    return (relevance + consistency + completeness + coherence) / 4


def pick_best_candidate(prompt: Prompt, candidates: Sequence[str]) -> str:
    """The candidate with the highest `heuristic_rationale_score` (the first one on ties)."""
    if not candidates:
        raise BackendError("no candidate to choose from")
    return max(candidates, key=lambda text: heuristic_rationale_score(prompt, text))


def _mentions(lowered: str, verb_phrase: str) -> bool:
    """Whether `lowered` states `verb_phrase` ("clicked" / "did not click"): a negated phrase also matches "didn't click",
    "not click", "never click"; a positive verb preceded by "not"/"never" is the opposite statement and does not match."""
    if verb_phrase.startswith("did not "):
        stem = re.escape(verb_phrase.removeprefix("did not "))
        return re.search(rf"(\bnot|n't|\bnever) {stem}", lowered) is not None
    return re.search(rf"(?<!not )(?<!never )\b{re.escape(verb_phrase)}\b", lowered) is not None
