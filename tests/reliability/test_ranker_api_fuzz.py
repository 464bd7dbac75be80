"""Property-based fuzzing of `POST /v1/rank` on a real uvicorn server with a real trained model (DeepFM backbone) and
the stored pipeline data it scores with (trained once per module by `test_ranker_faults.deployment`).

Three sources of requests, all deterministic (hypothesis derandomized, no example database) and bounded:
- schemathesis, from the app's own OpenAPI document: bodies that fit the request schema (positive) must get 200 with
  one score per candidate in request order, and a response that fits the documented response schema;
- schemathesis negative mode: bodies that break the schema must get a 4xx with a JSON `detail` message;
- raw garbage that no schema describes: non-UTF-8 and arbitrary bytes, JSON of the wrong types, huge and negative
  numbers, NaN, deep nesting, other content types.
The common property: never a 5xx (503 is allowed only as `overloaded` or "no model"; neither should happen to
sequential requests with a model loaded, so it is reported too), and every 4xx carries a non-empty `detail` string.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from ranker.serving.app import NO_MODEL, Limits, RankRequest
from ranker.serving.server import ServeOptions, build_service
from storage.repository import Repository
from tests.ranker.serving.support import running_server
from tests.reliability.test_ranker_faults import Deployment, deployment  # noqa: F401 (the trained home, a fixture)

pytestmark = pytest.mark.slow

MAX_BODY_BYTES = 65_536  # small enough that the generators reach it now and then
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=60, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


@pytest.fixture
def ranker_url(deployment: Deployment) -> Iterator[str]:  # noqa: F811
    """The DeepFM version `deployment` trained, pinned, served by uvicorn in a thread (the app `llmcf serve` runs)."""
    with Repository.from_settings(deployment.settings) as repository:
        service = build_service(deployment.settings, ServeOptions(kind="deepfm", version=deployment.version_id), repository,
                                limits=Limits(max_body_bytes=MAX_BODY_BYTES))
        with running_server(service) as url:
            assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200
            yield url


def assert_no_server_error(status: int, body: bytes) -> None:
    if status >= 500:
        detail = _json(body).get("detail") if isinstance(_json(body), dict) else None
        assert status == 503 and detail in ("overloaded", NO_MODEL), f"server error {status}: {body[:500]!r}"


def assert_client_error_explained(status: int, body: bytes) -> None:
    if 400 <= status < 500:
        answer = _json(body)
        assert isinstance(answer, dict) and isinstance(answer.get("detail"), str) and answer["detail"].strip(), \
            f"{status} without a JSON detail message: {body[:500]!r}"


def assert_scored(sent: Any, body: bytes) -> None:
    answer = _json(body)
    assert [s["item_id"] for s in answer["scores"]] == sent["candidates"], "one score per candidate, in request order"
    assert all(0.0 < s["score"] < 1.0 for s in answer["scores"]), answer["scores"][:5]


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def test_bodies_that_fit_the_openapi_schema_are_scored(ranker_url: str) -> None:
    operation = schemathesis.openapi.from_url(f"{ranker_url}/openapi.json")["/v1/rank"]["POST"]
    seen: list[int] = []

    @FUZZ
    @given(case=operation.as_strategy(GenerationMode.POSITIVE))
    def check(case: Any) -> None:
        response = case.call(base_url=ranker_url, timeout=30)
        sent_bytes = len(response.request.body or b"")
        seen.append(response.status_code)
        assert_no_server_error(response.status_code, response.content)
        if sent_bytes > MAX_BODY_BYTES:
            assert response.status_code == 413, response.text
        else:
            assert response.status_code == 200, f"{response.status_code} {response.text[:500]} for {case.body!r:.500}"
            assert_scored(case.body, response.content)
        assert_client_error_explained(response.status_code, response.content)
        case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                                 response_schema_conformance])

    check()
    assert seen.count(200) >= len(seen) // 2, f"too few valid bodies were generated: {seen}"


def test_bodies_that_break_the_openapi_schema_get_a_4xx_with_a_message(ranker_url: str) -> None:
    operation = schemathesis.openapi.from_url(f"{ranker_url}/openapi.json")["/v1/rank"]["POST"]
    seen: list[int] = []

    @FUZZ
    @given(case=operation.as_strategy(GenerationMode.NEGATIVE))
    def check(case: Any) -> None:
        response = case.call(base_url=ranker_url, timeout=30)
        sent = response.request.body or b""
        seen.append(response.status_code)
        assert_no_server_error(response.status_code, response.content)
        if _accepted_by_contract(sent):
            # schemathesis' negative mode can only break what the schema states; the server's contract may still admit it
            assert response.status_code in (200, 413), response.text[:500]
        else:
            assert response.status_code in (400, 413, 422), f"{response.status_code} {response.text[:500]} for {sent[:300]!r}"
        assert_client_error_explained(response.status_code, response.content)

    check()
    assert sum(400 <= s < 500 for s in seen) >= len(seen) // 2, f"too few invalid bodies were generated: {seen}"


def _accepted_by_contract(raw: bytes | str) -> bool:
    try:
        RankRequest.model_validate_json(raw)
    except ValueError:
        return False
    return True


_ids = st.text(min_size=1, max_size=20)
_not_a_string = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
                          st.floats(allow_nan=False, allow_infinity=False), st.lists(st.integers(), max_size=3),
                          st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
                            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
                            max_leaves=20)


@st.composite
def _garbage(draw: st.DrawFn) -> tuple[bytes, str]:
    """(body, content type): something a broken or hostile client sends."""
    content_type = draw(st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                         "application/octet-stream", "multipart/form-data; boundary=x"]))
    valid = {"user_id": draw(_ids), "candidates": draw(st.lists(_ids, min_size=1, max_size=5))}
    kind = draw(st.sampled_from(["bytes", "non_utf8", "json_value", "wrong_type", "nan", "deep", "huge_list", "valid"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200)), content_type
    if kind == "non_utf8":
        body = json.dumps(valid).encode()
        cut = draw(st.integers(0, len(body)))
        return body[:cut] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80"])) + body[cut:], content_type
    if kind == "json_value":
        return json.dumps(draw(_json_values)).encode(), content_type
    if kind == "wrong_type":
        field = draw(st.sampled_from(["user_id", "candidates", "history", "candidates[0]"]))
        value = draw(_not_a_string)
        if field == "candidates[0]":
            valid["candidates"] = [value, *valid["candidates"][1:]]
        else:
            valid[field] = value
        return json.dumps(valid).encode(), content_type
    if kind == "nan":
        valid["history"] = [draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))]
        return json.dumps(valid).encode(), content_type  # Python writes NaN / Infinity, which is not JSON
    if kind == "deep":
        depth = draw(st.integers(100, 20_000))
        return b'{"user_id": "u", "candidates": ' + b"[" * depth + b"]" * depth + b"}", content_type
    if kind == "huge_list":
        count = draw(st.sampled_from([1001, 5000]))
        return json.dumps({"user_id": "u", "candidates": [str(i) for i in range(count)]}).encode(), content_type
    return json.dumps(valid).encode(), content_type


def test_raw_garbage_never_gets_a_server_error(ranker_url: str) -> None:
    seen: dict[int, int] = {}
    with httpx.Client(base_url=ranker_url, timeout=30) as client:

        @settings(FUZZ, max_examples=200)
        @given(garbage=_garbage())
        def check(garbage: tuple[bytes, str]) -> None:
            body, content_type = garbage
            response = client.post("/v1/rank", content=body, headers={"content-type": content_type})
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert_no_server_error(response.status_code, response.content)
            assert response.status_code in (200, 400, 413, 422), f"{response.status_code} {response.text[:300]}"
            assert_client_error_explained(response.status_code, response.content)
            if response.status_code == 200:
                assert_scored(json.loads(body), response.content)
            elif len(body) <= MAX_BODY_BYTES and _accepted_by_contract(body):
                raise AssertionError(f"a body the contract admits was refused: {response.status_code} {response.text[:300]}")

        check()
    assert {200, 400, 422} <= set(seen), f"the generator missed a whole class of answers: {seen}"
