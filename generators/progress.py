"""What a pool member reports about itself in logs and to tests: its counters (`PoolStats`) and the periodic progress
line written from them (`ProgressLog`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PROGRESS_LOG_EVERY_S = 10.0


@dataclass
class PoolStats:
    """Counters for logs and tests. Each field is written by one thread only (see the comments), read by any."""

    consumed: int = 0  # polling thread
    batches: int = 0  # generation thread: batches with at least one request for the backend
    published: int = 0  # generation thread
    skipped_ttl: int = 0  # polling thread: requests in the backlog that would be published past the TTL
    skipped_in_queue: int = 0  # generation thread: requests that passed the TTL while queued, not generated
    skipped_backlog: int = 0  # polling thread: requests ranked last in a full backlog
    skipped_duplicate: int = 0  # polling thread: requests for a sample waiting, generating or generated recently
    dead_lettered: int = 0  # generation thread
    completion_tokens: int = 0  # generation thread
    commits: int = 0  # polling thread
    pauses: dict[str, int] = field(default_factory=lambda: {"backend_saturated": 0})  # polling thread

    @property
    def skipped(self) -> int:
        return self.skipped_ttl + self.skipped_in_queue + self.skipped_backlog + self.skipped_duplicate


class ProgressLog:
    """A progress line every `every_s` while the pool works (silent while idle)."""

    def __init__(self, stats: PoolStats, every_s: float = PROGRESS_LOG_EVERY_S):
        self._stats = stats
        self._every_s = every_s
        self._last_at = time.monotonic()
        self._last_published = 0
        self._last_tokens = 0

    def maybe_log(self, waiting: int, paused: bool) -> None:
        now = time.monotonic()
        if now - self._last_at < self._every_s:
            return
        published, tokens = self._stats.published, self._stats.completion_tokens
        if published != self._last_published or waiting:
            elapsed = now - self._last_at
            stats = self._stats
            log.info("%d results published (%.1f CoTs/s, %.0f tokens/s over %.0f s), %d skipped (ttl %d, backlog full "
                     "%d, duplicate %d), %d dead-lettered, %d requests waiting%s", published,
                     (published - self._last_published) / elapsed, (tokens - self._last_tokens) / elapsed, elapsed,
                     stats.skipped, stats.skipped_ttl + stats.skipped_in_queue, stats.skipped_backlog,
                     stats.skipped_duplicate, stats.dead_lettered, waiting, ", consumption paused" if paused else "")
        self._last_at, self._last_published, self._last_tokens = now, published, tokens
