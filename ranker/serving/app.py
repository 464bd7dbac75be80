"""The ranker's HTTP API (FastAPI): `POST /v1/rank`, `/healthz`, `/readyz`, `/metrics`, OpenAPI docs at `/docs`.

`/v1/rank`, in order: bearer token (when `LLMCF_API_TOKEN` is set; 401), a model loaded (503), body size
(`LLMCF_RANKER_MAX_BODY_BYTES`; 413, checked on Content-Length and again while reading), JSON (400) and the request
contract (422 naming the field; strict types, 1..1000 candidates), load shedding (503 `overloaded` with
`Retry-After: 1` at once when `LLMCF_RANKER_MAX_INFLIGHT` requests are scoring already, or when queueing itself shows
while other requests are in flight: the event loop runs more than `LLMCF_RANKER_MAX_WAIT_MS` late, or a request waited
longer than that for a scoring thread; a count of requests in flight alone does not see a saturated CPU or GIL,
where requests wait seconds in the event loop), then scoring on a thread pool of `LLMCF_RANKER_MAX_INFLIGHT` threads
(the event loop never blocks). The bundle is taken once per request, so a hot swap never mixes two versions in one
answer. An unexpected exception is logged with its traceback
and answered 500 without internals. Every answer of `/v1/rank` is counted by status and timed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from llmcf.metrics import FRESHNESS
from ranker.serving.metrics import CANDIDATES, EXAMPLE_AGE, EXAMPLES, INFLIGHT, LOOP_LAG, REQUEST_SECONDS, REQUESTS, SHED
from ranker.serving.models import ModelHolder
from ranker.serving.pool import PoolSync
from ranker.serving.scoring import RankResult, Scorer

log = logging.getLogger(__name__)

MAX_CANDIDATES = 1000
MAX_HISTORY = 1000
NO_MODEL = "no model version: run `llmcf train`"

Id = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class HistoryEntry(BaseModel):
    """A history item with the user's label on it (1 = liked, 0 = not)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    item_id: Id
    label: Literal[0, 1] = Field(description="1: the user liked the item, 0: did not")


class RankRequest(BaseModel):
    """Score `candidates` for `user_id`; `history` (oldest first) replaces the stored history when given: item ids, or
    `{"item_id", "label"}` objects where the user's label is known (a plain id's label counts as unknown)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    user_id: Id
    candidates: Annotated[list[Id], Field(min_length=1, max_length=MAX_CANDIDATES)]
    history: Annotated[list[Id | HistoryEntry], Field(max_length=MAX_HISTORY)] | None = None

    def history_items(self) -> tuple[list[str] | None, list[int | None] | None]:
        """The history's item ids and labels (None where unknown); (None, None) when the request gives no history."""
        if self.history is None:
            return None, None
        return ([e if isinstance(e, str) else e.item_id for e in self.history],
                [None if isinstance(e, str) else e.label for e in self.history])


class ItemScore(BaseModel):
    item_id: str
    score: float = Field(description="click probability in (0, 1)")


class ColdStart(BaseModel):
    user: bool = Field(description="the user is unknown to the model (scored with the unknown-user row)")
    items: list[str] = Field(description="candidates unknown to the model, scored from their stored text embedding if any")


class RankResponse(BaseModel):
    model_version: str
    kind: str
    scores: list[ItemScore] = Field(description="one per candidate, in request order")
    example_age_s: float | None = Field(description="event-time age of the freshest in-context example used; null when "
                                        "none was used (no example found, or a backbone-only model)")
    cold_start: ColdStart


@dataclass(frozen=True)
class Limits:
    max_inflight: int = 8
    max_body_bytes: int = 262_144
    api_token: str | None = None
    max_wait_s: float = 0.1


LAG_PROBE_S = 0.02


class Overloaded(Exception):
    """Shed without scoring: the request waited too long for a scoring thread."""


class RankerService:
    """The server's state: model holder, example pool sync (None for backbone-only kinds), scorer, scoring threads."""

    def __init__(self, holder: ModelHolder, scorer: Scorer, source: PoolSync | None, limits: Limits) -> None:
        self.holder = holder
        self.scorer = scorer
        self.source = source
        self.limits = limits
        self.executor = ThreadPoolExecutor(max_workers=limits.max_inflight, thread_name_prefix="ranker-score")
        self.inflight = 0  # changed on the event loop only
        self.loop_lag_s = 0.0  # how late the event loop ran its last probe (`watch_loop`)

    async def watch_loop(self) -> None:
        """Measure how late the event loop wakes up, every `LAG_PROBE_S` (until cancelled)."""
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + LAG_PROBE_S
            await asyncio.sleep(LAG_PROBE_S)
            self.loop_lag_s = max(0.0, loop.time() - expected)
            LOOP_LAG.set(self.loop_lag_s)

    def score(self, submitted: float, queued: bool, *args: Any) -> RankResult:
        """Scoring on a scoring thread, unless the request, `queued` behind others, already waited too long for one."""
        if queued and time.perf_counter() - submitted > self.limits.max_wait_s:
            raise Overloaded
        return self.scorer.score(*args)

    def start(self) -> None:
        """Load the model to serve (if any) and start polling; start the example source. Blocking."""
        if self.source is not None:
            self.source.start()
        self.holder.start()

    def close(self) -> None:
        self.holder.stop()
        self.executor.shutdown(wait=True)
        if self.source is not None:
            self.source.close()

    def readiness(self) -> tuple[bool, str]:
        bundle = self.holder.current
        if bundle is None:
            return False, self.holder.last_error or NO_MODEL
        if bundle.ict:
            if self.source is None:
                return False, f"model {bundle.version_id} needs in-context examples but no example pool is configured"
            return self.source.reachable()
        return True, ""


def create_app(service: RankerService) -> FastAPI:
    """The FastAPI application over `service`; its lifespan starts and closes the service."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(service.start)
        watcher = asyncio.create_task(service.watch_loop())
        try:
            yield
        finally:
            watcher.cancel()
            await asyncio.to_thread(service.close)

    app = FastAPI(title="llmcf ranker", version="1", lifespan=lifespan,
                  description="LLM-CF ranking: DeepFM/DIN with in-context CoT examples, served with onnxruntime.")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _describe(exc.errors()), errors=_fields(exc.errors()))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal error (logged by the server)")

    @app.get("/healthz", summary="the process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="200 when a model is loaded and warmed and the example pool is reachable")
    async def readyz() -> JSONResponse:
        ready, reason = await asyncio.to_thread(service.readiness)
        bundle = service.holder.current
        body: dict[str, Any] = {"status": "ready" if ready else "not ready", "model_version": bundle.version_id if bundle else None}
        if not ready:
            body["reason"] = reason
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/rank",
        summary="score candidate items for a user",
        response_model=RankResponse,
        responses={
            400: {"description": "the body is not JSON"}, 401: {"description": "missing or wrong bearer token"},
            413: {"description": "body too large"}, 422: {"description": "the body breaks the contract (field named)"},
            503: {"description": "no model loaded, or overloaded (Retry-After: 1)"},
        },
        openapi_extra={"requestBody": {"required": True,
                                       "content": {"application/json": {"schema": _inline_schema(RankRequest)}}}},
    )
    async def rank(request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await _rank(service, request)
        except Exception:
            log.exception("unexpected error while ranking")
            response = _error(500, "internal error (logged by the server)")
        REQUESTS.labels(status=str(response.status_code)).inc()
        REQUEST_SECONDS.observe(time.perf_counter() - started)
        return response

    return app


async def _rank(service: RankerService, request: Request) -> Response:
    limits = service.limits
    if limits.api_token is not None and not _authorised(request.headers.get("authorization"), limits.api_token):
        return _error(401, "missing or wrong bearer token (Authorization: Bearer <LLMCF_API_TOKEN>)",
                      headers={"WWW-Authenticate": 'Bearer realm="llmcf"'})
    bundle = service.holder.current
    if bundle is None:
        return _error(503, NO_MODEL)
    body = await _read_body(request, limits.max_body_bytes)
    if body is None:
        return _error(413, f"request body over {limits.max_body_bytes} bytes (LLMCF_RANKER_MAX_BODY_BYTES)")
    try:
        query = RankRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            return _error(400, f"request body is not valid JSON: {errors[0]['msg']}")
        return _error(422, _describe(errors), errors=_fields(errors))
    if service.inflight >= limits.max_inflight:
        return _shed("inflight")
    # Queueing sheds only beside other requests in flight: a lone request's wait is the loop's own work, and answering
    # it is how the server makes progress (a burst on a busy machine must not be shed whole).
    queued = service.inflight > 0
    if queued and service.loop_lag_s > limits.max_wait_s:
        return _shed("loop_lag")
    service.inflight += 1
    INFLIGHT.inc()
    try:
        result = await asyncio.get_running_loop().run_in_executor(
            service.executor, service.score, time.perf_counter(), queued, bundle, query.user_id, query.candidates,
            *query.history_items())
    except Overloaded:
        return _shed("queue_wait")
    finally:
        service.inflight -= 1
        INFLIGHT.dec()
    CANDIDATES.observe(len(query.candidates))
    if result.example_age_s is not None:
        EXAMPLE_AGE.observe(result.example_age_s)
        FRESHNESS.labels(stage="served").observe(result.example_age_s)
    for cot, count in result.examples.items():
        EXAMPLES.labels(cot=cot).inc(count)
    return JSONResponse(_answer(query, result), headers={
        "Server-Timing": f"retrieval;dur={result.retrieval_s * 1000:.2f}, model;dur={result.model_s * 1000:.2f}"})


def _shed(reason: str) -> JSONResponse:
    SHED.labels(reason=reason).inc()
    return _error(503, "overloaded", headers={"Retry-After": "1"})


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON Schema with its `$defs` written in place: the OpenAPI document has no `$defs` for a `$ref`
    to point into (the request body is declared by hand, as the handler reads it itself)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        return [resolve(value) for value in node] if isinstance(node, list) else node

    return resolve(schema)


def _answer(query: RankRequest, result: RankResult) -> dict[str, Any]:
    return {
        "model_version": result.version_id,
        "kind": result.kind,
        "scores": [{"item_id": item, "score": score} for item, score in zip(query.candidates, result.scores.tolist(), strict=True)],
        "example_age_s": result.example_age_s,
        "cold_start": {"user": result.cold_user, "items": result.cold_items},
    }


def _authorised(header: str | None, token: str) -> bool:
    scheme, _, given = (header or "").partition(" ")
    # compare_digest on both branches' bytes: the time taken does not tell how much of the token was right
    return hmac.compare_digest(given.strip().encode(), token.encode()) and scheme.lower() == "bearer"


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is over `limit` bytes (declared or actual); stops reading at the limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _fields(errors: Sequence[Any]) -> list[dict[str, str]]:
    return [{"field": _location(e["loc"]), "message": _message(e)} for e in errors]


def _describe(errors: Sequence[Any]) -> str:
    return "; ".join(f"{item['field']}: {item['message']}" for item in _fields(errors))


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _message(error: dict[str, Any]) -> str:
    if error["loc"][-1:] == ("candidates",) and error["type"] == "too_long":
        return f"at most {MAX_CANDIDATES} candidates per request, got {error.get('ctx', {}).get('actual_length')}"
    if error["loc"][-1:] == ("candidates",) and error["type"] == "too_short":
        return "at least one candidate is required"
    return str(error["msg"])


def _error(status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)
