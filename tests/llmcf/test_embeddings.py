import numpy as np
import pytest

from llmcf.embeddings import EMBEDDING_DIMENSION, TextEmbedder
from llmcf.errors import UserFacingError

TEXTS = [
    "A young lion prince flees his kingdom after his father's murder.",
    "A lion cub runs away from home when his father the king is killed.",
    "Quarterly tax filing deadlines for small businesses in Germany.",
    "",
    "word " * 400,  # longer than the model's 256-token window: truncated, not an error
    "Toy Story (1995); Animation, Children's, Comedy",
]


@pytest.fixture(scope="module")
def embedder() -> TextEmbedder:
    return TextEmbedder.load("cpu")


def test_shape_dtype_and_unit_norm(embedder):
    vectors = embedder.embed(TEXTS, batch_size=4)
    assert vectors.shape == (len(TEXTS), EMBEDDING_DIMENSION) == (6, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)


def test_similar_sentences_are_closer_than_unrelated_ones(embedder):
    lion_a, lion_b, taxes = embedder.embed(TEXTS[:3])
    assert float(lion_a @ lion_b) > 0.6
    assert float(lion_a @ lion_b) > float(lion_a @ taxes) + 0.3


def test_rows_do_not_depend_on_batching(embedder):
    together = embedder.embed(TEXTS, batch_size=64)
    one_by_one = np.vstack([embedder.embed([t]) for t in TEXTS])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_load_returns_the_shared_instance(embedder):
    assert TextEmbedder.load("cpu") is embedder
    with pytest.raises(UserFacingError):
        TextEmbedder.load("cpu", runtime="tensorflow")  # type: ignore[arg-type]


def test_onnx_runtime_matches_sentence_transformers(embedder, tmp_path_factory):
    home = tmp_path_factory.mktemp("llmcf-home")
    onnx = TextEmbedder.load("cpu", runtime="onnx", home=home)
    assert (home / "models" / "all-minilm-l6-v2-onnx" / "model.onnx").is_file()
    texts = TEXTS + [f"sentence {i} " + "more words " * (i % 13) for i in range(40)]
    expected = embedder.embed(texts, batch_size=16)
    got = onnx.embed(texts, batch_size=16)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-5
    # A second load in a process reuses the cached export (no re-export).
    assert TextEmbedder.load("cpu", runtime="onnx", home=home) is onnx
    with pytest.raises(UserFacingError, match="CPU only"):
        TextEmbedder.load("cuda:0", runtime="onnx", home=home)
