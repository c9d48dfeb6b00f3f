"""experiments.sweeps.probe: per-candidate trajectory scores from flat per-step probe logits."""

import numpy as np

import msjax.cli.convert  # noqa: F401  (defines --out)
import msjax.cli.infer  # noqa: F401  (defines --model: the sweeps must import beside the CLIs)
from experiments.sweeps import spr_threshold  # noqa: F401
from experiments.sweeps.probe import candidate_scores, weakest_step_scores


def test_candidate_scores_match_a_plain_geometric_mean():
    rng = np.random.default_rng(0)
    p, k = 3, 4
    n_steps = rng.integers(0, 5, size=p * k)  # some candidates have no step
    candidate = np.repeat(np.arange(p * k), n_steps)
    logits = rng.normal(size=len(candidate)).astype(np.float32) * 3
    got = candidate_scores(candidate, logits, (p, k))
    want, weakest = np.zeros(p * k), np.zeros(p * k)
    for c in range(p * k):
        z = logits[candidate == c].astype(np.float64)
        if len(z):
            step = 1 / (1 + np.exp(-z))
            want[c] = np.exp(np.mean(np.log(np.maximum(step, 1e-10))))
            weakest[c] = step.min()
    np.testing.assert_allclose(got, want.reshape(p, k), rtol=1e-5)
    assert got.shape == (p, k) and (got.ravel()[n_steps == 0] == 0).all()
    np.testing.assert_allclose(
        weakest_step_scores(candidate, logits, (p, k)), weakest.reshape(p, k), rtol=1e-6
    )
