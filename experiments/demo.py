"""`make demo`: a tiny reflective model learns the synthetic step task, end to end, on a CPU.

    python -m experiments.demo [--config=experiments/configs/demo.py[:micro]] [--config.x=y]

Stages (each writes its outputs under out_dir atomically, then a marker stages/<name>.json with
its results and seconds; a finished stage is skipped, so an interrupted run picks up where it
stopped, and the RL trainer resumes from its own latest checkpoint):

  data         synthetic tokenizer (out/tokenizer) and synthetic_steps dataset (out/data)
  sft          supervised warm start on gold + deliberately flawed solutions (out/sft), in two
               phases: "features" (sft.feature_steps; a stand-in for pre-training: CE plus a head
               trained on the TRUE step labels with its gradient into the backbone unscaled, so
               the backbone learns features that tell right from wrong steps; that head is then
               discarded), then "sft" (CE, with a FRESH SPRM head warmed up by the SPR loss on the
               SFT data's outcome labels only)
  eval_before  pass@1 of the warm-started policy on held-out problems
  rl           GRPO + SPR with msjax.rl.Trainer from out/sft (workdir out/rl)
  eval_after   k_max samples per held-out problem: pass@1, BoN / majority / weighted / random at
               each k, SPRM AUROC per trajectory (correct vs wrong) and per step (true labels)
  prune        the same samples with SPRM-guided early pruning: token savings, accuracy change
  export       Hugging Face export (out/hf); transformers' greedy tokens vs msjax's
  report       report.json, report.md and plots (experiments.demo_report)
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from msjax import checkpoint as ckpt
from msjax.data import (
    Difficulty,
    MixedSolutions,
    SftPipeline,
    build_synthetic_steps,
    build_synthetic_tokenizer,
    first_error,
    load_source,
    token_step_labels,
)
from msjax.data.pipeline import as_text, default_buckets
from msjax.evaluation import (
    bootstrap_ci,
    default_ks,
    k_curve,
    per_problem_accuracy,
    roc_auc,
    sample_candidates,
    scaling_metrics,
    step_scores_and_labels,
    within_problem_auroc,
)
from msjax.generate import PruneRule, Sampler, SamplerConfig
from msjax.tokenizer import Tokenizer, atomic_write_text, render_prompt

log = logging.getLogger("demo")
STAGES = ("data", "sft", "eval_before", "rl", "eval_after", "prune", "export", "report")
# Config fields that may change between the invocations of one run.
RUNTIME_FIELDS = {"out_dir", "stop_after", "log", "compilation_cache"}


def config_flag(recipe: str = "demo.py"):
    """Defines the --config recipe flag (once per program: the demo, experiments.sweeps.* and
    experiments.evidence each call it), default experiments/configs/<recipe>."""
    path = Path(__file__).with_name("configs") / recipe
    return config_flags.DEFINE_config_file("config", str(path), "Demo recipe.")


def parse_variant(text: str) -> tuple[str, float]:
    """An SPR loss variant: 'bce' -> ("bce", 0.5); 'spr:0.3' -> ("spr", 0.3); 'soft:0.5'
    likewise; ValueError naming the accepted forms otherwise."""
    name, _, thr = text.partition(":")
    if name not in ("bce", "spr", "soft"):
        raise ValueError(f"variant {text!r}: use bce, spr:<threshold> or soft:<threshold>")
    try:
        threshold = float(thr) if thr else 0.5
    except ValueError as e:
        raise ValueError(f"variant {text!r}: threshold {thr!r} is not a number") from e
    if not 0 < threshold < 1:
        raise ValueError(f"variant {text!r}: the threshold must be in (0, 1)")
    return name, threshold


def write_json(path: Path, data) -> None:
    """Writes JSON atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_npz(path: Path, **arrays) -> None:
    """np.savez atomically."""
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class Demo:
    """The stages of the demo over one out_dir (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.c = config
        self.out = Path(config.out_dir).absolute()
        self.paths = {
            name: self.out / name for name in ("tokenizer", "data", "sft", "rl", "hf", "stages")
        }
        self._tokenizer: Tokenizer | None = None

    # --------------------------------------------------------------------------- bookkeeping

    def marker(self, stage: str) -> Path:
        return self.paths["stages"] / f"{stage}.json"

    def done(self, stage: str) -> dict | None:
        path = self.marker(stage)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def check_config(self) -> None:
        """A resumed run must use the recipe its finished stages used (runtime-only fields
        aside); ValueError naming the differing fields otherwise."""
        path = self.out / "config.json"
        if not path.is_file() or not any(self.paths["stages"].glob("*.json")):
            return
        saved = json.loads(path.read_text(encoding="utf-8"))
        now = json.loads(self.c.to_json())
        keys = (set(saved) | set(now)) - RUNTIME_FIELDS
        differ = sorted(k for k in keys if saved.get(k) != now.get(k))
        if differ:
            raise ValueError(
                f"{self.out} holds stages of a run with another recipe (differs in {differ}); "
                "use another --config.out_dir or delete that folder to start over."
            )

    def run(self) -> dict:
        """Runs every unfinished stage; returns the report."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_config()
        write_json(self.out / "config.json", json.loads(self.c.to_json()))
        for stage in STAGES:
            if self.done(stage) is not None:
                log.info("stage %-11s done, skipped", stage)
                if stage == self.c.stop_after:  # a resumed run stops there too
                    return {}
                continue
            log.info("stage %-11s ...", stage)
            t0 = time.perf_counter()
            result = getattr(self, f"stage_{stage}")()
            if result is None:  # stopped early (SIGTERM during RL): not finished
                log.warning(
                    "stage %s stopped before finishing; run the demo again to resume", stage
                )
                return {}
            result["seconds"] = time.perf_counter() - t0
            write_json(self.marker(stage), result)
            log.info("stage %-11s finished in %.0f s", stage, result["seconds"])
            if stage == self.c.stop_after:
                log.info("stopping after stage %s (config.stop_after)", stage)
                return {}
        return self.done("report")

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_dir(self.paths["tokenizer"])
        return self._tokenizer

    def source(self, split: str):
        return load_source("synthetic_steps/demo", split, self.paths["data"])

    def eval_problems(self) -> tuple[list[str], list[str], list[list[int]]]:
        """(problems, gold answers, prompt ids) of the held-out problems."""
        src = self.source("test")
        n = min(self.c.eval.num_problems, len(src))
        records = [src[i] for i in range(n)]
        problems = [as_text(r["problem"]) for r in records]
        golds = [as_text(r["answer"]) for r in records]
        d = self.c.data
        prompts = [
            self.tokenizer.encode(render_prompt(p, d.template, d.suffix or None)) for p in problems
        ]
        return problems, golds, prompts

    # --------------------------------------------------------------------------- stages

    def stage_data(self) -> dict:
        t = self.c.task
        tmp = self.out / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tok = build_synthetic_tokenizer(tmp, vocab_size=self.c.model.vocab_size)
        shutil.rmtree(self.paths["tokenizer"], ignore_errors=True)
        os.replace(tmp, self.paths["tokenizer"])
        difficulty = Difficulty(
            min_steps=t.min_steps,
            max_steps=t.max_steps,
            max_start=t.max_start,
            max_operand=t.max_operand,
            max_value=t.max_value,
            ops=t.ops,
        )
        built = build_synthetic_steps(
            self.paths["data"],
            num_train=t.num_train,
            num_test=t.num_test,
            difficulty=difficulty,
            seed=t.seed,
            config_name="demo",
        )
        return {"vocab_size": tok.vocab_size, "splits": dict(built.splits)}

    def stage_sft(self) -> dict:
        from flax import nnx

        from msjax.models import create_model
        from msjax.rl.config import model_config
        from msjax.rl.optimizer import OptimizerConfig, make_optimizer
        from msjax.sft import SftLossConfig, step_label_array, train_sft

        s = self.c.sft
        cfg = model_config(self.c)
        src = self.source("train")
        pipeline = SftPipeline(
            src,
            self.tokenizer,
            batch_size=s.batch_size,
            max_len=s.max_len,
            response_fn=MixedSolutions(s.flawed_fraction, kinds=tuple(s.error_kinds)),
            template=self.c.data.template,
            suffix=self.c.data.suffix or None,
            seed=self.c.seed,
            shard_index=0,
            shard_count=1,
        )
        if pipeline.stats["too_long"]:
            log.warning(
                "SFT: %d of %d examples are longer than sft.max_len=%d and are skipped",
                pipeline.stats["too_long"],
                pipeline.stats["examples"],
                s.max_len,
            )
        batches = iter(pipeline)
        model = create_model(cfg, seed=self.c.seed)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        rows = []

        def phase(params, name, steps, head_grad_scale, loss, labeler=None):
            # The head's gradient into the backbone is the phase's own (the saved model keeps
            # cfg's value, the official 1e-4, for RL).
            graphdef, _ = nnx.split(create_model(cfg.replace(head_grad_scale=head_grad_scale)))
            tx = make_optimizer(
                OptimizerConfig(lr=s.lr, head_lr=s.head_lr, warmup_steps=s.warmup_steps)
            )
            offset = len(rows)
            return train_sft(
                params,
                graphdef,
                tx,
                loss,
                batches,
                self.tokenizer,
                lambda i: as_text(src[i]["answer"]),
                steps=steps,
                seed=self.c.seed,
                progress=self.c.log.progress,
                on_metrics=lambda i, m: rows.append({"step": offset + i, "phase": name, **m}),
                step_labeler=labeler,
            )

        if s.feature_steps:
            # Stand-in for pre-training (see msjax.sft): the backbone learns features that tell
            # right from wrong steps, through a head trained on the TRUE step labels with its
            # gradient unscaled. That head is then discarded: the SPRM starts afresh.
            labeler = functools.partial(
                step_label_array,
                tokenizer=self.tokenizer,
                problem_of=lambda i: as_text(src[i]["problem"]),
                label=s.feature_label,
            )
            params, _ = phase(
                params,
                "features",
                s.feature_steps,
                1.0,
                SftLossConfig(step_label_coef=s.feature_coef),
                labeler,
            )
            fresh = create_model(cfg, seed=self.c.seed + 1)
            params["head"] = nnx.to_pure_dict(nnx.state(fresh.head, nnx.Param))
        params, history = phase(
            params,
            "sft",
            s.steps,
            s.head_grad_scale,
            SftLossConfig(
                spr_coef=s.spr_coef, spr_variant=s.spr_variant, spr_threshold=s.spr_threshold
            ),
        )
        state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state, params)
        tmp = self.out / ".sft.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        ckpt.save_model(tmp, state, cfg, step=0, tokenizer_dir=self.paths["tokenizer"])
        atomic_write_text(tmp / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        shutil.rmtree(self.paths["sft"], ignore_errors=True)
        os.replace(tmp, self.paths["sft"])
        last = history[-1]
        return {
            **{k: last[k] for k in ("ce", "score_correct", "score_wrong") if k in last},
            "data": pipeline.stats,
        }

    def _sampler(self, cfg, *, temperature: float, max_new_tokens: int, prune=None, scores=True):
        return Sampler(
            _graphdef(cfg),
            cfg,
            SamplerConfig.from_tokenizer(
                self.tokenizer,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                prompt_buckets=default_buckets(self.c.data.max_prompt_len),
                prune=prune,
                score_steps=scores,
            ),
        )

    def evaluate(self, ckpt_dir: Path, k: int, prune: PruneRule | None = None, step=None):
        """k candidates per held-out problem from step `step` (default latest) of a checkpoint."""
        from flax import nnx

        model, cfg = ckpt.load_model(ckpt_dir, step=step)
        e = self.c.eval
        problems, golds, prompts = self.eval_problems()
        sampler = self._sampler(
            cfg, temperature=e.temperature, max_new_tokens=e.max_new_tokens, prune=prune
        )
        return sample_candidates(
            sampler,
            nnx.state(model),
            self.tokenizer,
            prompts,
            golds,
            k=k,
            key=jax.random.key(e.seed),
            batch_size=e.batch_size,
            problems=problems,
            progress=self.c.log.progress,
        )

    def _labeler(self, problem, prompt_ids, response_ids):
        lab = token_step_labels(self.tokenizer, problem, prompt_ids, response_ids)
        return lab.positions, {"on_track": lab.on_track, "locally_correct": lab.locally_correct}

    def summary(self, cands, ks, name: str | None = None) -> dict:
        """Metrics of a candidate set: accuracy at `ks`, the k-curve with 95% intervals over
        problems at every power of two up to k, AUROCs. The per-problem accuracies and raw scores
        go to out/<name>.npz (plots, and experiments.evidence pools them over seeds)."""
        metrics = scaling_metrics(cands.correct, cands.scores, cands.answers, ks, cands.eligible)
        per = per_problem_accuracy(
            cands.correct, cands.scores, cands.answers, default_ks(cands.correct.shape[1])
        )
        step_s, step_l, unmatched = step_scores_and_labels(cands, self._labeler)
        within = within_problem_auroc(cands.scores, cands.correct)
        if name:
            save_npz(
                self.out / f"{name}.npz",
                traj_scores=cands.scores,
                correct=cands.correct,
                lengths=cands.lengths,
                step_scores=step_s,
                **{f"step_{k}": v for k, v in step_l.items()},
                **{f"per_{m}_{k}": v for m, by_k in per.items() for k, v in by_k.items()},
            )
        return {
            **metrics,
            "k_curve": k_curve(per),
            "bon_vs_maj": {str(k): bootstrap_ci(per["bon"][k] - per["maj"][k]) for k in per["bon"]},
            "tokens_per_problem": {str(k): k * float(cands.lengths.mean()) for k in per["bon"]},
            "traj_auroc": roc_auc(cands.scores.ravel(), cands.correct.ravel()),
            "traj_auroc_within": within[0],
            "mixed_problems": within[1],
            "step_auroc": roc_auc(step_s, step_l.get("on_track", [])),
            "step_auroc_local": roc_auc(step_s, step_l.get("locally_correct", [])),
            "error_kinds": error_kinds(cands),
            "steps_scored": len(step_s),
            "steps_unmatched": unmatched,
            "tokens_generated": cands.tokens_generated,
            "problems": len(cands.golds),
            "k": int(cands.correct.shape[1]),
        }

    def stage_eval_before(self) -> dict:
        k = self.c.eval.k_before
        cands = self.evaluate(self.paths["sft"], k)
        return self.summary(cands, [x for x in self.c.eval.ks if k % x == 0] or [k], "before")

    def rl_config(self) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict(self.c.to_dict())
        c.workdir = str(self.paths["rl"])
        c.init = str(self.paths["sft"])
        c.tokenizer = ""
        c.data.data_dir = str(self.paths["data"])
        return c

    def stage_rl(self) -> dict | None:
        from msjax.metrics import read_metrics
        from msjax.rl.trainer import Trainer

        trainer = Trainer(self.rl_config())
        try:
            trainer.run()
        finally:
            trainer.close()
        if trainer.rl_step < self.c.total_steps:
            return None
        rows = read_metrics(self.paths["rl"])
        last = rows[-1] if rows else {}
        return {k: last[k] for k in ("reward", "rollout_score_gap", "spr_kept_frac") if k in last}

    def stage_eval_after(self) -> dict:
        cands = self.evaluate(self.paths["rl"], self.c.eval.k_max)
        return self.summary(cands, list(self.c.eval.ks), "after")

    def stage_prune(self) -> dict:
        """SPRM-guided pruning: k_max pruned candidates per problem against the unpruned ones
        (same keys), and accuracy against generated tokens at every k of config.eval.ks, each
        k sampled on its own (the rule compares a problem's k candidates with each other)."""
        rule = PruneRule.parse(self.c.eval.prune)
        k_max = self.c.eval.k_max
        full = self.done("eval_after")
        curve, pruned = {}, None
        for k in sorted({*self.c.eval.ks, k_max}):
            cands = self.evaluate(self.paths["rl"], k, prune=rule)
            per = per_problem_accuracy(
                cands.correct, cands.scores, cands.answers, [k], cands.eligible
            )
            curve[str(k)] = {
                "tokens_per_problem": cands.tokens_generated / len(cands.golds),
                **{m: bootstrap_ci(per[m][k]) for m in ("bon", "maj", "weighted")},
            }
            if k == k_max:
                pruned = cands
        k = str(k_max)
        return {
            "rule": self.c.eval.prune,
            "tokens_generated": pruned.tokens_generated,
            "tokens_full": full["tokens_generated"],
            "token_savings": 1.0 - pruned.tokens_generated / max(full["tokens_generated"], 1),
            "bon": curve[k]["bon"][0],
            "bon_full": full["bon"][k],
            "accuracy_change": curve[k]["bon"][0] - full["bon"][k],
            "maj": curve[k]["maj"][0],
            "maj_full": full["maj"][k],
            "pruned_candidates": int((~pruned.eligible).sum()),
            "curve": curve,
        }

    def stage_export(self) -> dict:
        from experiments.demo_parity import greedy_parity

        shutil.rmtree(self.paths["hf"], ignore_errors=True)
        ckpt.export_hf(self.paths["rl"], self.paths["hf"])
        e = self.c.eval
        _, _, prompts = self.eval_problems()
        return greedy_parity(
            self.paths["rl"],
            self.paths["hf"],
            self.tokenizer,
            prompts[: e.parity_prompts],
            e.parity_new_tokens,
            buckets=default_buckets(self.c.data.max_prompt_len),
        )

    def stage_report(self) -> dict:
        from experiments.demo_report import write_report

        stages = {s: self.done(s) for s in STAGES[:-1]}
        return write_report(self.out, self.c, stages)


def error_kinds(cands) -> dict[str, int]:
    """How many wrong candidates have each first error (`msjax.data.first_error`'s kinds; "pruned"
    for candidates pruned while sampling, "none" when every step is right but the answer is not,
    e.g. a wrong box or a response cut at max_new_tokens after the last step)."""
    counts: dict[str, int] = {}
    for problem, choice, right in zip(cands.problems, cands.choices, cands.correct, strict=True):
        for cand, ok in zip(choice.candidates, right, strict=True):
            if ok:
                continue
            if cand.pruned:
                kind = "pruned"
            else:
                err = first_error(problem, cand.response)
                kind = err[1] if err else "none"
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def _graphdef(cfg):
    from msjax.models import abstract_model

    return abstract_model(cfg)[0]


def start_program(argv: list[str]) -> None:
    """What every experiments program does first: refuse stray arguments, log progress at INFO
    and the chatty libraries at WARNING."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax._src", "msjax.data.pipeline", "math_verify"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str]) -> None:
    start_program(argv)
    config = flags.FLAGS.config
    if config.stop_after and config.stop_after not in STAGES:
        raise app.UsageError(f"--config.stop_after={config.stop_after!r}; choose one of {STAGES}.")
    if config.compilation_cache:
        # Compiled programs are reused by a resumed run and by stages with the same shapes.
        cache = Path(config.out_dir).absolute() / "jax_cache"
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    demo = Demo(config)
    try:
        demo.check_config()
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    report = demo.run()
    if report:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    config_flag()
    app.run(main)
