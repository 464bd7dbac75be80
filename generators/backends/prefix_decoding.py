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

Layout of a batch's cache, per layer: rows x key/value heads x (longest own part + max_new_tokens [+ draft tokens]) x
head_dim. Own parts are right-aligned (left padding, masked); each row then writes its generated tokens from the same
column on, at its own pace (`written`): one token per pass in plain decoding, a token and the drafts kept with it in
speculative decoding (`Drafter`, `Acceptance`; the drafts a pass refuses are masked and overwritten by the next one).
Every pass attends over the whole allocated width, the columns not yet written masked: a slice of the first columns
would be copied before each product.
Positions (rotary) count real tokens only: prefix, then the row's own part, then its generated tokens. A bfloat16 model
decodes with bfloat16 caches (softmax in float32).

Lifecycle: build once per model (`PrefixDecoder.supports(model)` first), call from one thread; `prefix()` results may be
kept for the model's lifetime.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from generators.backends.llama_layout import LlamaLayer, llama_layout
from generators.backends.sampling import Acceptance, Sampling, sample

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
    if not isinstance(module.weight, torch.Tensor):  # a dynamically quantized (int8) layer: its own kernel
        return module(x)
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


class PrefixDecoder:
    """Generates continuations of `prefix + own part` prompts for a Llama-architecture `model` (evaluation mode)."""

    def __init__(self, model: torch.nn.Module, eos_ids: list[int]):
        if not self.supports(model):
            raise ValueError(f"PrefixDecoder supports {', '.join(SUPPORTED_MODEL_TYPES)} models, "
                             f"not {llama_layout(model).config.model_type}")
        self.model = llama_layout(model)
        self.decoder = self.model.model
        config = self.model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.group = self.heads // self.kv_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.decoder.layers[0].self_attn.scaling
        self.dtype = next(self.model.parameters()).dtype  # the caches' too (bfloat16 models decode in bfloat16)
        self.seconds = {"prefill": 0.0, "decode": 0.0}  # wall time spent in each phase since construction (benchmarks)
        self._eos = frozenset(eos_ids)

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """Whether `model` has the Llama layout this decoder drives (a plain decoder, no sliding window)."""
        config = llama_layout(model).config
        return config.model_type in SUPPORTED_MODEL_TYPES and getattr(config, "sliding_window", None) is None

    @torch.inference_mode()
    def prefix(self, token_ids: list[int]) -> Prefix:
        """Keys and values of `token_ids` (a prompt's shared beginning), computed once."""
        if not token_ids:
            empty = tuple(torch.zeros(self.kv_heads, 0, self.head_dim, dtype=self.dtype) for _ in self.decoder.layers)
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
        self, prefix: Prefix, own_parts: list[list[int]], *, max_new_tokens: int, sampling: Sampling, candidates: int = 1,
        drafter: Drafter | None = None, acceptance: Acceptance | None = None,
    ) -> list[list[list[int]]]:
        """For each own part, `candidates` continuations of prefix + own part: token ids up to and including the first
        end-of-sequence token, at most `max_new_tokens`. Sampling uses torch's global generator (seed it to repeat).

        With a `drafter`, each step verifies a row's draft tokens in the same forward pass as its next token and keeps
        those `acceptance` allows (speculative decoding): lossless acceptance gives plain decoding's greedy text, and
        its distribution when sampling."""
        if not own_parts:
            return []
        if any(not part for part in own_parts):
            raise ValueError("every prompt needs at least one token after the shared prefix")
        spare = drafter.max_tokens if drafter is not None else 0
        rows, first_logits = self._prefill_rows(prefix, own_parts, candidates, max_new_tokens + spare)
        prefilled = time.perf_counter()
        step = _Step(max_new_tokens, sampling, drafter, acceptance or Acceptance())
        outputs = self._decode(prefix, rows, first_logits, step)
        self.seconds["decode"] += time.perf_counter() - prefilled
        return [outputs[i * candidates : (i + 1) * candidates] for i in range(len(own_parts))]

    def _prefill_rows(self, prefix: Prefix, own_parts: list[list[int]], candidates: int,
                      new_columns: int) -> tuple[_Rows, list[torch.Tensor]]:
        """Each own part prefilled once, its keys and values copied to its `candidates` rows of a cache with
        `new_columns` left for generated tokens; the rows and the logits of their first token."""
        width = max(len(part) for part in own_parts)
        rows = len(own_parts) * candidates
        total = width + new_columns
        keys = [torch.zeros(rows, self.kv_heads, total, self.head_dim, dtype=self.dtype) for _ in self.decoder.layers]
        values = [torch.zeros(rows, self.kv_heads, total, self.head_dim, dtype=self.dtype) for _ in self.decoder.layers]
        valid = torch.zeros(rows, total, dtype=torch.bool)
        first_logits = []
        started = time.perf_counter()
        for index, part in enumerate(own_parts):
            rows_of_part = slice(index * candidates, (index + 1) * candidates)
            start = width - len(part)
            own_keys, own_values, logits = self._prefill(prefix, part)
            for layer_keys, layer_values, key, value in zip(keys, values, own_keys, own_values, strict=True):
                layer_keys[rows_of_part, :, start:width] = key
                layer_values[rows_of_part, :, start:width] = value
            valid[rows_of_part, start:width] = True
            first_logits.append(logits.expand(candidates, -1))
        positions = torch.tensor([len(prefix) + len(part) for part in own_parts]).repeat_interleave(candidates)
        state = _Rows(owner=torch.arange(rows), tokens=torch.zeros(rows, dtype=torch.long), positions=positions,
                      valid=valid, written=torch.full((rows,), width), keys=keys, values=values)
        self.seconds["prefill"] += time.perf_counter() - started
        return state, first_logits

    def _decode(self, prefix: Prefix, rows: _Rows, first_logits: list[torch.Tensor], step: _Step) -> list[list[int]]:
        """Decode every row until it ends; each row's tokens (prompt * candidates + candidate order)."""
        outputs: list[list[int]] = [[] for _ in range(len(rows.owner))]
        rows.tokens = sample(torch.cat(first_logits), step.sampling)
        emitted = [[token] for token in rows.tokens.tolist()]
        first_pass = True
        total = rows.valid.shape[1]
        while True:
            done = torch.tensor(step.emit(rows.owner.tolist(), emitted, outputs, first_pass, self._eos))
            if bool(done.all()):
                return outputs
            if bool(done.any()):
                rows.keep(~done)
            drafts = [step.draft(row, len(outputs[row])) for row in rows.owner.tolist()]
            block = rows.tokens[:, None].repeat(1, 1 + max(len(d) for d in drafts))
            for index, draft in enumerate(drafts):
                if draft:
                    block[index, 1 : 1 + len(draft)] = torch.tensor(draft)
            logits = self._forward_block(prefix, block, rows.positions, rows.keys, rows.values, rows.valid, rows.written)
            kept, rows.tokens = step.acceptance.verify(logits, block, torch.tensor([len(d) for d in drafts]),
                                                       step.sampling)
            first_pass = False
            emitted = [block[index, 1 : 1 + count].tolist() + [token]
                       for index, (count, token) in enumerate(zip(kept.tolist(), rows.tokens.tolist(), strict=True))]
            # The row's token and its accepted drafts are now in the cache; the token after them is not yet.
            columns = torch.arange(total)[None, :]
            rows.valid |= (columns >= rows.written[:, None]) & (columns <= (rows.written + kept)[:, None])
            rows.written = rows.written + 1 + kept
            rows.positions = rows.positions + 1 + kept

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

    def _forward_block(
        self,
        prefix: Prefix,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        valid: torch.Tensor,
        written: torch.Tensor,
    ) -> torch.Tensor:
        """`tokens` (rows x L) continue each row from cache column `written[row]` and rotary position
        `positions[row]`: writes their keys and values there, returns the logits after each (rows x L x vocabulary).
        Token j of a row sees the prefix, the row's `valid` columns and its own tokens 0..j. Plain decoding is L = 1."""
        rows, length = tokens.shape
        steps = torch.arange(length)
        hidden = self.decoder.embed_tokens(tokens)
        cos, sin = self.decoder.rotary_emb(hidden, positions[:, None] + steps[None, :])
        columns = written[:, None] + steps[None, :]  # rows x L: where each token's keys and values go
        # Attention reads each layer's whole allocated cache, its unwritten columns masked: the matrix products then
        # take the cache as it lies, where a slice of its first columns is copied first (in bfloat16 that copy cost
        # more than the products themselves).
        span = keys[0].shape[2]
        own = torch.arange(span)[None, None, :]
        visible = valid[:, None] | ((own >= written[:, None, None]) & (own <= columns[:, :, None]))
        # rows x 1 x (group x L) x span: the query heads of a group share their row's mask
        masked = ~visible[:, None, None].expand(rows, 1, self.group, length, span).reshape(rows, 1, -1, span)
        row_index = torch.arange(rows)[:, None]
        prefix_length = len(prefix)
        for layer, layer_keys, layer_values, prefix_key, prefix_value in zip(
            self.decoder.layers, keys, values, prefix.keys, prefix.values, strict=True
        ):
            query, key, value = self._project(layer, hidden, cos, sin, few_rows_linear)
            layer_keys[row_index, :, columns] = key.transpose(1, 2)
            layer_values[row_index, :, columns] = value.transpose(1, 2)
            # rows x kv heads x (group x L) x head_dim: the query heads of a group share one key/value head.
            grouped = (query * self.scale).reshape(rows, self.kv_heads, self.group * length, self.head_dim)
            # The prefix is the same for every row: one (rows * group * L) x head_dim by head_dim x prefix product per head.
            stacked = grouped.transpose(0, 1).reshape(self.kv_heads, -1, self.head_dim)
            prefix_scores = torch.matmul(stacked, prefix_key.transpose(1, 2))
            prefix_scores = prefix_scores.view(self.kv_heads, rows, -1, prefix_length).transpose(0, 1)
            own_scores = torch.matmul(grouped, layer_keys.transpose(2, 3)).masked_fill_(masked, float("-inf"))
            # softmax in float32 whatever the model's type: bfloat16 sums of ~600 weights lose the small ones
            weights = torch.softmax(torch.cat([prefix_scores, own_scores], dim=-1), dim=-1, dtype=torch.float32)
            weights = weights.to(self.dtype)
            prefix_weights = weights[..., :prefix_length].transpose(0, 1).reshape(self.kv_heads, -1, prefix_length)
            from_prefix = torch.matmul(prefix_weights, prefix_value).view(self.kv_heads, rows, -1, self.head_dim)
            attended = torch.matmul(weights[..., prefix_length:], layer_values)
            attended = attended + from_prefix.transpose(0, 1)
            hidden = self._finish_layer(
                layer, hidden, attended.reshape(rows, self.heads, length, self.head_dim), few_rows_linear
            )
        return self._logits(hidden, few_rows_linear)

    def _project(
        self, layer: LlamaLayer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
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
        layer: LlamaLayer, hidden: torch.Tensor, attended: torch.Tensor, linear: Linear = torch.nn.Module.__call__
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


@dataclass
class _Rows:
    """The rows of a batch still decoding, and their caches (the module docstring gives the layout)."""

    owner: torch.Tensor  # row -> index into the outputs (prompt * candidates + candidate)
    tokens: torch.Tensor  # each row's next token, not in the cache yet
    positions: torch.Tensor  # each row's next rotary position
    valid: torch.Tensor  # rows x columns: the cache columns written and kept
    written: torch.Tensor  # per row, the cache column of its next token
    keys: list[torch.Tensor]  # per layer
    values: list[torch.Tensor]

    def keep(self, keep: torch.Tensor) -> None:
        """Only the rows where `keep` is true go on (rows that finished leave the batch)."""
        self.owner, self.tokens, self.positions = self.owner[keep], self.tokens[keep], self.positions[keep]
        self.valid, self.written = self.valid[keep], self.written[keep]
        self.keys = [k[keep] for k in self.keys]
        self.values = [v[keep] for v in self.values]


@dataclass
class _Step:
    """How each decoding pass of one `generate` call emits and drafts tokens."""

    max_new_tokens: int
    sampling: Sampling
    drafter: Drafter | None
    acceptance: Acceptance

    def emit(self, owners: list[int], emitted: list[list[int]], outputs: list[list[int]], first_pass: bool,
             eos: frozenset[int]) -> list[bool]:
        """Append each row's newly emitted tokens to its output, up to and including the first end-of-sequence token
        and within `max_new_tokens`; per row, whether it is finished."""
        finished = []
        for row, new in zip(owners, emitted, strict=True):
            out = outputs[row]
            count = next((i + 1 for i, token in enumerate(new) if token in eos), len(new))
            count = min(count, self.max_new_tokens - len(out))
            out.extend(new[:count])
            finished.append(len(out) == self.max_new_tokens or out[-1] in eos)
            if self.drafter is not None:
                self.drafter.extend(row, new[:count])
                if not first_pass:
                    self.drafter.steps += 1
                    self.drafter.emitted += count
                    self.drafter.accepted += min(count, len(new) - 1)  # drafts kept and emitted (none after an end)
        return finished

    def draft(self, row: int, written: int) -> list[int]:
        """The row's draft tokens for the next pass (none without a drafter), leaving room for the token after."""
        return self.drafter.draft(row, self.max_new_tokens - written - 1) if self.drafter is not None else []


class Drafter(Protocol):
    """Draft tokens per decoding row (`drafts.RequestDrafter`): `extend` reports each row's newly emitted tokens,
    `draft` proposes up to `limit` next ones, `max_tokens` bounds every draft; the decoder counts each row's verifying
    passes (`steps`), the tokens they emitted (`emitted`) and the draft tokens among them (`accepted`)."""

    max_tokens: int
    steps: int
    emitted: int
    accepted: int

    def extend(self, row: int, tokens: list[int]) -> None: ...

    def draft(self, row: int, limit: int) -> list[int]: ...
