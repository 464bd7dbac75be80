"""The OpenAI-compatible backend: any server that speaks the OpenAI HTTP API (vLLM, TGI, SGLang, llama.cpp server).

`api="chat"` POSTs `/v1/chat/completions` (the server applies the model's chat template); `api="completions"` POSTs
`/v1/completions` with the prompt rendered as plain text. A batch is sent as concurrent requests, at most `concurrency` at
a time, so the server's continuous batching sees them together.

Failure handling, per request:
- connection errors, timeouts and HTTP 5xx other than 503: retried `max_retries` times with exponential backoff and full
  jitter, then `BackendError`;
- HTTP 429 and 503 are backpressure: `Retry-After` (seconds or an HTTP date, capped at `max_retry_after_s`) is honoured
  up to `backpressure_waits` times, then `BackendSaturated(retry_after_s)` is raised so the pool pauses consumption
  instead of hammering an overloaded server;
- any other HTTP error: `BackendError` at once (a wrong model name or URL does not heal by retrying).
The API key comes from `LLMCF_OPENAI_API_KEY` or `OPENAI_API_KEY`; it is sent as a bearer token and never logged or shown.

Lifecycle: construct (opens a connection pool, sends nothing), `generate` from one thread, `close()`.
"""

from __future__ import annotations

import email.utils
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, Literal

import httpx

from generators.backends.base import BackendError, BackendSaturated, CotBackend, Generation, GenerationOptions
from generators.backends.best_of_n import pick_best_candidate
from generators.prompt import Prompt
from llmcf.errors import UserFacingError
from llmcf.retries import backoff_s, jittered_backoff_s
from llmcf.settings import without_credentials

log = logging.getLogger(__name__)

API_KEY_ENV_VARS = ("LLMCF_OPENAI_API_KEY", "OPENAI_API_KEY")
DEFAULT_MAX_NEW_TOKENS = 256
_BACKPRESSURE_STATUSES = {429, 503}


class OpenAIBackend(CotBackend):
    """`base_url` is the server root (e.g. http://vllm:8000; a trailing /v1 is accepted); `model` the served model name."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api: Literal["chat", "completions"] = "chat",
        options: GenerationOptions | None = None,
        concurrency: int = 16,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 120.0,
        max_retries: int = 3,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 10.0,
        backpressure_waits: int = 2,
        max_retry_after_s: float = 30.0,
    ):
        if api not in ("chat", "completions"):
            raise UserFacingError(f"OpenAI api {api!r} is not 'chat' or 'completions'")
        if not base_url.startswith(("http://", "https://")):
            raise UserFacingError(f"OpenAI base URL {without_credentials(base_url)!r} must start with http:// or https://")
        if concurrency < 1:
            raise UserFacingError("OpenAI concurrency must be at least 1")
        root = base_url.rstrip("/").removesuffix("/v1")
        self.endpoint = f"{root}/v1/chat/completions" if api == "chat" else f"{root}/v1/completions"
        self.shown_endpoint = without_credentials(self.endpoint)  # what logs say: never credentials in a URL
        self.model = model
        self.api = api
        self.options = (options or GenerationOptions()).with_max_new_tokens_default(DEFAULT_MAX_NEW_TOKENS)
        self.max_batch = concurrency
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.backpressure_waits = backpressure_waits
        self.max_retry_after_s = max_retry_after_s
        headers = {"Content-Type": "application/json"}
        api_key = next((os.environ[v] for v in API_KEY_ENV_VARS if os.environ.get(v)), None)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="openai-backend")

    def __repr__(self) -> str:
        return f"OpenAIBackend(endpoint={self.shown_endpoint!r}, model={self.model!r})"

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]:
        if not prompts:
            return []
        futures = [self._pool.submit(self._generate_one, prompt) for prompt in prompts]
        done, not_done = wait(futures, return_when=FIRST_EXCEPTION)
        error = next((e for e in (f.exception() for f in futures if f in done) if e is not None), None)
        if error is not None:
            for future in not_done:
                future.cancel()
            wait(not_done)
            raise error
        return [f.result() for f in futures]

    def _generate_one(self, prompt: Prompt) -> Generation:
        body = self._request_body(prompt)
        response = self._post_with_retries(body)
        try:
            choices = response["choices"]
            texts = [(c["message"]["content"] if self.api == "chat" else c["text"]) or "" for c in choices]
            usage = response.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens", 0))
            completion_tokens = int(usage.get("completion_tokens", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"unexpected response from {self.shown_endpoint}: missing {exc}") from None
        texts = [t.strip() for t in texts]
        if not texts:
            raise BackendError(f"{self.shown_endpoint} returned no choices")
        text = texts[0] if len(texts) == 1 else pick_best_candidate(prompt, texts)
        return Generation(text=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    def _request_body(self, prompt: Prompt) -> dict[str, Any]:
        options = self.options
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": options.max_new_tokens,
            "temperature": options.temperature,
            "top_p": options.top_p,
            "n": 1 if options.greedy else options.candidates,
        }
        if options.seed is not None:
            body["seed"] = options.seed
        if self.api == "chat":
            body["messages"] = list(prompt.messages)
        else:
            body["prompt"] = prompt.as_text()
        return body

    def _post_with_retries(self, body: dict[str, Any]) -> dict[str, Any]:
        failures = 0
        busy_answers = 0
        while True:
            try:
                response = self._client.post(self.endpoint, json=body)
            except httpx.TransportError as exc:
                failures += 1
                if failures > self.max_retries:
                    raise BackendError(
                        f"{self.shown_endpoint} unreachable after {failures} attempts: {type(exc).__name__}: {exc}"
                    ) from None
                self._sleep_backoff(failures, f"{type(exc).__name__}")
                continue
            status = response.status_code
            if status == 200:
                try:
                    return response.json()
                except ValueError:
                    raise BackendError(f"{self.shown_endpoint} answered 200 with a body that is not JSON") from None
            if status in _BACKPRESSURE_STATUSES:
                busy_answers += 1
                wait_s = self._retry_after(response, busy_answers)
                if busy_answers > self.backpressure_waits:
                    raise BackendSaturated(
                        wait_s,
                        f"{self.shown_endpoint} answered {status} {busy_answers} times in a row; retry after {wait_s:.1f} s",
                    )
                log.info("%s answered %s; waiting %.1f s", self.shown_endpoint, status, wait_s)
                time.sleep(wait_s)
                continue
            if status >= 500:
                failures += 1
                if failures > self.max_retries:
                    raise BackendError(
                        f"{self.shown_endpoint} answered {status} after {failures} attempts: {_snippet(response)}"
                    )
                self._sleep_backoff(failures, f"HTTP {status}")
                continue
            raise BackendError(f"{self.shown_endpoint} rejected the request with {status}: {_snippet(response)}")

    def _sleep_backoff(self, attempt: int, why: str) -> None:
        """Exponential backoff with full jitter (`llmcf.retries`)."""
        delay = jittered_backoff_s(attempt, self.backoff_base_s, self.backoff_max_s)
        log.warning("%s failed (%s), retry %d/%d in %.2f s", self.shown_endpoint, why, attempt, self.max_retries, delay)
        time.sleep(delay)

    def _retry_after(self, response: httpx.Response, attempt: int) -> float:
        """The server's Retry-After (delta seconds or HTTP date), else the backoff schedule; capped either way."""
        header = response.headers.get("Retry-After")
        seconds: float | None = None
        if header:
            try:
                seconds = float(header)
            except ValueError:
                try:
                    seconds = email.utils.parsedate_to_datetime(header).timestamp() - time.time()
                except (TypeError, ValueError):
                    seconds = None
        if seconds is None:
            seconds = backoff_s(attempt, self.backoff_base_s, self.max_retry_after_s)
        return max(0.0, min(seconds, self.max_retry_after_s))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()


def _snippet(response: httpx.Response, limit: int = 200) -> str:
    text = response.text.strip().replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
