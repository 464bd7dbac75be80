"""How a sample (one user, one target item) is represented for retrieval, shared by whoever indexes samples (the
stream worker) and whoever queries them (the ranker), so both compute the same vector.

LLM-CF: a sample is two normalised text embeddings, the mean of its history items' embeddings (h) and its target item's
(t); similarity = 0.5*<h,h'> + 0.5*<t,t'>, which is one cosine search over [h; t] / sqrt(2).
"""

from __future__ import annotations

import numpy as np

from llmcf.embeddings import EMBEDDING_DIMENSION

SAMPLE_DIMENSION = 2 * EMBEDDING_DIMENSION
_SQRT2 = np.float32(np.sqrt(2.0))


def unit_rows(rows: np.ndarray) -> np.ndarray:
    """Each row divided by its norm, as float32; all-zero rows stay zero."""
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def history_vectors(table: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """h for many samples: row i is the unit mean of `table[codes[i, k]]` over the positions with `codes[i, k] > 0`
    (zeros when there are none). Row 0 of `table` must be all zeros: it is the padding. Summed one history position
    at a time, in order (a (samples, dim) gather per position stays in cache, where gathering every history row at
    once and reducing per sample was 2-3x slower), so every caller gets the same float32 result for the same history."""
    codes = np.asarray(codes, dtype=np.intp)
    n, dim = codes.shape[0], table.shape[1]
    sums = np.zeros((n, dim), dtype=np.float32)
    gathered = np.empty_like(sums)
    for position in codes.T:
        np.take(table, position, axis=0, out=gathered)
        sums += gathered
    counts = np.count_nonzero(codes > 0, axis=1)
    out = np.zeros((n, dim), dtype=np.float32)
    filled = counts > 0
    out[filled] = unit_rows(sums[filled] / counts[filled, None].astype(np.float32))
    return out


def history_vector(vectors: np.ndarray) -> np.ndarray:
    """h of one sample from its history items' embeddings (oldest first); zeros for an empty history (a cold-start
    user). The same arithmetic as `history_vectors`."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if len(vectors) == 0:
        return np.zeros(EMBEDDING_DIMENSION, dtype=np.float32)
    table = np.concatenate([np.zeros((1, vectors.shape[1]), dtype=np.float32), vectors])
    return history_vectors(table, np.arange(1, len(vectors) + 1)[None, :])[0]


def join_sample_vectors(histories: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Row-wise [h; t] / sqrt(2) from h (already unit or zero: `history_vectors`) and the target's embedding (made unit
    here): the one place LLM-CF's sample formula is written. A row is a unit vector when its history is not empty,
    and its cosine with another sample's row is 0.5*<h,h'> + 0.5*<t,t'>."""
    joined = np.concatenate([np.asarray(histories, dtype=np.float32), unit_rows(targets)], axis=-1)
    joined /= _SQRT2
    return joined


def sample_vector(history_vectors: np.ndarray, target_vector: np.ndarray) -> np.ndarray:
    """One sample's vector (`join_sample_vectors`) from its history items' embeddings and its target's."""
    return join_sample_vectors(history_vector(history_vectors)[None, :], np.asarray(target_vector)[None, :])[0]


HISTORY_SEPARATOR = "\x1f"


def encode_history(item_ids: list[str]) -> str:
    """A sample's history item ids as one payload string: a 20-element list costs the index as much again per point as
    everything else in the payload, and ids may contain commas (MovieLens 1M titles), never the unit separator."""
    return HISTORY_SEPARATOR.join(item_ids)


def decode_history(value: str | None) -> tuple[str, ...]:
    """The item ids `encode_history` stored, oldest first."""
    return tuple(value.split(HISTORY_SEPARATOR)) if value else ()
