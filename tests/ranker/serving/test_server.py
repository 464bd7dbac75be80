"""`llmcf serve` as an operator runs it: a subprocess that promotes the trained candidate, answers over HTTP, serves
`/metrics` and `/docs`, and exits 0 on SIGTERM."""

from __future__ import annotations

import httpx
import pytest

from llmcf.infra import free_port
from llmcf.settings import Settings
from ranker.registry import TrainResult
from testkit.processes import ProcessStarter, wait_while_running
from tests.ranker.serving.support import Populated

pytestmark = pytest.mark.slow


def test_llmcf_serve_runs_answers_and_stops_cleanly(llmcf_processes: ProcessStarter, serving_settings: Settings,
                                                    versions: dict[str, TrainResult], populated: Populated, tmp_path) -> None:
    # The backbone kind keeps no example pool: the child only reads the session's model versions.
    port = free_port()
    process = llmcf_processes.start("serve", serving_settings, tmp_path / "serve.log", "--kind", "deepfm", "--port", str(port))
    url = f"http://127.0.0.1:{port}"  # /metrics is served on the API port

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_while_running(ready, [process], timeout_s=90, what="llmcf serve to become ready")
    answer = httpx.post(f"{url}/v1/rank", json={"user_id": populated.known_user, "candidates": populated.known_items[:10]},
                        timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == versions["backbone"].version_id
    assert 'llmcf_ranker_requests_total{status="200"} 1.0' in httpx.get(f"{url}/metrics").text
    assert "/v1/rank" in httpx.get(f"{url}/openapi.json").json()["paths"]

    assert process.stop(timeout=30) == 0, process.log_tail()
