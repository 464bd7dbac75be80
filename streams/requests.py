"""The CoT samples of one `interactions` batch, built together: each sample's request (the JSON published to
`cot-requests`), its pending row (PostgreSQL) and its point (the vector index).

Everything is built from already validated data, without pydantic models: a request's JSON is spliced from its items'
JSON, serialised once per item (`CatalogueItem.target_json`, `Catalogue.history_json`), and orjson for its own fields; it
decodes to the very `CotRequest` the model would have given (tests/streams/test_requests.py). Sample vectors are
LLM-CF's [h; t] / sqrt(2) (`llmcf.samples.sample_vector`) for the whole batch in a few numpy calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from itertools import chain
from operator import attrgetter
from typing import NamedTuple

import numpy as np
import orjson

from llmcf.cot_policy import CotReason, cot_request_id
from llmcf.dead_letters import SourceRecord
from llmcf.events import epoch_ms
from llmcf.samples import encode_history, history_vectors, join_sample_vectors
from storage.rows import InteractionRow, PendingSampleRow
from storage.vectors import Point
from streams.catalogue import Catalogue, CatalogueItem
from streams.history import HistoryItem


class Decided(NamedTuple):
    """An interaction that gets a CoT: why, its target item, and the user's history before it (known items only,
    oldest first)."""

    record: SourceRecord
    row: InteractionRow
    reason: CotReason
    target: CatalogueItem
    past: list[HistoryItem]


class Sample(NamedTuple):
    """A sampled interaction, ready to write: its request id and JSON, its pending row and its pending point."""

    record: SourceRecord
    row: InteractionRow
    request_id: str
    reason: CotReason
    request: bytes
    pending: PendingSampleRow
    point: Point


_ITEM_ID = attrgetter("item_id")
_LABEL = attrgetter("label")


def build_samples(
    decided: Sequence[Decided], catalogue: Catalogue, requested_at: datetime, refuse: Callable[[SourceRecord, str], object]
) -> list[Sample]:
    """The samples of `decided`, in order. Every history and target item must be in `catalogue`. A sample that cannot
    be built is handed to `refuse` with the reason, and the others go on."""
    if not decided:
        return []
    row_of = catalogue.row_of.__getitem__
    vectors = sample_vectors(
        catalogue.vectors,
        [row_of(d.target.snapshot.item_id) for d in decided],
        [list(map(row_of, map(_ITEM_ID, d.past))) for d in decided],
    )
    requested_json = orjson.dumps(requested_at, option=orjson.OPT_UTC_Z)
    requested_ms = epoch_ms(requested_at)
    fragments = catalogue.history_json.__getitem__
    samples = []
    for d, vector in zip(decided, vectors, strict=True):
        try:
            samples.append(_sample(d, vector, fragments, requested_json, requested_ms))
        except (orjson.JSONEncodeError, ValueError) as exc:  # e.g. a string orjson cannot encode: that sample only
            refuse(d.record, f"{type(exc).__name__}: {exc}")
    return samples


def _sample(
    d: Decided, vector: np.ndarray, fragments: Callable[[tuple[str, int]], bytes], requested_json: bytes, requested_ms: int
) -> Sample:
    # Per history entry only C-level loops (map, zip, join): a sample has up to 20 and a batch ~400 samples.
    row = d.row
    request_id = cot_request_id(row.interaction_id)
    item_ids = list(map(_ITEM_ID, d.past))
    history = list(zip(item_ids, map(_LABEL, d.past), strict=True))
    head = orjson.dumps(
        {"schema_version": 1, "request_id": request_id, "user_id": row.user_id, "item_id": row.item_id,
         "label": row.label, "ts": row.ts.astimezone(timezone.utc)},
        option=orjson.OPT_UTC_Z,
    )
    request = b"".join((
        head[:-1], b',"target":', d.target.target_json, b',"history":[', b",".join(map(fragments, history)),
        b'],"reason":"', d.reason.encode(), b'","requested_at":', requested_json, b"}",
    ))
    pending = PendingSampleRow(request_id, row.user_id, row.item_id, row.label, row.ts, history, d.reason, requested_ms)
    payload = {
        "user_id": row.user_id,
        "item_id": row.item_id,
        "label": row.label,
        "ts": row.version,
        "status": "pending",
        "history": encode_history(item_ids),
    }
    return Sample(d.record, row, request_id, d.reason, request, pending, Point(request_id, vector, payload))


def sample_vectors(vectors: np.ndarray, target_rows: Sequence[int], history_rows: Sequence[Sequence[int]]) -> np.ndarray:
    """`llmcf.samples.sample_vector` for many samples at once: row i is [h_i; t_i] / sqrt(2), where t_i is the unit
    vector of `vectors[target_rows[i]]` and h_i the unit mean of `vectors[history_rows[i]]` (zeros when empty).

    Row 0 of `vectors` must be all zeros (`Catalogue` keeps it so): histories are padded with it to the longest one,
    and summed one history position at a time (a (samples, dim) gather per position stays in cache, where gathering
    every history row at once and reducing per sample was 2-3x slower)."""
    n, dim = len(target_rows), vectors.shape[1]
    histories = np.zeros((n, dim), dtype=np.float32)
    counts = np.fromiter(map(len, history_rows), dtype=np.intp, count=n)
    if counts.any():
        flat = np.fromiter(chain.from_iterable(history_rows), dtype=np.intp, count=int(counts.sum()))
        padded = np.zeros((n, int(counts.max())), dtype=np.intp)
        owner = np.repeat(np.arange(n), counts)
        padded[owner, np.arange(len(flat)) - np.repeat(np.cumsum(counts) - counts, counts)] = flat
        histories = history_vectors(vectors, padded)
    return join_sample_vectors(histories, vectors[np.asarray(target_rows, dtype=np.intp)])
