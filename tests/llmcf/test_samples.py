"""LLM-CF's sample vector: one cosine over [h; t] / sqrt(2) is the paper's 0.5*<h,h'> + 0.5*<t,t'>."""

import numpy as np

from llmcf.samples import history_vector, join_sample_vectors, sample_vector, unit_rows


def test_one_cosine_is_the_mean_of_the_history_and_target_similarities():
    rng = np.random.default_rng(0)
    (h1, h2), (t1, t2) = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 8))
    a, b = sample_vector(h1, t1), sample_vector(h2, t2)
    expected = 0.5 * history_vector(h1) @ history_vector(h2) + 0.5 * unit_rows(t1[None])[0] @ unit_rows(t2[None])[0]
    assert np.isclose(a @ b, expected, atol=1e-6) and np.isclose(np.linalg.norm(a), 1.0, atol=1e-6)


def test_a_cold_start_user_has_a_zero_history_half():
    vector = sample_vector(np.zeros((0, 8)), np.ones(8))
    assert not vector[:8].any() and np.isclose(np.linalg.norm(vector), np.sqrt(0.5), atol=1e-6)


def test_rows_join_the_same_way_one_at_a_time_or_together():
    rng = np.random.default_rng(1)
    histories, targets = unit_rows(rng.standard_normal((5, 8))), rng.standard_normal((5, 8))
    together = join_sample_vectors(histories, targets)
    assert together.dtype == np.float32
    for row, (h, t) in enumerate(zip(histories, targets, strict=True)):
        assert np.array_equal(together[row], join_sample_vectors(h[None], t[None])[0])
