"""The vocabulary of CoT backend names, in one place: `CotBackendName` (the type of `CotResult.backend` and of
`CotBackend.name`), `BACKEND_NAMES` (the CLI's and the settings' choices, in the order they are offered),
`NOT_LLM_BACKENDS` / `LLM_BACKEND_NAMES` (which writers are language models: only their CoTs count as LLM output) and
`parse_backend_name`, the check `create_backend` applies. Standard library only: the settings, the CLI and the event
contracts import it without loading any backend."""

from __future__ import annotations

from typing import Literal, get_args

CotBackendName = Literal["transformers", "openai", "template"]
BACKEND_NAMES: tuple[CotBackendName, ...] = get_args(CotBackendName)
NOT_LLM_BACKENDS: frozenset[str] = frozenset({"template"})  # never presented or counted as LLM output
LLM_BACKEND_NAMES: tuple[CotBackendName, ...] = tuple(name for name in BACKEND_NAMES if name not in NOT_LLM_BACKENDS)


def parse_backend_name(value: str) -> CotBackendName:
    """`value` as a backend name; ValueError, naming the choices, for any other text."""
    for name in BACKEND_NAMES:
        if value == name:
            return name
    raise ValueError(f"unknown CoT backend {value!r}; choose one of: {', '.join(BACKEND_NAMES)}")
