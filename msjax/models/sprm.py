"""The SPRM head (self-supervised process reward model) and the rules that say where steps are.

SPRM(h) = Linear(2C -> 1)(Dropout(0.5)(ReLU(Linear(C -> 2C)(h)))): one logit per step, read from
the penultimate hidden state, with the gradient flowing back into the backbone scaled by 1e-4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_LOG_SCORE_FLOOR = math.log(1e-10)


@jax.custom_vjp
def _scale_grad(x, scale):
    return x


def _scale_grad_fwd(x, scale):
    return x, scale


def _scale_grad_bwd(scale, g):
    return (g * scale).astype(g.dtype), None


_scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


def scale_gradient(x: jax.Array, scale: float) -> jax.Array:
    """Identity in the forward pass; multiplies the incoming gradient by `scale`.

    Same gradient as the original `x * s + stop_gradient(x) * (1 - s)`, but the forward value is
    exactly `x` (no rounding from the two products).
    """
    return _scale_grad(x, jnp.asarray(scale, jnp.float32))


def _torch_linear_init(rngs: nnx.Rngs, fan_in: int, shape) -> jax.Array:
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)


class SPRMHead(nnx.Module):
    """The scoring head. Parameters: w1 [C, 2C], b1 [2C], w2 [2C, 1], b2 [1] (2C^2 + 4C + 1)."""

    def __init__(
        self,
        hidden_size: int,
        *,
        rngs: nnx.Rngs,
        dropout: float = 0.5,
        grad_scale: float = 1e-4,
        param_dtype=jnp.float32,
    ):
        c = hidden_size
        # torch.nn.Linear's default init, as the original head.
        self.w1 = nnx.Param(
            _torch_linear_init(rngs, c, (c, 2 * c)).astype(param_dtype),
            axes=("embed", "head_hidden"),
        )
        self.b1 = nnx.Param(
            _torch_linear_init(rngs, c, (2 * c,)).astype(param_dtype), axes=("head_hidden",)
        )
        self.w2 = nnx.Param(
            _torch_linear_init(rngs, 2 * c, (2 * c, 1)).astype(param_dtype),
            axes=("head_hidden", "head_out"),
        )
        self.b2 = nnx.Param(
            _torch_linear_init(rngs, 2 * c, (1,)).astype(param_dtype), axes=("head_out",)
        )
        self.dropout = dropout
        self.grad_scale = grad_scale

    def __call__(self, h: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        """h: [..., C] penultimate hidden states -> f32[...] step logits.

        Dropout is active only when `dropout_rng` is given (training): one PRNG key, or one key
        per row of h (shape [batch] typed or [batch, 2] raw) so that a row's mask does not depend
        on how the batch is split into micro-batches or over devices.
        """
        h = scale_gradient(h, self.grad_scale).astype(jnp.float32)
        z = jax.nn.relu(h @ self.w1.value.astype(jnp.float32) + self.b1.value.astype(jnp.float32))
        if dropout_rng is not None and self.dropout > 0:
            keep = _dropout_keep(dropout_rng, z.shape, 1.0 - self.dropout)
            z = jnp.where(keep, z / (1.0 - self.dropout), 0.0)
        out = z @ self.w2.value.astype(jnp.float32) + self.b2.value.astype(jnp.float32)
        return out[..., 0]


def _dropout_keep(rng: jax.Array, shape, keep_prob: float) -> jax.Array:
    """bool[shape] keep mask from one key, or from per-row keys (vmapped over leading axes)."""
    rng = jnp.asarray(rng)
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    batch_dims = rng.ndim if typed else rng.ndim - 1
    if batch_dims == 0:
        return jax.random.bernoulli(rng, keep_prob, shape)
    return jax.vmap(lambda k: _dropout_keep(k, shape[1:], keep_prob))(rng)


def step_mask(
    tokens: jax.Array,
    valid: jax.Array,
    step_ids: Sequence[int],
    think_start_id: int | None,
    think_end_id: int | None,
    scorable: jax.Array | None = None,
    rule: str = "inference",
) -> jax.Array:
    """Where the SPRM scores: bool[batch, seq], True at the token JUST BEFORE a step delimiter.

    Args:
      tokens: int32[batch, seq]; may be left- or right-padded.
      valid: bool[batch, seq], the real (non-padding) tokens.
      step_ids: delimiter token ids (".\\n\\n"; any of them counts).
      think_start_id / think_end_id: ids of `<think>` / `</think>` (None: not in the vocab).
      scorable: optional bool[batch, seq], positions that may be scored (e.g. the response).
      rule: "inference" (the original reward server; what msjax uses everywhere): the scored
        position p must satisfy think_start < p < think_end, where think_start is the position
        of `<think>` when the text has exactly one, else the text start (exclusive, as the
        server's position 0), and think_end is the position of `</think>` when it has exactly
        one, else the text length. "training" (the original trainer's mask): first `<think>`
        <= p <= last `</think>` (a missing tag leaves that side open).
    A delimiter counts only when it is the first of a run of delimiters and does not directly
    follow `<think>`.
    """
    if rule not in ("inference", "training"):
        raise ValueError(f"step_mask rule={rule!r}; choose 'inference' or 'training'.")
    tokens = jnp.asarray(tokens)
    valid = jnp.asarray(valid, bool)
    b, t = tokens.shape
    ids = jnp.asarray(list(step_ids), tokens.dtype)
    delim = jnp.isin(tokens, ids) & valid
    prev_delim = jnp.pad(delim[:, :-1], ((0, 0), (1, 0)))
    prev_tok = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    first = delim & ~prev_delim
    if think_start_id is not None:
        first &= prev_tok != think_start_id
    scored = jnp.pad(first[:, 1:], ((0, 0), (0, 1)))  # scored[p] = first[p + 1]
    pos = jnp.arange(t)[None, :]
    text_start = jnp.argmax(valid, axis=1)[:, None]
    text_end = (t - jnp.argmax(valid[:, ::-1], axis=1))[:, None]

    def tag_positions(tag_id):
        hits = (tokens == tag_id) & valid if tag_id is not None else jnp.zeros_like(valid)
        count = hits.sum(axis=1, keepdims=True)
        first_hit = jnp.argmax(hits, axis=1)[:, None]
        last_hit = (t - 1 - jnp.argmax(hits[:, ::-1], axis=1))[:, None]
        return count, first_hit, last_hit

    n_start, first_start, _ = tag_positions(think_start_id)
    n_end, _, last_end = tag_positions(think_end_id)
    if rule == "inference":
        lo = jnp.where(n_start == 1, first_start, text_start)
        _, first_end, _ = tag_positions(think_end_id)
        hi = jnp.where(n_end == 1, first_end, text_end)
        span = (pos > lo) & (pos < hi)
    else:
        lo = jnp.where(n_start >= 1, first_start, text_start)
        hi = jnp.where(n_end >= 1, last_end, text_end - 1)
        span = (pos >= lo) & (pos <= hi)
    mask = scored & span & valid
    if scorable is not None:
        mask &= jnp.asarray(scorable, bool)
    return mask


def trajectory_score(step_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Geometric mean of sigmoid(step logits) over the masked steps.

    step_logits: f32[batch, n]; mask: bool[batch, n] -> f32[batch]. Step scores are clamped at
    1e-10 before the log (computed as max(log_sigmoid(s), log 1e-10): the same value, without
    the rounding of sigmoid near 1); a trajectory with no step scores 0.
    """
    mask = jnp.asarray(mask).astype(bool)
    s = jnp.where(mask, step_logits.astype(jnp.float32), 0.0)
    logp = jnp.maximum(jax.nn.log_sigmoid(s), _LOG_SCORE_FLOOR)
    n = mask.sum(axis=-1)
    mean = jnp.where(mask, logp, 0.0).sum(axis=-1) / jnp.maximum(n, 1)
    return jnp.where(n > 0, jnp.exp(mean), 0.0)
