"""The ranker's on-disk caches when several processes share them (parallel `llmcf evaluate` runs): an embedding cache
keeps what another writer added, and an atomic write leaves a whole file and no staging file behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmcf.embeddings import TextEmbedder
from ranker.data import EmbeddingCache, save_npz


def test_two_writers_of_one_embedding_cache_keep_each_others_texts(tmp_path: Path) -> None:
    path = tmp_path / "cot.npz"
    embedder = TextEmbedder.load()
    first, second = EmbeddingCache(path, embedder), EmbeddingCache(path, embedder)  # both loaded before either saved
    a = first.embed(["the user likes slow dramas"])
    b = second.embed(["the user skips horror films"])  # saved last: must not drop the first writer's text

    stored = np.load(path)
    assert len(stored["digests"]) == 2
    reread = EmbeddingCache(path, embedder=None)  # would load a model (and fail the check below) if a text were missing
    np.testing.assert_array_equal(reread.embed(["the user likes slow dramas", "the user skips horror films"]),
                                  np.concatenate([a, b]))
    assert reread._embedder is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cot.npz"]


def test_save_npz_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "x.npz"
    save_npz(path, values=np.arange(3))
    save_npz(path, values=np.arange(5))
    np.testing.assert_array_equal(np.load(path)["values"], np.arange(5))
    assert [p.name for p in path.parent.iterdir()] == ["x.npz"]
