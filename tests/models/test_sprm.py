"""SPRM head, gradient scaling and the step rules, against independent NumPy/python references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from msjax.models import SPRMHead, scale_gradient, step_mask, trajectory_score

STEP, THINK, END, PAD = 7, 8, 9, 0


def ref_step_positions(text, step_ids, think, end, rule="inference"):
    """Plain-python version of REFERENCE section 2 on one unpadded text: scored positions."""
    n = len(text)
    starts = [i for i, t in enumerate(text) if t == think]
    ends = [i for i, t in enumerate(text) if t == end]
    out = []
    for t in range(1, n):
        if text[t] not in step_ids or text[t - 1] in step_ids or text[t - 1] == think:
            continue
        p = t - 1
        if rule == "inference":
            lo = starts[0] if len(starts) == 1 else 0
            hi = ends[0] if len(ends) == 1 else n
            ok = lo < p < hi
        else:
            lo = starts[0] if starts else 0
            hi = ends[-1] if ends else n - 1
            ok = lo <= p <= hi
        if ok:
            out.append(p)
    return out


CASES = [
    [1, THINK, 2, 3, STEP, 4, STEP, END, 5],  # plain
    [1, THINK, 2, STEP, STEP, STEP, 3, STEP, END],  # a run of delimiters
    [1, THINK, STEP, 2, STEP, 3, STEP, END],  # delimiter right after <think>
    [2, STEP, 1, THINK, 3, STEP, END, 4, STEP, 5, STEP],  # delimiters outside the span
    [1, 2, 3, STEP, 4, STEP],  # no think tags
    [THINK, 1, STEP, THINK, 2, STEP, END, 3, STEP],  # two <think>
    [1, THINK, 2, STEP, END, 3, END, 4, STEP],  # two </think>
    [1, THINK, 2, 3, 4, END],  # no steps
    [1, THINK, 2, END, STEP, 3],  # delimiter right after </think>
]


@pytest.mark.parametrize("rule", ["inference", "training"])
@pytest.mark.parametrize("left_pad", [0, 3])
def test_step_mask_matches_reference(rule, left_pad):
    width = max(map(len, CASES)) + left_pad
    tokens = np.full((len(CASES), width), PAD)
    valid = np.zeros_like(tokens, bool)
    for i, c in enumerate(CASES):
        off = left_pad + (width - left_pad - len(c)) if left_pad else 0
        tokens[i, off : off + len(c)] = c
        valid[i, off : off + len(c)] = True
    got = np.asarray(step_mask(tokens, valid, [STEP], THINK, END, rule=rule))
    for i, c in enumerate(CASES):
        off = np.argmax(valid[i])
        want = ref_step_positions(c, {STEP}, THINK, END, rule)
        assert list(np.nonzero(got[i])[0] - off) == want, (rule, c)


def test_step_mask_edges_differ_between_rules():
    # </think> followed by a delimiter: scored in training (inclusive), not at inference.
    text = np.array([[1, THINK, 2, END, STEP, 3]])
    valid = np.ones_like(text, bool)
    inf = np.asarray(step_mask(text, valid, [STEP], THINK, END, rule="inference"))
    tr = np.asarray(step_mask(text, valid, [STEP], THINK, END, rule="training"))
    assert not inf.any() and tr[0, 3]


def test_step_mask_scorable_and_several_delimiter_ids():
    text = np.array([[THINK, 1, STEP, 2, 11, 3, STEP, END]])
    valid = np.ones_like(text, bool)
    both = np.asarray(step_mask(text, valid, [STEP, 11], THINK, END))
    assert list(np.nonzero(both[0])[0]) == [1, 3, 5]
    scorable = np.arange(8)[None] >= 3
    assert list(
        np.nonzero(np.asarray(step_mask(text, valid, [STEP, 11], THINK, END, scorable))[0])[0]
    ) == [3, 5]
    with pytest.raises(ValueError, match="rule"):
        step_mask(text, valid, [STEP], THINK, END, rule="other")


def test_trajectory_score_geometric_mean():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 6)).astype(np.float32) * 3
    logits[1, 0] = -40.0  # sigmoid underflows: the clamp at 1e-10 applies
    mask = rng.random((4, 6)) > 0.4
    mask[2] = False
    got = np.asarray(trajectory_score(jnp.asarray(logits), jnp.asarray(mask)))
    for i in range(4):
        s = 1 / (1 + np.exp(-logits[i][mask[i]].astype(np.float64)))
        want = np.exp(np.mean(np.log(np.maximum(s, 1e-10)))) if s.size else 0.0
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-7)
    assert got[2] == 0.0


def test_head_matches_torch_sequential():
    import torch

    c = 12
    head = SPRMHead(c, rngs=nnx.Rngs(3))
    seq = torch.nn.Sequential(
        torch.nn.Linear(c, 2 * c), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(2 * c, 1)
    ).eval()
    seq.load_state_dict(
        {
            "0.weight": torch.tensor(np.asarray(head.w1.value).T),
            "0.bias": torch.tensor(np.asarray(head.b1.value)),
            "3.weight": torch.tensor(np.asarray(head.w2.value).T),
            "3.bias": torch.tensor(np.asarray(head.b2.value)),
        },
        strict=True,
    )
    h = np.random.default_rng(1).normal(size=(3, 5, c)).astype(np.float32)
    want = seq(torch.tensor(h)).detach().numpy()[..., 0]
    np.testing.assert_allclose(np.asarray(head(jnp.asarray(h))), want, atol=1e-5)
    assert sum(np.size(v) for v in jax.tree.leaves(nnx.state(head))) == 2 * c * c + 4 * c + 1


def test_head_dropout_only_with_rng():
    head = SPRMHead(16, rngs=nnx.Rngs(0), dropout=0.5)
    h = jnp.ones((64, 16))
    a, b = head(h), head(h)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    d1 = head(h, jax.random.key(1))
    d2 = head(h, jax.random.key(2))
    assert not np.allclose(np.asarray(d1), np.asarray(a))
    assert not np.allclose(np.asarray(d1), np.asarray(d2))


def test_gradient_scaling_is_exact():
    x = jax.random.normal(jax.random.key(0), (5, 7))
    w = jax.random.normal(jax.random.key(1), (7,))
    f = lambda x: jnp.sum(jnp.tanh(x @ w) ** 2)
    g_plain = jax.grad(f)(x)
    g_scaled = jax.grad(lambda x: f(scale_gradient(x, 1e-4)))(x)
    np.testing.assert_array_equal(np.asarray(g_scaled), np.asarray(g_plain * jnp.float32(1e-4)))
    np.testing.assert_array_equal(np.asarray(scale_gradient(x, 1e-4)), np.asarray(x))
    # the original formula gives the same gradient
    g_orig = jax.grad(lambda x: f(x * 1e-4 + jax.lax.stop_gradient(x) * (1 - 1e-4)))(x)
    np.testing.assert_allclose(np.asarray(g_scaled), np.asarray(g_orig), rtol=1e-6)


def test_head_gradient_into_backbone_is_scaled():
    head = SPRMHead(8, rngs=nnx.Rngs(0), grad_scale=1e-4)
    h = jax.random.normal(jax.random.key(0), (4, 8))
    g = jax.grad(lambda h: head(h).sum())(h)
    head.grad_scale = 1.0
    g_full = jax.grad(lambda h: head(h).sum())(h)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_full) * 1e-4, rtol=1e-6)
