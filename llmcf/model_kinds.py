"""Model kinds: the one vocabulary that names a ranker variant, and its parser.

A kind is a backbone (DeepFM or DIN) with or without LLM-CF's in-context chain-of-thought module: `deepfm`,
`deepfm+ict`, `din`, `din+ict`. Settings (`LLMCF_RANKER_KIND`), the CLI's choices, `model_versions.kind`, evaluation
variants and the server all use these names; they parse them here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

Backbone = Literal["deepfm", "din"]
BACKBONES: tuple[Backbone, ...] = ("deepfm", "din")
_ICT_SUFFIX = "+ict"
MODEL_KINDS: tuple[str, ...] = tuple(name for backbone in BACKBONES for name in (backbone, backbone + _ICT_SUFFIX))


@dataclass(frozen=True)
class ModelKind:
    backbone: Backbone
    ict: bool

    @classmethod
    def parse(cls, name: str) -> ModelKind:
        """`'din+ict'` -> `ModelKind('din', True)`; ValueError naming the kinds for anything else."""
        if name not in MODEL_KINDS:
            raise ValueError(f"unknown model kind {name!r}: one of {', '.join(MODEL_KINDS)}")
        return cls(cast(Backbone, name.removesuffix(_ICT_SUFFIX)), name.endswith(_ICT_SUFFIX))

    @property
    def name(self) -> str:
        return self.backbone + _ICT_SUFFIX if self.ict else self.backbone

    def __str__(self) -> str:
        return self.name
