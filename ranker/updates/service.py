"""`llmcf update`: the loop that runs an update round every `interval_s` seconds (or once), serves the updater's
metrics, and survives failed rounds.

Lifecycle: the database is migrated once at start (a failure there ends the command: nothing can work without it).
A round that raises is logged with its traceback and counted as `failed`; the loop sleeps and tries again, so a
database outage or a broken artifact costs rounds, not the process. SIGTERM / Ctrl-C end the process between or
during rounds; a round interrupted mid-way has written nothing (see `rounds`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from llmcf.metrics import serve_metrics
from llmcf.settings import Settings
from ranker.updates.metrics import RUN_SECONDS, RUNS, record_promotion
from ranker.updates.rounds import RoundReport, UpdateOptions, run_round

logger = logging.getLogger(__name__)


def run_updater(settings: Settings, options: UpdateOptions, interval_s: float, once: bool, metrics_port: int | None,
                log: Callable[[str], None] = print, stop: threading.Event | None = None) -> int:
    """Rounds until `stop` is set (forever without one), or one round with `once`. Returns the exit code: with `once`,
    1 when the round failed."""
    import migrations

    migrations.upgrade(settings.database_url)
    serve_metrics(metrics_port)
    stop = stop or threading.Event()
    while True:
        outcome = run_once(settings, options, log)
        if once:
            return 1 if outcome == "failed" else 0
        if stop.wait(interval_s):
            return 0


def run_once(settings: Settings, options: UpdateOptions, log: Callable[[str], None]) -> str:
    """One round with its metrics; returns its outcome (`failed` when it raised)."""
    started = time.perf_counter()
    report: RoundReport | None = None
    try:
        report = run_round(settings, options, log)
        outcome: str = report.outcome
    except Exception:
        logger.exception("update round failed; the next one runs as scheduled")
        outcome = "failed"
    RUNS.labels(outcome=outcome).inc()
    RUN_SECONDS.observe(time.perf_counter() - started)
    if report is not None and report.outcome == "promoted" and report.newest_event_ms is not None:
        record_promotion(report.newest_event_ms)
    return outcome
