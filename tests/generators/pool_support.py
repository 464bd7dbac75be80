"""What the generator-pool tests share: publishing requests, reading results back, and a real OpenAI-compatible HTTP
server on 127.0.0.1 whose failures are scripted per prompt."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler

from confluent_kafka import Producer

from generators.config import group_id
from llmcf.events import CotResult, DeadLetter, decode
from llmcf.kafka import producer_config, read_to_end
from llmcf.settings import Settings
from llmcf.topics import Topics
from testkit.http import LocalHTTPServer
from testkit.kafka import partitions_behind
from tests.generators import make_request


def publish_requests(settings: Settings, count: int, *, prefix: str = "req", poisoned: set[int] = frozenset(),
                     extra: list[tuple[bytes | None, bytes | None]] = (), age_s: float = 0.0,
                     event_minutes: bool = False, reason: str = "sampled") -> list[str]:
    """Publish `count` valid CotRequests (titles of `poisoned` indexes contain POISON), requested `age_s` seconds ago,
    with `reason`, the i-th at event time NOW + i minutes if `event_minutes` (else all at NOW), plus raw `extra`
    (key, value) records to cot-requests; return the valid request ids."""
    topic = Topics.from_settings(settings).cot_requests
    producer = Producer(producer_config(settings, settings.kafka_bootstrap_servers))
    ids = []
    for i in range(count):
        request_id = f"{prefix}-{i}"
        title = f"POISON Movie {i}" if i in poisoned else f"Movie {i} ({1950 + i % 50})"
        request = make_request(label=i % 2, request_id=request_id, title=title,
                               requested_at=datetime.now(timezone.utc) - timedelta(seconds=age_s))
        request = request.model_copy(update={"reason": reason, "ts": request.ts + timedelta(minutes=i if event_minutes else 0)})
        producer.produce(topic, key=request_id.encode(), value=request.to_bytes())
        ids.append(request_id)
    for key, value in extra:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0
    return ids


def read_results(settings: Settings) -> list[CotResult]:
    topic = Topics.from_settings(settings).cot_results
    return [decode(CotResult, m.value()) for m in read_to_end(settings, settings.kafka_bootstrap_servers, topic)]


def read_dead_letters(settings: Settings) -> list[DeadLetter]:
    topic = Topics.from_settings(settings).dead_letters
    return [decode(DeadLetter, m.value()) for m in read_to_end(settings, settings.kafka_bootstrap_servers, topic)]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.3) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def uncommitted(settings: Settings) -> dict[int, tuple[int | None, int]]:
    """Partitions of cot-requests whose generator-group commit is behind their end: partition -> (committed, end)."""
    return partitions_behind(settings, group_id(settings), Topics.from_settings(settings).cot_requests)


class ChatCompletionsServer(LocalHTTPServer):
    """A real OpenAI-compatible `/v1/chat/completions` server on 127.0.0.1.

    Prompts whose target title contains `fail_marker` always get HTTP 500. For the first `busy_for_s` seconds after the
    first request, every request gets 429 with `Retry-After: retry_after`. Others get a short rationale that names the
    title, after `delay_s`. `titles` counts the requests per target title."""

    def __init__(self, *, fail_marker: str | None = None, busy_for_s: float = 0.0, retry_after: str = "1",
                 delay_s: float = 0.0):
        self.fail_marker = fail_marker
        self.busy_for_s = busy_for_s
        self.retry_after = retry_after
        self.delay_s = delay_s
        self.titles: Counter[str] = Counter()
        self.busy_answers = 0
        self._first_request_at: float | None = None
        self._lock = threading.Lock()
        super().__init__(self._handler())

    @property
    def url(self) -> str:
        return f"{self.origin}/v1"

    def _answer(self, body: dict) -> tuple[int, dict[str, str], dict]:
        prompt = body["messages"][-1]["content"]
        title = next(line.removeprefix("Title: ") for line in prompt.splitlines() if line.startswith("Title: "))
        with self._lock:
            now = time.monotonic()
            self._first_request_at = self._first_request_at or now
            self.titles[title] += 1
            busy = now - self._first_request_at < self.busy_for_s
            self.busy_answers += busy
        if busy:
            return 429, {"Retry-After": self.retry_after}, {"error": {"message": "server busy"}}
        if self.fail_marker and self.fail_marker in title:
            return 500, {}, {"error": {"message": "model crashed on this prompt"}}
        time.sleep(self.delay_s)
        text = f"The user's history points to {title}; the known outcome follows from it."
        return 200, {}, {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())},
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep the test output readable
                pass

            def do_POST(self) -> None:
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, headers, payload = server._answer(body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in {**headers, "Content-Type": "application/json",
                                    "Content-Length": str(len(data))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler
