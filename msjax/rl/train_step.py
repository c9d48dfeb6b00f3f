"""ONE jitted train step for GRPO + SPR: forward, every loss, gradients, two optimizers.

The batch holds full sequences (prompt left-padded, response right-padded), as the sampler
produces them; every per-token array is aligned with `tokens` (entry t is about token t):

    tokens      int32[batch, seq]    prompt + response ids
    positions   int32[batch, seq]    RoPE positions (number of real tokens before t)
    valid       bool[batch, seq]     real tokens (not padding)
    loss_mask   bool[batch, seq]     response tokens whose log-prob is trained
    old_logp    f32[batch, seq]      log-probs before the update (see LossConfig.old_logprobs)
    ref_logp    f32[batch, seq]      log-probs under the frozen reference (zeros when kl_coef=0)
    advantages  f32[batch]           GRPO advantages
    labels      f32[batch]           outcome labels (1 correct, 0 wrong) for the SPR loss
    step_mask   bool[batch, seq]     positions the SPRM scores (msjax.models.step_mask)

    loss = spr_coef * L_SPR + L_pg - entropy_coef * entropy + kl_coef * KL

Gradient accumulation runs k micro-batches in a `lax.scan` inside the jit. Micro-batch i takes
rows i, i+k, i+2k, ... so every micro-batch stays spread over all data-parallel devices. The
policy terms use full-batch normalisers, so they equal one large batch whatever k.

SPR class counts (`LossConfig.spr_stats_scope`):
  "microbatch" (default) pos/neg are counted over each GLOBAL micro-batch (all data-parallel
      shards together, +1 once), the micro-batch's loss divides by its own weight sum, and the
      loss is the mean of the k micro-batch losses. No extra forward; the result depends on k but
      not on the mesh. The original (REFERENCE 3) also counts per micro-batch, but each of its W
      data-parallel workers adds its own +1 (so pos/neg carry +W) and divides by the weight sum
      of its OWN rows; its gradient is the mean of the W local losses. msjax's rule is that
      computation with W = 1: the same on any mesh.
  "minibatch" exact batch-wide counts from a forward pre-pass over the whole mini-batch (one
      extra backbone forward per update when k > 1; `msjax-aot` counts it in model FLOPs), so
      k micro-batches equal one large batch. With k = 1 both scopes are the same computation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from msjax import sharding as sh
from msjax.models.sprm import trajectory_score
from msjax.rl import grpo, spr

BATCH_KEYS = (
    "tokens",
    "positions",
    "valid",
    "loss_mask",
    "old_logp",
    "ref_logp",
    "advantages",
    "labels",
    "step_mask",
)
# Where the PPO ratio's old log-probs come from: the train step's own forward over the rollout
# batch before the first update (as the original), or the sampler's (no extra forward; in bf16
# compute they differ from the train step's by the sampler's bf16 unembedding).
OLD_LOGPROBS = ("recompute", "sampler")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static settings of the train step (REFERENCE sections 3-4 defaults)."""

    clip_eps: float = 0.2
    kl_coef: float = 0.001
    entropy_coef: float = 0.001
    spr_coef: float = 1.0
    spr_variant: str = "spr"
    spr_threshold: float = 0.5
    aggregation: str = "token-mean"
    temperature: float = 1.0
    logprob_chunk: int = 1024
    num_microbatches: int = 1
    spr_stats_scope: str = "microbatch"
    old_logprobs: str = "recompute"

    def __post_init__(self):
        if self.aggregation not in grpo.AGGREGATIONS:
            raise ValueError(
                f"LossConfig.aggregation={self.aggregation!r}; choose one of {grpo.AGGREGATIONS}."
            )
        if self.spr_variant not in spr.VARIANTS:
            raise ValueError(
                f"LossConfig.spr_variant={self.spr_variant!r}; choose one of {spr.VARIANTS}."
            )
        if not 0.0 < self.spr_threshold < 1.0:
            raise ValueError(f"LossConfig.spr_threshold={self.spr_threshold} must be in (0, 1).")
        if self.spr_stats_scope not in ("minibatch", "microbatch"):
            raise ValueError("LossConfig.spr_stats_scope must be 'minibatch' or 'microbatch'.")
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ValueError(
                f"LossConfig.old_logprobs={self.old_logprobs!r}; choose one of {OLD_LOGPROBS}."
            )
        if self.num_microbatches < 1 or self.logprob_chunk < 1:
            raise ValueError("LossConfig.num_microbatches and logprob_chunk must be >= 1.")
        if self.temperature <= 0:
            raise ValueError("LossConfig.temperature must be > 0 (use 1.0 for greedy rollouts).")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """step: int32[] applied updates; params: pure dict; opt_state: optax state; rng: uint32[2]."""

    step: jax.Array
    params: dict
    opt_state: Any
    rng: jax.Array


def init_train_state(params: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh TrainState (call under jit with out_shardings to create it sharded)."""
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(seed))


def _dict_path(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def train_state_shardings(abstract_state: TrainState, param_shardings: dict, mesh) -> TrainState:
    """Shardings for a TrainState: optimizer moments follow their parameter, the rest replicated."""
    by_path = {
        _dict_path(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    }
    rep = sh.replicated(mesh)

    def for_leaf(path, leaf):
        names = _dict_path(path)
        for i in range(len(names)):
            s = by_path.get(names[i:])
            if s is not None and len(s.spec) <= len(getattr(leaf, "shape", ())):
                return s
        return rep

    opt = jax.tree_util.tree_map_with_path(for_leaf, abstract_state.opt_state)
    return TrainState(rep, param_shardings, opt, rep)


def batch_shardings(mesh, batch: dict) -> dict:
    """Every batch array is split over (data, fsdp) along its leading axis."""
    return {k: sh.batch_sharding(mesh, jnp.ndim(v)) for k, v in batch.items()}


def _forward(graphdef, params, mb, cfg: LossConfig, dropout_rng, with_logp: bool):
    """Model forward on one micro-batch -> dict of per-token log-probs/entropy and step logits."""
    model = nnx.merge(graphdef, params)
    # The parameters are in the training layout: the embedding lookup stays in the table's
    # shards, so its gradient is never a full [vocab, embed] array (Qwen2.__call__).
    hidden, penultimate, _ = model.backbone(
        mb["tokens"], mb["positions"], mb["valid"], sharded_lookup=True
    )
    res = {"step_logits": model.step_logits(penultimate, dropout_rng)}
    res["step_logits_eval"] = jax.lax.stop_gradient(model.step_logits(penultimate))
    if with_logp:
        logp, ent = _log_probs(hidden[:, :-1], model.backbone, mb["tokens"][:, 1:], cfg)
        res["logp"] = jnp.pad(logp, ((0, 0), (1, 0)))
        res["entropy"] = jnp.pad(ent, ((0, 0), (1, 0)))
    return res


def _log_probs(hidden, backbone, targets, cfg: LossConfig):
    """Per-token log-probs and entropies, f32[batch, seq] each, of hidden [batch, seq, embed]
    (split over the batch axes) under the backbone's unembedding, by
    `grpo.chunked_log_probs_and_entropy`.

    The unembedding (the LM head [embed, vocab], or the tied table [vocab, embed]: embed split
    over fsdp, vocab over tensor) is all-gathered over fsdp once per call, outside the chunk
    scan, inside a shard_map over the batch axes (tensor stays automatic). Each device's gradient
    of it is the sum over its own rows and chunks, and the transpose of that gather
    reduce-scatters it onto the fsdp shards once per micro-batch (then the shard is summed over
    data, whose devices hold the same one). libtpu may still lower that reduce-scatter as a
    full all-reduce + slice: it does on v5p-16's 2 x 2 x 2 torus, not on v5e-4 or v5p-8.
    """
    tied = backbone.cfg.tie_word_embeddings
    w = backbone.embed.value if tied else backbone.lm_head.value
    logp_fn = functools.partial(
        grpo.chunked_log_probs_and_entropy, chunk=cfg.logprob_chunk, temperature=cfg.temperature
    )
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get("fsdp", 1) == 1:
        return logp_fn(hidden, w.T if tied else w, targets)
    batch = sh.spec_on_mesh(("batch",), mesh)[0]
    manual = set((batch,) if isinstance(batch, str) else batch) | {"fsdp"}

    def local(h, w, y):
        if tied:
            # Gathered along a new leading axis, so that the gradient's reduce-scatter splits
            # the major dimension (as the untied head's): gathered along embed, the minor one,
            # TPU (v5e-4) all-reduces the whole gradient instead.
            w = jax.lax.all_gather(w, "fsdp", axis=0)  # [fsdp, vocab, embed / fsdp]
            w = w.transpose(0, 2, 1).reshape(-1, w.shape[1])  # [embed, vocab]
        else:
            w = jax.lax.all_gather(w, "fsdp", axis=0, tiled=True)
        return logp_fn(h, w, y)

    rows = PartitionSpec(batch, None)
    w_spec = PartitionSpec(None, "fsdp") if tied else PartitionSpec("fsdp", None)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(batch, None, None), w_spec, rows),
        out_specs=(rows, rows),
        axis_names=manual,
    )(hidden, w, targets)


def _micro_losses(graphdef, params, mb, norms, spr_stats, cfg: LossConfig, dropout_rng):
    """(total loss, metrics) of one micro-batch; metrics are additive over micro-batches."""
    f = _forward(graphdef, params, mb, cfg, dropout_rng, with_logp=True)
    mask = mb["loss_mask"]
    pg, pg_m = grpo.ppo_clip_loss(
        f["logp"],
        mb["old_logp"],
        mb["advantages"],
        mask,
        cfg.clip_eps,
        aggregation=cfg.aggregation,
        normalizer=norms["tokens"],
    )
    agg = lambda x: grpo.masked_aggregate(x, mask, cfg.aggregation, norms["tokens"])
    entropy = agg(f["entropy"])
    kl = agg(grpo.k3_kl(f["logp"], mb["ref_logp"])) if cfg.kl_coef else jnp.zeros(())
    spr_loss, spr_m = spr.spr_loss(
        f["step_logits"],
        mb["step_mask"],
        mb["labels"],
        variant=cfg.spr_variant,
        threshold=cfg.spr_threshold,
        stats=spr_stats,
    )
    if spr_stats is None and cfg.num_microbatches > 1:
        # Per-micro-batch statistics ("microbatch" scope): the loss and the fractions are the
        # mean over the k micro-batches, the counts their sum.
        spr_loss = spr_loss / cfg.num_microbatches
        spr_m = {
            k: v if k in spr.COUNT_METRICS else v / cfg.num_microbatches for k, v in spr_m.items()
        }
    total = cfg.spr_coef * spr_loss + pg - cfg.entropy_coef * entropy + cfg.kl_coef * kl
    traj = trajectory_score(f["step_logits_eval"], mb["step_mask"])
    rows = norms["rows"]
    correct = mb["labels"] > 0.5
    metrics = {
        "loss": total,
        "pg_loss": pg,
        "entropy": entropy,
        "kl": kl,
        "spr_loss": spr_loss,
        **{f"pg_{k}": v for k, v in pg_m.items()},
        **{f"spr_{k}": v for k, v in spr_m.items()},
        "score_sum_correct": jnp.sum(jnp.where(correct, traj, 0.0)),
        "score_sum_wrong": jnp.sum(jnp.where(correct, 0.0, traj)),
        "n_correct": jnp.sum(correct.astype(jnp.float32)),
        "reward_mean": jnp.sum(mb["labels"]) / rows,
    }
    return total, metrics


def _split_micro(batch: dict, k: int) -> dict:
    """[B, ...] -> [k, B/k, ...] with micro-batch i = rows i, i+k, ... (stays device-spread)."""

    def split(x):
        b = x.shape[0]
        x = x.reshape(b // k, k, *x.shape[1:]).swapaxes(0, 1)
        return sh.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def _prepare(batch: dict, rng: jax.Array, cfg: LossConfig):
    """-> (full-batch normalisers, micro-batches [k, B/k, ...], row dropout keys [k, B/k, 2])."""
    k = cfg.num_microbatches
    b = batch["tokens"].shape[0]
    if b % k:
        raise ValueError(f"Batch of {b} rows does not split into {k} micro-batches.")
    norms = {
        "tokens": grpo.aggregation_normalizer(batch["loss_mask"], cfg.aggregation),
        "rows": jnp.asarray(b, jnp.float32),
    }
    # One dropout key per ROW: the SPRM dropout masks do not depend on k or on the mesh.
    row_keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(b))
    return norms, _split_micro(batch, k), _split_micro(row_keys, k)


def _minibatch_spr_stats(graphdef, params, micro, keys, cfg: LossConfig):
    """SPRStats of the whole mini-batch from a forward pre-pass over its micro-batches, or None
    when the loss uses per-micro-batch statistics (one micro-batch, "microbatch" scope, no SPR)."""
    k = cfg.num_microbatches
    if k == 1 or cfg.spr_stats_scope != "minibatch" or not cfg.spr_coef:
        return None

    def pre(_, xs):
        mb, key = xs
        return None, _forward(graphdef, params, mb, cfg, key, with_logp=False)["step_logits"]

    _, logits = jax.lax.scan(pre, None, (micro, keys))
    flat = lambda x: x.reshape(-1, *x.shape[2:])
    return spr.spr_batch_stats(
        flat(logits),
        flat(micro["step_mask"]),
        flat(micro["labels"]),
        variant=cfg.spr_variant,
        threshold=cfg.spr_threshold,
    )


def _accumulate(grad_fn, params, micro, keys, k: int):
    """Sum of `grad_fn(params, mb, key) -> ((loss, metrics), grads)` over the k micro-batches:
    (f32 gradients like params, summed metrics)."""
    if k == 1:
        # One micro-batch: no accumulation scan (a smaller program that compiles faster;
        # the same values, as 0 + x == x).
        (_, metrics), grads = grad_fn(params, *jax.tree.map(lambda x: x[0], (micro, keys)))
        return jax.tree.map(lambda g: g.astype(jnp.float32), grads), metrics

    def body(carry, xs):
        grads, metrics = carry
        (_, m), g = grad_fn(params, *xs)
        # Each micro-batch's gradient is reduced onto its parameter's shards here: the barrier
        # stops XLA from moving that reduction out of the loop, where it becomes one full-size
        # all-reduce per update into a full-size f32 accumulator per device (the whole LM
        # head's gradient: +1.6 GiB temporaries in the 1.5B recipe's program for v5p-16).
        g = jax.lax.optimization_barrier(g)
        grads = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), grads, g)
        return (grads, jax.tree.map(jnp.add, metrics, m)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    first = jax.tree.map(lambda x: x[0], (micro, keys))
    metric_zeros = jax.tree.map(
        jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, *first)[0][1])
    )
    (grads, metrics), _ = jax.lax.scan(body, (zeros, metric_zeros), (micro, keys))
    return grads, metrics


def _guarded_update(state: TrainState, grads, tx, rng, finite) -> TrainState:
    """The optimizer update, applied only when `finite` (else the state is kept as it was)."""
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    return TrainState(
        state.step + finite.astype(jnp.int32),
        keep(params, state.params),
        keep(opt_state, state.opt_state),
        rng,
    )


def _final_metrics(metrics: dict, norms: dict, grad_norms: dict, finite) -> dict:
    """Summed micro-batch metrics -> the logged ones (score means, grad norms, skipped flag)."""
    n_correct = metrics.pop("n_correct")
    n_wrong = norms["rows"] - n_correct
    metrics["score_correct"] = metrics.pop("score_sum_correct") / jnp.maximum(n_correct, 1)
    metrics["score_wrong"] = metrics.pop("score_sum_wrong") / jnp.maximum(n_wrong, 1)
    metrics["n_correct"] = n_correct
    metrics["grad_norm"] = grad_norms["backbone"]
    metrics["head_grad_norm"] = grad_norms.get("head", jnp.zeros(()))
    metrics["update_skipped"] = (~finite).astype(jnp.float32)
    return metrics


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    cfg: LossConfig,
    *,
    mesh=None,
    state_shardings: TrainState | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Builds `train_step(state, batch) -> (state, metrics)`, jitted, state donated.

    With a mesh, `state_shardings` (from `train_state_shardings`) fixes the in/out shardings of
    the state and the batch is split over (data, fsdp), and `.lower(state, batch)` /
    `.trace(state, batch)` give the jax.stages objects for AOT compilation. Non-finite loss or
    gradients leave the state untouched (metrics["update_skipped"] = 1).
    """

    def step_fn(state: TrainState, batch: dict):
        rng, step_rng = jax.random.split(state.rng)
        norms, micro, keys = _prepare({key: batch[key] for key in BATCH_KEYS}, step_rng, cfg)
        spr_stats = _minibatch_spr_stats(graphdef, state.params, micro, keys, cfg)
        grad_fn = jax.value_and_grad(
            lambda p, mb, key: _micro_losses(graphdef, p, mb, norms, spr_stats, cfg, key),
            has_aux=True,
        )
        grads, metrics = _accumulate(grad_fn, state.params, micro, keys, cfg.num_microbatches)
        grad_norms = {g: optax.global_norm(grads[g]) for g in grads}
        finite = jnp.isfinite(metrics["loss"]) & jnp.all(
            jnp.stack([jnp.isfinite(n) for n in grad_norms.values()])
        )
        new_state = _guarded_update(state, grads, tx, rng, finite)
        return new_state, _final_metrics(metrics, norms, grad_norms, finite)

    if mesh is None:
        return jax.jit(step_fn, donate_argnums=0)
    rep = NamedSharding(mesh, PartitionSpec())
    batch_sh = {
        key: sh.batch_sharding(mesh, 1 if key in ("advantages", "labels") else 2)
        for key in BATCH_KEYS
    }
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sh),
        out_shardings=(state_shardings, rep),
        donate_argnums=0,
    )

    def run(state, batch):
        with jax.set_mesh(mesh):
            return jitted(state, {key: batch[key] for key in BATCH_KEYS})

    run.lower = lambda state, batch: _lower(jitted, mesh, state, batch)
    run.trace = lambda state, batch: _trace(jitted, mesh, state, batch)
    return run


def _lower(jitted, mesh, state, batch):
    with jax.set_mesh(mesh):
        return jitted.lower(state, {key: batch[key] for key in BATCH_KEYS})


def _trace(jitted, mesh, state, batch):
    with jax.set_mesh(mesh):
        return jitted.trace(state, {key: batch[key] for key in BATCH_KEYS})


def make_logprob_fn(graphdef, cfg: LossConfig, *, mesh=None, param_shardings=None):
    """Jitted `logp(params, tokens, positions, valid) -> f32[batch, seq]`: the train step's own
    forward (no gradient) over the same k micro-batches, e.g. the old log-probs before an update
    (REFERENCE 4: recomputed by the actor) or the reference log-probs. Inputs and the result stay
    on the devices, split over (data, fsdp); with a mesh it also has `.trace(...)` (same
    arguments; the jax.stages.Traced gives the jaxpr and `.lower()` for AOT compilation)."""
    k = cfg.num_microbatches

    def fn(params, tokens, positions, valid):
        batch = {"tokens": tokens, "positions": positions, "valid": valid}
        b = tokens.shape[0]
        if b % k:
            raise ValueError(f"Batch of {b} rows does not split into {k} micro-batches.")

        def body(_, mb):
            return None, _forward(graphdef, params, mb, cfg, None, with_logp=True)["logp"]

        _, logp = jax.lax.scan(body, None, _split_micro(batch, k))
        return logp.swapaxes(0, 1).reshape(b, -1)  # [k, B/k, seq] -> rows i, i+k, ... back

    if mesh is None:
        return jax.jit(fn)
    b2 = sh.batch_sharding(mesh, 2)
    jitted = jax.jit(fn, in_shardings=(param_shardings, b2, b2, b2), out_shardings=b2)

    def run(params, tokens, positions, valid):
        with jax.set_mesh(mesh):
            return jitted(params, tokens, positions, valid)

    def trace(params, tokens, positions, valid):
        with jax.set_mesh(mesh):
            return jitted.trace(params, tokens, positions, valid)

    run.trace = trace
    return run
