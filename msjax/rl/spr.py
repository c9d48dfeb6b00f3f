"""Self-supervised process reward (SPR) loss for the SPRM head (REFERENCE section 3).

Only outcome labels exist: every step of a trajectory gets its trajectory's label y (1 correct,
0 wrong). Per step n with SPRM logit s_n the loss is a weighted BCE,

    L = sum_n weight_n * BCE(s_n, y_n) / (sum_n weight_n + 1e-5),

with the weights of one of three variants:

  "spr"  (the original) a consistency filter plus class balance: w_n = 1 when the head's own
         prediction agrees with the label, else 0; pos = sum(w*y) + 1, neg = sum(w*(1-y)) + 1 over
         the whole global batch; weight = 1.5*w*y*neg/(pos+neg) + w*(1-y)*pos/(pos+neg).
  "bce"  the baseline: weight 1 on every real step (plain mean BCE, no filter, no balance).
  "soft" the expected value of the "spr" filter when the head's prediction is *sampled* from its
         own Bernoulli instead of thresholded: w_n = P(pred_n == y_n) with
         P(pred_n = 1) = sigmoid(s_n - logit(threshold)), then the same class balance. It keeps the
         original's self-paced character (steps the head already agrees with count most), but a
         step near the threshold counts about half instead of flipping between 0 and 1, and early
         in training, when every score sits near the threshold, it does not throw away an
         arbitrary half of the steps.

Threshold: the prediction is pred = sigmoid(s) > threshold, compared in logit space:
s > logit(threshold) agrees with y = 1, s < logit(threshold) agrees with y = 0. At threshold 0.5
(logit 0) this is exactly the original's rule, including that a logit of exactly 0 agrees with
neither label. Raising the threshold makes "correct" harder to agree with (fewer positive steps
kept, more negative steps kept); lowering it does the opposite.

Weights and counts are constants for autodiff (stop_gradient), as in the original where they come
from comparisons. All sums are plain `jnp.sum` over the global arrays, so under `jax.jit` with
sharded inputs the class counts are global. For micro-batch accumulation compute
`spr_batch_stats` on the full mini-batch and pass it as `stats` to every micro-batch's
`spr_loss`: the micro-batch losses (and metrics) then sum to the full-batch values.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from msjax.rl.grpo import safe_div

VARIANTS = ("spr", "bce", "soft")
# `spr_loss` metrics that are counts (additive over micro-batches); the others are fractions.
COUNT_METRICS = ("pos_kept", "neg_kept", "n_steps")


class SPRStats(NamedTuple):
    """Batch-level SPR quantities (f32 scalars), global over the mini-batch.

    pos, neg: class-balance counts sum(w*y) + 1 and sum(w*(1-y)) + 1.
    weight_sum: sum of the final per-step weights (the loss denominator before the 1e-5).
    n_steps: number of real steps.
    """

    pos: jax.Array
    neg: jax.Array
    weight_sum: jax.Array
    n_steps: jax.Array


def _check(variant: str, threshold: float) -> float:
    """Validate the static options; returns the threshold in logit space."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SPR variant {variant!r}; use one of {VARIANTS}")
    try:
        threshold = float(threshold)
    except (TypeError, jax.errors.ConcretizationTypeError) as err:
        raise TypeError(
            "SPR threshold must be a static Python float (mark it static under jax.jit), got "
            f"{type(threshold).__name__}"
        ) from err
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"SPR threshold must be a probability in (0, 1), got {threshold}")
    return math.log(threshold) - math.log1p(-threshold)


def _prepare(step_logits, step_mask, labels):
    """-> (s f32[b, s] with 0 in empty slots, real f32[b, s], y f32[b, s])."""
    if step_logits.shape != step_mask.shape or step_logits.ndim != 2:
        raise ValueError(
            f"SPR: step_logits {step_logits.shape} and step_mask {step_mask.shape} must both be "
            "[batch, step_slots]"
        )
    if jnp.shape(labels) != step_logits.shape[:1]:
        raise ValueError(f"SPR: labels {jnp.shape(labels)} must be [batch={step_logits.shape[0]}]")
    real = jnp.asarray(step_mask).astype(bool)
    s = jnp.where(real, step_logits.astype(jnp.float32), 0.0)
    y = jnp.broadcast_to(jnp.asarray(labels, jnp.float32)[:, None], s.shape)
    return s, real.astype(jnp.float32), y


def _bce_with_logits(s: jax.Array, y: jax.Array) -> jax.Array:
    """Numerically stable binary cross-entropy of logits s against targets y, elementwise."""
    return jnp.maximum(s, 0.0) - s * y + jnp.log1p(jnp.exp(-jnp.abs(s)))


def _agreement(s, y, real, thr_logit):
    """Hard consistency filter: 1 where the thresholded prediction equals the label."""
    positive = y > 0.5
    agree = jnp.where(positive, s > thr_logit, s < thr_logit)
    return agree.astype(jnp.float32) * real


def _filter(s, y, real, variant, thr_logit):
    """Per-step filter w (before class balance), a constant for autodiff."""
    s = jax.lax.stop_gradient(s)
    if variant == "spr":
        return _agreement(s, y, real, thr_logit)
    if variant == "soft":
        p_pos = jax.nn.sigmoid(s - thr_logit)
        return jnp.where(y > 0.5, p_pos, 1.0 - p_pos) * real
    return real


def _counts(w, y):
    return jnp.sum(w * y) + 1.0, jnp.sum(w * (1.0 - y)) + 1.0


def _weights(w, y, variant, pos, neg):
    if variant == "bce":
        return w
    return 1.5 * w * y * neg / (pos + neg) + w * (1.0 - y) * pos / (pos + neg)


def spr_batch_stats(
    step_logits: jax.Array,
    step_mask: jax.Array,
    labels: jax.Array,
    *,
    variant: str = "spr",
    threshold: float = 0.5,
) -> SPRStats:
    """Global SPR quantities of a (full) mini-batch, to pass as `spr_loss(..., stats=...)`.

    Args:
      step_logits: f32[batch, step_slots] one SPRM logit per step slot.
      step_mask: bool[batch, step_slots] real steps.
      labels: f32[batch] outcome labels (1 correct, 0 wrong).
    """
    thr_logit = _check(variant, threshold)
    s, real, y = _prepare(step_logits, step_mask, labels)
    w = _filter(s, y, real, variant, thr_logit)
    pos, neg = _counts(w, y)
    weight = _weights(w, y, variant, pos, neg)
    return jax.lax.stop_gradient(SPRStats(pos, neg, jnp.sum(weight), jnp.sum(real)))


def spr_loss(
    step_logits: jax.Array,
    step_mask: jax.Array,
    labels: jax.Array,
    *,
    variant: str = "spr",
    threshold: float = 0.5,
    stats: SPRStats | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SPR loss of the SPRM step logits (see the module docstring for the variants).

    Args:
      step_logits: f32[batch, step_slots] one SPRM logit per step slot (differentiated).
      step_mask: bool[batch, step_slots] which slots are real steps.
      labels: f32[batch] outcome labels, 1 correct / 0 wrong, shared by all steps of a row.
      variant: "spr" (original), "bce" (baseline) or "soft" (sampled-prediction filter).
      threshold: prediction threshold in probability space (0.5 = the original's logit > 0).
      stats: `spr_batch_stats` of the full mini-batch; when given, its class counts and weight
        total replace the local ones (exact micro-batch accumulation).

    Returns:
      (loss, metrics): a scalar f32 loss (0 with zero gradients when nothing is kept) and
        kept_frac: sum of filter values w / number of real steps (1 for "bce"),
        agree_frac: share of real steps whose thresholded prediction equals the label,
        pos_kept, neg_kept: sum(w*y) and sum(w*(1-y)) (without the +1),
        bce_mean: mean BCE over real steps, unweighted,
        n_steps: number of real steps.
      With `stats`, fractions and means divide by the full-batch step count and counts are local,
      so every metric sums over micro-batches to its full-batch value.
    """
    thr_logit = _check(variant, threshold)
    s, real, y = _prepare(step_logits, step_mask, labels)
    w = _filter(s, y, real, variant, thr_logit)
    if stats is None:
        pos, neg = _counts(w, y)
    else:
        pos, neg = stats.pos, stats.neg
    weight = jax.lax.stop_gradient(_weights(w, y, variant, pos, neg))
    bce = _bce_with_logits(s, y) * real
    weight_sum = jnp.sum(weight) if stats is None else stats.weight_sum
    if variant == "bce":
        loss = safe_div(jnp.sum(weight * bce), weight_sum)
    else:
        loss = jnp.sum(weight * bce) / (weight_sum + 1e-5)
    n_local = jnp.sum(real)
    n_total = n_local if stats is None else stats.n_steps
    agree = _agreement(jax.lax.stop_gradient(s), y, real, thr_logit)
    metrics = {
        "kept_frac": safe_div(jnp.sum(w), n_total),
        "agree_frac": safe_div(jnp.sum(agree), n_total),
        "pos_kept": jnp.sum(w * y),
        "neg_kept": jnp.sum(w * (1.0 - y)),
        "bce_mean": safe_div(jnp.sum(jax.lax.stop_gradient(bce)), n_total),
        "n_steps": n_local,
    }
    return loss, metrics


def score_gap_metrics(
    traj_scores: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Mean trajectory score of correct and of wrong responses (the "aha moment" curves).

    Args:
      traj_scores: f32[batch] from `msjax.models.trajectory_score`.
      labels: f32[batch] 1 correct / 0 wrong.
      mask: optional bool[batch] of rows to count (e.g. to drop padding rows).

    Returns f32 scalars: score_correct, score_wrong (0 when the class is absent), score_gap
    (score_correct - score_wrong, 0 unless both classes are present), n_correct, n_wrong.
    """
    scores = jnp.asarray(traj_scores, jnp.float32)
    valid = jnp.ones(scores.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
    correct = (valid & (jnp.asarray(labels) > 0.5)).astype(jnp.float32)
    wrong = (valid & (jnp.asarray(labels) <= 0.5)).astype(jnp.float32)
    n_correct, n_wrong = jnp.sum(correct), jnp.sum(wrong)
    score_correct = safe_div(jnp.sum(jnp.where(correct > 0, scores, 0.0)), n_correct)
    score_wrong = safe_div(jnp.sum(jnp.where(wrong > 0, scores, 0.0)), n_wrong)
    both = (n_correct > 0) & (n_wrong > 0)
    return {
        "score_correct": score_correct,
        "score_wrong": score_wrong,
        "score_gap": jnp.where(both, score_correct - score_wrong, 0.0),
        "n_correct": n_correct,
        "n_wrong": n_wrong,
    }
