"""Supervised warm start: token cross-entropy on response tokens, optionally with the SPR loss.

The policy learns from `msjax.data.SftPipeline` batches (prompt + response + EOS, right-padded):

    loss = CE(response tokens) + spr_coef * L_SPR(step logits, outcome labels)
                               + step_label_coef * BCE(step logits, TRUE step labels)

CE is the mean negative log-likelihood of every response token (EOS included), over the whole
batch. The optional SPR term warms the SPRM head up on the same forward pass, with OUTCOME labels
only: a response whose boxed answer matches the gold answer is 1, any other is 0 (e.g. a
deliberately flawed solution from `msjax.data.MixedSolutions`), shared by all its steps as in
`msjax.rl.spr`. The head reads the penultimate hidden state with its gradient into the backbone
scaled by `head_grad_scale` (1e-4), so the CE term drives the backbone. The same two AdamW groups
as RL (`msjax.rl.optimizer`) update backbone and head; `TrainState` is the RL train step's.

The optional step-label term is NOT part of the method: it is a stand-in for the pre-training
that gives a real LLM's hidden states their knowledge of whether a step is right. With data whose
true step labels are known (the synthetic task), a BCE of the step logits against them, with the
head's gradient into the backbone unscaled (`head_grad_scale` 1), shapes the backbone's features;
the demo then re-initialises the head, so the SPRM used in RL learns from outcomes only.

    step = make_sft_step(graphdef, tx, SftLossConfig(spr_coef=1.0), tokenizer=tok)
    state = init_train_state(params, tx, seed)
    for batch in pipeline:
        batch["labels"] = outcome_labels(batch, tok, answers)
        state, metrics = step(state, batch)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from msjax.models.sprm import step_mask, trajectory_score
from msjax.progress import progress as progress_bar
from msjax.rewards.math import math_reward
from msjax.rl import grpo, spr
from msjax.rl.train_step import TrainState
from msjax.tokenizer import Tokenizer

SFT_KEYS = ("tokens", "loss_mask", "lengths", "weights", "labels", "step_labels")


@dataclasses.dataclass(frozen=True)
class SftLossConfig:
    """Static settings of the SFT step.

    spr_coef: weight of the SPR term (0 = language modelling only; labels are then ignored).
    spr_variant / spr_threshold: as `msjax.rl.spr.spr_loss`.
    logprob_chunk: positions per chunk of the log-prob computation (memory only).
    step_label_coef: weight of the BCE of the step logits against the batch's TRUE per-token
      step labels `step_labels` (see the module docstring; 0 = off).
    """

    spr_coef: float = 0.0
    spr_variant: str = "spr"
    spr_threshold: float = 0.5
    logprob_chunk: int = 1024
    step_label_coef: float = 0.0

    def __post_init__(self):
        if self.spr_coef < 0:
            raise ValueError(f"SftLossConfig.spr_coef={self.spr_coef} must be >= 0.")
        if self.step_label_coef < 0:
            raise ValueError(f"SftLossConfig.step_label_coef={self.step_label_coef} must be >= 0.")
        if self.spr_variant not in spr.VARIANTS:
            raise ValueError(
                f"SftLossConfig.spr_variant={self.spr_variant!r}; choose one of {spr.VARIANTS}."
            )
        if not 0.0 < self.spr_threshold < 1.0:
            raise ValueError(f"SftLossConfig.spr_threshold={self.spr_threshold} must be in (0, 1).")
        if self.logprob_chunk < 1:
            raise ValueError("SftLossConfig.logprob_chunk must be >= 1.")


def response_texts(batch: dict, tokenizer: Tokenizer) -> list[str]:
    """The response text of every row of an SftPipeline batch (prompt and final EOS left out)."""
    out = []
    for row, (p, n) in enumerate(zip(batch["prompt_lengths"], batch["lengths"], strict=True)):
        ids = [int(t) for t in batch["tokens"][row, int(p) : int(n)]]
        if ids and ids[-1] in tokenizer.eos_ids:
            ids = ids[:-1]
        out.append(tokenizer.decode(ids))
    return out


def outcome_labels(
    batch: dict,
    tokenizer: Tokenizer,
    answer_of: Callable[[int], str] | Sequence[str],
) -> np.ndarray:
    """f32[batch] outcome labels of an SftPipeline batch: 1 when a row's last boxed answer equals
    its gold answer, else 0 (fill rows, index -1, get 0).

    answer_of: gold answer by source index, a callable or a sequence (e.g. the split's answers).
    """
    get = answer_of if callable(answer_of) else answer_of.__getitem__
    labels = np.zeros(len(batch["index"]), np.float32)
    for row, (text, index) in enumerate(zip(response_texts(batch, tokenizer), batch["index"])):
        if int(index) >= 0:
            labels[row] = math_reward(text, str(get(int(index))))
    return labels


def step_label_array(
    batch: dict,
    tokenizer: Tokenizer,
    problem_of: Callable[[int], str] | Sequence[str],
    label: str = "on_track",
) -> np.ndarray:
    """f32[batch, seq] TRUE step labels of an SftPipeline batch of synthetic-task rows: 1 / 0 at
    each scored step position (`msjax.data.token_step_labels`, field `label`: "on_track" or
    "locally_correct"), -1 everywhere else (no label; fill rows are all -1).

    problem_of: the problem text by source index, a callable or a sequence.
    """
    from msjax.data import token_step_labels

    if label not in ("on_track", "locally_correct"):
        raise ValueError(f"step_label_array: label={label!r}; use on_track or locally_correct.")
    get = problem_of if callable(problem_of) else problem_of.__getitem__
    tokens = batch["tokens"]
    out = np.full(tokens.shape, -1.0, np.float32)
    rows = zip(batch["index"], batch["prompt_lengths"], batch["lengths"], strict=True)
    for row, (index, p, n) in enumerate(rows):
        if int(index) < 0:
            continue
        ids = [int(t) for t in tokens[row, : int(n)]]
        lab = token_step_labels(tokenizer, str(get(int(index))), ids[: int(p)], ids[int(p) :])
        out[row, lab.positions] = getattr(lab, label).astype(np.float32)
    return out


def _sft_losses(graphdef, params, batch, cfg: SftLossConfig, ids: tuple, dropout_rng):
    """(loss, metrics) of one batch; see the module docstring."""
    step_ids, think_start, think_end = ids
    tokens = batch["tokens"]
    b, t = tokens.shape
    valid = jnp.arange(t)[None, :] < batch["lengths"][:, None]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
    model = nnx.merge(graphdef, params)
    out = model(tokens, positions, valid, compute_logits=False)
    logp, _ = grpo.chunked_log_probs_and_entropy(
        out.hidden[:, :-1], model.backbone.unembedding(), tokens[:, 1:], cfg.logprob_chunk
    )
    w = batch["loss_mask"][:, 1:].astype(jnp.float32) * batch["weights"][:, None]
    n_tok = jnp.maximum(jnp.sum(w), 1.0)
    ce = -jnp.sum(logp * w) / n_tok
    metrics = {"ce": ce, "response_tokens": jnp.sum(w)}

    response = batch["loss_mask"].astype(bool) & (batch["weights"][:, None] > 0)
    scorable = jnp.pad(response[:, 1:], ((0, 0), (0, 1)))  # the delimiter is in the response
    steps = step_mask(tokens, valid, step_ids, think_start, think_end, scorable=scorable)
    total = ce
    if cfg.spr_coef:
        logits = model.step_logits(out.penultimate, dropout_rng)
        spr_loss, spr_m = spr.spr_loss(
            logits,
            steps,
            batch["labels"],
            variant=cfg.spr_variant,
            threshold=cfg.spr_threshold,
        )
        total = total + cfg.spr_coef * spr_loss
        eval_logits = jax.lax.stop_gradient(model.step_logits(out.penultimate))
        traj = trajectory_score(eval_logits, steps)
        gap = spr.score_gap_metrics(traj, batch["labels"], batch["weights"] > 0)
        metrics |= {"spr_loss": spr_loss, **{f"spr_{k}": v for k, v in spr_m.items()}, **gap}
    if cfg.step_label_coef:
        labels = batch["step_labels"]
        known = steps & (labels >= 0)
        logits = model.step_logits(out.penultimate, dropout_rng)
        # BCE with logits: softplus(z) - y z.
        bce = jax.nn.softplus(logits) - jnp.clip(labels, 0.0, 1.0) * logits
        n_known = jnp.maximum(jnp.sum(known), 1)
        step_loss = jnp.sum(jnp.where(known, bce, 0.0)) / n_known
        total = total + cfg.step_label_coef * step_loss
        metrics |= {"step_label_loss": step_loss, "labelled_steps": jnp.sum(known)}
    metrics["steps_per_response"] = jnp.sum(steps) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    return total, metrics


def make_sft_step(
    graphdef,
    tx: optax.GradientTransformation,
    cfg: SftLossConfig,
    *,
    tokenizer: Tokenizer | None = None,
    step_ids: Sequence[int] | None = None,
    think_start_id: int | None = None,
    think_end_id: int | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Builds the jitted `sft_step(state, batch) -> (state, metrics)` (state donated).

    batch: tokens int32[batch, seq] right-padded, loss_mask f32[batch, seq] (1 on response tokens
    and EOS), lengths int32[batch], weights f32[batch] (0 = fill row), labels f32[batch] outcome
    labels (read only when cfg.spr_coef > 0; `outcome_labels` makes them). Other keys of an
    SftPipeline batch are ignored. The step ids (delimiter, think tags) come from `tokenizer` or
    are given explicitly. Metrics: loss, ce, grad norms and, with SPR, the SPR metrics and the mean
    trajectory score of correct / wrong responses (score_correct, score_wrong, score_gap).
    """
    if tokenizer is not None:
        step_ids = step_ids or tokenizer.step_ids
        think_start_id = think_start_id if think_start_id is not None else tokenizer.think_start_id
        think_end_id = think_end_id if think_end_id is not None else tokenizer.think_end_id
    if not step_ids:
        raise ValueError(
            "make_sft_step needs the step delimiter ids: pass tokenizer= or step_ids=."
        )
    ids = (tuple(int(i) for i in step_ids), think_start_id, think_end_id)

    def step_fn(state: TrainState, batch: dict):
        rng, step_rng = jax.random.split(state.rng)
        b = batch["tokens"].shape[0]
        row_keys = jax.vmap(lambda i: jax.random.fold_in(step_rng, i))(jnp.arange(b))
        grad_fn = jax.value_and_grad(
            lambda p: _sft_losses(graphdef, p, batch, cfg, ids, row_keys), has_aux=True
        )
        (loss, metrics), grads = grad_fn(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics |= {
            "loss": loss,
            "grad_norm": optax.global_norm(grads["backbone"]),
            "head_grad_norm": optax.global_norm(grads.get("head", {})),
        }
        return TrainState(state.step + 1, params, opt_state, rng), metrics

    jitted = jax.jit(step_fn, donate_argnums=0)

    def run(state: TrainState, batch: dict):
        optional = {"labels": not cfg.spr_coef, "step_labels": not cfg.step_label_coef}
        missing = [k for k in SFT_KEYS if k not in batch and not optional.get(k, False)]
        if missing:
            raise KeyError(
                f"SFT batch lacks {missing}; use SftPipeline batches (labels from "
                "outcome_labels, step_labels from step_label_array)."
            )
        feed = {k: jnp.asarray(batch[k]) for k in SFT_KEYS if k in batch}
        feed.setdefault("labels", jnp.zeros(feed["tokens"].shape[:1], jnp.float32))
        if not cfg.step_label_coef:
            feed.pop("step_labels", None)
        feed["weights"] = feed["weights"].astype(jnp.float32)
        feed["loss_mask"] = feed["loss_mask"].astype(jnp.float32)
        feed["labels"] = feed["labels"].astype(jnp.float32)
        return jitted(state, feed)

    return run


def train_sft(
    params: dict,
    graphdef,
    tx: optax.GradientTransformation,
    cfg: SftLossConfig,
    batches,
    tokenizer: Tokenizer,
    answer_of: Callable[[int], str] | Sequence[str],
    *,
    steps: int,
    seed: int = 0,
    progress: bool = True,
    on_metrics: Callable[[int, dict], None] | None = None,
    step_labeler: Callable[[dict], np.ndarray] | None = None,
) -> tuple[dict, list[dict]]:
    """Runs `steps` SFT updates from `params` (a pure dict; its arrays are donated to the train
    state, so copy them first to keep using them) over `batches` (an SftPipeline iterator);
    returns (params, one metrics dict per step). `on_metrics(step, metrics)` is called after
    every update (1-based step). `step_labeler(batch) -> f32[batch, seq]` (e.g. a partial of
    `step_label_array`) gives the true step labels when cfg.step_label_coef > 0."""
    from msjax.rl.train_step import init_train_state

    if steps < 1:
        raise ValueError(f"train_sft: steps={steps} must be >= 1.")
    if cfg.step_label_coef and step_labeler is None:
        raise ValueError("train_sft: step_label_coef > 0 needs a step_labeler.")
    step = make_sft_step(graphdef, tx, cfg, tokenizer=tokenizer)
    state = jax.jit(lambda p: init_train_state(p, tx, seed))(params)
    bar = progress_bar(total=steps, desc="SFT", unit="step", enabled=progress)
    history = []
    try:
        for i in range(steps):
            batch = dict(next(batches))
            if cfg.spr_coef:
                batch["labels"] = outcome_labels(batch, tokenizer, answer_of)
            if cfg.step_label_coef:
                batch["step_labels"] = step_labeler(batch)
            state, m = step(state, batch)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            if not np.isfinite(m["loss"]):
                raise FloatingPointError(
                    f"SFT step {i + 1}: the loss is {m['loss']}; lower the learning rates."
                )
            history.append(m)
            if on_metrics is not None:
                on_metrics(i + 1, m)
            bar.update(1)
            post = {"ce": f"{m['ce']:.3f}"}
            if "score_gap" in m:
                post["gap"] = f"{m['score_gap']:+.3f}"
            bar.set_postfix(post)
    finally:
        bar.close()
    return state.params, history
