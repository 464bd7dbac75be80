"""The demo's own pieces: the replay position it resumes from, waiting for its worker, its documented flags, a whole run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from llmcf import movielens
from llmcf.demo import Child, DemoOptions, DemoPaths, ReplayPosition, wait_for_worker
from llmcf.events import InteractionEvent
from llmcf.infra import free_port
from llmcf.settings import Settings
from storage.repository import Repository
from testkit.processes import child_environment


@pytest.mark.parametrize("same_window", [True, False])
def test_replay_position_survives_a_restart_only_for_the_same_window(tmp_path, same_window):
    path = tmp_path / "state.json"
    ReplayPosition("ml-100k", 5_000, published=1_200).save(path)
    limit = 5_000 if same_window else 6_000
    assert ReplayPosition.load(path, "ml-100k", limit).published == (1_200 if same_window else 0)


def free_port_run(length: int) -> int:
    """The first of `length` consecutive free ports (the demo puts its processes' /metrics on base, base+1, ...)."""
    for _ in range(50):
        base = free_port()
        if base + length < 65_535 and all(_bindable(base + offset) for offset in range(length)):
            return base
    raise AssertionError("no run of free ports found")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_demo_resumes_after_ctrl_c_runs_to_its_summary_and_leaves_a_ranker_that_answers(kafka_settings, tmp_path):
    """`llmcf demo` as a user runs it (template backend, a small fast window): interrupted mid-replay it stops with
    130; run again it resumes, prints its summary and plot, and the ranker it started answers `/v1/rank` until
    `llmcf demo --stop`. Every interaction of the window is stored once."""
    port, metrics_base = free_port(), free_port_run(3)
    env = child_environment(kafka_settings, kafka_settings.database_url, 0)
    env.pop("LLMCF_METRICS_PORT")
    demo = [sys.executable, "-m", "llmcf.cli", "demo", "--backend", "template", "--limit", "1500", "--rate", "300",
            "--port", str(port), "--metrics-port-base", str(metrics_base), "--update-interval", "5", "--timeout", "900"]
    paths = DemoPaths(kafka_settings)
    log = tmp_path / "demo.log"
    try:
        with open(log, "wb") as out:
            first = subprocess.Popen(demo, env=env, stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 240
            while not (paths.state.is_file() and json.loads(paths.state.read_text())["published"] >= 400):
                assert first.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
                time.sleep(0.2)
            first.send_signal(signal.SIGINT)
            assert first.wait(120) == 130, log.read_text(errors="replace")[-3000:]
        stopped_at = json.loads(paths.state.read_text())["published"]
        assert "run the demo again to resume" in log.read_text()
        assert not json.loads(paths.processes.read_text() if paths.processes.is_file() else "{}")

        second = subprocess.run(demo, env=env, capture_output=True, text=True, timeout=900)
        output = second.stdout + second.stderr
        assert second.returncode == 0, output[-4000:]
        assert f"from event {stopped_at:,}" in output
        assert "== summary" in output and "ranked:     user" in output and paths.plot.is_file()

        response = httpx.post(f"http://127.0.0.1:{port}/v1/rank", json={"user_id": "1", "candidates": ["1", "50"]},
                              timeout=30)
        assert response.status_code == 200 and len(response.json()["scores"]) == 2
    finally:
        subprocess.run([sys.executable, "-m", "llmcf.cli", "demo", "--stop"], env=env, timeout=120, check=False)

    with Repository.from_settings(kafka_settings) as repository:
        stored = repository.counts()["interactions"]
    window = [e for e in movielens.events("ml-100k", limit=1500) if isinstance(e, InteractionEvent)]
    assert stored == len({e.interaction_id for e in window}) == 1500


def test_the_replay_waits_for_a_worker_that_exits_and_says_so(tmp_path):
    worker = Child("worker", ["worker", "--no-such-flag"])
    worker.start(DemoPaths(Settings.from_env({"LLMCF_HOME": str(tmp_path)})), dict(os.environ))
    outcome = wait_for_worker(DemoOptions(metrics_port_base=free_port()), [worker], threading.Event())
    assert outcome == "failed: llmcf worker exited with status 2 (see worker.log)"


def test_the_demo_documents_only_flags_its_parser_has():
    """The demo's docstring and the docs' paragraphs on the demo name its flags; each must be a real `llmcf demo`
    flag (the docstring once said `--timeout-s` for `--timeout`). Snippets running another command are not the demo's."""
    import re
    from pathlib import Path

    from llmcf import demo
    from llmcf.cli import build_parser

    demo_parser = build_parser()._subparsers._group_actions[0].choices["demo"]
    flags = {flag for action in demo_parser._actions for flag in action.option_strings}
    root = Path(__file__).parents[2]
    pages = [(root / "README.md").read_text(), *(page.read_text() for page in sorted((root / "docs").glob("*.md")))]
    texts = [demo.__doc__ or "", *(paragraph for page in pages for paragraph in page.split("\n\n") if "llmcf demo" in paragraph)]
    snippets = [snippet for text in texts for snippet in re.findall(r"`([^`]+)`", text)]
    documented = {flag for snippet in snippets if "llmcf " not in snippet or "llmcf demo" in snippet
                  for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", snippet)}
    assert {"--timeout", "--rate", "--limit", "--stop"} <= documented
    assert documented <= flags, sorted(documented - flags)


def test_the_demo_flags_defaults_are_the_demo_options_defaults():
    from llmcf.cli import build_parser
    from llmcf.commands.serving import _demo_options

    assert _demo_options(build_parser().parse_args(["demo"])) == DemoOptions()
