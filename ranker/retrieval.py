"""Retrieval of in-context examples for the ICT module: the same code at training and at serving.

LLM-CF picks, for a sample with history embedding h and target embedding t, the top 2 positive and top 2 negative stored
samples by similarity 0.5<h,h'> + 0.5<t,t'>, shuffled, never one of the same user at a later time (nor the sample itself).

A filtered top-k query per candidate would cost ~100 index queries per ranking request, far over the serving budget, so
retrieval is batched and split by the two halves of the similarity:
- history half: one pair of queries (positives, negatives) on [h; 0] per group of queries that share a user and nearly
  the same history (cosine >= `history_group_cosine` to the group's first): a serving request (one user, many candidates)
  is one group; at training, a user's consecutive samples share a group. These queries carry the no-leak filter
  (not this user after the group's latest time) and the label.
- target half: one unfiltered query on [0; t] per distinct target item, cached for `item_cache_ttl_s` seconds (shared
  by every request and user, so the cache is user-independent; short enough that fresh examples still appear).
Hits come back with their stored vectors and the small payload fields only; the union of a sample's history-group
hits and its item hits is re-ranked exactly by the full similarity in numpy, the no-leak and not-itself rules are
applied exactly per sample, and 2+2 are picked. The history ids and CoT embeddings of the picked examples are then read
by key (`get_payloads`; cached once generated, as a generated sample never changes): converting a 384-float payload for
every candidate hit costs more than the searches. It is approximate where the true top examples are in neither
candidate list (top `history_candidates` by h, top `item_candidates` by t); `bench/ranker_model.py` measures the cost.

What the index holds (written by the stream worker, or by training for its private pool): vector = `sample_vector` =
[h; t]/sqrt(2), key = the sample (CoT request) id, payload `user_id`, `item_id`, `label`, `ts` (event time, epoch ms),
`status` ('pending' | 'generated'), `history` (item ids, oldest first, `llmcf.samples.encode_history`) and, once
generated, `cot_embedding` (384 floats).
"""

from __future__ import annotations

import itertools
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from llmcf.embeddings import EMBEDDING_DIMENSION
from llmcf.samples import decode_history
from storage.vectors import Filter, Hit, Match, Range, VectorIndex, all_of

COT_EMBEDDING_FIELD = "cot_embedding"
GENERATED = "generated"
CANDIDATE_FIELDS = ("user_id", "item_id", "label", "ts", "status")
DETAIL_FIELDS = ("history", COT_EMBEDDING_FIELD)
_PERMUTATIONS_OF_4 = np.array(list(itertools.permutations(range(4))), dtype=np.int64)


@dataclass(frozen=True)
class ExampleQuery:
    """One sample to find examples for: who, which item, when (event time, epoch ms), and its two text embeddings.
    `exclude_key` is the sample's own key when it may itself be in the index (training)."""

    user_id: str
    item_id: str
    ts_ms: int
    history_vector: np.ndarray
    target_vector: np.ndarray
    exclude_key: str | None = None


@dataclass(frozen=True)
class ExampleRecord:
    """A stored sample as retrieved: payload fields, the two halves of its vector, whether its CoT is generated, and
    its CoT embedding (filled for the examples picked; None while pending)."""

    key: str
    user_id: str
    item_id: str
    label: int
    ts_ms: int
    history_vector: np.ndarray
    target_vector: np.ndarray
    generated: bool
    history: tuple[str, ...] = ()
    cot: np.ndarray | None = None


@dataclass
class Retrieval:
    """K examples per query: `slots[b, k]` indexes `records` (-1 = no example found for that slot)."""

    records: list[ExampleRecord]
    slots: np.ndarray  # (B, K) int64

    @property
    def freshest_ts_ms(self) -> int | None:
        """Event time of the newest example used, or None when none was found."""
        used = {int(i) for i in self.slots.ravel() if i >= 0}
        return max((self.records[i].ts_ms for i in used), default=None)

    def freshest_age_s(self, now_ms: int) -> float | None:
        freshest = self.freshest_ts_ms
        return None if freshest is None else max(0.0, (now_ms - freshest) / 1000.0)


@dataclass
class _Block:
    """The hits of one search as arrays, for exact re-ranking; records are built only for the hits picked."""

    keys: np.ndarray  # (n,) object
    items: np.ndarray  # (n,) object
    history: np.ndarray  # (n, 384) unit rows (or zeros)
    target: np.ndarray  # (n, 384)
    label: np.ndarray  # (n,)
    ts: np.ndarray  # (n,)
    user: np.ndarray  # (n,) object
    generated: np.ndarray  # (n,) bool

    @classmethod
    def from_hits(cls, hits: list[Hit]) -> _Block:
        n = len(hits)
        if n and any(h.vector is None for h in hits):
            raise ValueError("example hits must be searched with_vectors=True")
        vectors = np.stack([h.vector for h in hits]) if n else np.zeros((0, 2 * EMBEDDING_DIMENSION), np.float32)
        return cls(
            keys=np.array([h.key for h in hits], dtype=object),
            items=np.array([str(h.payload["item_id"]) for h in hits], dtype=object),
            history=_unit_rows(vectors[:, :EMBEDDING_DIMENSION]),
            target=_unit_rows(vectors[:, EMBEDDING_DIMENSION:]),
            label=np.fromiter((int(h.payload["label"]) for h in hits), dtype=np.int64, count=n),
            ts=np.fromiter((int(h.payload["ts"]) for h in hits), dtype=np.int64, count=n),
            user=np.array([str(h.payload["user_id"]) for h in hits], dtype=object),
            generated=np.fromiter((h.payload.get("status") == GENERATED for h in hits), dtype=bool, count=n),
        )

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def concatenate(cls, blocks: Sequence[_Block]) -> _Block:
        return cls(*(np.concatenate([getattr(b, name) for b in blocks]) for name in _BLOCK_FIELDS))

    def record(self, i: int) -> ExampleRecord:
        return ExampleRecord(
            key=str(self.keys[i]),
            user_id=str(self.user[i]),
            item_id=str(self.items[i]),
            label=int(self.label[i]),
            ts_ms=int(self.ts[i]),
            history_vector=self.history[i],
            target_vector=self.target[i],
            generated=bool(self.generated[i]),
        )


_BLOCK_FIELDS = ("keys", "items", "history", "target", "label", "ts", "user", "generated")


class ExampleRetriever:
    """Batched, balanced (positives + negatives), leak-free example retrieval over a `VectorIndex` of samples.

    Not thread-safe (the item cache is shared state): one retriever per serving worker thread, or a lock around it.
    `item_cache_ttl_s=None` keeps item results forever (training, where the pool does not change).
    """

    def __init__(
        self,
        index: VectorIndex,
        positives: int = 2,
        negatives: int = 2,
        history_candidates: int = 16,
        item_candidates: int = 16,
        item_cache_ttl_s: float | None = 5.0,
        item_cache_size: int = 20_000,
        details_cache_size: int = 100_000,
        history_group_cosine: float = 0.95,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if positives + negatives != 4:
            raise ValueError("the ICT module takes K = 4 examples: positives + negatives must be 4")
        if index.dim != 2 * EMBEDDING_DIMENSION:
            raise ValueError(f"the example index must hold {2 * EMBEDDING_DIMENSION}-d sample vectors, not {index.dim}-d")
        self.index = index
        self.positives = positives
        self.negatives = negatives
        self.history_candidates = history_candidates
        self.item_candidates = item_candidates
        self.item_cache_ttl_s = item_cache_ttl_s
        self.item_cache_size = item_cache_size
        self.history_group_cosine = history_group_cosine
        self._clock = clock
        self.details_cache_size = details_cache_size
        self._item_cache: OrderedDict[str, tuple[float, _Block]] = OrderedDict()
        self._details_cache: OrderedDict[str, tuple[tuple[str, ...], np.ndarray | None]] = OrderedDict()
        self.index_queries = 0  # queries sent to the index so far (for benchmarks and metrics)

    @property
    def k(self) -> int:
        return self.positives + self.negatives

    def retrieve(self, queries: Sequence[ExampleQuery]) -> Retrieval:
        """K examples for each query, in a deterministic shuffled order."""
        groups, group_of = self._history_groups(queries)
        group_blocks = self._search_history_groups(groups)
        item_blocks = self._search_items(queries)
        table, rows = _candidate_rows(queries, group_blocks, group_of, item_blocks)
        picked = self._choose(queries, table, rows)  # (B, K) rows of `table`, -1 = none

        records: list[ExampleRecord] = []
        position: dict[int, int] = {}
        slots = np.full((len(queries), self.k), -1, dtype=np.int64)
        for row, query in enumerate(queries):
            order = _PERMUTATIONS_OF_4[_seed(query) % len(_PERMUTATIONS_OF_4)]
            for slot, chosen in zip(order.tolist(), picked[row].tolist(), strict=True):
                if chosen < 0:
                    continue
                if chosen not in position:
                    position[chosen] = len(records)
                    records.append(table.record(chosen))
                slots[row, slot] = position[chosen]
        return Retrieval(self._with_details(records), slots)

    def _with_details(self, records: list[ExampleRecord]) -> list[ExampleRecord]:
        """The picked records with their history ids and CoT embeddings, read by key. A generated sample never changes,
        so its details are cached; a pending one is read again each time (its CoT may have landed)."""
        wanted = [r.key for r in records if r.key not in self._details_cache]
        fetched = self.index.get_payloads(wanted, DETAIL_FIELDS) if wanted else {}
        detailed = []
        for record in records:
            details = self._details_cache.get(record.key)
            if details is None:
                payload = fetched.get(record.key, {})
                cot = payload.get(COT_EMBEDDING_FIELD)
                details = (decode_history(payload.get("history")),
                           None if cot is None else np.asarray(cot, dtype=np.float32))
                if record.generated and details[1] is not None:
                    self._details_cache[record.key] = details
            detailed.append(replace(record, history=details[0], cot=details[1] if record.generated else None))
        while len(self._details_cache) > self.details_cache_size:
            self._details_cache.popitem(last=False)
        return detailed

    # ---- candidate searches ---------------------------------------------------------------------------------------

    def _history_groups(self, queries: Sequence[ExampleQuery]) -> tuple[list[list[ExampleQuery]], list[int]]:
        """Queries grouped by user and near-identical history (in input order); cold-start histories (zero vectors)
        form groups that search nothing."""
        groups: list[list[ExampleQuery]] = []
        group_of = [0] * len(queries)
        open_group: dict[str, int] = {}
        for row, query in enumerate(queries):
            current = open_group.get(query.user_id)
            if current is not None:
                anchor = groups[current][0].history_vector
                if float(np.dot(anchor, query.history_vector)) >= self.history_group_cosine or (
                    not anchor.any() and not query.history_vector.any()
                ):
                    groups[current].append(query)
                    group_of[row] = current
                    continue
            open_group[query.user_id] = len(groups)
            group_of[row] = len(groups)
            groups.append([query])
        return groups, group_of

    def _search_history_groups(self, groups: list[list[ExampleQuery]]) -> list[_Block]:
        vectors, filters, owners = [], [], []
        for number, members in enumerate(groups):
            anchor = members[0]
            if not anchor.history_vector.any():
                continue
            latest = max(q.ts_ms for q in members)
            no_leak = all_of(Match("user_id", anchor.user_id), Range("ts", gt=latest))
            vector = np.concatenate([anchor.history_vector, np.zeros(EMBEDDING_DIMENSION, dtype=np.float32)])
            for label in (1, 0):
                vectors.append(vector)
                filters.append(Filter(must=[Match("label", label)], must_not=[no_leak]))
                owners.append(number)
        found: list[list[Hit]] = [[] for _ in groups]
        if vectors:
            hits = self.index.search(np.stack(vectors), self.history_candidates, filter=filters, with_vectors=True,
                                     payload_fields=CANDIDATE_FIELDS)
            self.index_queries += len(vectors)
            for owner, group_hits in zip(owners, hits, strict=False):
                found[owner].extend(group_hits)
        return [_Block.from_hits(group_hits) for group_hits in found]

    def _search_items(self, queries: Sequence[ExampleQuery]) -> dict[str, _Block]:
        now = self._clock()
        blocks: dict[str, _Block] = {}
        missing: dict[str, np.ndarray] = {}
        for query in queries:
            item = query.item_id
            if item in blocks or item in missing:
                continue
            cached = self._item_cache.get(item)
            if cached is not None and (self.item_cache_ttl_s is None or now - cached[0] < self.item_cache_ttl_s):
                self._item_cache.move_to_end(item)
                blocks[item] = cached[1]
            elif query.target_vector.any():
                missing[item] = query.target_vector
            else:
                blocks[item] = EMPTY_BLOCK
        if missing:
            zeros = np.zeros(EMBEDDING_DIMENSION, dtype=np.float32)
            vectors = np.stack([np.concatenate([zeros, t]) for t in missing.values()])
            hits = self.index.search(vectors, self.item_candidates, with_vectors=True, payload_fields=CANDIDATE_FIELDS)
            self.index_queries += len(vectors)
            for item, item_hits in zip(missing, hits, strict=False):
                block = _Block.from_hits(item_hits)
                blocks[item] = block
                self._item_cache[item] = (now, block)
                self._item_cache.move_to_end(item)
            while len(self._item_cache) > self.item_cache_size:
                self._item_cache.popitem(last=False)
        return blocks

    # ---- exact re-ranking -----------------------------------------------------------------------------------------

    def _choose(self, queries: Sequence[ExampleQuery], table: _Block, rows: np.ndarray) -> np.ndarray:
        """For each query, the top positives then the top negatives by 0.5<h,h'> + 0.5<t,t'> among its candidate
        rows of `table` (`rows[b]`, -1 padded, group hits first then item hits), leak-free, never itself, each stored
        sample once; ties go to the earlier candidate. Returns (B, K) table rows, -1 where too few were found."""
        picked = np.full((len(queries), self.k), -1, dtype=np.int64)
        if rows.shape[1] == 0 or len(table) == 0:
            return picked
        present = rows >= 0
        safe = np.where(present, rows, 0)
        history = np.stack([q.history_vector for q in queries])
        target = np.stack([q.target_vector for q in queries])
        score = 0.5 * np.einsum("bwd,bd->bw", table.history[safe], history) + 0.5 * np.einsum(
            "bwd,bd->bw", table.target[safe], target)
        users = np.array([q.user_id for q in queries], dtype=object)[:, None]
        times = np.array([q.ts_ms for q in queries], dtype=np.int64)[:, None]
        leak = (table.user[safe] == users) & (table.ts[safe] > times)
        excluded = np.array([q.exclude_key for q in queries], dtype=object)[:, None]
        allowed = present & ~leak & (table.keys[safe] != excluded) & ~_repeated_in_row(table.keys, safe, present)
        label = table.label[safe]
        column = 0
        for wanted_label, wanted in ((1, self.positives), (0, self.negatives)):
            eligible = allowed & (label == wanted_label)
            best = np.argsort(-np.where(eligible, score, -np.inf), axis=1, kind="stable")[:, :wanted]
            found = np.take_along_axis(eligible, best, axis=1)
            width = best.shape[1]
            picked[:, column:column + width] = np.where(found, np.take_along_axis(safe, best, axis=1), -1)
            column += wanted
        # Positives and negatives each padded at the end of their own part, as the shuffle expects.
        return picked


def _candidate_rows(queries: Sequence[ExampleQuery], group_blocks: list[_Block], group_of: list[int],
                    item_blocks: dict[str, _Block]) -> tuple[_Block, np.ndarray]:
    """One table of every hit found (each block once) and, per query, its candidates' rows: its history group's hits
    then its target item's hits, -1 padded."""
    blocks: list[_Block] = []
    offsets: dict[int, int] = {}
    start = 0
    for block in [*group_blocks, *item_blocks.values()]:
        if id(block) not in offsets:
            offsets[id(block)] = start
            blocks.append(block)
            start += len(block)
    table = _Block.concatenate(blocks) if blocks else EMPTY_BLOCK
    spans = []
    for row, query in enumerate(queries):
        group = group_blocks[group_of[row]]
        item = item_blocks.get(query.item_id, EMPTY_BLOCK)
        spans.append(np.concatenate([offsets[id(group)] + np.arange(len(group)),
                                     offsets.get(id(item), 0) + np.arange(len(item))]))
    width = max((len(span) for span in spans), default=0)
    rows = np.full((len(queries), width), -1, dtype=np.int64)
    for row, span in enumerate(spans):
        rows[row, :len(span)] = span
    return table, rows


def _repeated_in_row(keys: np.ndarray, safe: np.ndarray, present: np.ndarray) -> np.ndarray:
    """True where a row's candidate repeats a stored sample already listed earlier in that row (a hit of both the
    history and the item search): the earlier one stands for it, with the same score."""
    _, codes = np.unique(keys, return_inverse=True)
    row_codes = np.where(present, codes[safe], -1 - np.arange(safe.shape[1]))  # padding never repeats
    order = np.argsort(row_codes, axis=1, kind="stable")
    ordered = np.take_along_axis(row_codes, order, axis=1)
    repeated_sorted = np.zeros_like(present)
    repeated_sorted[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    repeated = np.zeros_like(present)
    np.put_along_axis(repeated, order, repeated_sorted, axis=1)
    return repeated


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.where(norms > 0, matrix / np.where(norms > 0, norms, 1.0), 0.0).astype(np.float32)


def _seed(query: ExampleQuery) -> int:
    """A stable per-sample seed (same sample, same shuffle, in every process)."""
    return zlib.crc32(f"{query.user_id}\x1f{query.item_id}\x1f{query.ts_ms}".encode())


EMPTY_BLOCK = _Block.from_hits([])
