"""What `llmcf evaluate` compares and on which rows: the variants, the offline CoT pools, the test slices (which rows
are on new items), the streaming cases, and `EvaluationOptions` (its caps and schedules, and their description in the
reports). The runs themselves: `ranker.evaluation` (offline) and `ranker.evaluation_streaming` (the replay)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmcf.errors import UserFacingError
from llmcf.model_kinds import MODEL_KINDS
from ranker.cot_pool import LLM_FILE_COTS
from ranker.data import Corpus
from ranker.options import FitOptions

VARIANTS = MODEL_KINDS  # every model kind is an evaluation variant
COT_POOLS = {
    "uniform": "a uniform --pool-rate of the training rows, CoTs from --cot-backend",
    "llm": "the rows of the LLM CoT file (`llmcf cots`), with the CoTs the LLM wrote",
    "llm-rows-template": "the rows of the LLM CoT file, with template CoTs (not an LLM): the control for `llm`",
    "llm-rows-no-cot": "the rows of the LLM CoT file, without CoTs (the ICT module's CoT token is its placeholder)",
}
# What each offline pool's CoTs are, for `ranker.cot_pool.llm_file_pool` and the reports' `cot_backend` column.
FILE_POOL_COTS = {"llm": "llm", "llm-rows-template": "template", "llm-rows-no-cot": "none"}
DAY_MS = 86_400_000
TEST_SLICES = {
    "new_items": "rows on new items (the item's first interaction in the data at most --new-item-window-days earlier)",
    "unseen_users": "rows of users who have no row among the training rows trained on",
}
STREAM_CASES = {
    "a": "frozen model, frozen pool (day 0)",
    "b": "frozen model, live pool",
    "c": "model fine-tuned daily, live pool",
}


@dataclass(frozen=True)
class EvaluationOptions:
    """Caps and schedules of `llmcf evaluate` (defaults: see `--help`). The defaults are the full-scale table: every
    training row, 20,000 validation and 20,000 test rows, up to 10 epochs with early stopping, 5 seeds. `quick()` is
    the small configuration the test suite runs (ml-100k, seconds per run)."""

    dataset: str = "ml-1m"
    seeds: int = 5
    variants: tuple[str, ...] = VARIANTS
    max_train_samples: int | None = None
    max_eval_samples: int | None = 20_000
    fit: FitOptions = FitOptions(max_epochs=10)  # every run's and the replay's frozen model's; a run sets its seed
    field_dim: int = 16
    user_tags: bool = True  # the demographics field, where the dataset ships demographics
    history_labels: bool = True  # the liked-history field
    pool_rate: float = 0.1
    cot_backend: str = "template"
    cot_pools: tuple[str, ...] = ("uniform",)
    cot_file: Path | None = None
    threads: int = 1
    offline: bool = True
    streaming: bool = False
    days: int = 7
    start_fraction: float = 0.3
    new_item_window_days: float = 30.0
    stream_kind: str = "deepfm+ict"
    update_window_days: float = 7.0
    update_max_samples: int = 20_000
    max_day_rows: int = 1_000
    update_epochs: int = 1
    update_learning_rate: float = 5e-4

    def __post_init__(self) -> None:
        unknown = [v for v in (*self.variants, self.stream_kind) if v not in VARIANTS]
        if unknown:
            raise UserFacingError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
        if not 0 < self.start_fraction < 1:
            raise UserFacingError(f"start fraction {self.start_fraction} must be in (0, 1)")
        if self.seeds < 1 or self.days < 1:
            raise UserFacingError("seeds and days must be at least 1")
        unknown = [p for p in self.cot_pools if p not in COT_POOLS]
        if unknown or not self.cot_pools:
            raise UserFacingError(f"unknown CoT pool(s) {', '.join(unknown) or '(none given)'}: choose from "
                                  f"{', '.join(COT_POOLS)}")
        if self.cot_pools != ("uniform",) and self.streaming:
            raise UserFacingError("--cot-pool other than uniform is for the offline table; the streaming replay's "
                                  "pool grows by the stream's own choice of rows (--cot-pool uniform)")

    @classmethod
    def quick(cls) -> EvaluationOptions:
        """`--quick`: ml-100k, the latest 1,500 training rows, 300 validation and test rows, one epoch, 2 seeds, a
        2-day replay: every code path of the full table in about a minute, for the test suite and a first try."""
        return cls(dataset="ml-100k", seeds=2, max_train_samples=1_500, max_eval_samples=300, fit=FitOptions(max_epochs=1), days=2,
                   update_max_samples=800, max_day_rows=300)

    def llm_cot_file(self) -> Path:
        from ranker.llm_cots import default_path

        return self.cot_file or default_path(self.dataset)

    def pool_label(self, pool: str) -> str:
        """The offline CoT pool `pool` in words, for the reports."""
        if pool == "uniform":
            return f"uniform {self.pool_rate:g} of train, CoTs: {backend_label(self.cot_backend)}"
        return (f"the rows of {self.llm_cot_file().name} (a seeded sample of all training rows), "
                f"{LLM_FILE_COTS[FILE_POOL_COTS[pool]]}")

    def pool_backend(self, pool: str) -> str:
        """What wrote the CoTs of `pool`: the reports' `cot_backend` column."""
        return self.cot_backend if pool == "uniform" else FILE_POOL_COTS[pool]

    def caps(self) -> str:
        def cap(value: int | None) -> str:
            return "all" if value is None else f"{value:,}"

        train = "all" if self.max_train_samples is None else f"latest {self.max_train_samples:,}"
        return (f"train rows: {train}; validation and test rows: {cap(self.max_eval_samples)} "
                f"each; at most {self.fit.max_epochs} epochs (early stopping, patience {self.fit.patience}); batch "
                f"{self.fit.batch_size}; Adam lr {self.fit.learning_rate:g}, weight decay {self.fit.weight_decay:g}; field dim "
                f"{self.field_dim}; demographics {'on' if self.user_tags else 'off'}; liked history "
                f"{'on' if self.history_labels else 'off'}; CoT pool" + (
                    f": {self.pool_label(self.cot_pools[0])}" if len(self.cot_pools) == 1 else
                    "s: " + "; ".join(f"{pool} = {self.pool_label(pool)}" for pool in self.cot_pools)))


def backend_label(backend: str) -> str:
    return "template (deterministic rationale, not an LLM)" if backend == "template" else backend


def first_seen_ms(corpus: Corpus) -> np.ndarray:
    """Per item code: the time of its first interaction in the corpus."""
    first_seen = np.full(len(corpus.item_ids), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first_seen, corpus.item, corpus.ts_ms)
    return first_seen


def on_new_items(corpus: Corpus, rows: np.ndarray, window_days: float, first_seen: np.ndarray | None = None) -> np.ndarray:
    """Which `rows` are on a new item: one whose first interaction is at most `window_days` before the row's."""
    first_seen = first_seen_ms(corpus) if first_seen is None else first_seen
    return corpus.ts_ms[rows] - first_seen[corpus.item[rows]] <= window_days * DAY_MS
