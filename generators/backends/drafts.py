"""Draft tokens for speculative decoding, retrieved from text already written (REST, arXiv 2311.08252; DARE, 2408.05676).

A chain of thought for LLM-CF restates its prompt (titles, tags, the known outcome) and follows the same four-part
structure as every other one, often in the same words for the same item. So the tokens that follow the last few
generated ones are likely to be found after the same few tokens (an n-gram, n = `max_ngram` down to `min_ngram`)
somewhere already written:
- in the request's own prompt and what it has generated so far (`RowContext`, always consulted first);
- in the chains of thought already written for the same target item, then in the most recent ones overall
  (`DraftIndex`, fed with every finished generation; groups and documents bounded in number, oldest evicted).
The continuation found (up to `draft_tokens`) is a draft; the decoder verifies all of it in one forward pass and keeps
the longest prefix the model agrees with (`sampling.Acceptance`), so drafts change speed, never the text in the
lossless mode. A miss costs a few dictionary lookups.

Lookups keep the latest occurrence of each n-gram (the freshest text wins). Thread-safety: none; one decoder thread
owns an index.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

GLOBAL_GROUP = "*"


@dataclass(frozen=True)
class DraftConfig:
    """How drafts are looked up: n-gram orders tried (longest first), tokens drafted per step at most, and the index's
    bounds (chains of thought kept per item, overall, and items kept)."""

    draft_tokens: int = 8
    max_ngram: int = 4
    min_ngram: int = 2
    per_group_documents: int = 16
    global_documents: int = 256
    max_groups: int = 4096

    def __post_init__(self) -> None:
        if self.draft_tokens < 1:
            raise ValueError("draft_tokens must be at least 1")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        for name in ("per_group_documents", "global_documents", "max_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


class _NgramTable:
    """The latest position after each n-gram (n in orders) over a set of token sequences."""

    def __init__(self, orders: range) -> None:
        self.orders = orders
        self.after: dict[tuple[int, ...], tuple[list[int], int]] = {}

    def add(self, tokens: list[int], start: int = 0) -> None:
        """Index the n-grams of `tokens` that end at positions >= start (each maps to the position after it)."""
        after = self.after
        for n in self.orders:
            for end in range(max(start, n), len(tokens)):
                after[tuple(tokens[end - n : end])] = (tokens, end)

    def continuation(self, context: Sequence[int], limit: int) -> list[int]:
        """What followed the longest n-gram ending `context` last time it was seen (at most `limit` tokens)."""
        for n in reversed(self.orders):
            if len(context) < n:
                continue
            found = self.after.get(tuple(context[-n:]))
            if found is not None:
                tokens, end = found
                follow = tokens[end : end + limit]
                if follow:
                    return follow
        return []


class RowContext:
    """One decoding row's own text (prompt, then what it generated) as a draft source, indexed as it grows."""

    def __init__(self, prompt: Sequence[int], config: DraftConfig) -> None:
        self.tokens = list(prompt)
        self.table = _NgramTable(range(config.min_ngram, config.max_ngram + 1))
        self.table.add(self.tokens)
        self.indexed = len(self.tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        self.tokens.extend(tokens)
        # n-grams whose continuation is now known: those ending before the last token
        self.table.add(self.tokens, start=self.indexed)
        self.indexed = len(self.tokens)


class DraftIndex:
    """Chains of thought already written, by group (a target item, plus `GLOBAL_GROUP` for all), bounded."""

    def __init__(self, config: DraftConfig | None = None) -> None:
        self.config = config or DraftConfig()
        self._orders = range(self.config.min_ngram, self.config.max_ngram + 1)
        self._groups: OrderedDict[str, deque[list[int]]] = OrderedDict()
        self._tables: dict[str, _NgramTable] = {}
        self._stale: dict[str, int] = {}
        self.documents_added = 0

    def add(self, group: str, tokens: Sequence[int]) -> None:
        """A finished generation for `group` (its target item): a draft source for later requests of the group and
        for every request (the global group)."""
        tokens = list(tokens)
        if not tokens:
            return
        self.documents_added += 1
        self._add(group, tokens, self.config.per_group_documents)
        self._add(GLOBAL_GROUP, tokens, self.config.global_documents)
        while len(self._groups) > self.config.max_groups + 1:  # +1: the global group is never evicted
            oldest = next(key for key in self._groups if key != GLOBAL_GROUP)
            del self._groups[oldest], self._tables[oldest], self._stale[oldest]

    def draft(self, row: RowContext, group: str, limit: int) -> list[int]:
        """Up to `limit` tokens likely to follow `row`: from its own text, else its group's, else the global group's."""
        if limit <= 0:
            return []
        found = row.table.continuation(row.tokens, limit)
        if found:
            return found
        for key in (group, GLOBAL_GROUP):
            table = self._tables.get(key)
            if table is not None:
                found = table.continuation(row.tokens, limit)
                if found:
                    return found
        return []

    def __len__(self) -> int:
        """Documents held (a document kept in a group and in the global group counts twice)."""
        return sum(len(documents) for documents in self._groups.values())

    def _add(self, group: str, tokens: list[int], bound: int) -> None:
        documents = self._groups.get(group)
        if documents is None:
            documents = self._groups[group] = deque()
            self._tables[group] = _NgramTable(self._orders)
            self._stale[group] = 0
        self._groups.move_to_end(group)
        documents.append(tokens)
        self._tables[group].add(tokens)
        if len(documents) > bound:
            documents.popleft()
            self._stale[group] += 1
            # The evicted document's n-grams may still point at it: rebuild once as many are stale as kept (amortised
            # O(1) per document), so the table stays within twice the documents' n-grams.
            if self._stale[group] >= bound:
                table = self._tables[group] = _NgramTable(self._orders)
                for document in documents:
                    table.add(document)
                self._stale[group] = 0


class RequestDrafter:
    """The decoder's `Drafter` for one batch: row r drafts from its own prompt and output, then from `index` under its
    group (the request's target item). Counts drafted tokens and verifying steps (acceptance metrics)."""

    def __init__(self, index: DraftIndex, prompts: Sequence[Sequence[int]], groups: Sequence[str]) -> None:
        self.index = index
        self.max_tokens = index.config.draft_tokens
        self.rows = [RowContext(prompt, index.config) for prompt in prompts]
        self.groups = list(groups)
        self.steps = self.emitted = self.accepted = 0  # verifying passes, tokens emitted, drafts kept (by the decoder)
        self.drafted = 0

    def extend(self, row: int, tokens: list[int]) -> None:
        self.rows[row].extend(tokens)

    def draft(self, row: int, limit: int) -> list[int]:
        found = self.index.draft(self.rows[row], self.groups[row], min(limit, self.max_tokens))
        self.drafted += len(found)
        return found
