"""`llmcf demo`, the main job on the embedded defaults: every stage of the system running on one machine.

1. Infrastructure: the embedded broker (or `KAFKA_BOOTSTRAP_SERVERS`) with its topics, the database migrated.
2. Processes, each the same `llmcf` sub-command an operator runs, as a child with its log under
   `$LLMCF_HOME/demo/logs/`: `worker`, `generate` (SmolLM2 on the CPU, or the first GPU), `update` (continuous
   fine-tuning that promotes versions) and `serve` (the ranker on `--port`).
3. Once the worker consumes (it reports its partitions' offsets), a MovieLens window replayed at `--rate` events/s
   with event times set to publish times (so freshness is real), from where the last run stopped
   (`$LLMCF_HOME/demo/state.json`).
4. A live status line until the window is stored, a model serves `/v1/rank` and the LLM has written its first chains
   of thought (or `--timeout` passes); then a summary, the freshness plot (`$LLMCF_HOME/demo/freshness.png`) and the
   URLs to try.

Lifecycle: Ctrl-C (or SIGTERM) stops the replay at its last confirmed checkpoint, stops the children (SIGTERM, then
SIGKILL after `STOP_GRACE_S`), records the position and exits 130; running the demo again resumes from there, and
idempotent upserts absorb the few events published twice. After the summary the children keep running so the ranker
can be tried; `llmcf demo --stop` stops them, and `llmcf infra down` the broker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcf.errors import UserFacingError
from llmcf.files import write_atomically
from llmcf.infra.processes import pid_alive
from llmcf.ports import WORKER_METRICS_PORT
from llmcf.scraping import (
    FRESHNESS_STAGES,
    FreshnessSeries,
    Samples,
    freshness_buckets,
    freshness_samples,
    histogram_quantile,
    scrape,
    total,
)
from llmcf.settings import Settings

STOP_GRACE_S = 20.0
STATUS_EVERY_S = 2.0
WORKER_READY_TIMEOUT_S = 180.0
COLD_START_EVENTS = 1_000
"""Replayed at publish time, every item of the window is new, so the cold-start window (a day of event time in
production) is set to the time this many events take at `--rate`: about a fifth of the interactions then get a CoT,
as in the worker benchmark, instead of all of them."""


@dataclass(frozen=True)
class DemoOptions:
    dataset: str = "ml-100k"
    limit: int = 20_000
    rate: float = 200.0
    backend: str = "transformers"
    port: int = Settings.ranker_port
    metrics_port_base: int = WORKER_METRICS_PORT
    """worker /metrics on this port, generator on the next, updater on the one after (the commands' defaults)."""
    update_interval_s: float = 60.0
    min_cots: int = 3
    timeout_s: float = 1_800.0
    fresh: bool = False
    stop_at_end: bool = False

    @property
    def worker_metrics_port(self) -> int:
        return self.metrics_port_base

    @property
    def generator_metrics_port(self) -> int:
        return self.metrics_port_base + 1

    @property
    def updater_metrics_port(self) -> int:
        return self.metrics_port_base + 2


class DemoPaths:
    """Where the demo keeps its state, logs and outputs (under `$LLMCF_HOME/demo/`)."""

    def __init__(self, settings: Settings) -> None:
        self.root = settings.home / "demo"
        self.state = self.root / "state.json"
        self.processes = self.root / "processes.json"
        self.logs = self.root / "logs"
        self.plot = self.root / "freshness.png"
        self.series = self.root / "freshness.csv"


# ---- resumable replay position -----------------------------------------------------------------------------------


@dataclass
class ReplayPosition:
    """How far the window was published; `published` only ever counts events a flush confirmed."""

    dataset: str
    limit: int
    published: int = 0

    @classmethod
    def load(cls, path: Path, dataset: str, limit: int) -> ReplayPosition:
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("dataset") == dataset and saved.get("limit") == limit:
                return cls(dataset, limit, int(saved["published"]))
        return cls(dataset, limit)

    def save(self, path: Path) -> None:
        # atomic: a crash leaves the old position or the new one
        write_atomically(path, json.dumps({"dataset": self.dataset, "limit": self.limit, "published": self.published}))


# ---- child processes ---------------------------------------------------------------------------------------------


@dataclass
class Child:
    """One `llmcf` sub-command run by the demo."""

    name: str
    args: list[str]
    process: subprocess.Popen[bytes] | None = None

    def start(self, paths: DemoPaths, env: dict[str, str]) -> None:
        paths.logs.mkdir(parents=True, exist_ok=True)
        with open(paths.logs / f"{self.name}.log", "ab") as log:
            # A session of its own: Ctrl-C reaches the demo only, which then stops the children in order.
            self.process = subprocess.Popen([sys.executable, "-m", "llmcf.cli", *self.args], env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def exited(self) -> int | None:
        return self.process.poll() if self.process else None


def _stop_pids(pids: dict[str, int]) -> list[str]:
    """SIGTERM each live pid, wait up to `STOP_GRACE_S` for all, SIGKILL the rest; returns the names stopped."""
    alive = {name: pid for name, pid in pids.items() if pid_alive(pid)}
    for pid in alive.values():
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and any(pid_alive(pid) for pid in alive.values()):
        time.sleep(0.2)
    for pid in alive.values():
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    return list(alive)


def stop_demo(settings: Settings) -> int:
    """`llmcf demo --stop`: stop the processes a previous demo left running."""
    paths = DemoPaths(settings)
    pids = json.loads(paths.processes.read_text()) if paths.processes.is_file() else {}
    stopped = _stop_pids(pids)
    paths.processes.unlink(missing_ok=True)
    print(f"stopped: {', '.join(stopped)}" if stopped else "no demo process was running")
    print("the broker keeps running; `llmcf infra down` stops it")
    return 0


# ---- the run -----------------------------------------------------------------------------------------------------


def run_demo(settings: Settings, options: DemoOptions) -> int:
    import migrations
    from llmcf import movielens
    from llmcf.events import InteractionEvent
    from llmcf.infra import broker

    paths = DemoPaths(settings)
    if paths.processes.is_file():
        previous = _stop_pids(json.loads(paths.processes.read_text()))
        if previous:
            print(f"stopped the processes of the previous demo: {', '.join(previous)}")
    if options.fresh:
        paths.state.unlink(missing_ok=True)

    print("== 1/4 infrastructure")
    info = broker.up(settings)
    print(f"broker {info.bootstrap} ({info.origin}); topics: {', '.join(info.topics)}")
    migrations.upgrade(settings.database_url)
    print(f"database migrated to revision {migrations.current(settings.database_url)}")

    window = movielens.events(options.dataset, limit=options.limit)
    window_events = len(window)
    window_interactions = sum(1 for event in window if isinstance(event, InteractionEvent))
    position = ReplayPosition.load(paths.state, options.dataset, options.limit)

    print("== 2/4 processes (logs in " + str(paths.logs) + ")")
    children = _children(options)
    env = _child_environment(settings, info.bootstrap, cold_start_window_s=COLD_START_EVENTS / options.rate)
    for child in children:
        child.start(paths, env)
        print(f"started llmcf {' '.join(child.args)}")
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.processes.write_text(json.dumps({c.name: c.process.pid for c in children if c.process}))

    stop = threading.Event()
    # Both signals set the event, so Ctrl-C stops the run the same way wherever it lands, and also where SIGINT was
    # inherited as ignored (a shell's background job): Python installs no KeyboardInterrupt handler there.
    previous_handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    replayer = _Replayer(settings, options, position, paths, stop)
    series = FreshnessSeries()
    try:
        outcome = wait_for_worker(options, children, stop)
        if outcome is None:
            print(f"== 3/4 replay {options.dataset}: {options.limit:,} interactions at {options.rate:g} events/s, "
                  f"from event {position.published:,} of {window_events:,}")
            replayer.start()
            print("== 4/4 running (Ctrl-C stops everything; running the demo again resumes)")
            outcome = _watch(settings, options, children, replayer, window_events, window_interactions, series, stop)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    if replayer.ident is not None:
        replayer.join()
    print()

    if outcome == "interrupted":
        _stop_children(children, paths)
        print(f"stopped at event {replayer.position.published:,} of {window_events:,}; run the demo again to resume")
        return 130
    if outcome.startswith("failed"):
        _stop_children(children, paths)
        raise UserFacingError(f"the demo stopped: {outcome}")

    _summary(settings, options, paths, replayer, window_interactions, series, outcome)
    if options.stop_at_end:
        _stop_children(children, paths)
        print("stopped the demo's processes (--stop-at-end)")
    return 0


def _stop_children(children: list[Child], paths: DemoPaths) -> None:
    """Stop this run's children and forget them (nothing is left for `--stop`)."""
    _stop_pids({c.name: c.process.pid for c in children if c.process})
    paths.processes.unlink(missing_ok=True)


def _children(options: DemoOptions) -> list[Child]:
    generate = ["generate", "--backend", options.backend, "--max-batch", "8",
                "--metrics-port", str(options.generator_metrics_port)]
    return [
        Child("worker", ["worker", "--metrics-port", str(options.worker_metrics_port)]),
        Child("generator", generate),
        Child("updater", ["update", "--interval-s", f"{options.update_interval_s:g}", "--metrics-port",
                          str(options.updater_metrics_port)]),
        Child("ranker", ["serve", "--port", str(options.port)]),
    ]


def _child_environment(settings: Settings, bootstrap: str, cold_start_window_s: float) -> dict[str, str]:
    env = dict(os.environ)
    env["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
    env["LLMCF_HOME"] = str(settings.home)
    env.setdefault("LLMCF_COLD_START_WINDOW_S", f"{cold_start_window_s:g}")
    env.pop("LLMCF_METRICS_PORT", None)  # each child gets its own port by flag
    return env


class _Replayer(threading.Thread):
    """The replay on a thread of its own, recording each confirmed checkpoint; `stop` ends it at the next event."""

    def __init__(self, settings: Settings, options: DemoOptions, position: ReplayPosition, paths: DemoPaths,
                 stop: threading.Event) -> None:
        super().__init__(name="demo-replay", daemon=True)
        self.settings, self.options, self.position, self.paths, self.stop = settings, options, position, paths, stop
        self.done = False
        self.error: BaseException | None = None

    def run(self) -> None:
        from llmcf.replay import ReplayOptions, replay

        def checkpoint(published: int) -> None:
            self.position.published = published
            self.position.save(self.paths.state)

        try:
            replay(self.settings, ReplayOptions(
                dataset=self.options.dataset, limit=self.options.limit, rate=self.options.rate, timestamps="now",
                progress=False, skip=self.position.published, checkpoint_every=200, on_checkpoint=checkpoint,
                should_stop=self.stop.is_set,
            ))
            self.done = not self.stop.is_set()
        except BaseException as error:  # reported by the watcher, which owns the terminal
            self.error = error


def wait_for_worker(options: DemoOptions, children: list[Child], stop: threading.Event) -> str | None:
    """Wait until the worker reports the offsets of its partitions (it has joined its group and consumes), so that the
    replay's event times, set when published, do not count the processes' start-up; None once it does, else
    'interrupted' or 'failed: why'."""
    worker = next(child for child in children if child.name == "worker")
    print("waiting for the worker to join its consumer group ...", flush=True)
    deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
    while not stop.wait(1.0):
        if worker.exited() is not None:
            return f"failed: llmcf worker exited with status {worker.exited()} (see worker.log)"
        if scrape(options.worker_metrics_port).get("llmcf_consumer_committed_offset"):
            return None
        if time.monotonic() > deadline:
            return f"failed: the worker reported no partition within {WORKER_READY_TIMEOUT_S:g} s (see worker.log)"
    return "interrupted"


def _watch(settings: Settings, options: DemoOptions, children: list[Child], replayer: _Replayer, window_events: int,
           window_interactions: int, series: FreshnessSeries, stop: threading.Event) -> str:
    """Print the status line until done, recording freshness into `series`; returns 'done', 'timeout',
    'interrupted' or 'failed: why'."""
    from storage.repository import Repository

    repository = Repository.from_settings(settings)
    started = time.monotonic()
    while not stop.wait(STATUS_EVERY_S):
        for child in children:
            if child.exited() is not None:
                return f"failed: llmcf {child.name} exited with status {child.exited()} (see {child.name}.log)"
        if replayer.error is not None:
            return f"failed: the replay stopped: {replayer.error}"
        counts = repository.counts()
        cots = repository.cot_sample_statuses()
        latest = series.record(_freshness_samples(options))
        model = _serving_model(options.port)
        elapsed = time.monotonic() - started
        line = (f"[{elapsed:5.0f}s] published {replayer.position.published:,}/{window_events:,}"
                f" | stored {counts.get('interactions', 0):,} interactions"
                f" | CoT samples {sum(cots.values()):,}, generated {cots.get('generated', 0):,}"
                f" | retrievable p99 {_seconds(latest.get('retrievable'))}"
                f" | model {model or 'none yet'}")
        print("\r" + line[:200].ljust(200), end="", flush=True)
        stored_all = counts.get("interactions", 0) >= window_interactions
        if replayer.done and stored_all and model and cots.get("generated", 0) >= options.min_cots:
            return "done"
        if elapsed > options.timeout_s:
            return "timeout"
    return "interrupted"


def _freshness_samples(options: DemoOptions) -> Samples:
    """The freshness histograms of the worker, the generator and the ranker (the updater observes none)."""
    return freshness_samples((options.worker_metrics_port, options.generator_metrics_port, options.port))


def _serving_model(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            body = json.loads(response.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return body.get("model_version") or "ready"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _summary(settings: Settings, options: DemoOptions, paths: DemoPaths, replayer: _Replayer, window_interactions: int,
             series: FreshnessSeries, outcome: str) -> None:
    from storage.repository import Repository

    repository = Repository.from_settings(settings)
    counts = repository.counts()
    cots = repository.cot_sample_statuses()
    freshness = _freshness_samples(options)
    print("== summary" + (" (timed out before everything was ready)" if outcome == "timeout" else ""))
    print(f"window:     {options.dataset}, {window_interactions:,} interactions, published up to event "
          f"{replayer.position.published:,}")
    print("stored:     " + ", ".join(f"{table} {n:,}" for table, n in counts.items()))
    generator = scrape(options.generator_metrics_port)
    skipped = {reason: total(generator, "llmcf_generator_cots_total", outcome=f"skipped_{reason}")
               for reason in ("ttl", "backlog", "duplicate")}
    print(f"CoTs:       {cots.get('generated', 0):,} generated, {cots.get('pending', 0):,} pending (retrievable "
          f"already; backend {options.backend}); the generator skipped {sum(skipped.values()):,.0f} requests: "
          f"{skipped['ttl']:,.0f} would be older than LLMCF_COT_TTL_S={settings.cot_ttl_s:g} s, "
          f"{skipped['backlog']:,.0f} last in a full backlog, {skipped['duplicate']:,.0f} duplicates")
    for stage in FRESHNESS_STAGES:
        bounds, cumulative = freshness_buckets(freshness, stage)
        p50, p99 = histogram_quantile(0.5, bounds, cumulative), histogram_quantile(0.99, bounds, cumulative)
        if p50 is not None:
            print(f"freshness:  {stage:<16} p50 {_seconds(p50):>9}  p99 {_seconds(p99):>9}  (this run, event time)")
    plot = series.write(paths.series, paths.plot)
    if plot:
        print(f"plot:       {plot} (data: {paths.series})")
    example = _example_ranking(repository, options.port)
    if example:
        print(f"ranked:     {example}")
    coverage = _served_examples(options.port)
    if coverage:
        print(f"examples:   {coverage}")
    print("\nTry:")
    print(f"  http://127.0.0.1:{options.port}/docs          the ranker's API (OpenAPI)")
    print(f"  curl -s -X POST http://127.0.0.1:{options.port}/v1/rank -H 'content-type: application/json' \\")
    print("       -d '{\"user_id\": \"1\", \"candidates\": [\"1\", \"50\", \"181\"]}'")
    print(f"  http://127.0.0.1:{options.worker_metrics_port}/metrics   worker, :{options.generator_metrics_port} "
          f"generator, :{options.updater_metrics_port} updater, :{options.port}/metrics ranker")
    print(f"  logs in {paths.logs}; `llmcf demo --stop` stops the processes, `llmcf infra down` the broker")


def _example_ranking(repository: Any, port: int) -> str | None:
    """One real `/v1/rank` call for a stored user over a few stored items, as proof the ranker answers."""
    user, items = repository.sample_user_and_items(5)
    if user is None:
        return None
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/rank", method="POST",
                                     data=json.dumps({"user_id": user, "candidates": items}).encode(),
                                     headers={"content-type": "application/json", **_auth_header()})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as error:
        return f"/v1/rank did not answer: {error}"
    scores = ", ".join(f"{s['item_id']} {s['score']:.3f}" for s in body.get("scores", []))
    return f"user {user} by model {body.get('model_version')}: {scores}"


def _served_examples(port: int) -> str | None:
    """The CoT coverage of the in-context examples the ranker has served so far (its /metrics): which share carries a
    language model's CoT, the template fallback's, or none yet (pending)."""
    samples = scrape(port)
    served = {cot: total(samples, "llmcf_ranker_examples_total", cot=cot) for cot in ("llm", "template", "pending")}
    count = sum(served.values())
    if not count:
        return None
    shares = ", ".join(f"{value / count:.0%} {cot}" for cot, value in served.items())
    return f"{count:,.0f} in-context examples served by the ranker: {shares} (CoT written by an LLM / by the " \
           "non-LLM template / not yet)"


def _auth_header() -> dict[str, str]:
    token = os.environ.get("LLMCF_API_TOKEN")
    return {"authorization": f"Bearer {token}"} if token else {}
