"""The jitted GRPO + SPR train step against a NumPy reference, across micro-batching and meshes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from msjax import sharding as sh
from msjax.models import ModelConfig, create_model, step_mask
from msjax.rl.optimizer import OptimizerConfig, make_optimizer
from msjax.rl.train_step import (
    LossConfig,
    init_train_state,
    make_logprob_fn,
    make_train_step,
    train_state_shardings,
)

CFG = ModelConfig(
    vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2
)
STEP_ID = 7
B, T = 16, 12
pytestmark = pytest.mark.expensive(minutes=2)


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (B, T))
    tokens[:, 5::3] = STEP_ID
    valid = np.ones((B, T), bool)
    valid[:, -3:] = rng.random((B, 3)) > 0.5
    valid[0, 5:] = False  # a response with no real token
    loss_mask = valid.copy()
    loss_mask[:, :5] = False
    batch = dict(
        tokens=tokens,
        positions=np.maximum(np.cumsum(valid, 1) - 1, 0),
        valid=valid,
        loss_mask=loss_mask,
        old_logp=rng.normal(-3.7, 0.3, (B, T)).astype(np.float32),
        ref_logp=rng.normal(-3.7, 0.3, (B, T)).astype(np.float32),
        advantages=rng.normal(size=B).astype(np.float32),
        labels=(rng.random(B) > 0.5).astype(np.float32),
        step_mask=np.asarray(step_mask(tokens, valid, [STEP_ID], None, None)),
    )
    return {k: jnp.asarray(v) for k, v in batch.items()}


def fresh_state(model_cfg, tx, seed=0):
    graphdef, state = nnx.split(create_model(model_cfg, seed=seed))
    return graphdef, init_train_state(nnx.to_pure_dict(state), tx, seed=3)


def run_step(model_cfg, loss_cfg, opt_cfg, batch, mesh=None, step=None):
    tx = make_optimizer(opt_cfg)
    graphdef, state = fresh_state(model_cfg, tx)
    before = jax.tree.map(np.asarray, state.params)
    if mesh is None:
        step = step or make_train_step(graphdef, tx, loss_cfg)
    else:
        abstract = nnx.split(nnx.eval_shape(lambda: create_model(model_cfg)))[1]
        ps = nnx.to_pure_dict(sh.state_shardings(abstract, mesh))
        shardings = train_state_shardings(jax.eval_shape(lambda: state), ps, mesh)
        state = jax.device_put(state, shardings)
        step = make_train_step(graphdef, tx, loss_cfg, mesh=mesh, state_shardings=shardings)
    new_state, metrics = step(state, batch)
    return graphdef, before, new_state, jax.tree.map(float, metrics), step


def np_spr_loss(s, sm, labels):
    """The SPR rule of REFERENCE 3 (threshold 0.5 -> logit 0) over the given rows, +1 once."""
    y = np.broadcast_to(labels[:, None], sm.shape)
    w = (((s > 0) & (y == 1)) | ((s < 0) & (y == 0))) & sm
    pos, neg = (w * y).sum() + 1, (w * (1 - y)).sum() + 1
    weight = 1.5 * w * y * neg / (pos + neg) + w * (1 - y) * pos / (pos + neg)
    bce = np.maximum(s, 0) - s * y + np.log1p(np.exp(-np.abs(s)))
    return (weight * bce).sum() / (weight.sum() + 1e-5)


def np_reference_loss(graphdef, params, batch, lc: LossConfig):
    """Independent float64 NumPy computation of the total loss from the model's full logits.

    SPR: batch-wide counts for one micro-batch or the "minibatch" scope; with the "microbatch"
    scope, the mean over micro-batches i (rows i, i+k, i+2k, ...) of each one's own SPR loss."""
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
    out = model(batch["tokens"], batch["positions"], batch["valid"])
    logits = np.asarray(out.logits, np.float64) / lc.temperature
    steps = np.asarray(model.step_logits(out.penultimate), np.float64)
    tok = np.asarray(batch["tokens"])
    z = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
    logsm = z - np.log(np.exp(z).sum(-1, keepdims=True))
    logp = np.zeros(tok.shape)
    logp[:, 1:] = np.take_along_axis(logsm, tok[:, 1:, None], -1)[..., 0]
    ent = np.zeros(tok.shape)
    ent[:, 1:] = -(np.exp(logsm) * logsm).sum(-1)
    m = np.asarray(batch["loss_mask"], np.float64)
    n = m.sum()
    adv = np.asarray(batch["advantages"], np.float64)[:, None]
    ratio = np.exp(logp - np.asarray(batch["old_logp"], np.float64))
    pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - lc.clip_eps, 1 + lc.clip_eps))
    pg = (pg * m).sum() / n
    kl_t = np.asarray(batch["ref_logp"], np.float64) - logp
    kl = (np.clip(np.exp(kl_t) - kl_t - 1, -10, 10) * m).sum() / n
    entropy = (ent * m).sum() / n
    sm = np.asarray(batch["step_mask"])
    labels = np.asarray(batch["labels"], np.float64)
    k = lc.num_microbatches if lc.spr_stats_scope == "microbatch" else 1
    spr = np.mean([np_spr_loss(steps[i::k], sm[i::k], labels[i::k]) for i in range(k)])
    return lc.spr_coef * spr + pg - lc.entropy_coef * entropy + lc.kl_coef * kl


@pytest.fixture(scope="module")
def reference_run():
    batch = make_batch()
    cfg = CFG.replace(head_dropout=0.0)
    lc = LossConfig(logprob_chunk=5, temperature=0.8)
    opt = OptimizerConfig(lr=1e-3, head_lr=1e-2)
    graphdef, before, state, metrics, step = run_step(cfg, lc, opt, batch)
    return batch, lc, graphdef, before, state, metrics, (cfg, opt, step)


def test_loss_matches_numpy_reference(reference_run):
    batch, lc, graphdef, before, _, metrics, _ = reference_run
    want = np_reference_loss(graphdef, before, batch, lc)
    assert metrics["loss"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert metrics["update_skipped"] == 0.0
    assert 0.0 <= metrics["spr_kept_frac"] <= 1.0
    assert metrics["spr_n_steps"] == float(np.asarray(batch["step_mask"]).sum())


def test_both_parameter_groups_are_updated(reference_run):
    *_, before, state, _, _ = reference_run
    assert int(state.step) == 1
    for group in ("backbone", "head"):
        moved = [
            np.abs(np.asarray(a) - b).max()
            for a, b in zip(jax.tree.leaves(state.params[group]), jax.tree.leaves(before[group]))
        ]
        assert max(moved) > 0, group


def test_each_group_has_its_own_optimizer():
    opt = OptimizerConfig(lr=0.0, head_lr=1e-2)
    _, before, state, _, _ = run_step(CFG, LossConfig(kl_coef=0.0), opt, make_batch(1))
    for group in ("backbone", "head"):
        same = all(
            np.array_equal(np.asarray(a), b)
            for a, b in zip(jax.tree.leaves(state.params[group]), jax.tree.leaves(before[group]))
        )
        assert same == (group == "backbone"), group


def test_microbatch_spr_scope_matches_numpy_reference():
    """The default scope: SPR counts per global micro-batch (+1 once), mean of the k losses."""
    batch = make_batch(3)
    cfg = CFG.replace(head_dropout=0.0)
    lc = LossConfig(logprob_chunk=5, num_microbatches=4)
    assert lc.spr_stats_scope == "microbatch"
    graphdef, before, _, metrics, _ = run_step(cfg, lc, OptimizerConfig(), batch)
    want = np_reference_loss(graphdef, before, batch, lc)
    assert metrics["loss"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    # it is not the batch-wide rule (so this test could fail)
    batch_wide = np_reference_loss(graphdef, before, batch, LossConfig(logprob_chunk=5))
    assert abs(batch_wide - want) > 1e-4
    assert metrics["spr_n_steps"] == float(np.asarray(batch["step_mask"]).sum())


@pytest.mark.parametrize(
    "scope, k_single", [("minibatch", 1), ("microbatch", 2)], ids=["minibatch", "microbatch"]
)
def test_microbatches_on_a_2x2x2_mesh_equal_one_device(scope, k_single):
    """Dropout stays on: the per-row dropout keys make the result independent of the split.
    "minibatch": 2 micro-batches on the mesh equal ONE large batch; "microbatch": they equal the
    same 2 micro-batches on one device (the counts are global over each micro-batch)."""
    batch = make_batch(2)
    opt = OptimizerConfig(lr=1e-3, head_lr=1e-2)
    lc = LossConfig(logprob_chunk=4, spr_stats_scope=scope)
    _, _, s1, m1, _ = run_step(CFG, dataclasses.replace(lc, num_microbatches=k_single), opt, batch)
    _, _, s4, m4, _ = run_step(
        CFG, dataclasses.replace(lc, num_microbatches=2), opt, batch, mesh=sh.make_mesh((2, 2, 2))
    )
    for key in m1:
        assert m4[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.opt_state), jax.tree.leaves(s4.opt_state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7, rtol=1e-4)


def test_non_finite_loss_refuses_the_update(reference_run):
    batch, lc, *_, (cfg, opt, step) = reference_run
    batch = dict(batch, advantages=batch["advantages"].at[2].set(jnp.nan))
    _, before, state, metrics, _ = run_step(cfg, lc, opt, batch, step=step)
    assert metrics["update_skipped"] == 1.0
    assert int(state.step) == 0
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_bad_loss_config_is_rejected():
    with pytest.raises(ValueError, match="spr_variant"):
        LossConfig(spr_variant="focal")
    with pytest.raises(ValueError, match="spr_threshold"):
        LossConfig(spr_threshold=1.0)
    with pytest.raises(ValueError, match="aggregation"):
        LossConfig(aggregation="sum")


def test_recomputed_old_logprobs_give_ratio_one_in_bf16():
    """Old log-probs from make_logprob_fn (the train step's own forward): every token's PPO ratio
    is 1 within 1e-6 on the first update, in bf16 compute. With clip_eps = 1e-6 a token is
    clipped only when its ratio is off by more (A > 0: r > 1 + eps; A < 0: r < 1 - eps), so
    clip_frac = 0 for both signs of the advantages bounds every token. Old log-probs of an fp32
    forward (what a differently-rounded sampler gives) fail the same check."""
    cfg = CFG.replace(dtype="bfloat16")
    lc = LossConfig(logprob_chunk=5, num_microbatches=2, clip_eps=1e-6)
    tx = make_optimizer(OptimizerConfig())
    graphdef, _ = fresh_state(cfg, tx)
    batch = make_batch(4)
    seq = (batch["tokens"], batch["positions"], batch["valid"])
    step = make_train_step(graphdef, tx, lc)

    def clip_fracs(old_logp):
        out = []
        for sign in (1.0, -1.0):
            b = dict(batch, old_logp=old_logp, advantages=jnp.full((B,), sign))
            _, m = step(fresh_state(cfg, tx)[1], b)
            out.append(float(m["pg_clip_frac"]))
        return out

    params = fresh_state(cfg, tx)[1].params
    assert clip_fracs(make_logprob_fn(graphdef, lc)(params, *seq)) == [0.0, 0.0]
    graphdef32 = nnx.split(create_model(CFG))[0]
    assert max(clip_fracs(make_logprob_fn(graphdef32, lc)(params, *seq))) > 0.05
