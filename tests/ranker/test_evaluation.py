"""`llmcf evaluate --quick` (tiny MovieLens-100k caps; real MiniLM, template CoT pool, the exact retrieval engine): the
offline report has 4 variants x N seeds, the streaming report has the (a)(b)(c) rows of every day; and the
summary arithmetic."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from llmcf.cli import main
from ranker.evaluation_options import DAY_MS, EvaluationOptions, on_new_items
from ranker.evaluation_report import RunResult, ict_gains, summarise

pytestmark = pytest.mark.slow

SEEDS = EvaluationOptions.quick().seeds
DAYS = EvaluationOptions.quick().days


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    home = tmp_path_factory.mktemp("evaluate-home")
    out = home / "reports"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMCF_HOME", str(home))
        import io
        from contextlib import redirect_stdout

        printed = io.StringIO()
        with redirect_stdout(printed):
            code = main(["evaluate", "--quick", "--streaming", "--out", str(out)])
    assert code == 0
    return out, printed.getvalue()


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_the_offline_report_has_every_variant_and_seed_and_names_the_cot_backend(reports) -> None:
    out, printed = reports
    rows = read_csv(out / "offline.csv")
    assert sorted((r["variant"], int(r["seed"])) for r in rows) == sorted(
        (v, s) for v in ("deepfm", "deepfm+ict", "din", "din+ict") for s in range(SEEDS))
    assert all(0.0 < float(r["auc"]) < 1.0 and float(r["logloss"]) > 0 for r in rows)
    # ml-100k's last 10% has few new-item rows (3 of these 300, both labels): their AUC may be 0 or 1
    assert all(0.0 <= float(r["auc_new_items"]) <= 1.0 and 0.0 < float(r["auc_unseen_users"]) < 1.0 for r in rows)
    assert {(r["cot_backend"], r["cot_pool"]) for r in rows if "+ict" in r["variant"]} == {("template", "uniform")}
    assert {(r["cot_backend"], r["cot_pool"]) for r in rows if "+ict" not in r["variant"]} == {("", "")}  # no pool read
    markdown = (out / "offline.md").read_text()
    assert "template (deterministic rationale, not an LLM)" in markdown and "latest 1,500" in markdown
    for variant in ("deepfm", "deepfm+ict", "din", "din+ict"):
        assert f"| {variant} | {SEEDS} |" in markdown
    for rows_name in ("all", "new items", "unseen users"):
        assert f"| deepfm+ict vs deepfm | {rows_name} |" in markdown and f"| din+ict vs din | {rows_name} |" in markdown
    assert markdown.strip() in printed


def test_a_second_call_reuses_every_finished_run(reports, monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = reports
    monkeypatch.setenv("LLMCF_HOME", str(out.parent))
    import io
    from contextlib import redirect_stdout

    printed = io.StringIO()
    with redirect_stdout(printed):  # the fixture's offline options: every run is in the cache, nothing trains
        assert main(["evaluate", "--quick", "--out", str(out.parent / "again")]) == 0
    assert printed.getvalue().count("cached from an earlier call") == 4 * SEEDS
    first, again = read_csv(out / "offline.csv"), read_csv(out.parent / "again" / "offline.csv")
    assert [(r["variant"], r["auc"], r["auc_new_items"]) for r in first] == \
        [(r["variant"], r["auc"], r["auc_new_items"]) for r in again]
    printed = io.StringIO()
    with redirect_stdout(printed):  # another option that changes a run: trained afresh
        assert main(["evaluate", "--quick", "--seeds", "1", "--variants", "deepfm", "--weight-decay", "1e-4",
                     "--out", str(out.parent / "other")]) == 0
    assert "cached" not in printed.getvalue()


def test_the_streaming_report_has_the_three_cases_for_every_day(reports) -> None:
    out, printed = reports
    rows = read_csv(out / "streaming.csv")
    assert [(int(r["day"]), r["case"]) for r in rows] == [(d, c) for d in range(DAYS) for c in ("a", "b", "c")]
    for day in range(DAYS):
        same_day = [r for r in rows if int(r["day"]) == day]
        assert len({r["recent_rows"] for r in same_day}) == 1 and len({r["all_rows"] for r in same_day}) == 1
        assert int(same_day[0]["all_rows"]) >= int(same_day[0]["recent_rows"])
    frozen, live = (int(r["pool_size"]) for r in rows if int(r["day"]) == DAYS - 1 and r["case"] in "ab")
    assert live > frozen  # the live pool gained the previous day's samples
    day0 = {r["case"]: r for r in rows if r["day"] == "0"}
    assert day0["a"]["all_auc"] == day0["b"]["all_auc"] == day0["c"]["all_auc"]  # nothing has changed yet on day 0
    markdown = (out / "streaming.md").read_text()
    assert "template (deterministic rationale, not an LLM)" in markdown and "(c) model fine-tuned daily" in markdown
    assert markdown.strip() in printed


def test_the_summary_is_the_mean_and_sample_std_and_a_gain_must_exceed_two_of_them() -> None:
    runs = [RunResult("deepfm", s, a, 0.5, 3, 2, 1.0) for s, a in enumerate([0.70, 0.72, 0.74])]
    runs += [RunResult("deepfm+ict", s, a, 0.4, 3, 2, 1.0) for s, a in enumerate([0.75, 0.76, 0.77])]
    summary = summarise(runs)

    assert summary["deepfm"]["auc_mean"] == pytest.approx(0.72)
    assert summary["deepfm"]["auc_std"] == pytest.approx(np.std([0.70, 0.72, 0.74], ddof=1))
    (gain,) = ict_gains(summary)
    assert gain["gain"] == pytest.approx(0.04) and gain["two_std"] == pytest.approx(0.04)
    assert gain["beats"] is False  # 0.04 is not more than 2 x 0.02
    runs[3:] = [RunResult("deepfm+ict", s, a, 0.4, 3, 2, 1.0) for s, a in enumerate([0.77, 0.78, 0.79])]
    assert ict_gains(summarise(runs))[0]["beats"] is True


def test_slices_have_their_own_summary_and_gain_and_a_slice_without_an_auc_has_none() -> None:
    runs = [RunResult("din", s, 0.7, 0.5, 3, 2, 1.0, new, None) for s, new in enumerate([0.60, 0.62])]
    runs += [RunResult("din+ict", s, 0.7, 0.5, 3, 2, 1.0, new, None) for s, new in enumerate([0.70, 0.70])]
    summary = summarise(runs)
    assert summary["din"]["auc_new_items_mean"] == pytest.approx(0.61)
    assert summary["din"]["auc_new_items_std"] == pytest.approx(np.std([0.60, 0.62], ddof=1))
    gains = {g["rows"]: g for g in ict_gains(summary)}
    assert set(gains) == {"all", "new_items"}  # no unseen-user AUC in any run: no gain claimed there
    assert gains["new_items"]["gain"] == pytest.approx(0.09) and gains["new_items"]["beats"] is True
    assert gains["all"]["beats"] is False  # equal means


def test_a_row_is_on_a_new_item_within_the_window_after_the_items_first_interaction() -> None:
    day = DAY_MS
    corpus = SimpleNamespace(item_ids=["a", "b"], item=np.array([0, 1, 0, 1]),
                             ts_ms=np.array([0, 10 * day, 30 * day, 41 * day]))
    assert on_new_items(corpus, np.arange(4), 30.0).tolist() == [True, True, True, False]  # 31 days after b's first


def test_flags_left_out_keep_the_options_defaults_and_quick_values_and_given_flags_override_them() -> None:
    import re

    from llmcf.cli import build_parser
    from llmcf.commands.training import _evaluation_options

    parser = build_parser()
    assert _evaluation_options(parser.parse_args(["evaluate", "--threads", "1"])) == EvaluationOptions()
    assert _evaluation_options(parser.parse_args(["evaluate", "--quick", "--threads", "1"])) == EvaluationOptions.quick()
    given = _evaluation_options(parser.parse_args(["evaluate", "--quick", "--threads", "1", "--max-train-samples", "0",
                                                   "--epochs", "3", "--variants", "din", "din", "--weight-decay", "1e-4"]))
    assert (given.dataset, given.max_train_samples, given.fit.max_epochs, given.variants, given.fit.weight_decay) == \
        ("ml-100k", None, 3, ("din",), 1e-4)
    # every "(default N)" the help states is the options class's default
    evaluate = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("evaluate"))
    defaults = EvaluationOptions()
    from llmcf.commands.training import _EVALUATION_FLAGS, _FIT_FLAGS

    stated = 0
    for action in evaluate._actions:
        match = re.search(r"default (\d[\d.e-]*)", action.help or "")
        flag = action.dest
        if match and (flag in _EVALUATION_FLAGS or flag in _FIT_FLAGS):
            value = getattr(defaults, _EVALUATION_FLAGS[flag]) if flag in _EVALUATION_FLAGS else \
                getattr(defaults.fit, _FIT_FLAGS[flag])
            assert float(match.group(1)) == float(value or 0), flag
            stated += 1
    assert stated >= 10


def test_tune_ranks_the_grid_on_validation_and_resumes_from_its_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LLMCF_HOME", str(tmp_path))
    args = ["tune", "--quick", "--backbones", "deepfm", "--grid", "learning_rate=1e-3,3e-3", "user_tags=on,off",
            "--out", str(tmp_path / "reports")]
    assert main(args) == 0
    rows = read_csv(tmp_path / "reports" / "tune.csv")
    assert sorted((r["learning_rate"], r["user_tags"]) for r in rows) == sorted(
        (lr, tags) for lr in ("0.001", "0.003") for tags in ("True", "False"))
    aucs = [float(r["valid_auc"]) for r in rows]
    assert aucs == sorted(aucs, reverse=True) and all(0.0 < a < 1.0 for a in aucs)
    assert "the test split is not read" in (tmp_path / "reports" / "tune.md").read_text()
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("(cached)") == 4
    from llmcf.errors import UserFacingError
    from ranker.search import parse_grid

    with pytest.raises(UserFacingError, match="NAME=V1,V2"):
        parse_grid(["momentum=0.9"])
