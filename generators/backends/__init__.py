"""LLM backends of the generator pool: one interface (`base.CotBackend`), one module per backend, and `create_backend`,
which builds one by name (`names.BACKEND_NAMES`).

- `transformers` (`transformers_backend.py`): a local causal LM through Hugging Face transformers, CPU or one CUDA device.
- `openai` (`openai_backend.py`): any OpenAI-compatible server (vLLM, TGI, SGLang) over HTTP.
- `template` (`template_backend.py`): a deterministic rationale from the request's data, NOT an LLM (load tests, CI).

`base.py` states the lifecycle contract every backend keeps; `best_of_n.py` chooses among a prompt's candidates.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from generators.backends.base import CotBackend, GenerationOptions
from llmcf.backend_names import parse_backend_name
from llmcf.errors import UserFacingError


def create_backend(name: str, **options: Any) -> CotBackend:
    """Build a backend by name. Keyword options go to its constructor; `GenerationOptions` fields (temperature,
    max_new_tokens, top_p, candidates, seed) may be given flat and are folded into its `options`."""
    try:
        backend_name = parse_backend_name(name)
    except ValueError as exc:
        raise UserFacingError(str(exc)) from None
    option_names = {f.name for f in fields(GenerationOptions)}
    flat = {k: options.pop(k) for k in list(options) if k in option_names and options[k] is not None}
    if flat:
        base = options.pop("options", None) or GenerationOptions()
        options["options"] = GenerationOptions(**{**{f.name: getattr(base, f.name) for f in fields(base)}, **flat})
    if backend_name == "transformers":
        from generators.backends.transformers_backend import TransformersBackend

        return TransformersBackend(**options)
    if backend_name == "openai":
        from generators.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(**options)
    from generators.backends.template_backend import TemplateBackend

    return TemplateBackend(**options)
