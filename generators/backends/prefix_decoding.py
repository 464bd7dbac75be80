"""Batched CPU decoding with a shared-prefix KV cache, for Llama-architecture causal LMs (SmolLM2, Llama, TinyLlama).

Why not `model.generate`: on 2 CPU cores, for LLM-CF prompts, most of a chain of thought's cost is the prompt's prefill,
and in a batch the decoding steps are dominated by moving the KV cache, not by the weights:
- every prompt starts with the same instructions (`Prompt.instructions`): their keys and values are computed once per
  process (`PrefixDecoder.prefix`) and shared, never copied, by every row of every batch: attention reads them as one
  matrix for all rows (the rows' queries are stacked into one matrix product);
- transformers' DynamicCache concatenates the whole cache at every step (a copy of it per token); here each layer's
  cache is one tensor allocated for the batch's final length and written in place;
- each prompt's own part is prefilled alone (no padding computed); rows that finish leave the batch, so the last steps
  of a batch run on the rows still writing;
- grouped-query attention stays grouped: the query heads that share a key/value head are one matrix product with it;
- a decoding step's projections are weight @ rows^T (`few_rows_linear`), which MKL streams, rather than rows @ weight^T,
  for which it repacks every weight at every step.
The arithmetic is the model's own (its modules and weights: norms, projections, rotary positions, Llama's MLP, head);
only the order of floating-point operations in attention and in a decoding step's products differs from transformers'
path, so greedy output matches `model.generate` token for token in practice (tests/generators/test_backends.py checks
it on the real SmolLM2).

Layout of a batch's cache, per layer: rows x key/value heads x (longest own part + max_new_tokens) x head_dim. Own
parts are right-aligned (left padding, masked), so the token of decoding step t goes to the same column in every row.
Positions (rotary) count real tokens only: prefix, then the row's own part, then its generated tokens.

Lifecycle: build once per model (`PrefixDecoder.supports(model)` first), call from one thread; `prefix()` results may be
kept for the model's lifetime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

SUPPORTED_MODEL_TYPES = ("llama",)

Linear = Callable[[torch.nn.Linear, torch.Tensor], torch.Tensor]


def padded_rows(rows: int) -> int:
    """How many rows a decoding step's matrix products are computed for (MKL on 2 cores, 30 layers plus the head of
    SmolLM2 per step, measured: 1 row as 2 takes 32 ms instead of 49 (a matrix product instead of a single-threaded
    matrix-vector one); 12 to 15 rows as 16 take 69 ms instead of 90-150)."""
    if rows == 1:
        return 2
    if 12 <= rows < 16:
        return 16
    return rows


def few_rows_linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` for the few rows of a decoding step, computed as weight @ x^T: x @ weight^T, the usual order, has
    MKL pack the whole weight for every call, and a step reads every weight of the model once (at 16 rows: 97 vs 69 ms
    per step). The extra rows of `padded_rows` are zeros and are dropped."""
    rows = x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    padded = padded_rows(count)
    if padded != count:
        rows = torch.cat([rows, rows.new_zeros(padded - count, rows.shape[1])])
    out = torch.matmul(module.weight, rows.T).T[:count]
    if module.bias is not None:
        out = out + module.bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


@dataclass(frozen=True)
class Prefix:
    """A prompt prefix's token ids and, per layer, its keys and values (key/value heads x length x head_dim)."""

    token_ids: tuple[int, ...]
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Sampling:
    """Greedy when `temperature` is 0; otherwise softmax sampling at `temperature` within the top-p nucleus."""

    temperature: float
    top_p: float = 1.0


class PrefixDecoder:
    """Generates continuations of `prefix + own part` prompts for a Llama-architecture `model` (evaluation mode)."""

    def __init__(self, model: torch.nn.Module, eos_ids: list[int]):
        if not self.supports(model):
            raise ValueError(f"PrefixDecoder supports {', '.join(SUPPORTED_MODEL_TYPES)} models, not {model.config.model_type}")
        self.model = model
        self.decoder = model.model
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.group = self.heads // self.kv_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.decoder.layers[0].self_attn.scaling
        self.eos_ids = torch.tensor(eos_ids)

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """Whether `model` has the Llama layout this decoder drives (a plain decoder, no sliding window)."""
        config = model.config
        return config.model_type in SUPPORTED_MODEL_TYPES and getattr(config, "sliding_window", None) is None

    @torch.inference_mode()
    def prefix(self, token_ids: list[int]) -> Prefix:
        """Keys and values of `token_ids` (a prompt's shared beginning), computed once."""
        if not token_ids:
            empty = tuple(torch.zeros(self.kv_heads, 0, self.head_dim) for _ in self.decoder.layers)
            return Prefix((), empty, empty)
        ids = torch.tensor([token_ids])
        hidden = self.decoder.embed_tokens(ids)
        cos, sin = self.decoder.rotary_emb(hidden, torch.arange(len(token_ids))[None])
        keys, values = [], []
        for layer in self.decoder.layers:
            query, key, value = self._project(layer, hidden, cos, sin)
            attended = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, is_causal=True, scale=self.scale, enable_gqa=True
            )
            hidden = self._finish_layer(layer, hidden, attended)
            keys.append(key[0].contiguous())
            values.append(value[0].contiguous())
        return Prefix(tuple(token_ids), tuple(keys), tuple(values))

    @torch.inference_mode()
    def generate(
        self, prefix: Prefix, own_parts: list[list[int]], *, max_new_tokens: int, sampling: Sampling, candidates: int = 1
    ) -> list[list[list[int]]]:
        """For each own part, `candidates` continuations of prefix + own part: token ids up to and including the first
        end-of-sequence token, at most `max_new_tokens`. Sampling uses torch's global generator (seed it to repeat)."""
        if not own_parts:
            return []
        if any(not part for part in own_parts):
            raise ValueError("every prompt needs at least one token after the shared prefix")
        width = max(len(part) for part in own_parts)
        rows = len(own_parts) * candidates
        total = width + max_new_tokens
        keys = [torch.zeros(rows, self.kv_heads, total, self.head_dim) for _ in self.decoder.layers]
        values = [torch.zeros(rows, self.kv_heads, total, self.head_dim) for _ in self.decoder.layers]
        valid = torch.zeros(rows, total, dtype=torch.bool)
        first_logits = []
        for index, part in enumerate(own_parts):
            rows_of_part = slice(index * candidates, (index + 1) * candidates)
            start = width - len(part)
            own_keys, own_values, logits = self._prefill(prefix, part)
            for layer_keys, layer_values, key, value in zip(keys, values, own_keys, own_values, strict=True):
                layer_keys[rows_of_part, :, start:width] = key
                layer_values[rows_of_part, :, start:width] = value
            valid[rows_of_part, start:width] = True
            first_logits.append(logits.expand(candidates, -1))

        owner = torch.arange(rows)  # row -> index into the outputs (prompt * candidates + candidate)
        positions = torch.tensor([len(prefix) + len(part) for part in own_parts]).repeat_interleave(candidates)
        outputs: list[list[int]] = [[] for _ in range(rows)]
        tokens = self._sample(torch.cat(first_logits), sampling)
        for step in range(max_new_tokens):
            for row, token in zip(owner.tolist(), tokens.tolist(), strict=True):
                outputs[row].append(token)
            finished = torch.isin(tokens, self.eos_ids)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            if bool(finished.any()):
                keep = ~finished
                owner, tokens, positions, valid = owner[keep], tokens[keep], positions[keep], valid[keep]
                keys = [k[keep] for k in keys]
                values = [v[keep] for v in values]
            column = width + step
            valid[:, column] = True
            logits = self._decode_step(prefix, tokens, positions, keys, values, valid[:, : column + 1], column)
            positions = positions + 1
            tokens = self._sample(logits, sampling)
        return [outputs[i * candidates : (i + 1) * candidates] for i in range(len(own_parts))]

    def _prefill(self, prefix: Prefix, part: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """One prompt's own part after the prefix: its keys and values per layer, and the logits of its last token."""
        length = len(part)
        hidden = self.decoder.embed_tokens(torch.tensor([part]))
        cos, sin = self.decoder.rotary_emb(hidden, torch.arange(len(prefix), len(prefix) + length)[None])
        # Every own token sees the whole prefix and its own earlier tokens.
        mask = torch.ones(length, len(prefix) + length, dtype=torch.bool).tril(diagonal=len(prefix))
        keys, values = [], []
        for layer, prefix_key, prefix_value in zip(self.decoder.layers, prefix.keys, prefix.values, strict=True):
            query, key, value = self._project(layer, hidden, cos, sin)
            attended = torch.nn.functional.scaled_dot_product_attention(
                query,
                torch.cat([prefix_key[None], key], dim=2),
                torch.cat([prefix_value[None], value], dim=2),
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=True,
            )
            hidden = self._finish_layer(layer, hidden, attended)
            keys.append(key[0])
            values.append(value[0])
        return keys, values, self._logits(hidden[:, -1:])[:, -1]

    def _decode_step(
        self,
        prefix: Prefix,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        valid: torch.Tensor,
        column: int,
    ) -> torch.Tensor:
        """One token per row: writes its keys and values at `column`, returns the next-token logits (rows x vocabulary)."""
        rows = len(tokens)
        hidden = self.decoder.embed_tokens(tokens[:, None])
        cos, sin = self.decoder.rotary_emb(hidden, positions[:, None])
        masked = ~valid[:, None, None, :]
        prefix_length = len(prefix)
        for layer, layer_keys, layer_values, prefix_key, prefix_value in zip(
            self.decoder.layers, keys, values, prefix.keys, prefix.values, strict=True
        ):
            query, key, value = self._project(layer, hidden, cos, sin, few_rows_linear)
            layer_keys[:, :, column] = key[:, :, 0]
            layer_values[:, :, column] = value[:, :, 0]
            # rows x kv heads x group x head_dim: the query heads of a group share one key/value head.
            grouped = (query[:, :, 0] * self.scale).view(rows, self.kv_heads, self.group, self.head_dim)
            # The prefix is the same for every row: one (rows * group) x head_dim by head_dim x prefix product per head.
            stacked = grouped.transpose(0, 1).reshape(self.kv_heads, rows * self.group, self.head_dim)
            prefix_scores = torch.matmul(stacked, prefix_key.transpose(1, 2))
            prefix_scores = prefix_scores.view(self.kv_heads, rows, self.group, prefix_length).transpose(0, 1)
            own_keys = layer_keys[:, :, : column + 1]
            own_scores = torch.matmul(grouped, own_keys.transpose(2, 3)).masked_fill_(masked, float("-inf"))
            weights = torch.softmax(torch.cat([prefix_scores, own_scores], dim=-1), dim=-1)
            prefix_weights = weights[..., :prefix_length].transpose(0, 1).reshape(
                self.kv_heads, rows * self.group, prefix_length
            )
            from_prefix = torch.matmul(prefix_weights, prefix_value).view(self.kv_heads, rows, self.group, self.head_dim)
            attended = torch.matmul(weights[..., prefix_length:], layer_values[:, :, : column + 1])
            attended = attended + from_prefix.transpose(0, 1)
            hidden = self._finish_layer(
                layer, hidden, attended.reshape(rows, self.heads, 1, self.head_dim), few_rows_linear
            )
        return self._logits(hidden, few_rows_linear)[:, -1]

    def _project(
        self, layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        linear: Linear = torch.nn.Module.__call__,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values (batch x heads x tokens x head_dim) of a layer, rotary positions applied."""
        batch, length, _ = hidden.shape
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        query = linear(attention.q_proj, normed).view(batch, length, -1, self.head_dim).transpose(1, 2)
        key = linear(attention.k_proj, normed).view(batch, length, -1, self.head_dim).transpose(1, 2)
        value = linear(attention.v_proj, normed).view(batch, length, -1, self.head_dim).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        return query, key, value

    @staticmethod
    def _finish_layer(
        layer: torch.nn.Module, hidden: torch.Tensor, attended: torch.Tensor, linear: Linear = torch.nn.Module.__call__
    ) -> torch.Tensor:
        """Output projection and residual, then the MLP block (Llama's: down(act(gate(x)) * up(x))) and residual;
        `attended` is batch x heads x tokens x dim."""
        batch, _, length, _ = attended.shape
        hidden = hidden + linear(layer.self_attn.o_proj, attended.transpose(1, 2).reshape(batch, length, -1))
        mlp = layer.mlp
        normed = layer.post_attention_layernorm(hidden)
        return hidden + linear(mlp.down_proj, mlp.act_fn(linear(mlp.gate_proj, normed)) * linear(mlp.up_proj, normed))

    def _logits(self, hidden: torch.Tensor, linear: Linear = torch.nn.Module.__call__) -> torch.Tensor:
        return linear(self.model.lm_head, self.decoder.norm(hidden)).float()

    @staticmethod
    def _sample(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
        if sampling.temperature == 0:
            return logits.argmax(dim=-1)
        scaled = logits / sampling.temperature
        if sampling.top_p < 1.0:
            ordered, order = scaled.sort(dim=-1, descending=True)
            # Drop the tokens after the nucleus: those whose preceding cumulative probability already reaches top_p.
            outside = ordered.softmax(dim=-1).cumsum(dim=-1) - ordered.softmax(dim=-1) >= sampling.top_p
            scaled = scaled.scatter(-1, order, ordered.masked_fill(outside, float("-inf")))
        # Inverse-CDF sampling: one uniform number per row (torch.multinomial draws one exponential per vocabulary entry,
        # which costs more than the rest of a small model's step at batch 16).
        cumulative = scaled.softmax(dim=-1).cumsum(dim=-1)
        draws = torch.rand(len(cumulative), 1) * cumulative[:, -1:]
        return torch.searchsorted(cumulative, draws)[:, 0].clamp_(max=cumulative.shape[1] - 1)
