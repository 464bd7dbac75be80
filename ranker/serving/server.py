"""`llmcf serve`: build the ranker service from the settings and run it under uvicorn until SIGTERM / Ctrl-C.

Shutdown: uvicorn stops accepting connections, lets in-flight requests finish, then the app's lifespan closes the
service (model polling, scoring threads, the example pool's sync), and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from llmcf.errors import UserFacingError
from llmcf.model_kinds import ModelKind
from llmcf.settings import Settings
from ranker.serving.app import Limits, RankerService, create_app
from ranker.serving.models import ModelHolder
from ranker.serving.pool import PoolSync
from ranker.serving.scoring import Scorer
from storage.repository import Repository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """Flags of `llmcf serve`; None = the setting."""

    host: str | None = None
    port: int | None = None
    kind: str | None = None
    version: str | None = None
    threads: int | None = None
    max_inflight: int | None = None


def build_service(settings: Settings, options: ServeOptions, repository: Repository,
                  limits: Limits | None = None) -> RankerService:
    """The service for these settings (`limits` replaces the settings' ones). The kind is the pinned version's when
    `options.version` is given. Only ICT kinds keep an example pool (backbone-only models use none)."""
    kind = options.kind or settings.ranker_kind
    try:
        ModelKind.parse(kind)
    except ValueError as exc:
        raise UserFacingError(str(exc)) from None
    if options.version is not None:
        record = repository.get_model_version(options.version)
        if record is None:
            raise UserFacingError(f"no model version {options.version!r} in model_versions (DATABASE_URL)")
        kind = record.kind
    source = PoolSync(repository, settings.ranker_pool_sync_s, settings.ranker_pool_max_samples) \
        if ModelKind.parse(kind).ict else None
    scorer = Scorer(repository, source.pool if source is not None else None, settings.history_length)
    holder = ModelHolder(repository, kind, threads=options.threads or settings.ranker_threads,
                         pinned_version=options.version, poll_s=settings.ranker_model_poll_s, prepare=scorer.prepare)
    limits = limits or Limits(max_inflight=options.max_inflight or settings.ranker_max_inflight,
                              max_body_bytes=settings.ranker_max_body_bytes, api_token=settings.api_token,
                              max_wait_s=settings.ranker_max_wait_ms / 1000.0)
    return RankerService(holder, scorer, source, limits)


def run_server(settings: Settings, options: ServeOptions) -> int:
    import uvicorn

    import migrations

    class _Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn's own version re-raises SIGTERM after the graceful shutdown, so the process would die of it (status
            # -15); a finished graceful stop is a clean exit.
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    migrations.upgrade(settings.database_url)
    repository = Repository.from_settings(settings)
    try:
        service = build_service(settings, options, repository)
        host, port = options.host or settings.ranker_host, options.port or settings.ranker_port
        log.info("ranker on http://%s:%d (kind %s%s, token %s)", host, port, service.holder.kind,
                 f", pinned to {options.version}" if options.version else "", "required" if settings.api_token else "off")
        config = uvicorn.Config(create_app(service), host=host, port=port, log_level=settings.log_level.lower(),
                                access_log=False, timeout_graceful_shutdown=30)
        _Server(config).run()
    finally:
        repository.close()
    return 0
