"""The ranking model: DeepFM or DIN, alone or with LLM-CF's In-context Chain-of-Thought (ICT) module.

ICT, as the paper has it (../shared/docs/llm-cf.md): K=4 retrieved examples give 3 tokens each, in this order:
- a feature token: an MLP over the example's field embeddings (user id, item id, item-text embedding mapped down, tags,
  mean-pooled history ids, history-text embedding mapped down, and, where the model has them, mean-pooled user tags
  and the liked history); the embedding tables are the backbone's own;
- a CoT token: the frozen CoT embedding (384-d MiniLM here; 768-d in the paper) through an MLP 384->256->d, or a learned
  placeholder while the example's CoT is still pending;
- a label token: a learned 2 x d table;
then the current sample's feature token: 13 tokens. A 2-layer LLaMA-style decoder (pre-RMSNorm, rotary positions, causal
attention with 2 heads, SwiGLU FFN of hidden 2d, d=32) reads them; the last position's hidden state w joins the backbone
(DeepFM: concatenated to the deep MLP input plus a linear of w added to the wide logit; DIN: appended to the final FC
input). Reconstruction: the hidden states at the examples' feature-token positions go through a reverse MLP d->256->384,
and L_rec = 1 - mean cosine with the examples' raw CoT embeddings (pending and missing examples excluded).

Missing examples (fewer than K found) are masked out as attention keys, so they cannot change any other position; every
position may attend to itself, so no softmax row is empty. The forward pass has no data-dependent Python control flow:
it exports to ONNX (opset 17) as one static graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from llmcf.embeddings import EMBEDDING_DIMENSION
from llmcf.model_kinds import BACKBONES, Backbone, ModelKind
from ranker.features import EXAMPLE_ROW_INPUTS, EXAMPLES, LIKED, NOT_LIKED, SAMPLE_INPUTS, input_specs, model_inputs

FIELDS = 6  # user, item, tags, item text, history ids, history text (+ user tags, liked history: `ModelConfig.fields`)
TOKENS_PER_EXAMPLE = 3
_MASKED_SCORE = -1e9  # exp() of this underflows to exactly 0 in float32: masked keys get exactly zero weight


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network (saved in the artifact's manifest)."""

    backbone: Backbone
    ict: bool
    n_users: int
    n_items: int
    n_tags: int
    n_user_tags: int = 0  # 0: no user-tag (demographics) field, as for a corpus without profiles and older artifacts
    history_labels: bool = False  # the liked-history field (False in artifacts saved before it existed)
    field_dim: int = 16
    ict_dim: int = 32
    ict_layers: int = 2
    ict_heads: int = 2
    cot_hidden: int = 256
    text_dim: int = EMBEDDING_DIMENSION
    cot_dim: int = EMBEDDING_DIMENSION
    examples: int = EXAMPLES
    mlp_hidden: tuple[int, ...] = (128, 64)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.ict_dim % self.ict_heads or (self.ict_dim // self.ict_heads) % 2:
            raise ValueError("ict_dim must split into heads of an even size (rotary embeddings rotate pairs)")

    @property
    def kind(self) -> str:
        """The model_versions kind: 'deepfm', 'deepfm+ict', 'din', 'din+ict'."""
        return ModelKind(self.backbone, self.ict).name

    @property
    def fields(self) -> int:
        """Field vectors per sample: `FIELDS`, plus the user tags' and the liked history's when the model has them."""
        return FIELDS + (1 if self.n_user_tags else 0) + (1 if self.history_labels else 0)

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in input_specs(self.ict, self.n_user_tags > 0, self.history_labels)]

    @property
    def sample_input_names(self) -> list[str]:
        """The `SAMPLE_INPUTS` this model takes (the query scorer's sample inputs)."""
        return [spec.name for spec in model_inputs(SAMPLE_INPUTS, self.n_user_tags > 0, self.history_labels)]

    @property
    def example_row_input_names(self) -> list[str]:
        """The `EXAMPLE_ROW_INPUTS` this model takes (the example encoder's inputs)."""
        return [spec.name for spec in model_inputs(EXAMPLE_ROW_INPUTS, self.n_user_tags > 0, self.history_labels)]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ModelConfig:
        values = dict(data)
        values["mlp_hidden"] = tuple(values["mlp_hidden"])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]


@dataclass
class RankerOutput:
    logit: Tensor  # (B,)
    ict_hidden: Tensor | None  # (B, 13, d) decoder states; None without ICT


def mlp(sizes: list[int], final_activation: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class FieldEmbedder(nn.Module):
    """Turns a sample's (or an example's) inputs into `config.fields` vectors of `field_dim`; works on any leading
    shape. The user-tag and liked-history fields, where the model has them, come last (DIN reads the item field at
    index 1). The liked history is the mean embedding of the history items the user liked plus a linear map of the
    liked share among the history entries with a known label: the user's taste and their propensity to like, which
    the label (rating >= 4) depends on and which no id embedding gives for a user absent from training."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e = config.field_dim
        self.user = nn.Embedding(config.n_users, e)
        self.item = nn.Embedding(config.n_items, e)
        self.tag = nn.Embedding(config.n_tags, e)
        self.item_text = nn.Linear(config.text_dim, e)
        self.history_text = nn.Linear(config.text_dim, e)
        self.user_tag = nn.Embedding(config.n_user_tags, e) if config.n_user_tags else None
        self.liked_share = nn.Linear(1, e) if config.history_labels else None
        for table in (self.user, self.item, self.tag, self.user_tag):
            if table is not None:
                nn.init.normal_(table.weight, std=0.05)

    def forward(self, user: Tensor, item: Tensor, item_tags: Tensor, item_text: Tensor, history: Tensor,
                history_mask: Tensor, history_text: Tensor, user_tags: Tensor | None = None,
                history_label: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(..., fields, E) field vectors and (..., L, E) history item embeddings (for DIN's attention)."""
        history_items = self.item(history)
        mask = history_mask.unsqueeze(-1)
        history_pooled = (history_items * mask).sum(-2) / mask.sum(-2).clamp(min=1.0)
        vectors = [self.user(user), self.item(item), _mean_of_present(self.tag, item_tags), self.item_text(item_text),
                   history_pooled, self.history_text(history_text)]
        if self.user_tag is not None:
            if user_tags is None:
                raise ValueError("this model has a user-tag field: its inputs need user_tags")
            vectors.append(_mean_of_present(self.user_tag, user_tags))
        if self.liked_share is not None:
            if history_label is None:
                raise ValueError("this model has a liked-history field: its inputs need history_label")
            liked = (history_label == LIKED).to(torch.float32).unsqueeze(-1)
            known = (history_label >= NOT_LIKED).to(torch.float32).unsqueeze(-1)
            liked_pooled = (history_items * liked).sum(-2) / liked.sum(-2).clamp(min=1.0)
            share = liked.sum(-2) / known.sum(-2).clamp(min=1.0)
            vectors.append(liked_pooled + self.liked_share(share))
        return torch.stack(vectors, dim=-2), history_items


def _mean_of_present(table: nn.Embedding, indices: Tensor) -> Tensor:
    """The mean embedding of the non-zero indices on the last axis (zeros when there are none)."""
    mask = (indices > 0).to(torch.float32).unsqueeze(-1)
    return (table(indices) * mask).sum(-2) / mask.sum(-2).clamp(min=1.0)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class DecoderLayer(nn.Module):
    """LLaMA block: x + Attention(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)); rotary positions on queries and keys."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.attention_norm = RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.ffn_norm = RMSNorm(dim)
        self.gate = nn.Linear(dim, 2 * dim, bias=False)
        self.up = nn.Linear(dim, 2 * dim, bias=False)
        self.down = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, score_bias: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, tokens, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + score_bias
        attended = torch.softmax(scores, dim=-1) @ v
        x = x + self.out(attended.transpose(1, 2).reshape(batch, tokens, dim))
        h = self.ffn_norm(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class ICTModule(nn.Module):
    """The In-context Chain-of-Thought module: 13 tokens -> causal decoder -> w (B, d) and the reconstruction loss."""

    # Buffers (`register_buffer`): declared so that the type checker reads them as tensors, not as submodules.
    cos: Tensor
    sin: Tensor
    causal: Tensor
    diagonal: Tensor
    feature_positions: Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.ict_dim
        self.examples = config.examples
        self.feature_token = mlp([config.fields * config.field_dim, 2 * d, d])
        self.cot_token = mlp([config.cot_dim, config.cot_hidden, d])
        self.cot_placeholder = nn.Parameter(torch.zeros(d))
        self.label_token = nn.Embedding(2, d)
        self.layers = nn.ModuleList(DecoderLayer(d, config.ict_heads) for _ in range(config.ict_layers))
        self.norm = RMSNorm(d)
        self.reconstruct = mlp([d, config.cot_hidden, config.cot_dim])
        nn.init.normal_(self.cot_placeholder, std=0.02)

        tokens = TOKENS_PER_EXAMPLE * config.examples + 1
        head_dim = d // config.ict_heads
        inverse_frequency = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(tokens, dtype=torch.float32), inverse_frequency)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        causal = torch.tril(torch.ones(tokens, tokens, dtype=torch.bool))
        self.register_buffer("causal", causal, persistent=False)
        self.register_buffer("diagonal", torch.eye(tokens, dtype=torch.bool), persistent=False)
        feature_positions = torch.arange(config.examples) * TOKENS_PER_EXAMPLE
        self.register_buffer("feature_positions", feature_positions, persistent=False)

    def example_tokens(self, example_fields: Tensor, cot: Tensor, label: Tensor, cot_ready: Tensor) -> Tensor:
        """(..., 3, d): an example's [feature, CoT, label] tokens, from its own inputs alone (any leading shape): what
        the served example encoder computes once per pool sample."""
        features = self.feature_token(example_fields.flatten(-2))
        ready = cot_ready.unsqueeze(-1)
        cots = ready * self.cot_token(cot) + (1.0 - ready) * self.cot_placeholder
        return torch.stack([features, cots, self.label_token(label)], dim=-2)

    def decode(self, example_tokens: Tensor, current_fields: Tensor, present: Tensor) -> Tensor:
        """The decoder's final hidden states (B, 13, d) over (B, K, 3, d) example tokens then the current sample's
        feature token; the last position is w."""
        batch = current_fields.shape[0]
        current = self.feature_token(current_fields.flatten(-2)).unsqueeze(1)
        x = torch.cat([example_tokens.reshape(batch, -1, example_tokens.shape[-1]), current], dim=1)
        key_valid = torch.cat(
            [present.repeat_interleave(TOKENS_PER_EXAMPLE, dim=1), torch.ones_like(present[:, :1])], dim=1
        ) > 0.5  # (B, 13)
        allowed = self.causal & (key_valid[:, None, :] | self.diagonal)  # (B, 13, 13)
        score_bias = torch.where(allowed, 0.0, _MASKED_SCORE).to(x.dtype).unsqueeze(1)  # (B, 1, 13, 13)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin, score_bias)
        return self.norm(x)

    def forward(self, example_fields: Tensor, current_fields: Tensor, cot: Tensor, label: Tensor, cot_ready: Tensor,
                present: Tensor) -> Tensor:
        """The decoder's final hidden states (B, 13, d); the last position is w."""
        return self.decode(self.example_tokens(example_fields, cot, label, cot_ready), current_fields, present)

    def reconstruction_loss(self, hidden: Tensor, cot: Tensor, cot_ready: Tensor, present: Tensor) -> Tensor:
        """L_rec = 1 - mean cosine between each example's reconstructed and raw CoT embedding, over the examples that
        exist and have a CoT. The feature-token state sees earlier examples and its own features, never its own CoT.
        Training only: the served graph does not compute it."""
        predicted = self.reconstruct(hidden[:, self.feature_positions])  # (B, K, cot_dim)
        cosine = nn.functional.cosine_similarity(predicted, cot, dim=-1, eps=1e-8)
        weight = cot_ready * present
        return ((1.0 - cosine) * weight).sum() / weight.sum().clamp(min=1.0)


class DeepFM(nn.Module):
    """Wide (first-order biases + w-linear) + FM over the fields + a deep MLP over the concatenated fields (and w)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.user_bias = nn.Embedding(config.n_users, 1)
        self.item_bias = nn.Embedding(config.n_items, 1)
        self.tag_bias = nn.Embedding(config.n_tags, 1)
        for table in (self.user_bias, self.item_bias, self.tag_bias):
            nn.init.zeros_(table.weight)
        self.bias = nn.Parameter(torch.zeros(1))
        extra = config.ict_dim if config.ict else 0
        self.deep = mlp([config.fields * config.field_dim + extra, *config.mlp_hidden, 1])
        self.wide_w = nn.Linear(config.ict_dim, 1, bias=False) if config.ict else None

    def forward(self, fields: Tensor, history_items: Tensor, inputs: dict[str, Tensor], w: Tensor | None) -> Tensor:
        tags = inputs["item_tags"]
        tag_mask = (tags > 0).to(torch.float32)
        tag_bias = (self.tag_bias(tags).squeeze(-1) * tag_mask).sum(-1) / tag_mask.sum(-1).clamp(min=1.0)
        wide = self.bias + self.user_bias(inputs["user"]).squeeze(-1) + self.item_bias(inputs["item"]).squeeze(-1) + tag_bias
        fm = 0.5 * (fields.sum(1).pow(2) - fields.pow(2).sum(1)).sum(-1)
        deep_in = fields.flatten(1)
        if w is not None and self.wide_w is not None:
            deep_in = torch.cat([deep_in, w], dim=-1)
            wide = wide + self.wide_w(w).squeeze(-1)
        return wide + fm + self.deep(deep_in).squeeze(-1)


class DIN(nn.Module):
    """Deep Interest Network: an activation unit weighs each history item against the target item (sum pooling, no
    softmax, as in DIN); the final FC reads the fields, the attended interest (and w)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e = config.field_dim
        self.attention = mlp([4 * e, 64, 32, 1])
        extra = config.ict_dim if config.ict else 0
        self.final = mlp([(config.fields + 1) * e + extra, *config.mlp_hidden, 1])

    def forward(self, fields: Tensor, history_items: Tensor, inputs: dict[str, Tensor], w: Tensor | None) -> Tensor:
        target = fields[:, 1:2].expand_as(history_items)  # the item-id field is the query
        unit_in = torch.cat([target, history_items, target - history_items, target * history_items], dim=-1)
        weights = self.attention(unit_in).squeeze(-1) * inputs["history_mask"]  # (B, L)
        interest = (weights.unsqueeze(-1) * history_items).sum(1)
        final_in = torch.cat([fields.flatten(1), interest], dim=-1)
        if w is not None:
            final_in = torch.cat([final_in, w], dim=-1)
        return self.final(final_in).squeeze(-1)


class RankerModel(nn.Module):
    """Backbone (DeepFM or DIN), optionally with ICT. `forward(inputs)` takes the feature pipeline's named tensors."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.fields = FieldEmbedder(config)
        self.backbone: nn.Module = DeepFM(config) if config.backbone == "deepfm" else DIN(config)
        self.ict = ICTModule(config) if config.ict else None

    def forward(self, inputs: dict[str, Tensor]) -> RankerOutput:
        fields, history_items = self._sample_fields(inputs)
        hidden = None
        if self.ict is not None:
            hidden = self.ict.decode(self.example_tokens(inputs), fields, inputs["ex_present"])
        w = None if hidden is None else hidden[:, -1]
        return RankerOutput(self.backbone(fields, history_items, inputs, w), hidden)

    def example_tokens(self, inputs: dict[str, Tensor]) -> Tensor:
        """(..., 3, d) tokens of examples given by their `ex_*` inputs, any leading shape (ICT models only)."""
        if self.ict is None:
            raise ValueError(f"a {self.config.kind} model has no in-context examples")
        example_fields, _ = self.fields(
            inputs["ex_user"], inputs["ex_item"], inputs["ex_item_tags"], inputs["ex_item_text"],
            inputs["ex_history"], inputs["ex_history_mask"], inputs["ex_history_text"], inputs.get("ex_user_tags"),
            inputs.get("ex_history_label"),
        )
        return self.ict.example_tokens(example_fields, inputs["ex_cot"], inputs["ex_label"], inputs["ex_cot_ready"])

    def score_with_tokens(self, inputs: dict[str, Tensor], tokens: Tensor, present: Tensor) -> Tensor:
        """The logit from the sample inputs and precomputed (B, K, 3, d) example tokens: `forward` split in two."""
        fields, history_items = self._sample_fields(inputs)
        if self.ict is None:
            raise ValueError(f"a {self.config.kind} model has no in-context examples")
        w = self.ict.decode(tokens, fields, present)[:, -1]
        return self.backbone(fields, history_items, inputs, w)

    def _sample_fields(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.fields(
            inputs["user"], inputs["item"], inputs["item_tags"], inputs["item_text"], inputs["history"],
            inputs["history_mask"], inputs["history_text"], inputs.get("user_tags"), inputs.get("history_label"),
        )

    def loss(self, inputs: dict[str, Tensor], labels: Tensor, reconstruction_weight: float = 1.0
             ) -> tuple[Tensor, Tensor, Tensor]:
        """(total, BCE, L_rec): total = BCE + lambda * L_rec (L_rec is 0 without ICT)."""
        output = self(inputs)
        bce = nn.functional.binary_cross_entropy_with_logits(output.logit, labels)
        if self.ict is None or output.ict_hidden is None:
            return bce, bce, torch.zeros((), dtype=bce.dtype)
        reconstruction = self.ict.reconstruction_loss(
            output.ict_hidden, inputs["ex_cot"], inputs["ex_cot_ready"], inputs["ex_present"]
        )
        return bce + reconstruction_weight * reconstruction, bce, reconstruction


class _PositionalGraph(nn.Module):
    """A module for `torch.onnx.export`, which hands the inputs over by position: `names` are theirs, in order."""

    def __init__(self, model: RankerModel, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def named(self, tensors: Sequence[Tensor], strict: bool = True) -> dict[str, Tensor]:
        return dict(zip(self.names, tensors, strict=strict))


class ScoringGraph(_PositionalGraph):
    """What is exported: positional inputs in `config.input_names` order -> `score` (B,), the click probability."""

    def __init__(self, model: RankerModel) -> None:
        super().__init__(model, model.config.input_names)

    def forward(self, *tensors: Tensor) -> Tensor:
        return torch.sigmoid(self.model(self.named(tensors, strict=False)).logit)


class ExampleEncoderGraph(_PositionalGraph):
    """The served example encoder: one pool sample's `ex_*` inputs (P rows, no K axis) -> `tokens` (P, 3, d)."""

    def __init__(self, model: RankerModel) -> None:
        super().__init__(model, model.config.example_row_input_names)

    def forward(self, *tensors: Tensor) -> Tensor:
        return self.model.example_tokens(self.named(tensors))


class QueryScorerGraph(_PositionalGraph):
    """The served query scorer: the sample inputs, `ex_tokens` (B, K, 3, d) and `ex_present` -> `score` (B,)."""

    def __init__(self, model: RankerModel) -> None:
        super().__init__(model, model.config.sample_input_names)

    def forward(self, *tensors: Tensor) -> Tensor:
        *sample, tokens, present = tensors
        return torch.sigmoid(self.model.score_with_tokens(self.named(sample), tokens, present))
