"""`llmcf` commands (`worker`, `generate`) run as subprocesses, as an operator runs them.

A child gets the caller's `Settings` through its environment (broker, topic prefix, LLMCF_HOME, CoT policy), so what
the test computes from its settings is what the child does; nothing else of the developer's LLMCF_/KAFKA_/QDRANT_/
OPENAI_ configuration leaks in. Each child logs to a file (shown when an assertion fails) and serves `/metrics` on a
port of its own. `ProcessStarter` remembers what it started so that a
caller (the `llmcf_processes` fixture) can kill whatever is left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from llmcf.infra import free_port
from llmcf.settings import Settings

_CONFIGURATION_PREFIXES = ("LLMCF_", "KAFKA_", "QDRANT_", "OPENAI_")


def child_environment(settings: Settings, database_url: str, metrics_port: int) -> dict[str, str]:
    """The environment that makes a child's `Settings.from_env()` match `settings` where the pipeline depends on it."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(_CONFIGURATION_PREFIXES) and name != "DATABASE_URL"
    }
    env |= {
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
        "KAFKA_SECURITY_PROTOCOL": settings.kafka_security_protocol,
        "LLMCF_TOPIC_PREFIX": settings.topic_prefix,
        "LLMCF_HOME": str(settings.home),
        "LLMCF_LOG_LEVEL": settings.log_level,
        "LLMCF_COT_SAMPLE_RATE": repr(settings.cot_sample_rate),
        "LLMCF_COLD_START_WINDOW_S": repr(settings.cold_start_window_s),
        "LLMCF_HISTORY_LENGTH": str(settings.history_length),
        "LLMCF_METRICS_PORT": str(metrics_port),
        "DATABASE_URL": database_url,
    }
    # An external cluster may need SASL (the kafka_settings fixture takes it from the environment).
    for name, value in (
        ("KAFKA_SASL_MECHANISM", settings.kafka_sasl_mechanism),
        ("KAFKA_SASL_USERNAME", settings.kafka_sasl_username),
        ("KAFKA_SASL_PASSWORD", settings.kafka_sasl_password),
    ):
        if value:
            env[name] = value
    return env


class LlmcfProcess:
    """One `llmcf COMMAND ARGS...` subprocess, logging to `log_path` (appended: a restart shares the file).
    `extra_env` adds variables `Settings` does not carry to children (e.g. API keys)."""

    def __init__(self, command: str, settings: Settings, log_path: Path, *args: str, database_url: str | None = None,
                 extra_env: Mapping[str, str] | None = None):
        self.command = command
        self.metrics_port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "ab")
        env = child_environment(settings, database_url or settings.database_url, self.metrics_port) | dict(extra_env or {})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llmcf.cli", command, *args], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def running(self) -> bool:
        return self.process.poll() is None

    def assert_running(self) -> None:
        assert self.running(), f"llmcf {self.command} exited with {self.process.returncode}:\n{self.log_tail()}"

    def metrics(self) -> str:
        """The text of its `/metrics`."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for a clean exit; returns the exit status."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no flush, no commit, no goodbye
        self.process.wait(10)
        self._log.close()

    def ensure_stopped(self) -> None:
        if self.running():
            self.kill()


def wait_while_running(
    condition: Callable[[], bool], processes: Sequence[LlmcfProcess], timeout_s: float, what: str,
    interval_s: float = 0.5, diagnose: Callable[[], str] | None = None,
) -> None:
    """Poll `condition` until it holds; fail at once, with the process's log, if one of `processes` exits, and with
    `diagnose()` (what the test saw last) and every log after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        for process in processes:
            process.assert_running()
        if time.monotonic() > deadline:
            seen = f"{diagnose()}\n" if diagnose else ""
            logs = "\n\n".join(f"llmcf {p.command} log:\n{p.log_tail()}" for p in processes)
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{seen}{logs}")
        time.sleep(interval_s)


def wait_until_ready(url: str, process: LlmcfProcess, timeout_s: float, interval_s: float = 0.5) -> None:
    """Wait for `llmcf serve` at `url` to answer /readyz with 200 (the model loaded), failing as `wait_while_running`."""
    import httpx  # the worker tests do not need it

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_while_running(ready, [process], timeout_s, f"llmcf serve at {url} to become ready", interval_s)


class ProcessStarter:
    """`start(...)` = `LlmcfProcess(...)`, remembered so that the fixture's teardown can kill it if still running."""

    def __init__(self) -> None:
        self.started: list[LlmcfProcess] = []

    def start(self, command: str, settings: Settings, log_path: Path, *args: str,
              database_url: str | None = None, extra_env: Mapping[str, str] | None = None) -> LlmcfProcess:
        process = LlmcfProcess(command, settings, log_path, *args, database_url=database_url, extra_env=extra_env)
        self.started.append(process)
        return process
