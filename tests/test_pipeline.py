"""The whole CoT pipeline end to end, as deployed: `llmcf worker` and `llmcf generate` as subprocesses on the real broker,
PostgreSQL and the embedded Qdrant engine, fed a replayed MovieLens-100k window (issue 3's acceptance).

Every expected request id (computed with the worker's own decision function) must end up exactly once in PostgreSQL's
`cot_samples` and once in the vector index, generated, with the generator's text and embedding; malformed records on the
topics the pipeline consumes are dead-lettered with their reasons while the rest flows through. The kill -9 fault tests
live with each stage (tests/streams/test_worker_process.py, tests/generators/test_generate_cli.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from generators.backends.model_loading import resolve_model_dir
from generators.backends.template_backend import TEMPLATE_MARKER
from llmcf.embeddings import EMBEDDING_DIMENSION
from llmcf.events import CotResult, decode
from llmcf.kafka import producer_config, read_to_end
from llmcf.replay import ReplayOptions, replay
from llmcf.samples import SAMPLE_DIMENSION
from llmcf.settings import Settings
from llmcf.topics import Topics
from storage.models import CotSample, Interaction
from storage.repository import Repository
from storage.rows import StoredCotSample
from storage.vectors import Filter, Match
from storage.vectors.edge import EdgeIndex
from testkit.processes import LlmcfProcess, ProcessStarter, wait_while_running
from testkit.windows import Expected, expected_window
from tests.generators.pool_support import read_dead_letters

COMPLETED_TIMEOUT_S = 150.0
TEMPLATE_WINDOW = 3000  # interactions: 849 items; 309 CoT requests under the policy below
# No cold start: under the default 1-day window every first rating of the window's 849 new items gets a CoT (1,825
# requests), and the generator embeds only ~15 CoTs/s on 2 cores beside the worker: minutes, not the test's point.
TEMPLATE_POLICY = {"cold_start_window_s": 0.0}
SMOLLM2_WINDOW = 200  # interactions: with the policy below, 5 CoT requests
SMOLLM2_POLICY = {"cot_sample_rate": 0.02, "cold_start_window_s": 0.0}  # no cold start: only the 2% sample

MALFORMED_KEY = b"malformed"
# (topic attribute, record value) -> the dead-letter reason the worker must give it.
MALFORMED = {
    ("items", b"\xff\xfe not json"): "undecodable",
    ("items", b'{"item_id": "m-bad", "created_at": "1997-09-20T03:05:10Z"}'): "invalid",  # no title
    ("cot_results", b'{"request_id": "r-bad", "cot_text": 42}'): "invalid",
}


def publish_malformed(settings: Settings) -> None:
    topics = Topics.from_settings(settings)
    producer = Producer(producer_config(settings, settings.kafka_bootstrap_servers or ""))
    for topic, value in MALFORMED:
        producer.produce(getattr(topics, topic), key=MALFORMED_KEY, value=value)
    assert producer.flush(30) == 0


def generated_count(repository: Repository) -> int:
    table = CotSample.__table__
    with repository.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(table.c.status == "generated")).scalar_one()


def freshness_count(metrics: str, stage: str) -> float:
    """How many samples the process observed reaching `stage` (the freshness histogram's count)."""
    for family in text_string_to_metric_families(metrics):
        if family.name == "llmcf_freshness_seconds":
            for sample in family.samples:
                if sample.name.endswith("_count") and sample.labels.get("stage") == stage:
                    return sample.value
    return 0.0


@dataclasses.dataclass(frozen=True)
class PipelineRun:
    expected: Expected
    samples: dict[str, StoredCotSample]
    worker_metrics: str
    generator_metrics: str


def run_pipeline(
    settings: Settings, database_url: str, log_dir: Path, processes: ProcessStarter, limit: int, *generate_args: str
) -> PipelineRun:
    """Start worker and generator, replay the window, wait until every expected sample is generated, scrape both
    `/metrics`, stop both (cleanly), assert the interactions and samples in PostgreSQL and return the samples."""
    expected = expected_window(settings, limit)
    worker = processes.start("worker", settings, log_dir / "worker.log", database_url=database_url)
    generator = processes.start("generate", settings, log_dir / "generate.log", "--device", "cpu", *generate_args)
    replay(settings, ReplayOptions(limit=limit, progress=False))
    with Repository.from_url(database_url) as repository:
        wait_while_running(
            lambda: repository.counts()["interactions"] == len(expected.interaction_ids)
            and generated_count(repository) == len(expected.request_ids),
            [worker, generator], COMPLETED_TIMEOUT_S, f"{len(expected.request_ids):,} generated CoT samples",
        )
        # PostgreSQL is written before the index and the freshness observation: let the last batch finish both.
        wait_while_running(
            lambda: freshness_count(worker.metrics(), "cot_retrievable") >= len(expected.request_ids)
            and freshness_count(generator.metrics(), "cot_generated") >= len(expected.request_ids),
            [worker, generator], 30, "every CoT to be observed generated and retrievable",
        )
        worker_metrics, generator_metrics = worker.metrics(), generator.metrics()
        stop_cleanly(generator, worker)

        with repository.engine.connect() as conn:
            interaction_ids = conn.execute(select(Interaction.__table__.c.interaction_id)).scalars().all()
            sample_ids = conn.execute(select(CotSample.__table__.c.sample_id)).scalars().all()
        assert len(interaction_ids) == len(expected.interaction_ids)
        assert set(interaction_ids) == expected.interaction_ids
        assert len(sample_ids) == len(expected.request_ids) and set(sample_ids) == expected.request_ids
        samples = repository.get_cot_samples(sample_ids)
    return PipelineRun(expected, samples, worker_metrics, generator_metrics)


def stop_cleanly(*processes: LlmcfProcess) -> None:
    for process in processes:
        assert process.stop() == 0, process.log_tail()


def assert_generated_everywhere(settings: Settings, run: PipelineRun, backend: str) -> None:
    """Every sample is generated by `backend` in PostgreSQL, and once in the vector index with the same CoT embedding
    in its payload. The shard is opened here, after the worker (its only writer) has stopped."""
    for sample in run.samples.values():
        assert (sample.status, sample.backend) == ("generated", backend)
        assert sample.reason in ("sampled", "cold_start"), "the worker's request row is missing"
        assert sample.cot_text and sample.cot_text.strip()
        assert sample.generated_at is not None and sample.cot_stored_at is not None
        vector = sample.cot_vector()
        assert vector is not None and vector.shape == (EMBEDDING_DIMENSION,)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)

    with EdgeIndex(settings.home / "qdrant" / settings.qdrant_collection, SAMPLE_DIMENSION) as index:
        assert index.count() == len(run.expected.request_ids)
        assert index.count(Filter(must=[Match("status", "generated")])) == len(run.expected.request_ids)
        payloads = index.get_payloads(sorted(run.expected.request_ids), ["status", "cot_embedding"])
    assert set(payloads) == run.expected.request_ids
    for request_id, payload in payloads.items():
        np.testing.assert_allclose(payload["cot_embedding"], run.samples[request_id].cot_vector(), atol=1e-6)

    # Both moments of a sample's life are measured (cot_generated, cot_retrievable: waited for in run_pipeline), the
    # first one, retrievable while pending, too.
    assert freshness_count(run.worker_metrics, "retrievable") >= len(run.expected.request_ids)


@pytest.mark.slow
def test_a_replayed_window_flows_through_worker_and_template_generator_into_storage_once(
    kafka_settings: Settings, pg_database_url: str, tmp_path: Path, llmcf_processes: ProcessStarter
) -> None:
    settings = dataclasses.replace(kafka_settings, **TEMPLATE_POLICY)
    publish_malformed(settings)
    run = run_pipeline(settings, pg_database_url, tmp_path, llmcf_processes, TEMPLATE_WINDOW,
                       "--backend", "template", "--max-batch", "64")
    assert 0 < len(run.expected.request_ids) < TEMPLATE_WINDOW

    assert_generated_everywhere(settings, run, "template")
    # The stored text is the generator's own (the latest result per request, as the worker keeps it).
    topics = Topics.from_settings(settings)
    results = [
        decode(CotResult, message.value())
        for message in read_to_end(settings, settings.kafka_bootstrap_servers, topics.cot_results)
        if message.key() != MALFORMED_KEY
    ]
    published = {result.request_id: result.cot_text for result in sorted(results, key=lambda r: r.generated_at)}
    assert set(published) == run.expected.request_ids
    for request_id, sample in run.samples.items():
        assert sample.cot_text == published[request_id] and sample.cot_text.startswith(TEMPLATE_MARKER)
        assert sample.model == "template-v1"

    letters = {(letter.topic, letter.original_bytes(), letter.reason) for letter in read_dead_letters(settings)}
    assert letters == {(getattr(topics, topic), value, reason) for (topic, value), reason in MALFORMED.items()}


@pytest.mark.slow
def test_the_real_smollm2_writes_the_chains_of_thought_of_a_small_window(
    kafka_settings: Settings, pg_database_url: str, tmp_path: Path, llmcf_processes: ProcessStarter
) -> None:
    settings = dataclasses.replace(kafka_settings, **SMOLLM2_POLICY)
    # Converted once into the developer's model cache (as the in-process SmolLM2 tests do), not into this test's
    # LLMCF_HOME, which would cost a ~40 s conversion on every run.
    model_dir, _ = resolve_model_dir(None, Settings.from_env().home / "models")
    run = run_pipeline(settings, pg_database_url, tmp_path, llmcf_processes, SMOLLM2_WINDOW,
                       "--backend", "transformers", "--model", str(model_dir), "--max-batch", "4",
                       "--max-new-tokens", "24", "--temperature", "0")
    assert 3 <= len(run.expected.request_ids) <= 6, "the window no longer makes a handful of requests"

    assert_generated_everywhere(settings, run, "transformers")
    for sample in run.samples.values():
        assert sample.model == model_dir.name
        assert not sample.cot_text.startswith(TEMPLATE_MARKER)
