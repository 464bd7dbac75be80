"""`llmcf cots`: the real SmolLM2-135M writes CoTs for a seeded sample of MovieLens-100k training rows into a gzip
JSON-lines file; a second run resumes where the first stopped, a chunk cut off mid-write is dropped and written again,
and a run that would mix generators or samples in one file is refused."""

from __future__ import annotations

import csv
import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from llmcf.cli import main
from llmcf.errors import UserFacingError
from ranker.data import movielens_corpus
from ranker.dataset import time_split
from ranker.llm_cots import WriteOptions, manifest_path, read_cots, sample_rows, write_cots

pytestmark = pytest.mark.slow

FRACTION = 0.0001  # 8 of ml-100k's 80,000 training rows
ARGS = ["cots", "--dataset", "ml-100k", "--fraction", str(FRACTION), "--max-new-tokens", "8", "--max-batch", "2",
        "--threads", "1"]


def run(home: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    monkeypatch.setenv("LLMCF_HOME", str(home))
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert main([*ARGS, *args]) == 0
    return printed.getvalue()


def test_writes_the_seeded_sample_resumably_with_the_llm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "cots.jsonl.gz"
    corpus = movielens_corpus("ml-100k")
    rows = sample_rows(time_split(corpus, None, None, seed=0)[0].rows, FRACTION, 0)
    keys = {corpus.sample_key(row) for row in rows.tolist()}
    assert len(keys) == 8
    assert np.array_equal(rows, sample_rows(time_split(corpus, None, None, seed=0)[0].rows, FRACTION, 0))

    printed = run(tmp_path, monkeypatch, "--out", str(out), "--limit", "3")
    first = read_cots(out)
    assert len(first) == 3 and set(first) <= keys
    assert "8 rows" in printed and "writing 3" in printed and "3/8 CoTs" in printed
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["written"] == 3 and manifest["generator"]["backend"] == "transformers"
    assert "SmolLM2-135M" in manifest["generator"]["model"] and manifest["sample"] == {
        "dataset": "ml-100k", "fraction": FRACTION, "seed": 0, "rows": 8}
    assert manifest["command"].startswith("llmcf cots --dataset ml-100k --fraction 0.0001 --seed 0 --backend transformers")
    assert "--max-new-tokens 8" in manifest["command"] and "--limit" not in manifest["command"]

    # A run killed mid-write leaves a cut-off gzip member: it is dropped on reading and before appending.
    with out.open("ab") as handle:
        handle.write(out.read_bytes()[:40])
    assert read_cots(out) == first

    printed = run(tmp_path, monkeypatch, "--out", str(out))
    assert "3 in" in printed and "writing 5" in printed
    records = read_cots(out)
    assert set(records) == keys
    assert all(records[key] == first[key] for key in first), "a resumed run keeps what was written"
    for record in records.values():
        row = next(r for r in rows.tolist() if corpus.sample_key(r) == record["key"])
        assert record["label"] == int(corpus.label[row]) and record["ts_ms"] == int(corpus.ts_ms[row])
        assert record["cot"].strip() and 0 < record["completion_tokens"] <= 8 and record["prompt_tokens"] > 100
    assert json.loads(manifest_path(out).read_text())["written"] == 8

    assert "writing 0" in run(tmp_path, monkeypatch, "--out", str(out))  # complete: nothing to do


def test_refuses_the_template_backend_and_mixed_files(tmp_path: Path) -> None:
    out = tmp_path / "cots.jsonl.gz"
    with pytest.raises(UserFacingError, match="not|no LLM"):
        write_cots(WriteOptions(dataset="ml-100k", fraction=FRACTION, backend="template"), tmp_path, out)
    manifest_path(out).write_text(json.dumps({"sample": {"dataset": "ml-100k", "fraction": FRACTION, "seed": 1,
                                                         "rows": 8}}))
    with pytest.raises(UserFacingError, match="another sample"):
        write_cots(WriteOptions(dataset="ml-100k", fraction=FRACTION), tmp_path, out)


def test_evaluate_compares_llm_template_and_no_cots_on_the_same_rows_and_examples(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "cots.jsonl.gz"
    run(tmp_path, monkeypatch, "--out", str(out), "--fraction", "0.0003")  # 24 rows, the later flag wins
    assert len(read_cots(out)) == 24
    backends = {"llm": "llm", "llm-rows-template": "template", "llm-rows-no-cot": "none"}

    def evaluate(name: str, variants: list[str], pools: list[str]) -> tuple[str, list[dict[str, str]], str]:
        printed = io.StringIO()
        with redirect_stdout(printed):
            assert main(["evaluate", "--dataset", "ml-100k", "--seeds", "1", "--variants", *variants,
                         "--max-train-samples", "600", "--max-eval-samples", "200", "--epochs", "1", "--threads", "1",
                         "--cot-pool", *pools, "--cot-file", str(out), "--out", str(tmp_path / name)]) == 0
        with (tmp_path / name / "offline.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        return printed.getvalue(), rows, (tmp_path / name / "offline.md").read_text()

    # The pools split between two calls (as two processes would run them), then one call with all of them.
    printed, rows, _ = evaluate("first", ["deepfm", "deepfm+ict"], ["llm"])
    assert "CoT pool: the 24 rows of cots.jsonl.gz" in printed
    assert [(r["variant"], r["cot_backend"], r["cot_pool"]) for r in rows] == [("deepfm", "", ""),
                                                                                ("deepfm+ict", "llm", "llm")]
    printed, rows, _ = evaluate("second", ["deepfm+ict"], ["llm-rows-template", "llm-rows-no-cot"])
    assert [(r["cot_backend"], r["cot_pool"]) for r in rows] == [("template", "llm-rows-template"),
                                                                 ("none", "llm-rows-no-cot")]
    printed, rows, markdown = evaluate("all", ["deepfm", "deepfm+ict"], list(backends))
    assert printed.count("cached from an earlier call") == 4  # nothing trained again
    assert [(r["variant"], r["cot_pool"]) for r in rows] == [("deepfm", ""), *(("deepfm+ict", p) for p in backends)]
    for pool in backends:
        assert f"| deepfm+ict ({pool}) | 1 |" in markdown and f"| deepfm+ict ({pool}) vs deepfm | all |" in markdown
    assert "llm = the rows of cots.jsonl.gz (a seeded sample of all training rows), the CoTs an LLM wrote" in markdown
    assert "llm-rows-template = the rows of cots.jsonl.gz (a seeded sample of all training rows), template CoTs " \
        "(deterministic rationale, not an LLM)" in markdown
    assert "llm-rows-no-cot = the rows of cots.jsonl.gz (a seeded sample of all training rows), no CoTs (the CoT " \
        "token is the ICT module's learned placeholder)" in markdown
    # Retrieval reads the rows' history and item, never the CoT: the three pools share one cached set of examples.
    assert len(list((tmp_path / "cache" / "ranker" / "retrieval").glob("*.npz"))) == 1
    # ...but each run's examples carry its own pool's CoTs, never those cached by the other run.
    from ranker.cot_pool import llm_file_pool
    from ranker.dataset import Samples, Split
    from ranker.examples import retrieve_examples

    cache_dir = tmp_path / "cache" / "ranker"
    samples = Samples.of(movielens_corpus("ml-100k"), cache_dir)
    train = time_split(samples.corpus, None, None, seed=0)[0].rows
    split = Split("test", train[-50:])
    for cots in backends.values():
        pool = llm_file_pool(samples, train, out, cache_dir, lambda _line: None, cots=cots)
        records = retrieve_examples(samples, pool, [split], cache_dir, lambda _line: None)
        expected = dict(zip((samples.corpus.sample_key(r) for r in pool.rows.tolist()), pool.cots, strict=True))
        if cots == "none":  # every example is there, with no CoT: the model sees its CoT token's placeholder
            assert len(records) == 24 and all(r.cot is None and not r.generated for r in records)
        else:
            assert all(np.array_equal(r.cot, expected[r.key]) and r.generated for r in records)
