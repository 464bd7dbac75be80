"""`/v1/rank` over real HTTP (uvicorn in a thread) with real trained models, the session's stored pipeline data and the
server's in-memory example pool synced from it: answers, cold starts, the error contract, the bearer token, readiness,
load shedding."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest

import migrations
from ranker.registry import TrainResult
from ranker.serving.app import RankerService
from storage.repository import Repository
from tests.ranker.serving.support import Populated, running_server

pytestmark = pytest.mark.slow


@pytest.fixture
def ict_url(make_service: Callable[..., RankerService], versions: dict[str, TrainResult], populated: Populated
            ) -> Iterator[tuple[str, RankerService]]:
    service = make_service("deepfm+ict")
    service.holder.load(versions["ict_a"].version_id)
    with running_server(service) as url:
        wait_ready(url)
        yield url, service


def wait_ready(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        answer = httpx.get(f"{url}/readyz")
        if answer.status_code == 200:
            return
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.1)


def rank(url: str, body: object, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/rank", json=body, timeout=30, **kwargs)  # type: ignore[arg-type]


def test_a_good_request_gets_scores_in_request_order_from_the_served_version(
        ict_url: tuple[str, RankerService], populated: Populated, versions: dict[str, TrainResult]) -> None:
    url, service = ict_url
    space = service.holder.current.space
    candidates = [i for i in populated.known_items if space.item_index([i])[0] != 0][:100][::-1]
    served_before = {cot: examples_served(cot) for cot in ("llm", "template", "pending")}
    answer = rank(url, {"user_id": populated.known_user, "candidates": candidates})

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_version"] == versions["ict_a"].version_id and body["kind"] == "deepfm+ict"
    assert [s["item_id"] for s in body["scores"]] == candidates
    scores = np.array([s["score"] for s in body["scores"]])
    assert ((scores > 0) & (scores < 1)).all() and scores.std() > 0
    assert body["cold_start"] == {"user": False, "items": []}
    newest_example_age = body["example_age_s"]  # event time: the stored MovieLens examples are from 1998
    assert newest_example_age is not None and newest_example_age >= time.time() - populated.newest_sample_ts.timestamp() - 5
    assert "retrieval;dur=" in answer.headers["server-timing"]
    # every stored CoT was written by the template backend: served examples count as template, never as an LLM's
    served = {cot: examples_served(cot) - before for cot, before in served_before.items()}
    assert served["llm"] == served["pending"] == 0 and 0 < served["template"] <= 4 * len(candidates)


def examples_served(cot: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("llmcf_ranker_examples_total", {"cot": cot}) or 0.0


def test_the_stored_history_is_used_unless_the_request_gives_one(ict_url: tuple[str, RankerService], populated: Populated
                                                                 ) -> None:
    url, service = ict_url
    stored, labels = service.scorer.history_of(populated.known_user)
    assert len(stored) == len(labels) == 20 and set(labels) <= {0, 1}
    candidates = populated.known_items[:30]

    def scores(**extra: object) -> list[float]:
        answer = rank(url, {"user_id": populated.known_user, "candidates": candidates, **extra})
        assert answer.status_code == 200, answer.text
        return [s["score"] for s in answer.json()["scores"]]

    from_storage = scores()
    labelled = [{"item_id": item, "label": label} for item, label in zip(stored, labels, strict=True)]
    assert scores(history=labelled) == pytest.approx(from_storage, abs=1e-6)
    flipped = [dict(entry, label=1 - entry["label"]) for entry in labelled]  # labels reach the model: other scores
    assert scores(history=flipped) != pytest.approx(from_storage, abs=1e-4)
    assert scores(history=[*stored[:10], *flipped[10:]]) != pytest.approx(scores(history=flipped), abs=1e-4)
    assert scores(history=stored[:3]) != pytest.approx(from_storage, abs=1e-4)
    assert scores(history=[]) != pytest.approx(from_storage, abs=1e-4)


def test_unknown_users_and_items_are_scored_as_cold_starts(ict_url: tuple[str, RankerService], populated: Populated
                                                          ) -> None:
    url, service = ict_url
    space = service.holder.current.space
    with Repository.from_url(service.scorer.repository.engine.url) as repository:
        embedded = repository.get_item_embeddings(populated.known_items)
    new_with_text = [i for i in populated.known_items if space.item_index([i])[0] == 0 and i in embedded][:2]
    assert len(new_with_text) == 2, "the stored catalogue should hold items the small model never saw"
    candidates = [*new_with_text, "never-stored-1", "never-stored-2", populated.known_items[0]]

    answer = rank(url, {"user_id": "a-brand-new-user", "candidates": candidates})

    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected_cold = [c for c in candidates if space.item_index([c])[0] == 0]
    assert body["cold_start"] == {"user": True, "items": expected_cold}
    scores = {s["item_id"]: s["score"] for s in body["scores"]}
    assert all(0 < v < 1 for v in scores.values())
    # No stored text: both are the unknown item, so they score alike; stored texts make the two new items differ.
    assert scores["never-stored-1"] == pytest.approx(scores["never-stored-2"], abs=1e-7)
    assert scores[new_with_text[0]] != pytest.approx(scores[new_with_text[1]], abs=1e-6)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"user_id": "u", "candidates": []}, 422, "candidates: at least one candidate"),
        ({"user_id": "u", "candidates": [f"i{n}" for n in range(1001)]}, 422, "at most 1000 candidates per request, got 1001"),
        ({"user_id": 42, "candidates": ["1"]}, 422, "user_id: Input should be a valid string"),
        ({"user_id": "u", "candidates": ["1", 2]}, 422, "candidates.1: Input should be a valid string"),
        ({"user_id": "u", "candidates": "1"}, 422, "candidates: Input should be a valid array"),
        ({"user_id": "u", "candidates": ["1"], "history": [3]}, 422, "history.0"),
        ({"candidates": ["1"]}, 422, "user_id: Field required"),
        ({"user_id": "u", "candidates": ["1"], "history": [{"item_id": "3", "label": 2}]}, 422, "history.0"),
        ({"user_id": "u", "candidates": ["1"], "history": [{"item_id": "3"}]}, 422, "history.0"),
        (["not", "an", "object"], 422, "Input should be an object"),
    ],
)
def test_bad_requests_get_4xx_naming_the_field(ict_url: tuple[str, RankerService], body: object, status: int, words: str) -> None:
    answer = rank(ict_url[0], body)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["detail"]


def test_non_json_and_oversize_bodies_are_refused(ict_url: tuple[str, RankerService]) -> None:
    url = ict_url[0]
    not_json = httpx.post(f"{url}/v1/rank", content=b"user_id=u&candidates=1", timeout=30)
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["detail"]

    huge = json.dumps({"user_id": "u", "candidates": ["1"], "padding": "x" * 300_000}).encode()
    declared = httpx.post(f"{url}/v1/rank", content=huge, headers={"content-type": "application/json"}, timeout=30)
    assert declared.status_code == 413 and "262144 bytes" in declared.json()["detail"]

    chunked = httpx.post(f"{url}/v1/rank", content=iter([huge[i : i + 65536] for i in range(0, len(huge), 65536)]), timeout=30)
    assert chunked.status_code == 413

    fits = json.dumps({"user_id": "u", "candidates": ["1"], "padding": "x" * 200_000}).encode()
    assert httpx.post(f"{url}/v1/rank", content=fits, timeout=30).status_code == 200


def test_the_bearer_token_guards_rank_only(make_service: Callable[..., RankerService], versions: dict[str, TrainResult],
                                           populated: Populated) -> None:
    service = make_service("deepfm", api_token="s3cret-token")
    service.holder.load(versions["backbone"].version_id)
    body = {"user_id": populated.known_user, "candidates": populated.known_items[:5]}
    with running_server(service) as url:
        missing = rank(url, body)
        wrong = rank(url, body, headers={"Authorization": "Bearer s3cret-tokeN"})
        wrong_scheme = rank(url, body, headers={"Authorization": "Basic s3cret-token"})
        right = rank(url, body, headers={"Authorization": "Bearer s3cret-token"})
        open_paths = [httpx.get(f"{url}{path}").status_code for path in ("/healthz", "/readyz", "/metrics")]

    for refused in (missing, wrong, wrong_scheme):
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        assert "s3cret" not in refused.text
    assert right.status_code == 200, right.text
    assert right.json()["example_age_s"] is None and right.json()["kind"] == "deepfm"
    assert open_paths == [200, 200, 200]


def test_readiness_waits_for_a_model_and_a_first_deployment_promotes_the_newest_candidate(
        make_service: Callable[..., RankerService], versions: dict[str, TrainResult], serving_settings, database_url: str
) -> None:
    service = make_service("deepfm+ict", database_url=database_url)
    with running_server(service) as url:
        not_ready = httpx.get(f"{url}/readyz")
        no_model = rank(url, {"user_id": "u", "candidates": ["1"]})
        assert not_ready.status_code == 503 and "llmcf train" in not_ready.json()["reason"]
        assert no_model.status_code == 503 and no_model.json()["detail"] == "no model version: run `llmcf train`"

        migrations.upgrade(database_url)
        with Repository.from_settings(serving_settings) as trained_in, Repository.from_url(database_url) as target:
            for name in ("ict_b", "ict_a"):  # ict_b was trained after ict_a: it is the newest candidate
                target.record_model_version(trained_in.get_model_version(versions[name].version_id))
            assert service.holder.poll()
            wait_ready(url)
            assert target.latest_model_version("deepfm+ict", "serving").version_id == versions["ict_b"].version_id
        answer = rank(url, {"user_id": "u", "candidates": ["1", "2"]})
        assert answer.status_code == 200 and answer.json()["model_version"] == versions["ict_b"].version_id
        assert answer.json()["example_age_s"] is None  # this database holds no CoT samples yet


def test_overload_is_shed_with_503_and_retry_after(make_service: Callable[..., RankerService], versions: dict[str, TrainResult],
                                                   populated: Populated) -> None:
    service = make_service("deepfm+ict", max_inflight=1)
    service.holder.load(versions["ict_a"].version_id)
    body = {"user_id": populated.known_user, "candidates": populated.known_items[:200]}

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{url}/v1/rank", json=body) for _ in range(40)))

    with running_server(service) as url:
        wait_ready(url)
        answers = asyncio.run(burst(url))
    statuses = [a.status_code for a in answers]
    shed = [a for a in answers if a.status_code == 503]
    assert set(statuses) <= {200, 503}, statuses
    assert shed and statuses.count(200) >= 1, statuses
    assert all(a.json() == {"detail": "overloaded"} and a.headers["retry-after"] == "1" for a in shed)


def test_queueing_itself_is_shed_before_scoring(make_service: Callable[..., RankerService], versions: dict[str, TrainResult],
                                                populated: Populated) -> None:
    from prometheus_client import REGISTRY

    def shed(reason: str) -> float:
        return REGISTRY.get_sample_value("llmcf_ranker_shed_total", {"reason": reason}) or 0.0

    service = make_service("deepfm+ict", max_inflight=64, max_wait_s=1e-9)  # beside another request, any wait is too long
    service.holder.load(versions["ict_a"].version_id)
    body = {"user_id": populated.known_user, "candidates": populated.known_items[:200]}
    before = shed("loop_lag") + shed("queue_wait")

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{url}/v1/rank", json=body) for _ in range(40)))

    with running_server(service) as url:
        wait_ready(url)
        alone = rank(url, body)  # nothing else in flight: never shed for queueing
        answers = asyncio.run(burst(url))
    statuses = [a.status_code for a in answers]
    assert alone.status_code == 200
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    assert all(a.json() == {"detail": "overloaded"} and a.headers["retry-after"] == "1" for a in answers if a.status_code == 503)
    assert shed("loop_lag") + shed("queue_wait") - before == statuses.count(503)  # not one shed by the in-flight cap
