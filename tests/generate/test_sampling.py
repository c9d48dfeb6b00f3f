"""Temperature / top-k / top-p draw from the intended distribution (chi-square against NumPy), and
the returned log-prob is the unfiltered tempered one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from msjax.generate import Sampler, SamplerConfig
from msjax.generate.sampling import row_keys, sample_next

PROBS = np.array([0.07, 0.3, 0.015, 0.1, 0.2, 0.05, 0.15, 0.005, 0.08, 0.03])
LOGITS = np.log(PROBS).astype(np.float32)
DRAWS = 20000


def intended(logits, temperature, top_k=0, top_p=1.0):
    """NumPy reference: softmax(logits / T), keep the top k, then the smallest top set whose
    mass reaches top_p, renormalise."""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, bool)
    k = len(p) if top_k == 0 else top_k
    mass = 0.0
    for rank, i in enumerate(order[:k]):
        if rank > 0 and mass >= top_p:
            break
        keep[i] = True
        mass += p[i] / p[order[:k]].sum()
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def check_counts(tokens, expected, vocab):
    counts = np.bincount(np.asarray(tokens), minlength=vocab)
    assert counts[expected == 0].sum() == 0, "a filtered-out token was drawn"
    support = expected > 0
    if support.sum() > 1:
        exp = expected[support] / expected[support].sum() * counts.sum()
        test = stats.chisquare(counts[support], exp)
        assert test.pvalue > 1e-3, (counts, expected)
    tv = 0.5 * np.abs(counts / counts.sum() - expected).sum()
    assert tv < 0.02


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8), (1.5, 5, 0.7), (0.7, 0, 0.31)],
)
def test_sample_next_distribution(temperature, top_k, top_p):
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (DRAWS, len(LOGITS)))
    keys = row_keys(jax.random.key(3), jnp.arange(DRAWS))
    fn = jax.jit(lambda x, k: sample_next(x, k, temperature=temperature, top_k=top_k, top_p=top_p))
    tokens, logp = fn(logits, keys)
    check_counts(tokens, intended(LOGITS, temperature, top_k, top_p), len(LOGITS))
    # The log-prob is of the tempered, UNfiltered softmax (what a training pass recomputes).
    ref = np.log(intended(LOGITS, temperature))[np.asarray(tokens)]
    np.testing.assert_allclose(logp, ref, atol=1e-5)


def test_greedy_picks_argmax_with_untempered_logprob():
    logits = jnp.asarray(np.stack([LOGITS, LOGITS[::-1]]))
    tokens, logp = sample_next(logits, None, temperature=0.0)
    np.testing.assert_array_equal(tokens, [1, 8])
    np.testing.assert_allclose(logp, np.log(PROBS[1]) * np.ones(2), atol=1e-6)


def test_sampler_follows_markov_transitions(make_markov):
    vocab = len(LOGITS)
    table = np.stack([np.roll(LOGITS, shift) for shift in range(vocab)])
    model, cfg = make_markov(table, np.zeros(vocab, np.float32))
    temperature, top_k, top_p = 0.8, 6, 0.85
    config = SamplerConfig(
        max_new_tokens=2,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        score_steps=False,
        prompt_buckets=(2,),
    )
    out = Sampler(model, cfg, config)(model, [[2], [5, 7]], n=4000, key=jax.random.key(1))
    tokens = np.asarray(out.tokens)
    first_a, first_b = tokens[:4000, 0], tokens[4000:, 0]
    check_counts(first_a, intended(table[2], temperature, top_k, top_p), vocab)
    check_counts(first_b, intended(table[7], temperature, top_k, top_p), vocab)
    # The second token follows the row of the first one.
    prev = int(np.bincount(first_a).argmax())
    second = tokens[:4000, 1][first_a == prev]
    check_counts(second, intended(table[prev], temperature, top_k, top_p), vocab)
