"""The timing-isolation benchmark's statistics (the benchmark itself needs a server: not a test)."""

import numpy as np

from benchmarks.isolation import permutation_p


def test_permutation_p_separates_shifted_samples_and_not_equal_ones():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 0.1, 30), rng.normal(1.0, 0.1, 30)
    assert permutation_p(a, b, rounds=2000) > 0.05
    assert permutation_p(a, b + 0.3, rounds=2000) < 0.001
    assert permutation_p(a, a.copy(), rounds=200) == 1.0
