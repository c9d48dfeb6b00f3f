"""GRPO losses against plain NumPy (float64) references written independently here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from msjax.rl import grpo

# ------------------------------------------------------------------ NumPy references


def np_group_adv(rewards, group_size, eps=1e-6, mask=None):
    rewards = np.asarray(rewards, np.float64)
    mask = np.ones(rewards.shape, bool) if mask is None else np.asarray(mask, bool)
    out = np.zeros_like(rewards)
    for start in range(0, len(rewards), group_size):
        idx = [i for i in range(start, start + group_size) if mask[i]]
        if not idx:
            continue
        vals = rewards[idx]
        if len(vals) == 1:
            mean, std = 0.0, 1.0
        else:
            mean, std = vals.mean(), vals.std(ddof=1)
        out[idx] = (vals - mean) / (std + eps)
    return out


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_aggregate(x, mask, aggregation, normalizer=None):
    x, mask = np.asarray(x, np.float64), np.asarray(mask, np.float64)
    if aggregation == "token-mean":
        den = mask.sum() if normalizer is None else normalizer
        return 0.0 if den == 0 else float((x * mask).sum() / den)
    seq_vals = []
    for row_x, row_m in zip(x, mask, strict=True):
        if row_m.sum() > 0:
            seq_vals.append((row_x * row_m).sum() / row_m.sum())
    den = len(seq_vals) if normalizer is None else normalizer
    return 0.0 if den == 0 else float(sum(seq_vals) / den)


def np_ppo(logp, old, adv, mask, eps, aggregation):
    logp, old = np.asarray(logp, np.float64), np.asarray(old, np.float64)
    adv = np.asarray(adv, np.float64)
    adv = adv[:, None] if adv.ndim == 1 else adv
    ratio = np.exp(logp - old)
    surr1 = ratio * adv
    surr2 = np.clip(ratio, 1 - eps, 1 + eps) * adv
    per_token = -np.minimum(surr1, surr2)
    clipped_active = (surr2 < surr1).astype(np.float64)
    return (
        np_aggregate(per_token, mask, aggregation),
        np_aggregate(clipped_active, mask, aggregation),
        np_aggregate(old - logp, mask, aggregation),
    )


def np_k3(logp, ref):
    kl = np.asarray(ref, np.float64) - np.asarray(logp, np.float64)
    return np.clip(np.exp(kl) - kl - 1, -10, 10)


def random_mask(rng, b, t, empty_rows=()):
    lengths = rng.integers(1, t + 1, size=b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    for r in empty_rows:
        mask[r] = False
    return mask


# jitted entry points: one compile per shape instead of one per primitive
ppo_value_and_grad = jax.jit(
    jax.value_and_grad(grpo.ppo_clip_loss, has_aux=True),
    static_argnames=("clip_eps", "aggregation"),
)
k3_value_and_grad = jax.jit(
    lambda lp, ref: (grpo.k3_kl(lp, ref), jax.grad(lambda x: jnp.sum(grpo.k3_kl(x, ref)))(lp))
)
group_advantages = jax.jit(grpo.group_advantages, static_argnames=("group_size", "eps"))

# ------------------------------------------------------------------ advantages


@pytest.mark.parametrize("seed,n_prompts,group", [(0, 4, 8), (1, 3, 5), (2, 6, 2), (3, 2, 16)])
def test_group_advantages_match_numpy(seed, n_prompts, group):
    rng = np.random.default_rng(seed)
    for rewards in (rng.integers(0, 2, n_prompts * group), rng.normal(size=n_prompts * group)):
        rewards = rewards.astype(np.float32)
        got = group_advantages(rewards, group)
        np.testing.assert_allclose(got, np_group_adv(rewards, group), rtol=1e-5, atol=1e-5)


def test_group_advantages_edge_cases():
    rewards = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0], np.float32)
    adv = np.asarray(group_advantages(rewards, 4))
    np.testing.assert_array_equal(adv[:8], 0.0)  # all-correct and all-wrong groups
    # one correct of four: std = 0.5 (unbiased), mean 0.25.
    np.testing.assert_allclose(adv[8:], np.array([0.75, -0.25, -0.25, -0.25]) / 0.5, rtol=1e-5)
    # group size 1: mean 0, std 1 (verl's special case).
    single = np.array([1.0, 0.0, 0.3], np.float32)
    np.testing.assert_allclose(group_advantages(single, 1), single / (1 + 1e-6), rtol=1e-7)


def test_group_advantages_with_mask():
    rng = np.random.default_rng(7)
    rewards = rng.normal(size=12).astype(np.float32)
    mask = np.ones(12, bool)
    mask[[1, 2]] = False  # group 0: three valid samples
    mask[[4, 5, 6]] = False  # group 1: one valid sample -> mean 0, std 1
    mask[8:12] = False  # group 2: none
    got = np.asarray(group_advantages(rewards, 4, mask=mask))
    np.testing.assert_allclose(got, np_group_adv(rewards, 4, mask=mask), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[~mask], 0.0)
    np.testing.assert_allclose(got[7], rewards[7] / (1 + 1e-6), rtol=1e-6)


def test_group_advantages_bad_shape():
    with pytest.raises(ValueError, match="groups of 3"):
        grpo.group_advantages(np.zeros(8, np.float32), 3)


# ------------------------------------------------------------------ log-probs and entropy


@pytest.mark.parametrize("seed,temperature", [(0, 1.0), (1, 0.6)])
def test_token_log_probs_and_entropy_match_numpy(seed, temperature):
    rng = np.random.default_rng(seed)
    logits = (3 * rng.normal(size=(3, 7, 11))).astype(np.float32)
    targets = rng.integers(0, 11, size=(3, 7)).astype(np.int32)
    ref_all = np_log_softmax(logits / temperature)
    ref_logp = np.take_along_axis(ref_all, targets[..., None], -1)[..., 0]
    ref_ent = -(np.exp(ref_all) * ref_all).sum(-1)
    got_logp = grpo.token_log_probs(logits, targets, temperature=temperature)
    got_ent = grpo.entropy_from_logits(logits, temperature=temperature)
    assert got_logp.dtype == jnp.float32 and got_logp.shape == (3, 7)
    np.testing.assert_allclose(got_logp, ref_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_ent, ref_ent, rtol=1e-5, atol=1e-5)


def test_token_log_probs_stable_and_gradients_match_analytic():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 5, 9)).astype(np.float32)
    logits[0, 0, 0] = 1e4  # would overflow a naive softmax
    targets = rng.integers(0, 9, size=(2, 5)).astype(np.int32)
    assert np.isfinite(np.asarray(grpo.token_log_probs(logits, targets))).all()
    assert np.isfinite(np.asarray(grpo.entropy_from_logits(logits))).all()
    logits[0, 0, 0] = 0.0
    g_lp = jax.grad(lambda z: jnp.sum(grpo.token_log_probs(z, targets)))(logits)
    g_ent = jax.grad(lambda z: jnp.sum(grpo.entropy_from_logits(z)))(logits)
    logp = np_log_softmax(logits)
    p = np.exp(logp)
    onehot = np.eye(9)[targets]
    ent = -(p * logp).sum(-1, keepdims=True)
    np.testing.assert_allclose(g_lp, onehot - p, atol=1e-6)
    np.testing.assert_allclose(g_ent, -p * (logp + ent), atol=1e-6)


@pytest.mark.parametrize("t,chunk", [(13, 5), (16, 4), (13, 32)])
def test_chunked_equals_unchunked_values_and_gradients(t, chunk):
    rng = np.random.default_rng(t * 100 + chunk)
    b, c, v = 2, 6, 37
    hidden = rng.normal(size=(b, t, c)).astype(np.float32)
    unembed = rng.normal(size=(c, v)).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
    coef_lp = rng.normal(size=(b, t)).astype(np.float32)
    coef_ent = rng.normal(size=(b, t)).astype(np.float32)

    def full(h, w):
        logits = h @ w
        return (
            grpo.token_log_probs(logits, targets, temperature=0.7),
            grpo.entropy_from_logits(logits, temperature=0.7),
        )

    def chunked(h, w):
        return grpo.chunked_log_probs_and_entropy(h, w, targets, chunk, temperature=0.7)

    def with_grads(fn):
        def objective(h, w):
            lp, ent = fn(h, w)
            return jnp.sum(coef_lp * lp + coef_ent * ent), (lp, ent)

        return jax.grad(objective, argnums=(0, 1), has_aux=True)(hidden, unembed)

    (g, (lp, ent)), (g_ref, (lp_ref, ent_ref)) = jax.jit(
        lambda: (with_grads(chunked), with_grads(full))
    )()
    np.testing.assert_allclose(lp, lp_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, ent_ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)
    # and against NumPy directly
    ref_all = np_log_softmax(hidden.astype(np.float64) @ unembed / 0.7)
    ref_lp = np.take_along_axis(ref_all, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ent, -(np.exp(ref_all) * ref_all).sum(-1), rtol=1e-4, atol=1e-4)


def test_chunked_keeps_only_one_chunk_of_logits_live():
    b, t, c, v, chunk = 2, 1024, 16, 2048, 16
    logits_bytes, chunk_bytes = b * t * v * 4, b * chunk * v * 4
    hidden = jnp.ones((b, t, c), jnp.float32)
    unembed = jnp.ones((c, v), jnp.float32)
    targets = jnp.zeros((b, t), jnp.int32)

    def loss(fn):
        def f(h, w):
            lp, ent = fn(h, w)
            return jnp.sum(lp) + jnp.sum(ent)

        return jax.grad(f, argnums=(0, 1))

    chunked = lambda h, w: grpo.chunked_log_probs_and_entropy(h, w, targets, chunk)
    full = lambda h, w: (
        grpo.token_log_probs(h @ w, targets),
        grpo.entropy_from_logits(h @ w),
    )
    temp_chunked = (
        jax.jit(loss(chunked)).lower(hidden, unembed).compile().memory_analysis()
    ).temp_size_in_bytes
    temp_full = (
        jax.jit(loss(full)).lower(hidden, unembed).compile().memory_analysis()
    ).temp_size_in_bytes
    assert temp_full >= logits_bytes
    # a few chunk-sized buffers (logits, log-softmax, their cotangents), never the whole logits
    assert temp_chunked < 8 * chunk_bytes, (temp_chunked, temp_full)
    assert temp_chunked < logits_bytes / 10


def test_chunked_bf16_inputs_give_f32_outputs():
    rng = np.random.default_rng(8)
    hidden = jnp.asarray(rng.normal(size=(2, 9, 8)), jnp.bfloat16)
    unembed = jnp.asarray(rng.normal(size=(8, 33)), jnp.bfloat16)
    targets = rng.integers(0, 33, size=(2, 9)).astype(np.int32)
    lp, ent = jax.jit(grpo.chunked_log_probs_and_entropy, static_argnums=3)(
        hidden, unembed, targets, 4
    )
    assert lp.dtype == ent.dtype == jnp.float32
    ref_all = np_log_softmax(np.asarray(hidden, np.float64) @ np.asarray(unembed, np.float64))
    ref_lp = np.take_along_axis(ref_all, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-4, atol=1e-4)


def test_chunked_bf16_gradients_keep_input_dtypes_and_match_f32():
    rng = np.random.default_rng(9)
    hidden = jnp.asarray(rng.normal(size=(2, 7, 6)), jnp.bfloat16)
    unembed = jnp.asarray(rng.normal(size=(6, 11)), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 11, size=(2, 7)), jnp.int32)

    def grads(h, w):
        def objective(h, w):
            lp, ent = grpo.chunked_log_probs_and_entropy(h, w, targets, 3)
            return jnp.sum(lp) + 0.5 * jnp.sum(ent)

        return jax.jit(jax.grad(objective, argnums=(0, 1)))(h, w)

    g_h, g_w = grads(hidden, unembed)
    assert g_h.dtype == g_w.dtype == jnp.bfloat16
    r_h, r_w = grads(hidden.astype(jnp.float32), unembed.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(g_h, np.float32), r_h, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(g_w, np.float32), r_w, rtol=2e-2, atol=2e-2)


def test_chunked_rejects_bad_shapes():
    h = jnp.zeros((2, 4, 3))
    with pytest.raises(ValueError, match="unembed"):
        grpo.chunked_log_probs_and_entropy(h, jnp.zeros((5, 3)), jnp.zeros((2, 4), jnp.int32), 2)
    with pytest.raises(ValueError, match="targets"):
        grpo.chunked_log_probs_and_entropy(h, jnp.zeros((3, 5)), jnp.zeros((2, 3), jnp.int32), 2)


# ------------------------------------------------------------------ aggregation


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_masked_aggregate_matches_numpy(aggregation, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(6, 9)).astype(np.float32)
    mask = random_mask(rng, 6, 9, empty_rows=(2, 4))
    got = grpo.masked_aggregate(x, mask, aggregation)
    np.testing.assert_allclose(got, np_aggregate(x, mask, aggregation), rtol=1e-5)
    # a float mask works the same as a bool one
    got_f = grpo.masked_aggregate(x, mask.astype(np.float32), aggregation)
    np.testing.assert_allclose(got_f, got, rtol=1e-6)
    expected_norm = mask.sum() if aggregation == "token-mean" else (mask.sum(1) > 0).sum()
    assert float(grpo.aggregation_normalizer(mask, aggregation)) == expected_norm


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_masked_aggregate_empty_mask_is_zero_with_zero_grad(aggregation):
    x = jnp.full((3, 4), 1e30)
    mask = np.zeros((3, 4), bool)
    assert float(grpo.masked_aggregate(x, mask, aggregation)) == 0.0
    g = jax.grad(lambda v: grpo.masked_aggregate(v, mask, aggregation))(x)
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_micro_batches_with_global_normalizer_sum_to_full_batch(aggregation):
    rng = np.random.default_rng(4)
    k = 3
    b, t = 12, 10
    logp = rng.normal(-2, 1, size=(b, t)).astype(np.float32)
    old = (logp + rng.normal(0, 0.3, size=(b, t))).astype(np.float32)
    adv = rng.normal(size=b).astype(np.float32)
    mask = random_mask(rng, b, t, empty_rows=(0, 5))
    norm = grpo.aggregation_normalizer(mask, aggregation)

    @jax.jit
    def evaluate(logp, old, adv, mask, norm):
        def loss_fn(lp):
            return grpo.ppo_clip_loss(lp, old, adv, mask, aggregation=aggregation, normalizer=norm)

        agg = grpo.masked_aggregate(logp, mask, aggregation, norm)
        return agg, jax.value_and_grad(loss_fn, has_aux=True)(logp)

    full_agg, ((full_loss, full_metrics), g_full) = evaluate(logp, old, adv, mask, None)
    parts = [evaluate(logp[i], old[i], adv[i], mask[i], norm) for i in np.split(np.arange(b), k)]
    np.testing.assert_allclose(sum(p[0] for p in parts), full_agg, rtol=1e-5)
    np.testing.assert_allclose(sum(p[1][0][0] for p in parts), full_loss, rtol=1e-5)
    for name, value in full_metrics.items():
        np.testing.assert_allclose(sum(p[1][0][1][name] for p in parts), value, atol=1e-6)
    # and the gradient of the summed micro-batch losses is the full-batch gradient
    g_parts = np.concatenate([p[1][1] for p in parts])
    np.testing.assert_allclose(g_parts, g_full, rtol=1e-5, atol=1e-8)


def test_unknown_aggregation_raises():
    with pytest.raises(ValueError, match="seq-mean"):
        grpo.masked_aggregate(jnp.zeros((2, 2)), jnp.ones((2, 2)), "sum")


# ------------------------------------------------------------------ PPO clipped loss


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
@pytest.mark.parametrize("seed,b,t,eps", [(0, 4, 7, 0.2), (1, 8, 16, 0.3)])
def test_ppo_clip_loss_matches_numpy(aggregation, seed, b, t, eps):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-2, 1, size=(b, t)).astype(np.float32)
    old = (logp + rng.normal(0, 0.4, size=(b, t))).astype(np.float32)
    adv = rng.normal(size=b).astype(np.float32)
    mask = random_mask(rng, b, t, empty_rows=(1,))
    (loss, metrics), _ = ppo_value_and_grad(logp, old, adv, mask, eps, aggregation=aggregation)
    ref_loss, ref_clip, ref_kl = np_ppo(logp, old, adv, mask, eps, aggregation)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["clip_frac"], ref_clip, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["approx_kl"], ref_kl, rtol=1e-5, atol=1e-6)
    assert 0.0 < float(metrics["clip_frac"]) < 1.0
    # per-token advantages give the same result when constant along the sequence
    (loss_bt, _), _ = ppo_value_and_grad(
        logp, old, np.repeat(adv[:, None], t, 1), mask, eps, aggregation=aggregation
    )
    np.testing.assert_allclose(loss_bt, loss, rtol=1e-6)


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_ppo_clip_loss_gradient_matches_analytic(aggregation):
    rng = np.random.default_rng(11)
    b, t, eps = 5, 6, 0.2
    logp = rng.normal(-2, 1, size=(b, t)).astype(np.float32)
    old = (logp + rng.normal(0, 0.4, size=(b, t))).astype(np.float32)
    adv = rng.normal(size=b).astype(np.float32)
    mask = random_mask(rng, b, t, empty_rows=(3,))
    _, g = ppo_value_and_grad(logp, old, adv, mask, eps, aggregation=aggregation)
    # d/dlogp of -A*r is -A*r where the unclipped term is active, 0 where the clip is active.
    ratio = np.exp(logp.astype(np.float64) - old)
    a = adv[:, None]
    active_clip = np.clip(ratio, 1 - eps, 1 + eps) * a < ratio * a
    per_token_grad = np.where(active_clip, 0.0, -a * ratio) * mask
    if aggregation == "token-mean":
        ref = per_token_grad / mask.sum()
    else:
        lengths = np.maximum(mask.sum(1, keepdims=True), 1)
        ref = per_token_grad / lengths / (mask.sum(1) > 0).sum()
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-7)


def test_ppo_clip_fraction_hand_cases():
    # ratio 1.5, A>0: clipped active; ratio 0.5, A>0: not; ratio 0.5, A<0: clipped; 1.1: inside.
    logp = np.log(np.array([[1.5, 0.5, 1.1, 1.0]], np.float32))
    old = np.zeros_like(logp)
    mask = np.ones_like(logp, bool)
    (loss_pos, m_pos), _ = ppo_value_and_grad(logp, old, np.array([1.0]), mask)
    (_, m_neg), _ = ppo_value_and_grad(logp, old, np.array([-1.0]), mask)
    assert float(m_pos["clip_frac"]) == pytest.approx(0.25)  # only ratio 1.5
    assert float(m_neg["clip_frac"]) == pytest.approx(0.25)  # only ratio 0.5
    assert float(loss_pos) == pytest.approx(-(1.2 + 0.5 + 1.1 + 1.0) / 4, rel=1e-6)


def test_ppo_padding_garbage_is_harmless():
    logp = np.array([[-1.0, -2.0, 500.0, -1e4]], np.float32)  # last two are padding
    old = np.array([[-1.1, -1.9, -600.0, 3.0]], np.float32)
    mask = np.array([[True, True, False, False]])
    (loss, metrics), g = ppo_value_and_grad(logp, old, np.array([2.0]), mask)
    ref_loss, ref_clip, ref_kl = np_ppo(
        logp[:, :2], old[:, :2], [2.0], mask[:, :2], 0.2, "token-mean"
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["approx_kl"], ref_kl, rtol=1e-5)
    assert np.isfinite(np.asarray(g)).all() and (np.asarray(g)[0, 2:] == 0).all()


# ------------------------------------------------------------------ k3 KL


def test_k3_kl_matches_numpy_and_clamps():
    rng = np.random.default_rng(5)
    logp = rng.normal(-2, 1, size=(4, 9)).astype(np.float32)
    ref = (logp + rng.normal(0, 0.5, size=(4, 9))).astype(np.float32)
    value, g = k3_value_and_grad(logp, ref)
    np.testing.assert_allclose(value, np_k3(logp, ref), rtol=1e-5, atol=1e-6)
    # the clamp at 10, on both sides, and exactly 0 at equal log-probs
    extreme_ref = np.array([[5.0, -30.0, -1.0, -1e4, 1e4]], np.float32)
    extreme_lp = np.array([[0.0, 0.0, -1.0, 0.0, 0.0]], np.float32)
    value_extreme, g_extreme = k3_value_and_grad(extreme_lp, extreme_ref)
    np.testing.assert_allclose(value_extreme, [[10.0, 10.0, 0.0, 10.0, 10.0]])
    # gradient: d k3 / d logp = 1 - exp(ref - logp) inside the clamp, 0 outside, never NaN
    kl = ref.astype(np.float64) - logp
    inside = np.abs(np_k3(logp, ref)) < 10
    np.testing.assert_allclose(g, np.where(inside, 1 - np.exp(kl), 0.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_extreme, [[0.0, 0.0, 0.0, 0.0, 0.0]])


# ------------------------------------------------------------------ sharding


def test_sharded_evaluation_equals_single_device():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows, rows2d = NamedSharding(mesh, P("data")), NamedSharding(mesh, P("data", None))
    rng = np.random.default_rng(21)
    b, t, group = 16, 12, 4
    rewards = rng.integers(0, 2, size=b).astype(np.float32)
    logp = rng.normal(-2, 1, size=(b, t)).astype(np.float32)
    old = (logp + rng.normal(0, 0.4, size=(b, t))).astype(np.float32)
    ref = (logp + rng.normal(0, 0.4, size=(b, t))).astype(np.float32)
    mask = random_mask(rng, b, t, empty_rows=(3, 9))

    def step(rewards, logp, old, ref, mask):
        adv = grpo.group_advantages(rewards, group)
        pg, metrics = grpo.ppo_clip_loss(logp, old, adv, mask, aggregation="seq-mean")
        kl = grpo.masked_aggregate(grpo.k3_kl(logp, ref), mask, "token-mean")
        return adv, pg, metrics["clip_frac"], kl

    single = jax.jit(step)(rewards, logp, old, ref, mask)
    args = [jax.device_put(rewards, rows)] + [
        jax.device_put(x, rows2d) for x in (logp, old, ref, mask)
    ]
    assert len(args[1].sharding.device_set) == 8
    sharded = jax.jit(step)(*args)
    for s, r in zip(sharded, single, strict=True):
        np.testing.assert_allclose(s, r, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sharded[0], np_group_adv(rewards, group), rtol=1e-5, atol=1e-6)
