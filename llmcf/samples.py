"""How a sample (one user, one target item) is represented for retrieval, shared by whoever indexes samples (the
stream worker) and whoever queries them (the ranker), so both compute the same vector.

LLM-CF: a sample is two normalised text embeddings, the mean of its history items' embeddings (h) and its target item's
(t); similarity = 0.5*<h,h'> + 0.5*<t,t'>, which is one cosine search over [h; t] / sqrt(2).
"""

from __future__ import annotations

import numpy as np

from llmcf.embeddings import EMBEDDING_DIMENSION

SAMPLE_DIMENSION = 2 * EMBEDDING_DIMENSION


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def history_vector(history_vectors: np.ndarray) -> np.ndarray:
    """h: the normalised mean of the history items' embeddings; zeros for an empty history (a cold-start user)."""
    if len(history_vectors) == 0:
        return np.zeros(EMBEDDING_DIMENSION, dtype=np.float32)
    return _unit(np.asarray(history_vectors, dtype=np.float32).mean(axis=0))


def sample_vector(history_vectors: np.ndarray, target_vector: np.ndarray) -> np.ndarray:
    """[h; t] / sqrt(2), a unit vector when the history is not empty: its cosine with another sample's vector is
    0.5*<h,h'> + 0.5*<t,t'>."""
    target = _unit(np.asarray(target_vector, dtype=np.float32))
    return (np.concatenate([history_vector(history_vectors), target]) / np.sqrt(2.0)).astype(np.float32)


HISTORY_SEPARATOR = "\x1f"


def encode_history(item_ids: list[str]) -> str:
    """A sample's history item ids as one payload string: a 20-element list costs the index as much again per point as
    everything else in the payload, and ids may contain commas (MovieLens 1M titles), never the unit separator."""
    return HISTORY_SEPARATOR.join(item_ids)


def decode_history(value: str | None) -> tuple[str, ...]:
    """The item ids `encode_history` stored, oldest first."""
    return tuple(value.split(HISTORY_SEPARATOR)) if value else ()
