"""`llmcf serve` under faults, as a subprocess an operator runs: kill -9 and restart under traffic, and overload.

Designed behaviour: the ranker holds nothing that a crash can lose (the model versions and the data live in storage),
so a restarted process becomes ready again with the same serving version. Under overload it sheds at once (503
`overloaded`, `Retry-After: 1`) instead of queueing, so the latency of what it does answer stays bounded, and it
answers everything again as soon as the load drops. The backbone kind (DeepFM) is served: it keeps no example pool,
so a restart has nothing to load but the model.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import migrations
from llmcf.infra import free_port
from llmcf.settings import Settings
from storage.repository import Repository
from testkit.processes import LlmcfProcess, ProcessStarter, wait_until_ready, wait_while_running
from tests.ranker.serving.support import Populated, populate_storage, train_version

pytestmark = pytest.mark.slow

MAX_INFLIGHT = 2  # small, so that a client on the same two cores can offer twice the capacity
CANDIDATES = 500  # heavy enough requests that the server, not the client, is the bottleneck


@dataclass(frozen=True)
class Deployment:
    settings: Settings
    version_id: str
    populated: Populated


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    """A home with one trained DeepFM candidate and the stored pipeline data it scores with."""
    settings = Settings.from_env({"LLMCF_HOME": str(tmp_path_factory.mktemp("ranker-faults")), "LLMCF_LOG_LEVEL": "WARNING"})
    migrations.upgrade(settings.database_url)
    version = train_version(settings, ict=False, epochs=1)
    with Repository.from_settings(settings) as repository:
        populated = populate_storage(repository, settings, samples=20)
    return Deployment(settings, version.version_id, populated)


def start_ranker(starter: ProcessStarter, deployment: Deployment, log: Path, port: int) -> LlmcfProcess:
    process = starter.start("serve", deployment.settings, log, "--kind", "deepfm", "--port", str(port),
                            extra_env={"LLMCF_RANKER_MAX_INFLIGHT": str(MAX_INFLIGHT)})
    wait_until_ready(f"http://127.0.0.1:{port}", process, timeout_s=120, interval_s=0.1)
    return process


def body(deployment: Deployment, candidates: int = 20) -> dict[str, object]:
    return {"user_id": deployment.populated.known_user, "candidates": deployment.populated.known_items[:candidates]}


def test_kill_9_under_traffic_then_restart_serves_the_same_version(
        llmcf_processes: ProcessStarter, deployment: Deployment, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/rank"
    log = tmp_path / "serve.log"
    process = start_ranker(llmcf_processes, deployment, log, port)
    phase = "before"
    outcomes: list[tuple[str, str, str | None]] = []  # (phase, status or error class, model version)
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:  # a busy machine answers late, not wrongly
            while not stop.is_set():
                sent_in = phase
                try:
                    answer = http.post(url, json=body(deployment))
                except httpx.TransportError as exc:
                    outcomes.append((sent_in, type(exc).__name__, None))
                    time.sleep(0.01)
                    continue
                version = answer.json().get("model_version") if answer.status_code == 200 else None
                outcomes.append((sent_in, f"{answer.status_code} {answer.json().get('detail', '')}".strip(), version))

    thread = threading.Thread(target=client, name="ranker-client", daemon=True)
    thread.start()
    def answered(in_phase: str) -> bool:
        return sum(1 for q, status, _ in outcomes if q == in_phase and status.startswith("200")) >= 5

    try:
        wait_while_running(lambda: answered("before"), [], 120, "5 answers before the kill")
        phase = "outage"  # first: whatever is sent from now on may meet the dead process
        process.kill()
        start_ranker(llmcf_processes, deployment, log, port)
        phase = "after"
        wait_while_running(lambda: answered("after"), [], 120, "5 answers after the restart")
    finally:
        stop.set()
        thread.join(timeout=30)

    by_phase = {p: Counter(status for q, status, _ in outcomes if q == p) for p in ("before", "outage", "after")}
    summary = f"{by_phase}\n{log.read_text(errors='replace')[-3000:]}"
    # one client, never over the in-flight limit: every HTTP answer in every phase is a 200
    assert all(status == "200" for _, status, _ in outcomes if status[0].isdigit()), summary
    # only the request in flight at the kill may fail among those sent before it
    assert by_phase["before"]["200"] >= 5 and by_phase["before"].total() - by_phase["before"]["200"] <= 1, summary
    assert by_phase["outage"].total() > by_phase["outage"]["200"], f"the kill went unnoticed: {summary}"
    assert by_phase["after"]["200"] >= 5 and by_phase["after"].total() - by_phase["after"]["200"] <= 1, summary
    assert {version for _, status, version in outcomes if status == "200"} == {deployment.version_id}, summary


def test_twice_the_capacity_is_shed_with_retry_after_and_latency_stays_bounded(
        llmcf_processes: ProcessStarter, deployment: Deployment, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/rank"
    start_ranker(llmcf_processes, deployment, tmp_path / "serve.log", port)
    heavy = body(deployment, CANDIDATES)

    with httpx.Client(timeout=30) as http:
        for _ in range(5):  # warm-up: onnxruntime, storage caches
            assert http.post(url, json=heavy).status_code == 200
        single_s = []
        for _ in range(15):
            started = time.perf_counter()
            assert http.post(url, json=heavy).status_code == 200
            single_s.append(time.perf_counter() - started)
    single = statistics.median(single_s)
    capacity = asyncio.run(closed_loop(url, heavy, workers=MAX_INFLIGHT, seconds=2.0))
    offered = 2 * capacity
    answers = asyncio.run(open_loop(url, heavy, rate=offered, seconds=4.0))

    statuses = Counter(status for status, _, _ in answers)
    context = f"capacity {capacity:.1f}/s, single {single * 1000:.1f} ms, offered {offered:.1f}/s: {statuses}"
    assert set(statuses) <= {200, 503}, context
    shed = [(status, headers) for status, _, headers in answers if status == 503]
    assert shed, f"nothing was shed at twice the capacity: {context}"
    assert all(headers.get("retry-after") == "1" for _, headers in shed), context
    ok = sum(1 for status, _, _ in answers if status == 200)
    assert ok >= capacity, f"the server answered too little under overload: {context}"
    # A server that queues instead of shedding answers nearly everything late; one that sheds refuses about half of
    # twice its capacity (a busier machine sheds more, not less). Latency itself is bench.overload's to print: a wall-
    # clock bound here failed CI when the whole machine stalled (p99 4.7 s with 44% shed, 2026-12-05).
    assert len(shed) >= 0.2 * len(answers), f"too little shed at twice the capacity, something queues: {context}"

    with httpx.Client(timeout=30) as http:
        time.sleep(1.0)  # the Retry-After the shed requests were given
        after = [http.post(url, json=heavy).status_code for _ in range(20)]
    assert after == [200] * 20, f"not recovered after the load dropped: {after}; {context}"


async def closed_loop(url: str, body: dict[str, object], workers: int, seconds: float) -> float:
    """Answered requests per second with `workers` clients each sending the next request when its answer comes."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            if (await client.post(url, json=body)).status_code == 200:
                done += 1

    async with httpx.AsyncClient(timeout=30) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(workers)))
        return done / (time.perf_counter() - started)


async def open_loop(url: str, body: dict[str, object], rate: float, seconds: float) -> list[tuple[int, float, httpx.Headers]]:
    """Request i sent at start + i / rate whatever the earlier ones do; (status, seconds from send to answer, headers).
    Latency is counted from the actual send, so the client's own lag on a shared machine is not blamed on the server."""
    answers: list[tuple[int, float, httpx.Headers]] = []
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one(at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            sent = time.perf_counter()
            answer = await client.post(url, json=body)
            answers.append((answer.status_code, time.perf_counter() - sent, answer.headers))

        start = time.perf_counter() + 0.1
        await asyncio.gather(*(one(start + i / rate) for i in range(int(rate * seconds))))
    return answers
