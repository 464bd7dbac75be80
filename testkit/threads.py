"""Running a service's blocking `run()` in a thread, for tests and benchmarks that drive it from the main thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Service(Protocol):
    def run(self) -> None: ...

    def stop(self) -> None: ...


@contextmanager
def running(service: Service, join_s: float = 60.0) -> Iterator[list[BaseException]]:
    """Run `service.run()` in a daemon thread. Yields the list that what it raises lands in (a caller polling for
    progress can fail early); on exit stops it, waits up to `join_s` for it and re-raises what it raised."""
    failures: list[BaseException] = []

    def target() -> None:
        try:
            service.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            failures.append(exc)

    thread = threading.Thread(target=target, name=f"{type(service).__name__}-under-test", daemon=True)
    thread.start()
    try:
        yield failures
    finally:
        service.stop()
        thread.join(timeout=join_s)
        assert not thread.is_alive(), f"{type(service).__name__} did not stop within {join_s:.0f} s"
    if failures:
        raise failures[0]
