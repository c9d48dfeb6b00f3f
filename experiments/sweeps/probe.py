"""Is step correctness in the SPRM's input at all? A fresh SPRM-shaped head trained on the TRUE
step labels of the synthetic task (an oracle no outcome-label method can beat), on the frozen
penultimate hidden states of a checkpoint, against heads trained on outcome labels.

    python -m experiments.sweeps.probe [--config=experiments/configs/demo.py]
        [--model=sft|rl|DIR] [--train_problems=512] [--k=8] [--out=probe.json]

Samples come from the checkpoint's own policy (config.eval.temperature): k per training problem
and config.eval.k_max per held-out problem (the demo's evaluation problems). Features are the
penultimate hidden states at the scored positions (the token before each step delimiter), read
by one full forward pass. Each probe is msjax's SPRMHead (dropout 0.5, fresh init) trained with
AdamW on BCE; AUROC is measured on the held-out problems' steps against both true labels. Each
head (the checkpoint's own too) then ranks the held-out candidates by its trajectory scores (the
geometric mean of its step scores): Best-of-N and majority at every k and the within-problem
trajectory AUROC, i.e. how far Best-of-N gets with a head trained on the true labels; for the
probes also with a candidate scored by its weakest step instead ("weakest_step").
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from experiments.demo import Demo, config_flag, start_program, write_json
from msjax import checkpoint as ckpt
from msjax.data import token_step_labels
from msjax.data.pipeline import as_text
from msjax.evaluation import (
    default_ks,
    roc_auc,
    sample_candidates,
    scaling_metrics,
    within_problem_auroc,
)
from msjax.models import SPRMHead
from msjax.models.sprm import trajectory_score
from msjax.tokenizer import render_prompt

FLAGS = flags.FLAGS
LABELS = ("on_track", "locally_correct", "outcome")


def step_features(demo: Demo, model, problems, golds, k: int, seed: int) -> dict:
    """Penultimate features f32[steps, C] at every labelled step of k samples per problem, with
    the labels (bool[steps] each), the checkpoint's own head score, each step's candidate index
    ("candidate", int[steps], row-major in [problems, k]) and the samples ("cands")."""
    d = demo.c.data
    prompts = [
        demo.tokenizer.encode(render_prompt(p, d.template, d.suffix or None)) for p in problems
    ]
    sampler = demo._sampler(
        model.cfg, temperature=demo.c.eval.temperature, max_new_tokens=demo.c.eval.max_new_tokens
    )
    cands = sample_candidates(
        sampler, nnx.state(model), demo.tokenizer, prompts, golds, k=k,
        key=jax.random.key(seed), batch_size=demo.c.eval.batch_size, problems=problems,
    )  # fmt: skip
    rows, out = [], {name: [] for name in (*LABELS, "head", "candidate")}
    for ch, prompt, problem, correct in zip(
        cands.choices, prompts, problems, cands.correct, strict=True
    ):
        for c, ok in zip(ch.candidates, correct, strict=True):
            lab = token_step_labels(demo.tokenizer, problem, prompt, c.tokens)
            out["candidate"].append(np.full(len(lab.positions), len(rows)))
            rows.append((prompt + c.tokens, lab.positions))
            out["on_track"].append(lab.on_track)
            out["locally_correct"].append(lab.locally_correct)
            out["outcome"].append(np.full(len(lab.positions), bool(ok)))
            own = dict(zip(c.step_positions, c.step_scores, strict=True))
            out["head"].append(np.asarray([own.get(int(p), np.nan) for p in lab.positions]))
    graphdef, state = nnx.split(model)

    @jax.jit
    def penultimate(state, tokens, valid):
        m = nnx.merge(graphdef, state)
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return m(tokens, pos, valid, compute_logits=False).penultimate

    width = max(len(t) for t, _ in rows)
    feats = []
    for lo in range(0, len(rows), 256):
        chunk = rows[lo : lo + 256]
        tokens = np.zeros((256, width), np.int32)
        valid = np.zeros((256, width), bool)
        for i, (t, _) in enumerate(chunk):
            tokens[i, : len(t)], valid[i, : len(t)] = t, True
        h = np.asarray(penultimate(state, tokens, valid))
        feats += [h[i][pos] for i, (_, pos) in enumerate(chunk)]
    result = {k: np.concatenate(v) for k, v in out.items()}
    result["features"] = np.concatenate(feats).astype(np.float32)
    result["cands"] = cands
    return result


def candidate_scores(candidate: np.ndarray, step_logits: np.ndarray, shape) -> np.ndarray:
    """f32[P, k] trajectory scores (msjax.models.sprm.trajectory_score: the geometric mean of
    the step scores, 0 without a step) from per-step logits f32[steps] and each step's candidate
    index int[steps] (row-major in [P, k], steps of a candidate contiguous)."""
    n_steps = np.bincount(candidate, minlength=int(np.prod(shape)))
    logits = np.zeros((len(n_steps), max(int(n_steps.max()), 1)), np.float32)
    first = np.concatenate([[0], np.cumsum(n_steps)[:-1]])
    slot = np.arange(len(candidate)) - first[candidate]
    mask = np.zeros(logits.shape, bool)
    logits[candidate, slot], mask[candidate, slot] = step_logits, True
    return np.asarray(trajectory_score(jnp.asarray(logits), jnp.asarray(mask))).reshape(shape)


def weakest_step_scores(candidate: np.ndarray, step_logits: np.ndarray, shape) -> np.ndarray:
    """f32[P, k]: a candidate's lowest step score (0 without a step); an alternative to the
    geometric mean that one wrong step cannot be averaged away from."""
    scores = np.ones(int(np.prod(shape)))
    np.minimum.at(scores, candidate, 1.0 / (1.0 + np.exp(-step_logits.astype(np.float64))))
    scores[np.bincount(candidate, minlength=scores.size) == 0] = 0.0
    return scores.reshape(shape)


def best_of_n(cands, scores: np.ndarray) -> dict:
    """BoN and majority at every k, and the within-problem trajectory AUROC, of the held-out
    candidates ranked by trajectory scores f32[P, k]."""
    metrics = scaling_metrics(cands.correct, scores, cands.answers, default_ks(scores.shape[1]))
    auroc = within_problem_auroc(scores, cands.correct)[0]
    return {"bon": metrics["bon"], "maj": metrics["maj"], "traj_auroc_within": auroc}


def train_probe(x: np.ndarray, y: np.ndarray, steps: int, seed: int = 0) -> SPRMHead:
    """A fresh SPRMHead fitted to labels y on features x (BCE, AdamW, dropout on)."""
    head = SPRMHead(x.shape[1], rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(head)
    tx = optax.adamw(1e-3, weight_decay=0.01)
    opt = tx.init(params)
    xs, ys = jnp.asarray(x), jnp.asarray(y, jnp.float32)

    @jax.jit
    def step(params, opt, key):
        k_idx, k_drop = jax.random.split(key)
        idx = jax.random.randint(k_idx, (512,), 0, xs.shape[0])

        def loss(p):
            logits = nnx.merge(graphdef, p)(xs[idx], k_drop)
            return optax.sigmoid_binary_cross_entropy(logits, ys[idx]).mean()

        g = jax.grad(loss)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt

    for i in range(steps):
        params, opt = step(params, opt, jax.random.key(seed * 100_003 + i))
    return nnx.merge(graphdef, params)


def main(argv: list[str]) -> None:
    start_program(argv)
    demo = Demo(FLAGS.config)
    path = demo.paths.get(FLAGS.model, Path(FLAGS.model))
    if not ckpt.is_checkpoint_dir(path):
        raise app.UsageError(f"{path} is not an msjax checkpoint; run the demo first.")
    model, _ = ckpt.load_model(path)
    src = demo.source("train")
    n = min(FLAGS.train_problems, len(src))
    train_recs = [src[i] for i in range(n)]
    train = step_features(
        demo,
        model,
        [as_text(r["problem"]) for r in train_recs],
        [as_text(r["answer"]) for r in train_recs],
        FLAGS.k,
        seed=0,
    )
    problems, golds, _ = demo.eval_problems()
    test = step_features(demo, model, problems, golds, demo.c.eval.k_max, seed=1)
    mu, sd = train["features"].mean(0), train["features"].std(0) + 1e-6
    norm = lambda x: (x - mu) / sd
    results = {
        "model": str(path),
        "train_steps": len(train["features"]),
        "test_steps": len(test["features"]),
        "test_on_track_fraction": float(test["on_track"].mean()),
        "checkpoint_head": {
            "on_track": roc_auc(test["head"], test["on_track"]),
            "locally_correct": roc_auc(test["head"], test["locally_correct"]),
        },
    }
    cands = test["cands"]
    results["checkpoint_head"] |= best_of_n(cands, cands.scores)
    for name in LABELS:
        probe = train_probe(norm(train["features"]), train[name], FLAGS.steps)
        scores = np.asarray(probe(jnp.asarray(norm(test["features"]))))
        results[f"probe_trained_on_{name}"] = {
            "on_track": roc_auc(scores, test["on_track"]),
            "locally_correct": roc_auc(scores, test["locally_correct"]),
            **best_of_n(cands, candidate_scores(test["candidate"], scores, cands.scores.shape)),
            "weakest_step": best_of_n(
                cands, weakest_step_scores(test["candidate"], scores, cands.scores.shape)
            ),
        }
    write_json(Path(FLAGS.out), results)
    print(json.dumps(results, indent=2))


def define_flags() -> None:
    """The probe's flags (defined only when run as a program: absl has one flag registry per
    process, and msjax's CLIs define --model and --out too)."""
    config_flag()
    flags.DEFINE_string("model", "sft", "'sft', 'rl' (the demo's) or a checkpoint dir.")
    flags.DEFINE_integer("train_problems", 512, "Training problems for the probes.")
    flags.DEFINE_integer("k", 8, "Samples per training problem.")
    flags.DEFINE_integer("steps", 3000, "Probe optimizer steps.")
    flags.DEFINE_string("out", "probe.json", "Where to write the results.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
