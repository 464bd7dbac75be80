"""`llmcf generate` as an operator runs it: clear errors, and kill -9 mid-stream followed by a restart loses nothing."""

from __future__ import annotations

import time

import pytest

from llmcf.cli import main
from testkit.processes import wait_while_running
from tests.generators.pool_support import publish_requests, read_results, uncommitted


@pytest.fixture
def clean_generator_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LLMCF_GENERATOR_BACKEND", "LLMCF_GENERATOR_MODEL", "LLMCF_GENERATOR_DEVICE", "LLMCF_OPENAI_BASE_URL",
                 "LLMCF_OPENAI_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_a_cuda_device_on_a_machine_without_cuda_is_a_clear_error(clean_generator_env, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["generate", "--backend", "template", "--device", "cuda:0"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


def test_the_openai_backend_without_a_server_or_model_is_a_clear_error(clean_generator_env, capsys):
    assert main(["generate", "--backend", "openai", "--device", "cpu"]) == 1
    assert "LLMCF_OPENAI_BASE_URL" in capsys.readouterr().err
    assert main(["generate", "--backend", "openai", "--device", "cpu", "--openai-base-url", "http://127.0.0.1:9"]) == 1
    assert "served model name" in capsys.readouterr().err


GENERATOR_ARGS = ("--backend", "template", "--device", "cpu", "--max-batch", "16")


def test_kill_9_mid_stream_then_restart_loses_no_request(kafka_settings, tmp_path, llmcf_processes):
    ids = publish_requests(kafka_settings, 100, prefix="k9")
    log_path = tmp_path / "generate.log"
    first = llmcf_processes.start("generate", kafka_settings, log_path, *GENERATOR_ARGS)
    wait_while_running(lambda: len(read_results(kafka_settings)) >= 16, [first], 60,
                       "the first generator to publish results", interval_s=0.2)
    first.kill()
    before_restart = {r.request_id for r in read_results(kafka_settings)}
    assert 0 < len(before_restart) < len(ids), "the kill did not land mid-stream"

    second = llmcf_processes.start("generate", kafka_settings, log_path, *GENERATOR_ARGS)
    wait_while_running(lambda: {r.request_id for r in read_results(kafka_settings)} == set(ids), [second], 90,
                       "a result for every request after the restart", interval_s=1.0)
    time.sleep(1.5)  # one more metrics report after the last commit
    metrics = second.metrics()
    assert second.stop(30) == 0, second.log_tail()

    assert {r.request_id for r in read_results(kafka_settings)} == set(ids)
    assert uncommitted(kafka_settings) == {}
    log = log_path.read_text()
    assert "backend=template (a deterministic rationale built from the request's data, NOT a language model)" in log
    assert "generator pool stopped" in log  # the SIGTERM stop was the graceful one
    assert 'llmcf_generator_cots_total{backend="template",outcome="ok"}' in metrics
    assert 'llmcf_freshness_seconds_count{stage="cot_generated"}' in metrics
    assert "llmcf_consumer_lag_records{" in metrics and "llmcf_generator_queue_depth" in metrics
