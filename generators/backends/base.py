"""The interface every CoT backend implements (`CotBackend`), what it is given and returns (`GenerationOptions`,
`Generation`), and the two ways a call can fail (`BackendError`, `BackendSaturated`).

Lifecycle contract: build a backend once per process (`generators.backends.create_backend`), call `generate` any number
of times from ONE thread (backends are not thread-safe; the OpenAI backend parallelises inside a call), then `close()`
(or use it as a context manager). `generate` returns one `Generation` per prompt, in order, or raises:
`BackendSaturated` means "the server is overloaded, pause consumption for `retry_after_s` and retry the same batch"; any
other `BackendError` means the batch failed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from generators.prompt import Prompt
    from llmcf.backend_names import CotBackendName


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

    name: ClassVar[CotBackendName]
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
