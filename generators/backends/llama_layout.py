"""The Llama-architecture module layout that `prefix_decoding.PrefixDecoder` drives, as types: transformers builds its
models from `torch.nn.Module` attributes, which type checkers see only as "a tensor or a module", so these protocols
name the parts the decoder reads (config, embeddings, rotary positions, layers, norms, projections, head), and
`llama_layout` is the one place a loaded model is taken to have them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, cast

import torch

Transform = Callable[[torch.Tensor], torch.Tensor]


class LlamaConfig(Protocol):
    model_type: str
    num_attention_heads: int
    num_key_value_heads: int
    hidden_size: int


class LlamaAttention(Protocol):
    q_proj: torch.nn.Linear
    k_proj: torch.nn.Linear
    v_proj: torch.nn.Linear
    o_proj: torch.nn.Linear
    scaling: float


class LlamaMlp(Protocol):
    gate_proj: torch.nn.Linear
    up_proj: torch.nn.Linear
    down_proj: torch.nn.Linear
    act_fn: Transform


class LlamaLayer(Protocol):
    self_attn: LlamaAttention
    mlp: LlamaMlp
    input_layernorm: Transform
    post_attention_layernorm: Transform


class RotaryEmbedding(Protocol):
    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class LlamaDecoder(Protocol):
    embed_tokens: Transform
    rotary_emb: RotaryEmbedding
    layers: Sequence[LlamaLayer]
    norm: Transform


class LlamaCausalLM(Protocol):
    config: LlamaConfig
    model: LlamaDecoder
    lm_head: torch.nn.Linear

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...


def llama_layout(model: torch.nn.Module) -> LlamaCausalLM:
    """`model` seen through the Llama layout (check `PrefixDecoder.supports(model)` first: nothing is checked here)."""
    return cast(LlamaCausalLM, model)
