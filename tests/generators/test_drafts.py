"""Speculative decoding: the draft index (`generators.backends.drafts`) and the decoder's verification
(`sampling.Acceptance`): lossless drafting gives plain greedy text token for token whatever the drafts, and
sampling's distribution; relaxed acceptance keeps what its rule says."""

from __future__ import annotations

import random

import pytest
import torch

from generators.backends.drafts import GLOBAL_GROUP, DraftConfig, DraftIndex, RequestDrafter, RowContext
from generators.backends.prefix_decoding import PrefixDecoder
from generators.backends.sampling import Acceptance, Sampling
from tests.generators.test_backends import tiny_llama

CONFIG = DraftConfig(draft_tokens=4, max_ngram=3, min_ngram=2, per_group_documents=2, global_documents=3)


def test_a_row_drafts_from_its_own_text_first_then_its_group_then_all() -> None:
    index = DraftIndex(CONFIG)
    index.add("item-a", [1, 2, 3, 4, 5, 6])
    index.add("item-b", [1, 2, 9, 9, 9])
    row = RowContext([7, 8, 1, 2], CONFIG)
    assert index.draft(row, "item-a", 3) == [3, 4, 5]  # the group's text
    assert index.draft(row, "item-c", 3) == [9, 9, 9]  # no text of its own group: the latest overall
    row.extend([3])
    assert index.draft(row, "item-b", 2) == [4, 5]  # item-b has no (1, 2, 3) nor (2, 3): the global group has
    row = RowContext([5, 6, 1, 2, 8, 7, 1, 2], CONFIG)
    assert index.draft(row, "item-a", 2) == [8, 7]  # its own prompt before any group
    assert index.draft(RowContext([42, 43], CONFIG), "item-a", 4) == []
    assert index.draft(row, "item-a", 0) == []


def test_the_index_is_bounded_and_forgets_the_oldest_text() -> None:
    index = DraftIndex(CONFIG)
    for n in range(10):
        index.add("item-a", [100 + n, 1, 2, 50 + n])
    assert index.documents_added == 10
    assert len(index) == CONFIG.per_group_documents + CONFIG.global_documents
    assert index.draft(RowContext([1, 2], CONFIG), "item-a", 1) == [59]
    assert index.draft(RowContext([100, 1], CONFIG), "item-a", 1) == []  # the first document was evicted everywhere
    bounded = DraftIndex(DraftConfig(max_groups=2))
    for group in ("a", "b", "c"):
        bounded.add(group, [1, 2, 3])
    assert set(bounded._groups) == {"b", "c", GLOBAL_GROUP}


class ScriptedDrafter(RequestDrafter):
    """Drafts that are right, partly wrong or random, by row: speed may change, text must not."""

    def __init__(self, truth: list[list[int]], vocabulary: int) -> None:
        self.truth, self.vocabulary = truth, vocabulary
        self.max_tokens, self.steps, self.emitted, self.accepted, self.drafted = 5, 0, 0, 0, 0
        self.seen: list[list[int]] = [[] for _ in truth]
        self.random = random.Random(7)

    def extend(self, row: int, tokens: list[int]) -> None:
        self.seen[row].extend(tokens)

    def draft(self, row: int, limit: int) -> list[int]:
        done = len(self.seen[row])
        right = self.truth[row][done : done + min(limit, self.max_tokens)]
        if row % 3 == 1 and right:  # wrong from the third token on
            right = right[:2] + [(t + 1) % self.vocabulary for t in right[2:]]
        if row % 3 == 2:
            right = [self.random.randrange(self.vocabulary) for _ in right]
        self.drafted += len(right)
        return right


def test_lossless_drafting_gives_plain_greedy_tokens_with_padding_and_rows_that_finish_early() -> None:
    prefix_ids = torch.randint(3, 128, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    own_parts = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 3, 6, 4, 8)]
    plain_model = tiny_llama(eos_token_id=-1)
    unreachable = PrefixDecoder(plain_model, [-1])
    first = unreachable.generate(unreachable.prefix(prefix_ids), own_parts, max_new_tokens=24, sampling=Sampling(0.0))
    eos = first[1][0][5]  # the second prompt's sixth token ends it early (others may end too)
    decoder = PrefixDecoder(tiny_llama(eos_token_id=eos), [eos])
    prefix = decoder.prefix(prefix_ids)
    plain = [c[0] for c in decoder.generate(prefix, own_parts, max_new_tokens=24, sampling=Sampling(0.0))]
    assert len(plain[1]) == 6 and plain[1][-1] == eos and max(len(p) for p in plain) == 24
    drafter = ScriptedDrafter(plain, vocabulary=128)
    drafted = [c[0] for c in decoder.generate(prefix, own_parts, max_new_tokens=24, sampling=Sampling(0.0),
                                              drafter=drafter)]
    assert drafted == plain
    assert drafter.steps < sum(len(p) - 1 for p in plain)  # right drafts saved passes
    assert drafter.emitted == sum(len(p) - 1 for p in plain)  # the first token of each comes from the prefill
    assert drafter.steps < drafter.emitted and 0 < drafter.accepted < drafter.drafted
    # a batch of one row, drafts that are always right: a pass per draft length
    oracle = ScriptedDrafter([plain[0]], vocabulary=128)
    assert decoder.generate(prefix, own_parts[:1], max_new_tokens=24, sampling=Sampling(0.0), drafter=oracle)[0][0] == plain[0]
    assert oracle.steps == -(-(len(plain[0]) - 1) // (oracle.max_tokens + 1))


def test_lossless_acceptance_keeps_sampling_s_distribution() -> None:
    """A draft token d is kept with probability p(d); a refusal draws from p without d: the token emitted first is
    distributed as p whatever the draft (here d = token 1, then token 3)."""
    p = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0])
    rows = 20_000
    logits = torch.log(p).expand(rows, 2, -1)
    torch.manual_seed(11)
    for draft in (1, 3):
        block = torch.tensor([[0, draft]]).expand(rows, -1)
        kept, following = Acceptance().verify(logits, block, torch.ones(rows, dtype=torch.long), Sampling(1.0))
        first = torch.where(kept == 1, block[:, 1], following)
        share = torch.bincount(first, minlength=5) / rows
        torch.testing.assert_close(share, p, atol=0.015, rtol=0)
        assert abs(kept.float().mean() - p[draft]) < 0.015


def test_relaxed_acceptance_keeps_top_k_tokens_above_the_threshold_and_stops_at_the_first_refusal() -> None:
    p = torch.tensor([[0.6, 0.25, 0.1, 0.05], [0.6, 0.25, 0.1, 0.05], [0.3, 0.3, 0.3, 0.1]])
    logits = torch.log(p)[None].expand(4, -1, -1)
    block = torch.tensor([[0, 1, 0], [0, 2, 0], [0, 0, 1], [0, 1, 3]])  # a row's token, then two draft tokens
    drafted = torch.tensor([2, 2, 1, 2])
    kept, following = Acceptance(top_k=2, min_probability=0.2).verify(logits, block, drafted, Sampling(0.0))
    # row 0: 1 is second (0.25) then 0 is first: both kept, and the model's argmax after them;
    # row 1: 2 is third: refused; row 2: one draft, kept; row 3: 1 kept, then 3 is not in the top 2
    assert kept.tolist() == [2, 0, 1, 1]
    assert following.tolist() == [0, 0, 0, 0]
    lossless, _ = Acceptance().verify(logits, block, drafted, Sampling(0.0))
    assert lossless.tolist() == [0, 0, 1, 0]
    with pytest.raises(ValueError):
        Acceptance(top_k=0)


@pytest.mark.slow
def test_lossless_drafts_leave_the_real_smollm2_s_greedy_text_unchanged() -> None:
    """The transformers backend on real LLM-CF prompts (a padded batch of different lengths), drafts from the prompt and
    from CoTs written for the same items earlier: the same greedy text as without drafts, with drafts accepted."""
    from generators.backends import create_backend
    from generators.backends.drafts import DraftConfig
    from generators.prompt import build_prompt
    from tests.generators import make_request

    requests = [
        make_request(label=1, title="The Lion King (1994)"),
        make_request(label=0, title="Heat (1995)", history=[("Fargo (1996)", ["Crime", "Drama"], 1)]),
        make_request(label=0, title="Casper (1995)", history=[], tags=()),
    ]
    prompts = [build_prompt(r, feedback="rating") for r in requests]
    # float32: a verifying pass's products have other shapes than a plain step's; in bfloat16 their rounding may differ
    backend = create_backend("transformers", temperature=0.0, max_new_tokens=48, drafts=DraftConfig(draft_tokens=4),
                             dtype="float32")
    try:
        drafted_first = backend.generate(prompts)  # also fills the index: the second call drafts from these CoTs
        drafted_again = backend.generate(prompts)
        stats = backend.draft_stats
        index, backend.drafts = backend.drafts, None
        plain = backend.generate(prompts)
    finally:
        backend.close()
    assert [g.text for g in drafted_first] == [g.text for g in drafted_again] == [g.text for g in plain]
    assert len(index) > 0 and stats.accepted > 0 and stats.tokens_per_pass > 1


def test_lossless_drafts_keep_the_distribution_of_sampled_text() -> None:
    """3,000 sampled continuations of one prompt at a low temperature, plain vs drafted (the drafts: the greedy
    continuation, often accepted): each position's token distribution differs by no more than sampling noise (the first
    token, drawn the same way in both, measures it: total variation ~0.07). Always keeping drafts would pile up the
    greedy tokens (TV > 0.3 at the second position)."""
    from collections import Counter

    decoder = PrefixDecoder(tiny_llama(eos_token_id=-1), [-1])
    prefix, part, rows = decoder.prefix([5, 6, 7]), [9, 10, 11, 12], 3_000
    greedy = decoder.generate(prefix, [part], max_new_tokens=6, sampling=Sampling(0.0))[0][0]
    torch.manual_seed(0)
    plain = decoder.generate(prefix, [part], max_new_tokens=6, sampling=Sampling(0.08), candidates=rows)[0]
    drafter = ScriptedDrafter([greedy] * rows, vocabulary=128)
    drafter.draft = lambda row, limit: greedy[len(drafter.seen[row]) :][: min(limit, drafter.max_tokens)]
    torch.manual_seed(1)
    drafted = decoder.generate(prefix, [part], max_new_tokens=6, sampling=Sampling(0.08), candidates=rows,
                               drafter=drafter)[0]
    assert drafter.accepted > rows // 2
    for position in range(6):
        a, b = Counter(s[position] for s in plain), Counter(s[position] for s in drafted)
        assert 0.5 * sum(abs(a[t] - b[t]) for t in a.keys() | b.keys()) / rows < 0.12, position
