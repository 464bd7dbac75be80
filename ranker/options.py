"""What the ranker's training commands are told: how a model is fitted (`FitOptions`), and the options of `llmcf
train` (`TrainOptions`) and `llmcf update` (`UpdateOptions`), which hold a `FitOptions` rather than copies of its fields.

Dataclasses only, no torch: `llmcf --help` takes its flag defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmcf.errors import UserFacingError
from llmcf.model_kinds import Backbone, ModelKind


@dataclass(frozen=True)
class FitOptions:
    """What `ranker.fitting.fit` needs: the optimiser, the epochs and early stopping, and the seed of the shuffling."""

    max_epochs: int = 20
    patience: int = 2
    batch_size: int = 512
    learning_rate: float = 1e-3
    reconstruction_weight: float = 1.0
    seed: int = 0
    weight_decay: float = 0.0


@dataclass(frozen=True)
class TrainOptions:
    """One training run. `dataset` None = read the database (`DATABASE_URL`); `fit.seed` also seeds the pool sample
    and the initialisation."""

    dataset: str | None = "ml-1m"
    backbone: Backbone = "deepfm"
    ict: bool = True
    max_train_samples: int | None = 100_000
    max_eval_samples: int | None = 20_000
    pool_rate: float = 0.1
    cot_backend: str = "template"
    fit: FitOptions = field(default_factory=FitOptions)
    threads: int = 1  # one thread per process: two fighting other work ran 10-18x slower
    register: bool = True

    def __post_init__(self) -> None:
        if not 128 <= self.fit.batch_size <= 4096:
            raise UserFacingError(f"batch size {self.fit.batch_size} is outside 128..4096")
        if not 0 < self.pool_rate <= 1:
            raise UserFacingError(f"pool rate {self.pool_rate} must be in (0, 1]")


@dataclass(frozen=True)
class UpdateOptions:
    """One updater's configuration (settings `LLMCF_UPDATE_*`, flags override them). `fit` is how a round fine-tunes
    the serving model; a round with no serving model trains from scratch for `scratch_max_epochs`."""

    kind: str = "deepfm+ict"
    window_s: float = 7 * 86400
    max_samples: int = 100_000
    holdout_fraction: float = 0.1
    max_auc_drop: float = 0.0
    max_pool_samples: int = 100_000
    fit: FitOptions = FitOptions(max_epochs=3, patience=1, learning_rate=5e-4)
    scratch_max_epochs: int = FitOptions.max_epochs
    threads: int = 1  # one thread per process: two fighting other work ran 10-18x slower

    def __post_init__(self) -> None:
        try:
            ModelKind.parse(self.kind)
        except ValueError as exc:
            raise UserFacingError(str(exc)) from None
        if not 0 < self.holdout_fraction < 0.5:
            raise UserFacingError(f"holdout fraction {self.holdout_fraction} must be in (0, 0.5)")
        if self.max_auc_drop < 0:
            raise UserFacingError(f"max AUC drop {self.max_auc_drop} must not be negative")

    @property
    def backbone(self) -> Backbone:
        return ModelKind.parse(self.kind).backbone

    @property
    def ict(self) -> bool:
        return ModelKind.parse(self.kind).ict
