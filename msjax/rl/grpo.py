"""GRPO policy-side losses as pure JAX functions on arrays (REFERENCE section 4).

Everything here is jit-able, works on sharded inputs (reductions are plain `jnp.sum` over the
global arrays, so under `jax.jit` they are global), and computes in float32.

Masks are `bool` or `float32` arrays; masked-out positions never reach an `exp` or a division with
their raw values (they are replaced through `jnp.where`), so garbage in padded slots can neither
produce NaN in the forward pass nor in gradients.

Exact gradient accumulation: a train step that splits a mini-batch into k micro-batches and sums
their losses gets exactly the full-batch loss when every aggregate is given the full-batch
`normalizer` (see `aggregation_normalizer`); the per-micro-batch metrics are then additive too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

AGGREGATIONS = ("token-mean", "seq-mean")

# -------------------------------------------------------------------------------- advantages


def group_advantages(
    rewards: jax.Array,
    group_size: int,
    eps: float = 1e-6,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Group-normalised GRPO advantages, as verl's `compute_grpo_outcome_advantage`.

    Args:
      rewards: f32[n_prompts * group_size]; the samples of one prompt are contiguous.
      group_size: samples per prompt (static).
      eps: added to the group std.
      mask: optional bool[n_prompts * group_size] of valid samples; statistics use valid samples
        only and invalid samples get advantage 0.

    Returns:
      f32[n_prompts * group_size]: (r - mean_group) / (std_group + eps), with std the unbiased
      (Bessel-corrected, torch.std default) estimate. A group with a single (valid) sample uses
      mean 0 and std 1 (verl's special case); a group with no valid sample gets 0.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D, got shape {rewards.shape}")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"group_advantages: {rewards.shape[0]} rewards do not split into groups of "
            f"{group_size}; pass n_prompts * group_size rewards with group_size >= 1"
        )
    valid = jnp.ones(rewards.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
    r = rewards.reshape(-1, group_size)
    v = valid.reshape(-1, group_size)
    count = jnp.sum(v, axis=1, keepdims=True).astype(jnp.float32)
    mean = jnp.sum(jnp.where(v, r, 0.0), axis=1, keepdims=True) / jnp.maximum(count, 1.0)
    sq_dev = jnp.sum(jnp.where(v, (r - mean) ** 2, 0.0), axis=1, keepdims=True)
    std = jnp.sqrt(sq_dev / jnp.maximum(count - 1.0, 1.0))
    single = count <= 1.0
    mean = jnp.where(single, 0.0, mean)
    std = jnp.where(single, 1.0, std)
    adv = jnp.where(v, (r - mean) / (std + eps), 0.0)
    return adv.reshape(rewards.shape)


# -------------------------------------------------------------------------------- log-probs


def token_log_probs(
    logits: jax.Array, targets: jax.Array, *, temperature: float = 1.0
) -> jax.Array:
    """Log-probability of each target token: f32[batch, seq].

    Args:
      logits: f32[batch, seq, vocab] (any float dtype; computed in float32).
      targets: int32[batch, seq].
      temperature: logits are divided by it first (the sampler's temperature, as verl does).
    """
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.take_along_axis(logp_all, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def entropy_from_logits(logits: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """Entropy of the softmax over the vocabulary: f32[batch, seq] from f32[batch, seq, vocab]."""
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def _chunk_logits(hidden, unembed):
    """hidden [b, k, c] @ unembed [c, vocab] -> f32[b, k, vocab], as one 2-D matmul (XLA:CPU
    computes the weight gradient of a 2-D matmul much faster than that of a batched one)."""
    b, k, c = hidden.shape
    logits = jnp.dot(hidden.reshape(b * k, c), unembed, preferred_element_type=jnp.float32)
    return logits.reshape(b, k, -1)


def _chunk_log_softmax(hidden, unembed, temperature):
    """Log-softmax of one chunk's logits: hidden [b, k, c] -> f32[b, k, vocab]."""
    return jax.nn.log_softmax(_chunk_logits(hidden, unembed) / temperature, axis=-1)


def _chunk_forward(hidden, unembed, targets, temperature):
    logp_all = _chunk_log_softmax(hidden, unembed, temperature)
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunk_log_probs_and_entropy(hidden, unembed, targets, temperature):
    """Log-probs and entropy of one chunk: hidden [b, k, c] -> (f32[b, k], f32[b, k]).

    The backward pass recomputes the chunk's logits (only hidden, unembed, targets and the
    entropy are saved) and applies the closed-form softmax cotangent, with z = logits / T,
    p = softmax(z), H = entropy:
        d logp_y / dz = onehot(y) - p,    dH / dz = -p * (log p + H),
    one fused element-wise pass instead of differentiating log_softmax, the gather and the
    entropy sum op by op; the two matmul cotangents come from `jax.vjp` of the logits matmul.
    """
    return _chunk_forward(hidden, unembed, targets, temperature)


def _chunk_fwd(hidden, unembed, targets, temperature):
    logp, entropy = _chunk_forward(hidden, unembed, targets, temperature)
    return (logp, entropy), (hidden, unembed, targets, entropy)


def _chunk_bwd(temperature, residuals, cotangents):
    hidden, unembed, targets, entropy = residuals
    g_logp, g_entropy = (g[..., None] for g in cotangents)
    logits, matmul_vjp = jax.vjp(_chunk_logits, hidden, unembed)
    logp_all = jax.nn.log_softmax(logits / temperature, axis=-1)
    p = jnp.exp(logp_all)
    is_target = jnp.arange(logp_all.shape[-1]) == targets[..., None]
    g_z = jnp.where(is_target, g_logp, 0.0) - p * (
        g_logp + g_entropy * (logp_all + entropy[..., None])
    )
    g_hidden, g_unembed = matmul_vjp(g_z / temperature)
    return g_hidden, g_unembed, None


_chunk_log_probs_and_entropy.defvjp(_chunk_fwd, _chunk_bwd)


def chunked_log_probs_and_entropy(
    hidden: jax.Array,
    unembed: jax.Array,
    targets: jax.Array,
    chunk: int,
    *,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Target log-probs and entropies without materialising the [batch, seq, vocab] logits.

    The sequence is cut into chunks of `chunk` positions; a `lax.scan` over the chunks computes
    `hidden @ unembed` for one chunk at a time (no scan when one chunk covers the sequence), and
    each chunk's custom VJP recomputes its logits in the backward pass instead of storing them,
    so only one chunk's f32[batch, chunk, vocab] logits are live in either pass. The result equals
    `token_log_probs(hidden @ unembed, targets)` and `entropy_from_logits(hidden @ unembed)`.

    Args:
      hidden: [batch, seq, embed] final hidden states (after the final norm), any float dtype.
      unembed: [embed, vocab] output projection (transpose a tied [vocab, embed] embedding).
      targets: int32[batch, seq].
      chunk: positions per chunk (static); seq need not be a multiple of it.
      temperature: logits are divided by it first.

    Returns:
      (logp f32[batch, seq], entropy f32[batch, seq]).
    """
    b, t, c = hidden.shape
    if unembed.ndim != 2 or unembed.shape[0] != c:
        raise ValueError(
            f"chunked_log_probs_and_entropy: unembed must be [embed={c}, vocab], got "
            f"{unembed.shape}; transpose a tied [vocab, embed] embedding first"
        )
    if targets.shape != (b, t):
        raise ValueError(
            f"chunked_log_probs_and_entropy: targets {targets.shape} must match hidden's "
            f"[batch, seq] = {(b, t)}"
        )
    if chunk < 1:
        raise ValueError(f"chunked_log_probs_and_entropy: chunk must be >= 1, got {chunk}")
    chunk = min(chunk, t)
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    targets = targets.astype(jnp.int32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    if n_chunks == 1:
        return _chunk_log_probs_and_entropy(hidden, unembed, targets, temperature)
    hidden_chunks = hidden.reshape(b, n_chunks, chunk, c).swapaxes(0, 1)
    target_chunks = targets.reshape(b, n_chunks, chunk).swapaxes(0, 1)

    def body(carry, xs):
        h, y = xs
        return carry, _chunk_log_probs_and_entropy(h, unembed, y, temperature)

    _, (logp, entropy) = jax.lax.scan(body, None, (hidden_chunks, target_chunks))
    logp = logp.swapaxes(0, 1).reshape(b, n_chunks * chunk)[:, :t]
    entropy = entropy.swapaxes(0, 1).reshape(b, n_chunks * chunk)[:, :t]
    return logp, entropy


# -------------------------------------------------------------------------------- aggregation


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; use one of {AGGREGATIONS}")


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 where den == 0 (with zero gradients there)."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


def aggregation_normalizer(mask: jax.Array, aggregation: str) -> jax.Array:
    """The denominator `masked_aggregate` uses, computed on the FULL batch: f32 scalar.

    token-mean: total number (weight) of valid tokens; seq-mean: number of sequences with at least
    one valid token. Pass it as `normalizer` to every micro-batch's aggregate so that the
    micro-batch values sum to the full-batch value.
    """
    _check_aggregation(aggregation)
    m = jnp.asarray(mask).astype(jnp.float32)
    if aggregation == "token-mean":
        return jnp.sum(m)
    return jnp.sum(jnp.sum(m, axis=-1) > 0).astype(jnp.float32)


def masked_aggregate(
    x: jax.Array,
    mask: jax.Array,
    aggregation: str = "token-mean",
    normalizer: jax.Array | float | None = None,
) -> jax.Array:
    """Reduce per-token values f32[batch, seq] under a mask to a scalar.

    token-mean: sum(x * mask) / sum(mask).
    seq-mean: mean over sequences of each sequence's masked token mean; sequences without a valid
      token contribute 0 and are not counted.
    normalizer: replaces the local denominator (token count, or number of non-empty sequences);
      from `aggregation_normalizer` on the full batch for exact micro-batch accumulation.
    An empty mask (or a zero normalizer) gives 0, never NaN.
    """
    _check_aggregation(aggregation)
    m = jnp.asarray(mask).astype(jnp.float32)
    xm = jnp.where(m != 0, x.astype(jnp.float32), 0.0) * m
    if normalizer is None:
        normalizer = aggregation_normalizer(m, aggregation)
    if aggregation == "token-mean":
        return safe_div(jnp.sum(xm), normalizer)
    seq_means = safe_div(jnp.sum(xm, axis=-1), jnp.sum(m, axis=-1))
    return safe_div(jnp.sum(seq_means), normalizer)


# -------------------------------------------------------------------------------- losses


def ppo_clip_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_eps: float = 0.2,
    *,
    aggregation: str = "token-mean",
    normalizer: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate, to minimise: aggregate of max(-A * r, -A * clip(r, 1 -+ eps)).

    Args:
      logp: f32[batch, seq] log-probs under the current policy (differentiated).
      old_logp: f32[batch, seq] log-probs under the sampling policy (treated as constant).
      advantages: f32[batch] per sequence (broadcast over tokens) or f32[batch, seq].
      mask: bool/f32[batch, seq] response tokens.
      clip_eps: ratio clip range.
      aggregation, normalizer: as `masked_aggregate`.

    Returns:
      (loss, metrics) with metrics
        clip_frac: share of tokens where the clipped term is the active one (verl's pg_clipfrac),
        approx_kl: aggregate of old_logp - logp (verl's ppo_kl),
        ratio_mean: aggregate of the ratio r = exp(logp - old_logp).
      All use the same aggregation and normalizer as the loss, so they add up over micro-batches.
    """
    m = jnp.asarray(mask).astype(jnp.float32)
    valid = m != 0
    adv = jnp.asarray(advantages, jnp.float32)
    if adv.ndim == 1:
        adv = adv[:, None]
    log_ratio = jnp.where(valid, logp - jax.lax.stop_gradient(old_logp), 0.0)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = jnp.maximum(unclipped, clipped)
    if normalizer is None:
        normalizer = aggregation_normalizer(m, aggregation)
    agg = lambda v: masked_aggregate(v, m, aggregation, normalizer)
    loss = agg(per_token)
    metrics = {
        "clip_frac": agg((clipped > unclipped).astype(jnp.float32)),
        "approx_kl": agg(jax.lax.stop_gradient(-log_ratio)),
        "ratio_mean": agg(jax.lax.stop_gradient(ratio)),
    }
    return loss, metrics


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """verl's "low_var_kl" (k3) estimate of KL(policy || reference) per token: f32[batch, seq].

    kl = ref_logp - logp; k3 = exp(kl) - kl - 1, clamped to [-10, 10]. The log-ratio is first
    clamped to [-20, 20]: this changes neither the value nor the gradient (k3 already reaches the
    clamp at kl ~ 2.6 and kl ~ -11) but keeps `exp` finite on padded garbage, so masked
    positions cannot turn gradients into NaN.
    """
    kl = jnp.clip(ref_logp.astype(jnp.float32) - logp.astype(jnp.float32), -20.0, 20.0)
    return jnp.clip(jnp.exp(kl) - kl - 1.0, -10.0, 10.0)
