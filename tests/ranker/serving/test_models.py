"""Hot swap of model versions while real requests are being served, and what a version that cannot be loaded does."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from prometheus_client import REGISTRY

from ranker.registry import TrainResult
from ranker.serving.app import RankerService
from ranker.serving.models import ModelLoadError
from storage.repository import Repository
from tests.ranker.serving.support import Populated, running_server
from tests.ranker.serving.test_app import rank, wait_ready

pytestmark = pytest.mark.slow


def swaps(outcome: str) -> float:
    return REGISTRY.get_sample_value("llmcf_ranker_model_swaps_total", {"outcome": outcome}) or 0.0


def test_hot_swaps_under_concurrent_requests_never_mix_versions(
        make_service: Callable[..., RankerService], versions: dict[str, TrainResult], populated: Populated) -> None:
    service = make_service("deepfm+ict")
    a, b = versions["ict_a"].version_id, versions["ict_b"].version_id
    body = {"user_id": populated.known_user, "candidates": populated.known_items[:100]}
    with running_server(service) as url:
        expected = {}
        for version in (b, a):  # the scores each version alone gives this request
            service.holder.load(version)
            wait_ready(url)
            expected[version] = np.array([s["score"] for s in rank(url, body).json()["scores"]])
        assert np.abs(expected[a] - expected[b]).max() > 1e-3, "the two versions must be told apart by their scores"

        answers: list[httpx.Response] = []
        failures: list[BaseException] = []
        stop = threading.Event()

        def hammer() -> None:
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    try:
                        answers.append(client.post(f"{url}/v1/rank", json=body))
                    except BaseException as exc:  # any transport error is a failure of the swap
                        failures.append(exc)

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for thread in threads:
            thread.start()
        swapped_ok = swaps("ok")
        for version in (b, a, b, a, b):
            service.holder.load(version)
            time.sleep(0.5)  # let requests land on each version
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    assert not failures, failures[:3]
    assert swaps("ok") - swapped_ok == 5
    # A busy machine may shed some of the four hammers' requests (503 + Retry-After is the server's answer to overload);
    # every answer that scored must come from one whole version.
    assert all(answer.status_code in (200, 503) for answer in answers), {a.status_code for a in answers}
    scored = [answer for answer in answers if answer.status_code == 200]
    assert len(scored) > 20
    seen = {answer.json()["model_version"] for answer in scored}
    assert seen == {a, b}, seen
    for answer in scored:
        body_out = answer.json()
        scores = np.array([s["score"] for s in body_out["scores"]])
        np.testing.assert_allclose(scores, expected[body_out["model_version"]], atol=1e-6)


def test_a_version_that_fails_its_checks_is_not_swapped_in(
        make_service: Callable[..., RankerService], versions: dict[str, TrainResult], populated: Populated) -> None:
    service = make_service("deepfm+ict")
    service.holder.load(versions["ict_a"].version_id)
    repository: Repository = service.scorer.repository
    good = repository.get_model_version(versions["ict_b"].version_id)
    tampered = dataclasses.replace(good, version_id=good.version_id + "-tampered", checksum="0" * 64, status="candidate")
    repository.record_model_version(tampered)
    failed_before = swaps("failed")

    repository.set_model_status(tampered.version_id, "serving")
    try:
        assert not service.holder.poll()  # the poller meets the broken version: logged, counted, not swapped in
        assert not service.holder.poll()  # and does not retry it at every poll
    finally:
        repository.set_model_status(tampered.version_id, "rejected")
    with pytest.raises(ModelLoadError, match="sha256"):
        service.holder.load(tampered.version_id)

    assert service.holder.current.version_id == versions["ict_a"].version_id
    assert swaps("failed") - failed_before == 2
    assert "sha256" in (service.holder.last_error or "")


def test_a_version_exported_above_the_parity_tolerance_is_refused(
        make_service: Callable[..., RankerService], versions: dict[str, TrainResult]) -> None:
    service = make_service("deepfm+ict")
    repository: Repository = service.scorer.repository
    good = repository.get_model_version(versions["ict_b"].version_id)
    drifted = dataclasses.replace(good, version_id=good.version_id + "-drifted", status="rejected",
                                  metrics={**good.metrics, "onnx_parity_max_abs_diff": 3.06e-05})
    repository.record_model_version(drifted)
    with pytest.raises(ModelLoadError, match="not servable: its ONNX scores differed from torch's by 3.06e-05"):
        service.holder.load(drifted.version_id)


def test_a_hot_swap_encodes_the_pool_for_the_new_version_before_serving_it(
        make_service: Callable[..., RankerService], versions: dict[str, TrainResult], populated: Populated) -> None:
    service = make_service("deepfm+ict")
    a, b = versions["ict_a"].version_id, versions["ict_b"].version_id
    service.source.sync()
    pool_size = len(service.source.pool)
    assert pool_size > 0
    service.holder.load(a)
    seen: list[tuple[str, str | None, int]] = []
    prepare = service.holder.prepare

    def watching(bundle) -> None:  # type: ignore[no-untyped-def]
        prepare(bundle)
        encoded = service.scorer.examples_of(bundle)
        seen.append((bundle.version_id, service.holder.current.version_id, encoded.n))

    service.holder.prepare = watching
    service.holder.load(b)

    assert seen == [(b, a, pool_size)]  # encoded in full while the old version still served
    assert service.holder.current.version_id == b and service.holder.current.split
