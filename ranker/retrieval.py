"""Exact retrieval of in-context examples, the one engine behind `llmcf train`, `evaluate`, `update` and `serve`.

The rule (LLM-CF, ../shared/docs/llm-cf.md, stricter on leakage): for a query with history vector h (the normalised
mean of its history items' text embeddings) and target vector t (its item's), every pool sample j scores
s_j = 0.5<h, H_j> + 0.5<t, T_item(j)>; the query gets the 2 best positives and the 2 best negatives, never a sample of
the same user at or after the query in stream order (event time, ties broken by `seq`; a training query is its own
pool sample, so it never retrieves itself). Ties in score go to the later sample in stream order (the fresher one):
the result is a function of the pool's content, not of its layout or arrival order. A query with neither a history
nor a target vector (an unknown user on an item without text) is similar to nothing: it gets no examples.

Why it is exact and cheap (the algebra): every sample of one item shares the item term, and <h, H_j> <= |h| max|H|
(= 1 for unit vectors). So for a query whose target's similarity row c_i = <t, T_i> is sorted in decreasing order,
items are scanned best-first and the scan stops as soon as the second-best score found for each label is strictly
above 0.5 |h| max|H| + 0.5 c_next: no sample of any item not scanned can reach it. The similarity rows depend only on
the target item and the pool's item table, so they are cached per item (`ranker.neighbours`) and extended, by merging,
when new items join the pool (`bench/retrieval.py` prints how many pool rows a query scores).

Two executions of the same rule, both checked against brute force in the tests:
- many queries sharing a target item with their own histories (training, evaluation, updates): one matrix product per
  target item over the rows of the items scanned (`top_rows`);
- one history and many targets (a serving request: one user, many candidates, `top_rows_for_history`): per item
  reached only its 2 best positives and 2 best negatives by the history term can win, so they are computed once per
  item from its contiguous block of history vectors (`_ItemBest`) and every candidate ranks 4 entries per item it
  scans; a small pool is scored whole instead.

The pool itself, its snapshots and their layout: `ranker.sample_pool`.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Sequence

import numpy as np

from ranker.neighbours import NeighbourCache, Neighbours
from ranker.sample_pool import PoolView, SamplePool

POSITIVES = 2
NEGATIVES = 2
K = POSITIVES + NEGATIVES
LATEST_SEQ = np.iinfo(np.int64).max  # a query's seq when it is not itself a pool sample (serving)
_PERMUTATIONS_OF_4 = np.array(list(itertools.permutations(range(K))), dtype=np.int64)
_NORM_SLACK = 1e-4  # float32 dot products may exceed |a||b| by rounding; the bound must never be below the truth
_MAX_SCORE_CELLS = 4_000_000  # queries x rows scored at once (16 MB of float32)
_FULL_SCAN_CELLS = 1_000_000  # targets x pool rows under which one request scores the whole pool (measured cheaper)


# ---- exact retrieval -------------------------------------------------------------------------------------------------


class ExactRetriever:
    """Exact, balanced (2 positives + 2 negatives), leak-free retrieval over a `SamplePool` (module docstring).

    Thread-safe: the only shared state is the similarity-row cache (`NeighbourCache`)."""

    def __init__(self, pool: SamplePool, neighbour_cache_size: int = 20_000, full_scan_cells: int = _FULL_SCAN_CELLS) -> None:
        self.pool = pool
        self.full_scan_cells = full_scan_cells  # below this many targets x rows, a request scores the whole pool
        self.neighbours = NeighbourCache(neighbour_cache_size)
        self.rows_scored = 0  # pool rows whose score was computed, summed over queries (benchmarks)

    # ---- the public entry points ---------------------------------------------------------------------------------

    def top_rows(self, view: PoolView, users: np.ndarray, items: Sequence[str], targets: np.ndarray,
                 histories: np.ndarray, ts: np.ndarray, seq: np.ndarray) -> np.ndarray:
        """(B, 4) pool rows per query: 2 positives best first, then 2 negatives best first; -1 where the pool has
        fewer. Queries are processed by target item: one matrix product per target over the rows scanned."""
        result = np.full((len(items), K), -1, dtype=np.int64)
        if view.n == 0 or len(items) == 0:
            return result
        gmax = np.linalg.norm(histories, axis=1) * view.max_history_norm * (1 + _NORM_SLACK) + 1e-6
        by_target: dict[str, list[int]] = {}
        for position, item in enumerate(items):
            by_target.setdefault(item, []).append(position)
        blank = ~np.any(histories, axis=1) & ~np.any(targets, axis=1)
        for item, positions in by_target.items():
            members = np.asarray(positions, dtype=np.int64)
            members = members[~blank[members]]
            if not len(members):
                continue
            neighbours = self.neighbours.get(view, item, targets[members[0]])
            self._scan(view, neighbours, histories[members], users[members], ts[members], seq[members], gmax[members],
                       result, members)
        return result

    def top_rows_for_history(self, view: PoolView, user: int, ts: int, seq: int, history: np.ndarray,
                             items: Sequence[str], targets: np.ndarray) -> np.ndarray:
        """`top_rows` for queries that share one user, time and history (a serving request): the history term is
        computed once per item reached (or once over a small pool) and shared by every target."""
        result = np.full((len(items), K), -1, dtype=np.int64)
        if view.n == 0 or len(items) == 0:
            return result
        if not history.any():  # without a history, a target without text is similar to nothing
            keep = np.flatnonzero(targets.any(axis=1))
            if len(keep) < len(items):
                if len(keep):
                    result[keep] = self.top_rows_for_history(view, user, ts, seq, history, [items[i] for i in keep.tolist()],
                                                             targets[keep])
                return result
        distinct = list(dict.fromkeys(items))
        position = {item: i for i, item in enumerate(distinct)}
        first = {item: targets[i] for i, item in reversed(list(enumerate(items)))}
        neighbours = [self.neighbours.get(view, item, first[item]) for item in distinct]
        sims = np.stack([nb.sims for nb in neighbours])  # (targets, items)
        excluded = _excluded_rows(view, user, ts, seq)
        best = _ItemBest(view, history, excluded)
        if view.n * len(distinct) <= self.full_scan_cells:  # a small pool: scoring it all costs less than bounding it
            self.rows_scored += best.fill_all()
            codes = np.broadcast_to(np.arange(view.n_items), sims.shape)
            found, _ = _top_entries(sims, codes, np.ones(sims.shape, dtype=bool), best)
            result[:] = found[[position[item] for item in items]]
            return result
        gmax = float(np.linalg.norm(history)) * view.max_history_norm * (1 + _NORM_SLACK) + 1e-6
        found = np.full((len(distinct), K), -1, dtype=np.int64)
        prefix = np.array([_first_prefix(nb, view.label_counts) for nb in neighbours], dtype=np.int64)
        active = np.arange(len(distinct))
        while len(active):
            codes, present = _padded([neighbours[t].order[: prefix[t]] for t in active.tolist()])
            self.rows_scored += best.fill(np.unique(codes[present]))
            safe = np.where(present, codes, 0)
            picked, second = _top_entries(np.take_along_axis(sims[active], safe, axis=1), safe, present, best)
            bounds = [0.5 * gmax + 0.5 * _next_sim(neighbours[t], int(prefix[t])) for t in active.tolist()]
            done, wanted = _settled(second, np.asarray(bounds), [neighbours[t] for t in active.tolist()],
                                    prefix[active], gmax)
            found[active[done]] = picked[done]
            prefix[active[~done]] = wanted[~done]
            active = active[~done]
        result[:] = found[[position[item] for item in items]]
        return result

    # ---- one target's scan --------------------------------------------------------------------------------------------

    def _scan(self, view: PoolView, neighbours: Neighbours, histories: np.ndarray, users: np.ndarray, ts: np.ndarray,
              seq: np.ndarray, gmax: np.ndarray, result: np.ndarray, members: np.ndarray) -> None:
        """Queries sharing one target: scan its items best-first. A query not settled by a prefix moves on to the
        prefix it needs, rounded up to a power of two and shared with the queries that need about as much: each query
        pays for at most twice the items its own bound asks for, whatever the others in its group need."""
        work = [(np.arange(len(members)), _first_prefix(neighbours, view.label_counts))]
        while work:
            active, prefix = work.pop()
            rows = view.rows_of(neighbours.order[:prefix])
            item_term = 0.5 * neighbours.sims[view.item[rows]]
            bound = 0.5 * gmax[active] + 0.5 * _next_sim(neighbours, prefix)
            chunk = max(1, _MAX_SCORE_CELLS // max(1, len(rows)))
            seconds, picks = [], []
            for start in range(0, len(active), chunk):
                part = active[start : start + chunk]
                score = 0.5 * (histories[part] @ view.history[rows].T) + item_term
                allowed = np.ones(score.shape, dtype=bool)
                query, column = np.nonzero(view.user[rows][None, :] == users[part][:, None])  # the same user's rows
                row_ts, row_seq = view.ts[rows[column]], view.seq[rows[column]]
                later = (row_ts > ts[part][query]) | ((row_ts == ts[part][query]) & (row_seq >= seq[part][query]))
                allowed[query[later], column[later]] = False
                picked, second = _top_per_label(score, allowed, np.broadcast_to(view.label[rows], score.shape),
                                                np.broadcast_to(view.ts[rows], score.shape),
                                                np.broadcast_to(view.seq[rows], score.shape),
                                                np.broadcast_to(rows, score.shape))
                picks.append(picked)
                seconds.append(second)
            self.rows_scored += len(rows) * len(active)
            picked, second = np.concatenate(picks), np.concatenate(seconds)
            done, wanted = _settled(second, bound, [neighbours] * len(active), np.full(len(active), prefix), gmax[active])
            result[members[active[done]]] = picked[done]
            if done.all():
                continue
            left, need = active[~done], wanted[~done]
            rounded = np.minimum(2 ** np.ceil(np.log2(need)).astype(np.int64), neighbours.n_items)
            for size in np.unique(rounded).tolist():
                work.append((left[rounded == size], int(size)))


class _ItemBest:
    """For one history h: each item's 2 best positive and 2 best negative rows by <h, H> (ties to the later (ts, seq)),
    computed for the items a request reaches, from the pool's contiguous per-item blocks (no row gather)."""

    def __init__(self, view: PoolView, history: np.ndarray, excluded: np.ndarray | None) -> None:
        self.view, self.history, self.excluded = view, history, excluded
        shape = (view.n_items, K)
        self.g = np.full(shape, -np.inf, dtype=np.float32)
        self.row = np.full(shape, -1, dtype=np.int64)
        self.ts = np.zeros(shape, dtype=np.int64)
        self.seq = np.zeros(shape, dtype=np.int64)
        self.filled = np.zeros(view.n_items, dtype=bool)

    def fill(self, items: np.ndarray) -> int:
        """Compute the entries of the items not filled yet; returns the rows whose history term it computed."""
        items = items[~self.filled[items]]
        if not len(items):
            return 0
        view = self.view
        parts = [view.item_history[i] @ self.history for i in items.tolist()]
        g = np.concatenate(parts).astype(np.float32, copy=False)
        rows = np.concatenate([view.item_rows[i] for i in items.tolist()])
        self._set(items, g, rows, np.array([len(p) for p in parts], dtype=np.int64))
        return len(rows)

    def fill_all(self) -> int:
        """Compute every item's entries from one product over the whole pool (a small pool)."""
        view = self.view
        rows, _, counts = view.by_item
        g = (view.history[: view.n] @ self.history).astype(np.float32, copy=False)[rows]
        self._set(np.arange(view.n_items), g, rows, counts)
        return view.n

    def _set(self, items: np.ndarray, g: np.ndarray, rows: np.ndarray, lengths: np.ndarray) -> None:
        """The entries of `items` from their rows' history terms `g` (item by item, `lengths` rows each)."""
        view = self.view
        self.filled[items] = True
        if self.excluded is not None:
            g = np.where(self.excluded[rows], np.float32(-np.inf), g)
        positives = view.item_positives[items]
        starts = np.cumsum(lengths) - lengths
        # groups: each item's positives then its negatives, contiguous in the concatenation
        group_start = np.stack([starts, starts + positives], axis=1).ravel()
        group_size = np.stack([positives, lengths - positives], axis=1).ravel()
        ts, seq = view.ts[rows], view.seq[rows]
        for rank in range(2):
            position, value = _group_best(g, ts, seq, group_start, group_size)
            found = value > -np.inf
            entry = np.tile(np.array([0, 2]), len(items)) + rank  # positives at entries 0-1, negatives at 2-3
            owner = np.repeat(items, 2)
            self.g[owner, entry] = np.where(found, value, -np.inf)
            self.row[owner, entry] = np.where(found, rows[np.maximum(position, 0)], -1)
            self.ts[owner, entry] = np.where(found, ts[np.maximum(position, 0)], 0)
            self.seq[owner, entry] = np.where(found, seq[np.maximum(position, 0)], 0)
            if rank == 0:
                g = g.copy()
            g[position[found]] = -np.inf


def _top_entries(item_sims: np.ndarray, codes: np.ndarray, present: np.ndarray,
                 best: _ItemBest) -> tuple[np.ndarray, np.ndarray]:
    """Per query (a row of (A, P) item codes, `present` where a code is, and the target's similarity to each): the 2
    best positive then the 2 best negative pool rows (A, 4), -1 where fewer, and each label's second-best score (A, 2),
    -inf where fewer than two; ties in score to the later (ts, seq).

    An item's two entries of a label are ordered (the first is at least the second, and fresher on a tie), so the best
    of a label is the best first entry, and the second best is either the runner-up first entry or the winner's second
    one: two passes of argmax over (A, P) instead of a sort. Queries with a tie at either place are settled one by one
    over all their entries (rare outside empty histories and items with equal vectors)."""
    count = codes.shape[0]
    picked = np.full((count, K), -1, dtype=np.int64)
    second = np.full((count, 2), -np.inf)
    every = np.arange(count)
    half_sims = 0.5 * item_sims
    for part, entry in enumerate((0, 2)):  # positives, then negatives
        first = np.where(present, 0.5 * best.g[codes, entry] + half_sims, -np.inf)
        top = first.argmax(axis=1)
        v1 = first[every, top]
        ties = np.count_nonzero(first == v1[:, None], axis=1) > 1
        top_code = codes[every, top]
        runner_up_of_winner = np.where(v1 > -np.inf, 0.5 * best.g[top_code, entry + 1] + half_sims[every, top], -np.inf)
        first[every, top] = -np.inf
        other = first.argmax(axis=1)
        v_other = first[every, other]
        v2 = np.maximum(v_other, runner_up_of_winner)
        ties |= (v2 > -np.inf) & ((np.count_nonzero(first == v2[:, None], axis=1) + (runner_up_of_winner == v2)) > 1)
        ties &= v1 > -np.inf
        picked[:, 2 * part] = np.where(v1 > -np.inf, best.row[top_code, entry], -1)
        from_winner = runner_up_of_winner >= v_other
        picked[:, 2 * part + 1] = np.where(v2 > -np.inf, np.where(from_winner, best.row[top_code, entry + 1],
                                                                  best.row[codes[every, other], entry]), -1)
        second[:, part] = v2
        for query in np.flatnonzero(ties).tolist():
            picked[query, 2 * part: 2 * part + 2], second[query, part] = _top_two_by_sorting(
                half_sims[query], codes[query], present[query], best, entry)
    return picked, second


def _top_two_by_sorting(half_sims: np.ndarray, codes: np.ndarray, present: np.ndarray, best: _ItemBest,
                        entry: int) -> tuple[np.ndarray, float]:
    """One query's 2 best rows of one label over all its items' two entries, by (score, ts, seq) descending, and the
    second-best score: the exact rule where argmax alone cannot break a tie."""
    codes, half_sims = codes[present], half_sims[present]
    items = np.concatenate([codes, codes])
    entries = np.repeat([entry, entry + 1], len(codes))
    score = 0.5 * best.g[items, entries] + np.concatenate([half_sims, half_sims])
    valid = np.flatnonzero(score > -np.inf)
    order = valid[np.lexsort((-best.seq[items[valid], entries[valid]], -best.ts[items[valid], entries[valid]],
                              -score[valid]))][:2]
    rows = np.full(2, -1, dtype=np.int64)
    rows[: len(order)] = best.row[items[order], entries[order]]
    return rows, float(score[order[1]]) if len(order) == 2 else -np.inf


def _group_best(values: np.ndarray, ts: np.ndarray, seq: np.ndarray, start: np.ndarray,
                size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per contiguous group (start, size) of `values`: the position of its largest value, ties to the later (ts, seq),
    and that value (-inf, position -1 for an empty group or one whose values are all -inf)."""
    position = np.full(len(start), -1, dtype=np.int64)
    best = np.full(len(start), -np.inf, dtype=np.float32)
    nonempty = np.flatnonzero(size > 0)
    if not len(nonempty):
        return position, best
    first = start[nonempty]  # contiguous, in order, covering every value: reduceat's segments
    lengths = size[nonempty]
    top = np.maximum.reduceat(values, first)
    tied = values == np.repeat(top, lengths)
    low = np.iinfo(np.int64).min
    latest_ts = np.maximum.reduceat(np.where(tied, ts, low), first)
    tied &= ts == np.repeat(latest_ts, lengths)
    latest_seq = np.maximum.reduceat(np.where(tied, seq, low), first)
    tied &= seq == np.repeat(latest_seq, lengths)
    where = np.maximum.reduceat(np.where(tied, np.arange(len(values)), -1), first)
    ok = top > -np.inf
    position[nonempty] = np.where(ok, where, -1)
    best[nonempty] = top
    return position, best


# ---- helpers -------------------------------------------------------------------------------------------------------


def _next_sim(neighbours: Neighbours, prefix: int) -> float:
    """The best item similarity not yet scanned (-inf when every item was)."""
    return float(neighbours.sorted_sims[prefix]) if prefix < neighbours.n_items else -np.inf


def _first_prefix(neighbours: Neighbours, label_counts: np.ndarray) -> int:
    """The shortest prefix of the target's items that holds two samples of each label (all items when the pool has
    fewer): where a scan starts, so that its first round can already bound the rest."""
    size = 4
    while True:  # usually the first few items hold them: look further only when they do not
        cum = np.cumsum(label_counts[neighbours.order[:size]], axis=0)
        if size >= neighbours.n_items or (cum[-1] >= 2).all():
            reach = [int(np.searchsorted(cum[:, label], 2)) + 1 for label in (0, 1)]
            return max(1, min(neighbours.n_items, max(reach)))
        size *= 4


def _settled(second: np.ndarray, bound: np.ndarray, neighbours: list[Neighbours], prefix: np.ndarray,
             gmax: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Which queries are settled (every item scanned, or each label's second-best score strictly above what an
    unscanned sample could reach), and for the others how many items to scan next: every item that could still reach
    the smaller second-best, or twice as many where a label still has fewer than two (its samples so far were the
    query's own user's, later ones). The next count only sizes the next scan; the bound judges it again."""
    threshold = second.min(axis=1)  # (B,) -inf when a label has fewer than two
    sizes = np.array([nb.n_items for nb in neighbours], dtype=np.int64)
    done = (prefix >= sizes) | (threshold > bound)
    wanted = np.minimum(2 * prefix, sizes)
    finite = ~done & np.isfinite(threshold)
    if finite.any():
        # items whose similarity s satisfies 0.5 gmax + 0.5 s >= threshold, i.e. s >= 2 threshold - gmax
        cut = 2 * threshold - np.broadcast_to(np.asarray(gmax, dtype=np.float64), threshold.shape)
        for i in np.flatnonzero(finite).tolist():
            reach = int(np.searchsorted(-neighbours[i].sorted_sims, -cut[i], side="right"))
            wanted[i] = min(max(int(prefix[i]) + 1, reach), int(sizes[i]))
    return done, wanted


def _top_per_label(score: np.ndarray, allowed: np.ndarray, label: np.ndarray, ts: np.ndarray, seq: np.ndarray,
                   rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a (B, M) score matrix: the 2 best positive columns then the 2 best negative ones as pool rows
    (B, 4), -1 where fewer; and each label's second-best score (B, 2), -inf where fewer than two. Ties in score go to
    the later (ts, seq)."""
    picked = np.full((score.shape[0], K), -1, dtype=np.int64)
    second = np.full((score.shape[0], 2), -np.inf)
    every = np.arange(score.shape[0])
    for part, (wanted_label, count) in enumerate(((1, POSITIVES), (0, NEGATIVES))):
        masked = np.where(allowed & (label == wanted_label), score, -np.inf)
        for rank in range(count):
            column = masked.argmax(axis=1)
            best = masked[every, column]
            found = best > -np.inf
            tied = found & (np.count_nonzero(masked == best[:, None], axis=1) > 1)
            for row in np.flatnonzero(tied).tolist():  # rare outside ties on an empty history: resolved row by row
                columns = np.flatnonzero(masked[row] == best[row])
                column[row] = columns[np.lexsort((seq[row, columns], ts[row, columns]))[-1]]
            picked[:, part * POSITIVES + rank] = np.where(found, rows[every, column], -1)
            if rank == count - 1:
                second[:, part] = best
            masked[every[found], column[found]] = -np.inf
    return picked, second


def _padded(row_lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged row lists as a (B, L) matrix padded with -1, and where it holds a row."""
    lengths = np.array([len(r) for r in row_lists], dtype=np.int64)
    width = max(1, int(lengths.max(initial=0)))
    rows = np.full((len(row_lists), width), -1, dtype=np.int64)
    if lengths.sum():
        flat = np.concatenate(row_lists)
        owner = np.repeat(np.arange(len(row_lists)), lengths)
        column = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        rows[owner, column] = flat
    return rows, rows >= 0


def _excluded_rows(view: PoolView, user: int, ts: int, seq: int) -> np.ndarray | None:
    """Rows of `user` at or after (ts, seq), as a mask over the view's rows; None when there are none."""
    if user < 0:
        return None
    mine = np.flatnonzero(view.user[: view.n] == user)
    later = mine[(view.ts[mine] > ts) | ((view.ts[mine] == ts) & (view.seq[mine] >= seq))]
    if not len(later):
        return None
    mask = np.zeros(view.n, dtype=bool)
    mask[later] = True
    return mask


def seed_of(user_id: str, item_id: str, ts_ms: int) -> int:
    """A stable per-sample seed (same sample, same shuffle, in every process)."""
    return zlib.crc32(f"{user_id}\x1f{item_id}\x1f{ts_ms}".encode())


def shuffle_slots(rows: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
    """(B, 4) rows (positives then negatives) placed in a per-sample permutation of the 4 slots, as LLM-CF shuffles
    its examples; -1 stays -1."""
    order = _PERMUTATIONS_OF_4[np.asarray(seeds, dtype=np.int64) % len(_PERMUTATIONS_OF_4)]
    slots = np.full_like(rows, -1)
    np.put_along_axis(slots, order, rows, axis=1)
    return slots
