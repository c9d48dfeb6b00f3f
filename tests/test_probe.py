"""experiments.sweeps.probe: per-candidate trajectory scores from flat per-step probe logits."""

import numpy as np

from experiments.sweeps.probe import candidate_scores


def test_candidate_scores_match_a_plain_geometric_mean():
    rng = np.random.default_rng(0)
    p, k = 3, 4
    n_steps = rng.integers(0, 5, size=p * k)  # some candidates have no step
    candidate = np.repeat(np.arange(p * k), n_steps)
    logits = rng.normal(size=len(candidate)).astype(np.float32) * 3
    got = candidate_scores(candidate, logits, (p, k))
    want = np.zeros(p * k)
    for c in range(p * k):
        z = logits[candidate == c].astype(np.float64)
        if len(z):
            want[c] = np.exp(np.mean(np.log(np.maximum(1 / (1 + np.exp(-z)), 1e-10))))
    np.testing.assert_allclose(got, want.reshape(p, k), rtol=1e-5)
    assert got.shape == (p, k) and (got.ravel()[n_steps == 0] == 0).all()
