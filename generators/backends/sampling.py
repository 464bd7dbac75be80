"""What a decoding step draws: the next token of each row (`Sampling`, `sample`: greedy, or at a temperature within a
top-p nucleus) and, in speculative decoding, which of a row's draft tokens are kept (`Acceptance`: lossless, or relaxed
as DARE does)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """Greedy when `temperature` is 0; otherwise softmax sampling at `temperature` within the top-p nucleus."""

    temperature: float
    top_p: float = 1.0


def distribution(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The probabilities sampling draws from (sampling.temperature > 0): softmax at the temperature, cut to the top-p
    nucleus (the tokens whose preceding cumulative probability is below top_p) and renormalised. Any leading shape."""
    scaled = logits / sampling.temperature
    if sampling.top_p < 1.0:
        ordered, order = scaled.sort(dim=-1, descending=True)
        probabilities = ordered.softmax(dim=-1)
        outside = probabilities.cumsum(dim=-1) - probabilities >= sampling.top_p
        scaled = scaled.scatter(-1, order, ordered.masked_fill(outside, float("-inf")))
    return scaled.softmax(dim=-1)


def sample(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """One token per row of `logits` (rows x vocabulary): the argmax when greedy, else a draw from `distribution`."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    return _draw(distribution(logits, sampling))


def _draw(probabilities: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: one uniform number per row (torch.multinomial draws one exponential per vocabulary entry,
    which costs more than the rest of a small model's step at batch 16)."""
    cumulative = probabilities.cumsum(dim=-1)
    draws = torch.rand(len(cumulative), 1) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, draws)[:, 0].clamp_(max=cumulative.shape[1] - 1)


@dataclass(frozen=True)
class Acceptance:
    """Which draft tokens a speculative step keeps.

    Lossless (`top_k` 1, `min_probability` 0): greedy keeps a draft token while it is the model's argmax, so the text
    is plain greedy decoding's; sampling keeps draft token d with probability p(d) and, at the first rejection, draws
    from p with d removed (speculative sampling with a one-point draft distribution), so the text follows the model's
    distribution. Relaxed (DARE): a draft token is kept when it is among the model's `top_k` and its probability (at
    temperature 1) is at least `min_probability`; the text changes (bench.generators measures how much)."""

    top_k: int = 1
    min_probability: float = 0.0

    def __post_init__(self) -> None:
        if self.top_k < 1 or not 0.0 <= self.min_probability <= 1.0:
            raise ValueError("top_k must be >= 1 and min_probability within [0, 1]")

    @property
    def lossless(self) -> bool:
        return self.top_k == 1 and self.min_probability == 0.0

    def verify(self, logits: torch.Tensor, block: torch.Tensor, drafted: torch.Tensor,
               sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
        """`logits` (rows x L x vocabulary) after each token of `block` (rows x L: a row's token, then `drafted[row]`
        draft tokens, then padding): per row, how many draft tokens are kept and the token that follows them."""
        rows, length, _ = logits.shape
        if length == 1:  # no row has drafts (plain decoding): only the next token, without the verifying gathers
            return torch.zeros(rows, dtype=torch.long), sample(logits[:, 0], sampling)
        drafts = block[:, 1:]
        in_draft = torch.arange(length - 1)[None, :] < drafted[:, None]
        index = torch.arange(rows)
        probabilities = None
        if self.lossless and sampling.temperature == 0:
            agrees = logits[:, :-1].argmax(dim=-1) == drafts
        elif self.lossless:
            probabilities = distribution(logits, sampling)
            p_draft = probabilities[:, :-1].gather(-1, drafts[..., None])[..., 0]
            agrees = torch.rand(p_draft.shape) < p_draft
        else:
            ranked = logits[:, :-1].topk(self.top_k, dim=-1).indices
            p_draft = logits[:, :-1].softmax(dim=-1).gather(-1, drafts[..., None])[..., 0]
            agrees = (ranked == drafts[..., None]).any(dim=-1) & (p_draft >= self.min_probability)
        kept = (agrees & in_draft).long().cumprod(dim=1).sum(dim=1)
        after = logits[index, kept]
        if sampling.temperature == 0:
            return kept, after.argmax(dim=-1)
        if probabilities is None:
            return kept, sample(after, sampling)
        following = probabilities[index, kept]
        rejected = kept < drafted  # the draft token at `kept` was refused: draw from the rest
        refused = drafts[index, kept.clamp(max=length - 2)] if length > 1 else block[:, 0]
        following = torch.where(rejected[:, None], following.scatter(-1, refused[:, None], 0.0), following)
        return kept, _draw(following)


RELAXED = Acceptance(top_k=2, min_probability=0.1)  # DARE's published setting
