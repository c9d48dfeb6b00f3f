"""The RL + SPR trainer: prompts -> rollouts -> rewards -> advantages -> PPO updates -> checkpoints.

One `Trainer.run()` loop step ("RL step"):
  1. the next batch of prompts from the grain pipeline (the same global batch on every process),
  2. `group_size` samples per prompt from the jitted sampler, called with the LIVE parameters
     (old log-probs and SPRM trajectory scores come from it), in calls of at most
     `rollout.max_rows_per_call` sequences (the KV cache holds one call's rows),
  3. outcome rewards (math verification in a worker pool), GRPO advantages,
  4. reference log-probs of the frozen start policy (skipped when kl_coef = 0),
  5. `ppo_epochs` passes of PPO mini-batch updates with the ONE jitted train step,
  6. metrics (JSONL, TensorBoard, progress bar) and, every `checkpoint.every_steps`, an orbax
     checkpoint of params, optimizer state, train-step RNG, RL step and data-iterator state.

The workdir is an msjax checkpoint directory (msjax.json + tokenizer/ + checkpoints/<step>), so
`msjax-convert export --checkpoint WORKDIR` exports the latest step. A run resumes from the
latest checkpoint of its workdir by itself (also onto a different mesh). Rollout keys derive from
(seed, RL step), so a resumed run repeats the interrupted run bit for bit. SIGTERM makes the
loop save the step it is on and return.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from msjax import checkpoint as ckpt
from msjax import sharding as sh
from msjax.data import build_synthetic_steps, build_synthetic_tokenizer, load_source
from msjax.data.pipeline import PromptPipeline
from msjax.generate.config import EOS, FINISH_REASONS, STOP, SamplerConfig
from msjax.generate.engine import EngineSampler
from msjax.generate.sampler import SampleResult
from msjax.metrics import MetricsWriter
from msjax.models.reflective import abstract_model, create_model
from msjax.rewards.math import MathVerifier
from msjax.rl import config as rlc
from msjax.rl import rollout, spr
from msjax.rl.optimizer import make_optimizer
from msjax.rl.train_step import (
    TrainState,
    init_train_state,
    make_logprob_fn,
    make_train_step,
    train_state_shardings,
)
from msjax.tokenizer import Tokenizer

log = logging.getLogger(__name__)
ITEMS = ("params", "train_state", "meta")


class NonFiniteError(RuntimeError):
    """Raised when too many updates in a row had a non-finite loss or gradient."""


def _to_global(x: np.ndarray, sharding) -> jax.Array:
    """A global array from a host array that every process holds in full."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


@jax.jit
def _copy(tree):
    """A copy of every array of `tree` (one compiled program, shardings kept)."""
    return jax.tree.map(jnp.copy, tree)


@jax.jit
def _all_finite(tree) -> jax.Array:
    """bool[]: every element of every array of `tree` is finite (one compiled program)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process) global array, on every process."""
    if not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class Trainer:
    """Builds everything from a config (see msjax.rl.config.default_config) and runs the loop."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = c = config
        self.mesh = sh.make_mesh(dict(c.mesh))
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        rlc.validate(c, batch_shards=shards)
        self.workdir = ckpt.as_path(c.workdir)  # local or gs:// (etils.epath)
        self.loss_cfg = rlc.loss_config(c)
        self.tx = make_optimizer(rlc.optimizer_config(c))

        resume_step = (
            ckpt.latest_step(self.workdir) if ckpt.is_checkpoint_dir(self.workdir) else None
        )
        self.model_cfg, params = self._initial_params(resume_step)
        self.tokenizer = self._tokenizer(resume_step)
        if resume_step is None:
            self._write_workdir_meta()

        graphdef, abstract = abstract_model(self.model_cfg, self.mesh)
        self.graphdef = graphdef
        param_shardings = nnx.to_pure_dict(sh.state_shardings(abstract, self.mesh))
        abstract_state = jax.eval_shape(lambda p: init_train_state(p, self.tx, c.seed), params)
        self.state_shardings = train_state_shardings(abstract_state, param_shardings, self.mesh)
        self.ref_params = None
        if self.loss_cfg.kl_coef:
            # The reference is the start policy, frozen (a real copy: the train step donates).
            self.ref_params = _copy(params)
        self.state = jax.jit(
            lambda p: init_train_state(p, self.tx, c.seed), out_shardings=self.state_shardings
        )(params)
        self.train_step = make_train_step(
            graphdef, self.tx, self.loss_cfg, mesh=self.mesh, state_shardings=self.state_shardings
        )
        self.logprob_fn = make_logprob_fn(
            graphdef, self.loss_cfg, mesh=self.mesh, param_shardings=param_shardings
        )
        self.pipeline = self._pipeline()
        self.data_iter = iter(self.pipeline)
        r = c.rollout
        self.sampler = EngineSampler(
            graphdef,
            self.model_cfg,
            self._sampler_config(),
            self.mesh,
            slots=r.max_rows_per_call or r.prompts_per_step * r.group_size,
        )
        self.verifier = None
        self.rl_step = 0
        self.manager = ocp.CheckpointManager(
            ckpt.checkpoints_path(self.workdir),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=c.checkpoint.keep,
                enable_async_checkpointing=c.checkpoint.async_save,
                create=True,
            ),
        )
        if resume_step is not None:
            self._restore(resume_step)
        self._stop_requested = False
        self._nonfinite_in_row = 0

    # ------------------------------------------------------------------------- set-up

    def _initial_params(self, resume_step):
        """(ModelConfig, params pure dict on the mesh) of the start policy.

        On resume the start policy is rebuilt from its source too: it is the frozen KL reference,
        and its arrays are the restore target's structure.
        """
        c = self.config
        if c.init:
            model, cfg = ckpt.load_any(c.init, self.mesh)
            cfg = rlc.model_config(c, cfg)
            if cfg != model.cfg:
                model, cfg = ckpt.load_any(c.init, self.mesh, **_runtime_fields(cfg))
        else:
            cfg = rlc.model_config(c)
            model = create_model(cfg, self.mesh, seed=c.seed)
        if resume_step is not None:
            saved = ckpt.read_config(self.workdir)
            for name in ckpt.ARCH_FIELDS:
                if getattr(saved, name) != getattr(cfg, name):
                    raise ValueError(
                        f"{self.workdir} was trained with {name}={getattr(saved, name)!r} but the "
                        f"config now gives {getattr(cfg, name)!r}; use a fresh workdir."
                    )
        return cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def _tokenizer(self, resume_step) -> Tokenizer:
        c = self.config
        own = self.workdir / ckpt.TOKENIZER_SUBDIR
        if resume_step is not None and (own / "tokenizer.json").is_file():
            return Tokenizer.from_dir(ckpt.local_copy(own))
        if c.tokenizer == "synthetic":
            return build_synthetic_tokenizer()
        source = c.tokenizer or (ckpt.tokenizer_dir(c.init) if c.init else None)
        if not source:
            raise ValueError(
                "No tokenizer: set config.tokenizer to a folder with tokenizer.json, or "
                "'synthetic', or start from a model folder that has one (config.init)."
            )
        return Tokenizer.from_dir(ckpt.local_copy(source))

    def _write_workdir_meta(self) -> None:
        if jax.process_index() != 0:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save(tmp)
            target = self.workdir / ckpt.TOKENIZER_SUBDIR
            target.mkdir(exist_ok=True)
            for f in Path(tmp).iterdir():
                (target / f.name).write_bytes(f.read_bytes())
        meta = {
            "format": ckpt.FORMAT,
            "format_version": ckpt.FORMAT_VERSION,
            "model_config": self.model_cfg.to_dict(),
        }
        (self.workdir / "config.json").write_text(self.config.to_json(indent=2))
        # msjax.json last: its presence marks the directory as an msjax checkpoint.
        tmp_meta = self.workdir / f".{ckpt.META_NAME}.tmp"
        tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
        tmp_meta.rename(self.workdir / ckpt.META_NAME)

    def _pipeline(self) -> PromptPipeline:
        d = self.config.data
        data_dir = d.data_dir or os.fspath(self.workdir / "data")
        if d.build_synthetic:
            name, _, config_name = d.name.partition("/")
            if name != "synthetic_steps":
                raise ValueError("config.data.build_synthetic needs data.name synthetic_steps/<c>.")
            if jax.process_index() == 0:
                build_synthetic_steps(
                    data_dir,
                    num_train=d.synthetic_num_train,
                    num_test=d.synthetic_num_test,
                    seed=d.synthetic_seed,
                    config_name=config_name or "default",
                )
            from msjax import distributed

            distributed.sync("synthetic_data_built")
        source = load_source(d.name, d.split, data_dir)
        return PromptPipeline(
            source,
            self.tokenizer,
            batch_size=self.config.rollout.prompts_per_step,
            max_prompt_len=d.max_prompt_len,
            template=d.template,
            suffix=d.suffix or None,
            seed=self.config.seed,
            shuffle=d.shuffle,
            shard_index=0,  # every process reads the same global prompt batch
            shard_count=1,
        )

    def _sampler_config(self) -> SamplerConfig:
        r = self.config.rollout
        return SamplerConfig.from_tokenizer(
            self.tokenizer,
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            prompt_buckets=self.pipeline.buckets,
        )

    # ------------------------------------------------------------------------- checkpoints

    def _abstract_state(self) -> TrainState:
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(lambda: self.state),
            self.state_shardings,
        )

    def _restore(self, step: int) -> None:
        target = self._abstract_state()
        rest = {"step": target.step, "opt_state": target.opt_state, "rng": target.rng}
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target.params),
                train_state=ocp.args.StandardRestore(rest),
                meta=ocp.args.JsonRestore(),
            ),
        )
        ts = out["train_state"]
        self.state = TrainState(ts["step"], out["params"], ts["opt_state"], ts["rng"])
        meta = out["meta"]
        self.rl_step = int(meta["rl_step"])
        self.data_iter.set_state(meta["data_state"])
        log.info("Resumed %s at RL step %d.", self.workdir, self.rl_step)

    def save(self, *, force: bool = False) -> bool:
        """Saves the current state as step `rl_step`; refuses a non-finite state."""
        if self.rl_step in self.manager.all_steps():
            return False
        if not bool(_all_finite(self.state.params)):
            log.error("Not saving step %d: the parameters are not finite.", self.rl_step)
            return False
        meta = {
            "rl_step": self.rl_step,
            "data_state": self.data_iter.get_state(),
            "config": json.loads(self.config.to_json()),
        }
        s = self.state
        return self.manager.save(
            self.rl_step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(s.params),
                train_state=ocp.args.StandardSave(
                    {"step": s.step, "opt_state": s.opt_state, "rng": s.rng}
                ),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    # ------------------------------------------------------------------------- the loop

    def _request_stop(self, signum, frame) -> None:
        del frame
        log.warning("Signal %d: saving at the end of this step, then stopping.", signum)
        self._stop_requested = True

    def _stop_agreed(self) -> bool:
        """True when any process got SIGTERM: every process then stops after the same step
        (and saves it together), instead of one waiting forever in the next step's collectives."""
        if jax.process_count() == 1:
            return self._stop_requested
        requested = multihost_utils.process_allgather(np.asarray(self._stop_requested))
        return bool(np.any(requested))

    def rollout(self, batch: dict) -> tuple[dict, dict]:
        """Samples, scores and rewards one prompt batch -> (train batch, rollout metrics)."""
        c = self.config
        n = c.rollout.group_size
        tokens, lengths = batch["prompt_tokens"], batch["prompt_lengths"]
        mask = np.arange(tokens.shape[1])[None] >= tokens.shape[1] - lengths[:, None]
        key = jax.random.fold_in(jax.random.PRNGKey(c.seed), self.rl_step)
        res = self._sample(tokens, mask, n, key)
        responses = [self.tokenizer.decode(res.response(r)) for r in range(res.tokens.shape[0])]
        golds = [str(a) for a in np.repeat(batch["answer"], n)]
        finished = np.isin(res.finish, (EOS, STOP))
        rewards = self.verifier.verify_batch(responses, golds, finished)
        tb = rollout.train_batch(
            tokens,
            lengths,
            res.tokens,
            res.lengths,
            res.logprobs,
            rewards,
            n,
            step_ids=self.tokenizer.step_ids,
            think_start_id=self.tokenizer.think_start_id,
            think_end_id=self.tokenizer.think_end_id,
        )
        labels = jnp.asarray(tb["labels"])
        gap = spr.score_gap_metrics(jnp.asarray(res.scores), labels)
        metrics = {
            "reward": float(np.mean(rewards)),
            "accuracy": float(np.mean(tb["labels"])),
            "response_len": float(np.mean(res.lengths)),
            "steps_per_response": float(np.mean(res.num_steps)),
            "rollout_score_correct": float(gap["score_correct"]),
            "rollout_score_wrong": float(gap["score_wrong"]),
            "rollout_score_gap": float(gap["score_gap"]),
        }
        for code, name in enumerate(FINISH_REASONS):
            if code:
                metrics[f"finish_{name}"] = float(np.mean(res.finish == code))
        return tb, metrics

    def _sample(self, tokens: np.ndarray, mask: np.ndarray, n: int, key) -> SampleResult:
        """n samples per prompt with the live params through the engine's slots (at most
        rollout.max_rows_per_call sequences decode at once); a host SampleResult. Prompts keep
        their batch index as sampling id."""
        return self.sampler(self.state.params, tokens, prompt_mask=mask, n=n, key=key)

    def _update(self, tb: dict) -> dict:
        """PPO epochs over mini-batches of the rollout batch; returns averaged metrics."""
        c = self.config
        rows = c.train.ppo_mini_batch * c.rollout.group_size
        total = tb["tokens"].shape[0]
        put = lambda x: _to_global(x, sh.batch_sharding(self.mesh, x.ndim))
        if self.ref_params is not None:
            # One micro-batch per forward: its activations are bounded like the train step's.
            micro = rows // self.loss_cfg.num_microbatches
            ref = [
                _to_host(
                    self.logprob_fn(
                        self.ref_params,
                        *(put(tb[k][i : i + micro]) for k in ("tokens", "positions", "valid")),
                    )
                )
                for i in range(0, total, micro)
            ]
            tb["ref_logp"] = np.concatenate(ref).astype(np.float32)
        sums: dict[str, float] = {}
        count = 0
        for _ in range(c.train.ppo_epochs):
            for i in range(0, total, rows):
                mb = {k: put(v[i : i + rows]) for k, v in tb.items()}
                self.state, m = self.train_step(self.state, mb)
                m = jax.device_get(m)
                skipped = bool(m["update_skipped"])
                self._nonfinite_in_row = self._nonfinite_in_row + 1 if skipped else 0
                if skipped:
                    log.warning(
                        "RL step %d: non-finite loss or gradient; update refused (%d in a row).",
                        self.rl_step,
                        self._nonfinite_in_row,
                    )
                    if self._nonfinite_in_row >= c.train.max_nonfinite_steps:
                        raise NonFiniteError(
                            f"{self._nonfinite_in_row} updates in a row had a non-finite loss or "
                            f"gradient (RL step {self.rl_step}); the last good state is in "
                            f"{self.workdir}. Lower the learning rates or check the data."
                        )
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
        return {k: v / count for k, v in sums.items()}

    def run(self) -> dict:
        """Trains until config.total_steps (or SIGTERM); returns the last step's metrics."""
        c = self.config
        writer = MetricsWriter(
            self.workdir,
            tensorboard=c.log.tensorboard,
            tensorboard_dir=c.log.tensorboard_dir or None,
        )
        previous = signal.signal(signal.SIGTERM, self._request_stop)
        bar = None
        if c.log.progress and jax.process_index() == 0:
            from tqdm import tqdm

            bar = tqdm(total=c.total_steps, initial=self.rl_step, desc="RL+SPR", unit="step")
        last: dict = {}
        self.verifier = MathVerifier(
            num_workers=c.rollout.reward_workers,
            timeout_s=c.rollout.reward_timeout_s,
            missing_eos_reward=None
            if c.rollout.missing_eos_reward < 0
            else c.rollout.missing_eos_reward,
        )
        try:
            stop = False
            while self.rl_step < c.total_steps and not (stop := self._stop_agreed()):
                t0 = time.perf_counter()
                tb, roll_m = self.rollout(next(self.data_iter))
                t1 = time.perf_counter()
                upd_m = self._update(tb)
                self.rl_step += 1
                tokens = float(tb["loss_mask"].sum())
                last = {
                    **roll_m,
                    **upd_m,
                    "rollout_s": t1 - t0,
                    "update_s": time.perf_counter() - t1,
                    "train_tokens_per_s": tokens / max(time.perf_counter() - t1, 1e-9),
                }
                writer.write(self.rl_step, last)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        reward=f"{last['reward']:.3f}",
                        spr_kept=f"{last.get('spr_kept_frac', math.nan):.2f}",
                        gap=f"{last['rollout_score_gap']:+.3f}",
                    )
                if self.rl_step % c.checkpoint.every_steps == 0 or self.rl_step == c.total_steps:
                    self.save()
            if stop:
                self.save(force=True)
        finally:
            self.manager.wait_until_finished()
            signal.signal(signal.SIGTERM, previous)
            writer.close()
            if bar is not None:
                bar.close()
            self.verifier.close()
        return last

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _runtime_fields(cfg) -> dict:
    return {
        k: getattr(cfg, k)
        for k in ("remat", "attention", "attention_chunk", "head_dropout", "head_grad_scale")
    }
