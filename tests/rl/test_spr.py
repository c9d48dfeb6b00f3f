"""SPR losses against plain NumPy (float64) references written independently here."""

import functools
import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from msjax.models.sprm import trajectory_score
from msjax.rl import spr

# ------------------------------------------------------------------ NumPy references


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def np_bce(s, y):
    p = np_sigmoid(s)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def np_filter(s, y, variant, threshold):
    """Per-step filter in probability space, one step at a time."""
    p = np_sigmoid(s)
    if variant == "bce":
        return 1.0
    if variant == "spr":
        return float((y == 1 and p > threshold) or (y == 0 and p < threshold))
    shift = math.log(threshold / (1 - threshold))
    p_pos = np_sigmoid(s - shift)
    return p_pos if y == 1 else 1 - p_pos


def np_spr(step_logits, step_mask, labels, variant="spr", threshold=0.5):
    """Returns (loss, d loss / d logits, kept count) straight from REFERENCE section 3."""
    steps = [
        (i, j, float(step_logits[i, j]), float(labels[i]))
        for i in range(step_mask.shape[0])
        for j in range(step_mask.shape[1])
        if step_mask[i, j]
    ]
    w = [np_filter(s, y, variant, threshold) for _, _, s, y in steps]
    pos = sum(wi * y for wi, (_, _, _, y) in zip(w, steps, strict=True)) + 1
    neg = sum(wi * (1 - y) for wi, (_, _, _, y) in zip(w, steps, strict=True)) + 1
    if variant == "bce":
        weight = w
    else:
        weight = [
            1.5 * wi * y * neg / (pos + neg) + wi * (1 - y) * pos / (pos + neg)
            for wi, (_, _, _, y) in zip(w, steps, strict=True)
        ]
    total = sum(weight)
    den = (total if total > 0 else 1.0) if variant == "bce" else total + 1e-5
    loss = sum(wt * np_bce(s, y) for wt, (_, _, s, y) in zip(weight, steps, strict=True)) / den
    grad = np.zeros(step_logits.shape)
    for wt, (i, j, s, y) in zip(weight, steps, strict=True):
        grad[i, j] = wt * (np_sigmoid(s) - y) / den
    return loss, grad, sum(w)


def make_batch(seed, b, s, p_correct=0.5, empty_rows=()):
    rng = np.random.default_rng(seed)
    logits = (2 * rng.normal(size=(b, s))).astype(np.float32)
    lengths = rng.integers(1, s + 1, size=b)
    mask = np.arange(s)[None, :] < lengths[:, None]
    for r in empty_rows:
        mask[r] = False
    labels = (rng.random(b) < p_correct).astype(np.float32)
    return logits, mask, labels


# ------------------------------------------------------------------ the loss


@functools.partial(jax.jit, static_argnames="threshold")
def all_variants(logits, mask, labels, threshold=0.5, stats=None):
    """{variant: ((loss, metrics), d loss / d logits)} for every variant, in one compile."""
    return {
        v: jax.value_and_grad(spr.spr_loss, has_aux=True)(
            logits,
            mask,
            labels,
            variant=v,
            threshold=threshold,
            stats=None if stats is None else stats[v],
        )
        for v in spr.VARIANTS
    }


@pytest.mark.parametrize(
    "seed,b,s,threshold", [(0, 6, 9, 0.5), (1, 16, 5, 0.3), (2, 4, 12, 0.7), (3, 8, 8, 0.5)]
)
def test_spr_loss_and_gradient_match_numpy(seed, b, s, threshold):
    logits, mask, labels = make_batch(seed, b, s, empty_rows=(1,))
    out = all_variants(logits, mask, labels, threshold=threshold)
    n = mask.sum()
    y = np.broadcast_to(labels[:, None], mask.shape)
    agree = np.where(y == 1, np_sigmoid(logits) > threshold, np_sigmoid(logits) < threshold)
    for variant, ((loss, metrics), grad) in out.items():
        ref_loss, ref_grad, ref_kept = np_spr(logits, mask, labels, variant, threshold)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=variant)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7, err_msg=variant)
        assert float(metrics["n_steps"]) == n
        np.testing.assert_allclose(metrics["kept_frac"], ref_kept / n, rtol=1e-5)
        np.testing.assert_allclose(metrics["bce_mean"], np_bce(logits, y)[mask].mean(), rtol=1e-5)
        np.testing.assert_allclose(metrics["agree_frac"], agree[mask].mean(), rtol=1e-6)
        kept_pos = sum(
            np_filter(logits[i, j], 1.0, variant, threshold)
            for i, j in zip(*np.nonzero(mask & (y == 1)), strict=True)
        )
        np.testing.assert_allclose(metrics["pos_kept"], kept_pos, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            metrics["pos_kept"] + metrics["neg_kept"], ref_kept, rtol=1e-5, atol=1e-6
        )


def test_threshold_moves_the_filter():
    spr_only = jax.jit(spr.spr_loss, static_argnames=("variant", "threshold"))
    # one correct and one wrong trajectory, one step each, both at probability 0.4 and 0.6
    p = np.array([[0.4, 0.6], [0.4, 0.6]])
    logits = np.log(p / (1 - p)).astype(np.float32)
    mask = np.ones((2, 2), bool)
    labels = np.array([1.0, 0.0], np.float32)
    kept = {}
    for t in (0.3, 0.5, 0.7):
        _, m = spr_only(logits, mask, labels, threshold=t)
        kept[t] = (float(m["pos_kept"]), float(m["neg_kept"]))
    assert kept[0.3] == (2.0, 0.0)  # both correct steps clear 0.3, no wrong step is below it
    assert kept[0.5] == (1.0, 1.0)
    assert kept[0.7] == (0.0, 2.0)


def test_zero_logit_agrees_with_neither_label_at_default_threshold():
    logits = np.zeros((2, 1), np.float32)
    labels = np.array([1.0, 0.0], np.float32)
    _, m = all_variants(logits, np.ones((2, 1), bool), labels)["spr"][0]
    assert float(m["kept_frac"]) == 0.0


def test_no_steps_gives_zero_loss_and_zero_gradient():
    logits = np.full((4, 3), 1e4, np.float32)  # garbage in empty slots
    mask = np.zeros((4, 3), bool)
    labels = np.array([1, 0, 1, 0], np.float32)
    for variant, ((loss, metrics), grad) in all_variants(logits, mask, labels).items():
        assert float(loss) == 0.0, variant
        np.testing.assert_array_equal(grad, 0.0)
        for name, value in metrics.items():
            assert np.isfinite(float(value)) and float(value) == 0.0, (variant, name)


def test_every_step_filtered_out_gives_zero_loss_and_finite_zero_gradient():
    logits = np.array([[-3.0, -1.0, 0.0], [2.0, 0.5, 7.0]], np.float32)  # all disagree
    mask = np.ones_like(logits, bool)
    labels = np.array([1.0, 0.0], np.float32)
    out = all_variants(logits, mask, labels)
    (loss, metrics), grad = out["spr"]
    assert float(loss) == 0.0
    assert float(metrics["kept_frac"]) == 0.0 and float(metrics["n_steps"]) == 6
    np.testing.assert_array_equal(grad, 0.0)
    # the baseline still trains on them
    bce_loss, bce_metrics = out["bce"][0]
    assert float(bce_loss) > 0 and float(bce_metrics["kept_frac"]) == 1.0


def test_class_balance_weights_hand_case():
    # 2 kept correct steps, 1 kept wrong step: pos = 3, neg = 2.
    logits = np.array([[1.0, 2.0], [-1.0, 5.0]], np.float32)  # step (1, 1) disagrees
    mask = np.ones_like(logits, bool)
    labels = np.array([1.0, 0.0], np.float32)
    loss, _ = all_variants(logits, mask, labels)["spr"][0]
    w_pos, w_neg = 1.5 * 2 / 5, 3 / 5
    bce = np_bce(np.array([1.0, 2.0, -1.0]), np.array([1.0, 1.0, 0.0]))
    expected = (w_pos * bce[0] + w_pos * bce[1] + w_neg * bce[2]) / (2 * w_pos + w_neg + 1e-5)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_micro_batches_with_global_stats_sum_to_full_batch():
    logits, mask, labels = make_batch(9, 12, 7, empty_rows=(2, 3))
    stats = jax.jit(
        lambda lg, mk, lb: {
            v: spr.spr_batch_stats(lg, mk, lb, variant=v, threshold=0.6) for v in spr.VARIANTS
        }
    )(logits, mask, labels)
    full = all_variants(logits, mask, labels, threshold=0.6)
    parts = np.split(np.arange(12), 4)
    outs = [all_variants(logits[i], mask[i], labels[i], threshold=0.6, stats=stats) for i in parts]
    local = [all_variants(logits[i], mask[i], labels[i], threshold=0.6) for i in parts]
    for variant, ((loss, metrics), grad) in full.items():
        summed = sum(o[variant][0][0] for o in outs)
        np.testing.assert_allclose(summed, loss, rtol=1e-5, err_msg=variant)
        for name, value in metrics.items():
            got = sum(o[variant][0][1][name] for o in outs)
            np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-6, err_msg=name)
        got_grad = np.concatenate([o[variant][1] for o in outs])
        np.testing.assert_allclose(got_grad, grad, rtol=1e-5, err_msg=variant)
        # without the global stats the micro-batches would not add up (the test discriminates)
        if variant != "bce":
            assert abs(sum(float(o[variant][0][0]) for o in local) - float(loss)) > 1e-3


def test_sharded_evaluation_equals_single_device():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows2d = NamedSharding(mesh, P("data", None))
    # rows of one class per shard: per-shard class counts would differ from the global ones
    logits, mask, _ = make_batch(13, 16, 6, empty_rows=(5,))
    labels = np.repeat(np.array([1, 0] * 4, np.float32), 2)

    @jax.jit
    def evaluate(lg, mk, lb):
        out = all_variants(lg, mk, lb, threshold=0.4)
        return out, spr.score_gap_metrics(trajectory_score(lg, mk), lb)

    single = evaluate(logits, mask, labels)
    args = (
        jax.device_put(logits, rows2d),
        jax.device_put(mask, rows2d),
        jax.device_put(labels, NamedSharding(mesh, P("data"))),
    )
    assert len(args[0].sharding.device_set) == 8
    sharded = evaluate(*args)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    shards = np.split(np.arange(16), 8)
    for variant in spr.VARIANTS:
        ref_loss = np_spr(logits, mask, labels, variant, 0.4)[0]
        np.testing.assert_allclose(sharded[0][variant][0][0], ref_loss, rtol=1e-5)
        if variant != "bce":  # a per-shard reduction would have given a different value
            per_shard = np.mean(
                [np_spr(logits[i], mask[i], labels[i], variant, 0.4)[0] for i in shards]
            )
            assert abs(per_shard - ref_loss) > 1e-3


def test_bad_options_raise():
    logits, mask, labels = make_batch(0, 2, 3)
    with pytest.raises(ValueError, match="variant"):
        spr.spr_loss(logits, mask, labels, variant="hard")
    for t in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            spr.spr_loss(logits, mask, labels, threshold=t)
    with pytest.raises(ValueError, match="labels"):
        spr.spr_loss(logits, mask, labels[:1])
    with pytest.raises(ValueError, match="step_mask"):
        spr.spr_loss(logits, mask[:, :2], labels)


# ------------------------------------------------------------------ trajectory scores


def np_trajectory_scores(step_logits, step_mask):
    out = np.zeros(step_logits.shape[0])
    for i in range(step_logits.shape[0]):
        scores = np_sigmoid(step_logits[i][step_mask[i]])
        if len(scores):
            out[i] = np.exp(np.mean(np.log(np.maximum(scores, 1e-10))))
    return out


def test_trajectory_scores_match_numpy():
    logits, mask, _ = make_batch(4, 8, 10, empty_rows=(0, 6))
    logits[1, 0] = -40.0  # sigmoid below 1e-10: clamped
    logits[2, :] = 30.0  # every step certain: score 1
    mask[1, 0] = True
    got = jax.jit(trajectory_score)(logits, mask)
    np.testing.assert_allclose(got, np_trajectory_scores(logits, mask), rtol=1e-5)
    assert float(got[0]) == 0.0 and float(got[6]) == 0.0
    np.testing.assert_allclose(got[2], 1.0, rtol=1e-6)


def test_score_gap_metrics():
    scores = np.array([0.9, 0.8, 0.2, 0.4, 0.7], np.float32)
    labels = np.array([1, 1, 0, 0, 1], np.float32)
    m = spr.score_gap_metrics(scores, labels)
    np.testing.assert_allclose(m["score_correct"], 0.8, rtol=1e-6)
    np.testing.assert_allclose(m["score_wrong"], 0.3, rtol=1e-6)
    np.testing.assert_allclose(m["score_gap"], 0.5, rtol=1e-6)
    assert (float(m["n_correct"]), float(m["n_wrong"])) == (3.0, 2.0)
    # a row mask drops rows
    m = spr.score_gap_metrics(scores, labels, mask=np.array([1, 0, 1, 1, 1], bool))
    np.testing.assert_allclose(m["score_correct"], 0.8, rtol=1e-6)
    assert float(m["n_correct"]) == 2.0
    # a missing class gives finite zeros and its count says so
    m = spr.score_gap_metrics(scores[:2], labels[:2])
    assert float(m["score_wrong"]) == 0.0 and float(m["n_wrong"]) == 0.0
    assert float(m["score_gap"]) == 0.0
    np.testing.assert_allclose(m["score_correct"], 0.85, rtol=1e-6)
    m = spr.score_gap_metrics(np.zeros(0, np.float32), np.zeros(0, np.float32))
    assert all(np.isfinite(float(v)) and float(v) == 0.0 for v in m.values())
