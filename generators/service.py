"""`llmcf generate`: one member of the generator pool as a process, with its backend, embedder, `/metrics` and signals.

Startup checks what an operator can get wrong (device, OpenAI endpoint and model name) before any model loads, and logs
which backend, model and device run (never the API key). SIGTERM or Ctrl-C stops the pool cleanly (in-flight batch
finished, flushed and committed); a second Ctrl-C ends the process at once, which loses nothing either: what was not
committed is consumed again.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

from generators.config import PoolConfig
from llmcf.errors import UserFacingError
from llmcf.ports import GENERATOR_METRICS_PORT
from llmcf.settings import Settings, without_credentials

if TYPE_CHECKING:
    from generators.backends.base import CotBackend
    from generators.pool import GeneratorPool
    from llmcf.embeddings import TextEmbedder

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class GenerateOptions:
    """The `llmcf generate` flags, after defaults from the settings were applied."""

    backend: str
    model: str | None
    device: str
    openai_base_url: str | None
    max_batch: int | None = None  # None: the transformers backend's own (48 on a CPU, 64 on a GPU), else 16
    max_wait_ms: int = PoolConfig.max_wait_ms
    max_attempts: int = PoolConfig.max_attempts
    max_new_tokens: int | None = None
    temperature: float | None = None
    draft_tokens: int = 0
    draft_acceptance: str = "lossless"
    dtype: str | None = None
    metrics_port: int | None = None


def resolve_device(device: str) -> str:
    """"auto" -> the first GPU when CUDA is available, else "cpu"; "cpu" / "cuda:N" are checked against this machine."""
    import torch

    from generators.backends.model_loading import resolve_device as checked_device

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return str(checked_device(device))


def run_generator(settings: Settings, options: GenerateOptions) -> int:
    """Run the pool until a signal stops it; 0 after a clean stop. Raises `UserFacingError` for operator mistakes and
    when the pool fails (nothing unfinished is committed then)."""
    from generators.backends import create_backend
    from generators.pool import GeneratorPool
    from llmcf.embeddings import TextEmbedder
    from llmcf.kafka import ensure_topics, resolve_bootstrap

    device = resolve_device(options.device)
    backend_options = _backend_options(options, device)
    bootstrap = resolve_bootstrap(settings)
    ensure_topics(settings, bootstrap)

    log.info("loading the %s backend%s", options.backend,
             f" on {device}" if options.backend == "transformers" else "")
    backend = create_backend(options.backend, **backend_options)
    try:
        max_batch = options.max_batch or (backend.max_batch if backend.name == "transformers" else PoolConfig.max_batch)
        config = PoolConfig(max_batch=max_batch, max_wait_ms=options.max_wait_ms, max_attempts=options.max_attempts,
                            ttl_s=settings.cot_ttl_s, max_backlog=settings.cot_max_backlog)
        embedder = TextEmbedder.load(device)
        _log_startup(settings, options, backend, embedder, config, device)
        pool = GeneratorPool(settings, bootstrap, backend, embedder, config)
        _serve_metrics(GENERATOR_METRICS_PORT if options.metrics_port is None else options.metrics_port)
        _run_until_signalled(pool)
    finally:
        backend.close()
    return 0


def _backend_options(options: GenerateOptions, device: str) -> dict[str, object]:
    """The keyword options of `create_backend` for the chosen backend; operator mistakes raise `UserFacingError`."""
    # Unset decoding flags are left out, so each backend applies its own defaults.
    backend_options: dict[str, object] = {
        name: value for name, value in (("max_new_tokens", options.max_new_tokens), ("temperature", options.temperature))
        if value is not None
    }
    if options.backend == "openai":
        if not options.openai_base_url:
            raise UserFacingError("the openai backend needs a server: set LLMCF_OPENAI_BASE_URL or --openai-base-url")
        if not options.model:
            raise UserFacingError("the openai backend needs the served model name: set LLMCF_GENERATOR_MODEL or --model")
        backend_options |= {"base_url": options.openai_base_url, "model": options.model,
                            "concurrency": options.max_batch or PoolConfig.max_batch}
    elif options.backend == "transformers":
        backend_options |= {"model": options.model, "device": device, "max_batch": options.max_batch,
                            "dtype": options.dtype}
        if options.draft_tokens:
            from generators.backends.drafts import DraftConfig
            from generators.backends.sampling import RELAXED, Acceptance

            backend_options |= {"drafts": DraftConfig(draft_tokens=options.draft_tokens),
                                "acceptance": RELAXED if options.draft_acceptance == "relaxed" else Acceptance()}
    elif options.model:
        log.warning("--model / LLMCF_GENERATOR_MODEL (%s) is ignored by the template backend", options.model)
    if options.backend != "transformers" and (options.draft_tokens or options.dtype):
        log.warning("--draft-tokens and --dtype are options of the transformers backend; the %s backend ignores them",
                    options.backend)
    return backend_options


def _log_startup(settings: Settings, options: GenerateOptions, backend: CotBackend, embedder: TextEmbedder,
                 config: PoolConfig, device: str) -> None:
    """Which backend, model and device run, and how the pool batches (never the API key)."""
    from generators.config import group_id

    described = {
        "template": "a deterministic rationale built from the request's data, NOT a language model",
        "transformers": f"a local causal LM on {device}",
        "openai": f"an OpenAI-compatible server at {without_credentials(options.openai_base_url or '')}",
    }[backend.name]
    log.info("generator: backend=%s (%s), model=%s, embedder=%s on %s, group=%s, max batch %d, max wait %d ms, "
             "max attempts %d, max new tokens %s, temperature %g, TTL %s, max backlog %d", backend.name, described,
             backend.model, embedder.model_name, device, group_id(settings), config.max_batch, config.max_wait_ms,
             config.max_attempts, backend.options.max_new_tokens, backend.options.temperature,
             f"{config.ttl_s:g} s" if config.ttl_s else "none", config.max_backlog)


def _serve_metrics(port: int) -> None:
    from llmcf.metrics import serve_metrics

    try:
        serve_metrics(port)
    except OSError as exc:
        raise UserFacingError(f"cannot serve /metrics on port {port} ({exc.strerror}): choose another with "
                              "--metrics-port or LLMCF_METRICS_PORT (0 = none)") from None


def _run_until_signalled(pool: GeneratorPool) -> None:
    """`pool.run()` with SIGTERM / Ctrl-C asking it to stop cleanly; a second Ctrl-C stops at once."""
    from generators.config import PoolFailure

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: finishing the in-flight batch, then stopping (Ctrl-C again to stop at once)",
                 signal.Signals(signum).name)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        pool.stop()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        pool.run()
    except PoolFailure as exc:
        raise UserFacingError(f"{exc}; uncommitted requests will be consumed again on restart") from exc
