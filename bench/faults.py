"""Fault drills end to end, printing what the reliability issue asks for: faults survived, bad inputs tried and
dead-lettered, events published vs stored, events lost, duplicates.

    python -m bench.faults [--interactions 3000] [--examples 3]

It starts an embedded Tansu broker (or uses KAFKA_BOOTSTRAP_SERVERS) and always a throwaway PostgreSQL of its own
(it restarts that server, so DATABASE_URL is deliberately not used), then runs two phases as subprocesses, as an
operator would:

1. bad inputs: `llmcf worker` fed `--examples` hypothesis-drawn batches of valid and mutated `items` and
   `interactions` records (testkit/fuzz.py); each bad record must have exactly one dead letter
   with the expected reason, each good one must be stored exactly once (an assertion stops the benchmark otherwise);
2. faults: `llmcf worker` (batches of 100) and `llmcf generate --backend template` on a replayed MovieLens-100k window
   (10% CoT sample, no cold start); during ingest the worker is killed with SIGKILL and restarted, PostgreSQL is
   stopped for 3 s and started again, and the generator is killed with SIGKILL mid-stream and restarted. Once every
   interaction is stored and every CoT generated, the stores are compared with what the window calls for.
"Lost" counts expected rows or points missing; "duplicates" counts rows or points beyond one per id. Re-deliveries on
the topics (at-least-once) are reported separately: the upserts absorb them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from sqlalchemy import select

import migrations
from llmcf.infra.postgres import TemporaryPostgres
from llmcf.kafka import ensure_topics, read_to_end
from llmcf.replay import ReplayOptions, replay
from llmcf.samples import SAMPLE_DIMENSION
from llmcf.settings import Settings
from llmcf.topics import Topics
from storage.models import CotSample, Interaction
from storage.repository import Repository
from storage.vectors import Filter, Match
from storage.vectors.edge import EdgeIndex
from testkit import fuzz
from testkit.processes import LlmcfProcess, wait_while_running
from testkit.windows import expected_window

WAIT_S = 300.0
BASE_ITEMS = 8
RECORDS_PER_EXAMPLE = (60, 90)
POSTGRES_DOWNTIME_S = 3.0
GENERATOR_ARGS = ("--backend", "template", "--device", "cpu", "--max-batch", "16")


def scratch_settings(bootstrap: str, home: Path, **overrides: str) -> Settings:
    settings = Settings.from_env({
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "LLMCF_TOPIC_PREFIX": f"f{uuid.uuid4().hex[:8]}.",
        "LLMCF_HOME": str(home), **overrides,
    })
    ensure_topics(settings, bootstrap)
    return settings


def scratch_database(server: TemporaryPostgres, name: str) -> str:
    import psycopg
    from psycopg import sql

    with psycopg.connect(host="127.0.0.1", port=server.port, user="postgres", dbname="postgres", autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = server.url.rsplit("/", 1)[0] + f"/{name}"
    migrations.upgrade(url)
    return url


def drawn_examples(count: int) -> list[list[fuzz.Spec]]:
    """`count` lists of record specs, drawn by hypothesis exactly as tests/reliability/test_event_fuzz.py draws them."""
    drawn: list[list[fuzz.Spec]] = []

    @settings(max_examples=count, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fuzz.specs(fuzz.base_item_ids(BASE_ITEMS), *RECORDS_PER_EXAMPLE))
    def collect(example: list[fuzz.Spec]) -> None:
        drawn.append(example)

    collect()
    return drawn[:count]


def bad_inputs_phase(args: argparse.Namespace, bootstrap: str, server: TemporaryPostgres, home: Path) -> dict:
    settings = scratch_settings(bootstrap, home / "bad-inputs")
    database_url = scratch_database(server, "faults_bad_inputs")
    fuzz.publish_base_catalogue(settings, BASE_ITEMS)
    worker = LlmcfProcess("worker", settings, home / "bad-inputs-worker.log", "--item-wait", "1", database_url=database_url)
    try:
        with Repository.from_url(database_url) as repository:
            wait_while_running(lambda: repository.counts()["item_embeddings"] == BASE_ITEMS, [worker], WAIT_S,
                               "the worker to load the base catalogue")
            examples: list[tuple[str, list[fuzz.Case]]] = []
            for n, drawn in enumerate(drawn_examples(args.examples)):
                namespace = f"fz{n}:"
                examples.append((namespace, fuzz.materialize(drawn, namespace)))
            fuzz.publish(settings, [case for _, cases in examples for case in cases])
            fuzz.wait_until_committed(settings, worker, WAIT_S)
            reasons: Counter[str] = Counter()
            for namespace, cases in examples:
                reasons.update(fuzz.check(settings, repository, cases, namespace))
            worker.assert_running()
        assert worker.stop() == 0, worker.log_tail()
    finally:
        worker.ensure_stopped()
    cases = [case for _, cases in examples for case in cases]
    return {
        "records": len(cases),
        "bad": sum(case.dead_letter_reason is not None for case in cases),
        "reasons": reasons,
        "good": sum(case.stored for case in cases),
        "mutations": len({case.mutation for case in cases}),
    }


def generated(repository: Repository) -> int:
    return repository.cot_sample_statuses().get("generated", 0)


def write_failures(metrics: str) -> int:
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("llmcf_worker_write_failures_total{")))


def faults_phase(args: argparse.Namespace, bootstrap: str, server: TemporaryPostgres, home: Path) -> dict:
    settings = scratch_settings(bootstrap, home / "faults", LLMCF_COLD_START_WINDOW_S="0")
    database_url = scratch_database(server, "faults_pipeline")
    expected = expected_window(settings, args.interactions)
    interactions_n, requests_n = len(expected.interaction_ids), len(expected.request_ids)
    worker_log, generator_log = home / "faults-worker.log", home / "faults-generate.log"
    faults: list[str] = []
    with ExitStack() as stack, Repository.from_url(database_url) as repository:
        def start(command: str, log: Path, *extra: str) -> LlmcfProcess:
            process = LlmcfProcess(command, settings, log, *extra, database_url=database_url)
            stack.callback(process.ensure_stopped)
            return process

        worker = start("worker", worker_log, "--batch-size", "100")
        generator = start("generate", generator_log, *GENERATOR_ARGS)
        replay(settings, ReplayOptions(limit=args.interactions, progress=False))

        def stored() -> int:
            return repository.counts()["interactions"]

        wait_while_running(lambda: stored() >= interactions_n // 4, [worker, generator], WAIT_S, "a quarter stored", 0.05)
        worker.kill()
        at = stored()
        worker = start("worker", worker_log, "--batch-size", "100")
        faults.append(f"worker kill -9 at {at:,}/{interactions_n:,} interactions stored: restarted")

        wait_while_running(lambda: stored() >= interactions_n // 2, [worker, generator], WAIT_S, "half stored", 0.05)
        at = stored()
        server.restart(downtime_s=POSTGRES_DOWNTIME_S)
        worker.assert_running()
        faults.append(f"PostgreSQL restart ({POSTGRES_DOWNTIME_S:g} s down) at {at:,}/{interactions_n:,} interactions "
                      "stored: worker stayed up")

        wait_while_running(lambda: generated(repository) >= requests_n // 3, [worker, generator], WAIT_S,
                           "a third of the CoTs", 0.1)
        generator.kill()
        at = generated(repository)
        generator = start("generate", generator_log, *GENERATOR_ARGS)
        faults.append(f"generator kill -9 at {at:,}/{requests_n:,} CoTs generated: restarted")
        if at >= requests_n:
            sys.exit("the generator kill came after the last CoT: nothing was tested; run with more --interactions")

        wait_while_running(lambda: stored() == interactions_n and generated(repository) == requests_n,
                           [worker, generator], WAIT_S, "every interaction stored and every CoT generated", 0.5)
        time.sleep(3.0)  # commit intervals, so the clean stops below have nothing left to re-do
        worker_metrics = worker.metrics()
        assert generator.stop(60) == 0, generator.log_tail()
        assert worker.stop(60) == 0, worker.log_tail()

        table_i, table_s = Interaction.__table__, CotSample.__table__
        with repository.engine.connect() as conn:
            interaction_ids = conn.execute(select(table_i.c.interaction_id)).scalars().all()
            samples = conn.execute(select(table_s.c.sample_id, table_s.c.status)).all()
    with EdgeIndex(settings.home / "qdrant" / settings.qdrant_collection, SAMPLE_DIMENSION) as index:
        points, generated_points = index.count(), index.count(Filter(must=[Match("status", "generated")]))
    topics = Topics.from_settings(settings)
    requests = Counter(m.key() for m in read_to_end(settings, bootstrap, topics.cot_requests))
    results = Counter(m.key() for m in read_to_end(settings, bootstrap, topics.cot_results))
    generated_ids = {sample_id for sample_id, status in samples if status == "generated"}
    sample_ids = [sample_id for sample_id, _ in samples]
    return {
        "faults": faults,
        "postgres_write_failures": write_failures(worker_metrics),
        "interactions": (interactions_n, len(interaction_ids)),
        "requests": requests_n,
        "lost": len(expected.interaction_ids - set(interaction_ids)) + len(expected.request_ids - set(sample_ids))
        + len(expected.request_ids - generated_ids) + max(0, requests_n - points) + max(0, requests_n - generated_points),
        "duplicates": (len(interaction_ids) - len(set(interaction_ids))) + (len(sample_ids) - len(set(sample_ids)))
        + max(0, points - requests_n),
        "unexpected": len(set(interaction_ids) - expected.interaction_ids) + len(set(sample_ids) - expected.request_ids),
        "stored_samples": (len(sample_ids), len(generated_ids), points, generated_points),
        "redelivered": (sum(n - 1 for n in requests.values()), sum(n - 1 for n in results.values())),
    }


def report(bad: dict, run: dict, args: argparse.Namespace, bootstrap: str) -> None:
    interactions_n, stored_n = run["interactions"]
    samples, generated_n, points, generated_points = run["stored_samples"]
    survived = run["lost"] == 0 and run["duplicates"] == 0 and run["unexpected"] == 0 and run["postgres_write_failures"] > 0
    print(f"faults benchmark: broker {bootstrap}, throwaway PostgreSQL, ml-100k window of {interactions_n:,} interactions")
    print(f"faults survived: {len(run['faults']) if survived else 0} of {len(run['faults'])}")
    for fault in run["faults"]:
        print(f"  {fault}")
    print(f"  (the worker counted {run['postgres_write_failures']} failed writes during the outage, each retried)")
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(bad["reasons"].items()))
    print(f"bad inputs (hypothesis, {args.examples} examples, {bad['mutations']} kinds of record): {bad['bad']} tried, "
          f"{sum(bad['reasons'].values())} dead-lettered exactly once ({reasons}); "
          f"{bad['good']} valid records beside them stored exactly once")
    print(f"events published vs stored: {interactions_n:,} interactions published, {stored_n:,} stored; "
          f"{run['requests']:,} CoT samples expected, {samples:,} stored, {generated_n:,} generated; "
          f"index: {points:,} points, {generated_points:,} generated")
    print(f"events lost: {run['lost']}")
    print(f"duplicates: {run['duplicates']} (rows or points beyond one per id; unexpected rows: {run['unexpected']})")
    print(f"at-least-once re-deliveries absorbed by the upserts: {run['redelivered'][0]} CoT requests and "
          f"{run['redelivered'][1]} CoT results published more than once")
    if not run["postgres_write_failures"]:
        sys.exit("FAILED: the worker never noticed the PostgreSQL outage, so that fault was not tested")
    if not survived:
        sys.exit("FAILED: events were lost or duplicated")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--interactions", type=int, default=3000, help="MovieLens-100k interactions (default 3000)")
    parser.add_argument("--examples", type=int, default=3, help="hypothesis examples of bad inputs (default 3)")
    args = parser.parse_args()

    from llmcf.infra.broker import bootstrap_servers

    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp, ExitStack() as stack:
        home = Path(tmp)
        bootstrap = stack.enter_context(bootstrap_servers(home / "broker.log"))
        server = stack.enter_context(TemporaryPostgres())
        started = time.monotonic()
        bad = bad_inputs_phase(args, bootstrap, server, home)
        run = faults_phase(args, bootstrap, server, home)
        report(bad, run, args, bootstrap)
        print(f"(took {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
