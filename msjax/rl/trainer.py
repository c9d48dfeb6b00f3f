"""The RL + SPR trainer: prompts -> rollouts -> rewards -> advantages -> PPO updates -> checkpoints.

One `Trainer.run()` loop step ("RL step"):
  1. the next batch of prompts from the grain pipeline (the same global batch on every process),
  2. `group_size` samples per prompt from the continuous-batching engine (msjax.generate.engine:
     `rollout.max_rows_per_call` slots, each refilled as soon as its row ends), run on the decode
     copy of the LIVE parameters (msjax.generate.weights: refreshed once per RL step,
     tensor-parallel, no per-token weight gathers; SPRM trajectory scores come from it),
  3. outcome rewards (`config.reward`; each process verifies its own share of the rows, the
     shares are all-gathered and checksummed, so every process trains on the same rewards),
     GRPO advantages,
  4. on the devices: old log-probs recomputed by the train step's own forward before the first
     update (REFERENCE 4; `loss.old_logprobs="sampler"` keeps the sampler's and skips this
     forward), reference log-probs of the frozen start policy (skipped when kl_coef = 0),
  5. `ppo_epochs` passes of PPO mini-batch updates with the ONE jitted train step (metrics read
     one update late, so the host does not wait for the devices between updates),
  6. metrics (JSONL, TensorBoard, progress bar) and, every `checkpoint.every_steps`, an orbax
     checkpoint of params, optimizer state, train-step RNG, RL step and data-iterator state.

The workdir is an msjax checkpoint directory (msjax.json + tokenizer/ + checkpoints/<step>), so
`msjax-convert export --checkpoint WORKDIR` exports the latest step. A run resumes from the
latest checkpoint of its workdir by itself (also onto a different mesh). Rollout keys derive from
(seed, RL step), so a resumed run repeats the interrupted run bit for bit. SIGTERM makes the
loop save the step it is on and return.
"""

from __future__ import annotations

import hashlib
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
from msjax import global_arrays
from msjax import sharding as sh
from msjax.data import build_synthetic_steps, build_synthetic_tokenizer, load_source
from msjax.data.local_math import build_local_math, files_config_name
from msjax.data.pipeline import PromptPipeline
from msjax.generate.config import FINISH_REASONS, SamplerConfig
from msjax.generate.engine import EngineSampler
from msjax.generate.sampler import SampleResult
from msjax.generate.weights import DecodeWeights
from msjax.metrics import MetricsWriter
from msjax.models.reflective import abstract_model, create_model
from msjax.progress import progress as progress_bar
from msjax.rewards.outcome import OutcomeReward
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


class RewardMismatchError(RuntimeError):
    """Raised when the processes of a run hold different rewards (or rollout texts) for a step."""


@jax.jit
def _copy(tree):
    """A copy of every array of `tree` (one compiled program, shardings kept)."""
    return jax.tree.map(jnp.copy, tree)


@jax.jit
def _all_finite(tree) -> jax.Array:
    """bool[]: every element of every array of `tree` is finite (one compiled program)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@jax.jit
def _logp_deviation(sampler_logp, logp, mask) -> dict:
    """Mean and max |sampler log-prob - recomputed log-prob| over the response tokens."""
    dev = jnp.where(mask, jnp.abs(sampler_logp - logp), 0.0)
    return {
        "sampler_logp_dev_sum": jnp.sum(dev),
        "sampler_logp_dev_max": jnp.max(dev),
        "response_tokens": jnp.sum(mask.astype(jnp.float32)),
    }


def _digest(rewards: np.ndarray, responses, golds) -> np.ndarray:
    """uint32[2]: a checksum of a step's rewards and the responses (token ids) and golds they
    were computed from."""
    h = hashlib.sha256(np.asarray(rewards, np.float32).tobytes())
    for r in responses:
        h.update(np.asarray(r, np.int64).tobytes() + b"\xff" * 8)
    for g in golds:
        h.update(g.encode("utf-8", "surrogatepass") + b"\0")
    return np.frombuffer(h.digest()[:8], np.uint32)


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
        self.response_widths = rollout.response_widths(r.max_new_tokens, r.response_buckets)
        self.decode_weights = DecodeWeights(abstract, self.mesh, r.decode_dtype)
        self.reward = None
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

        The head's training settings come from config.train, not from the start checkpoint. On
        resume the start policy is rebuilt from its source too (it is the frozen KL reference,
        and its arrays are the restore target's structure), and the training settings must be
        the run's own (ValueError otherwise).
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
            run_json = self.workdir / "config.json"
            run = json.loads(run_json.read_text()) if run_json.exists() else {}
            rlc.check_resume(c, run, saved, self.workdir)
        return cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def _tokenizer(self, resume_step) -> Tokenizer:
        c = self.config
        own = self.workdir / ckpt.TOKENIZER_SUBDIR
        if resume_step is not None and (own / "tokenizer.json").is_file():
            return Tokenizer.from_dir(ckpt.local_copy(own), step_mode=c.step_mode)
        if c.tokenizer == "synthetic":
            return build_synthetic_tokenizer()
        source = c.tokenizer or (ckpt.tokenizer_dir(c.init) if c.init else None)
        if not source:
            raise ValueError(
                "No tokenizer: set config.tokenizer to a folder with tokenizer.json, or "
                "'synthetic', or start from a model folder that has one (config.init)."
            )
        return Tokenizer.from_dir(ckpt.local_copy(source), step_mode=c.step_mode)

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
        name = d.name
        if d.files:
            name = f"local_math/{files_config_name(d.files)}"
            if jax.process_index() == 0:
                build_local_math(None, data_dir, files=d.files, overwrite=True, verbose=False)
            from msjax import distributed

            distributed.sync("local_math_built")
        source = load_source(name, d.split, data_dir)
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
        width = rollout.response_width(res.lengths, self.response_widths)
        rows = np.repeat(np.arange(tokens.shape[0]), n)
        rewards = self._rewards(
            [tokens[p, tokens.shape[1] - lengths[p] :] for p in rows],
            [res.response(r) for r in range(res.tokens.shape[0])],
            [str(batch["answer"][p]) for p in rows],
        )
        tb = rollout.train_batch(
            tokens,
            lengths,
            res.tokens[:, :width],
            res.lengths,
            res.logprobs[:, :width],
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
            "response_width": float(width),
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
        """n samples per prompt through the engine's slots (at most rollout.max_rows_per_call
        sequences decode at once), on the decode copy of the live params refreshed once here; a
        host SampleResult. Prompts keep their batch index as sampling id."""
        params = self.decode_weights.refresh(self.state.params)
        return self.sampler(params, tokens, prompt_mask=mask, n=n, key=key)

    def _rewards(self, prompts: list, responses: list, golds: list[str]) -> np.ndarray:
        """Rewards f32[rows] of prompt + response token ids against golds, identical on every
        process: process p verifies only its own share of the rows (a contiguous block), the
        shares are all-gathered, and a checksum of the rewards and the rows is compared across
        processes before anything trains on them."""
        count, index = jax.process_count(), jax.process_index()
        share = -(-len(responses) // count)
        own = slice(index * share, (index + 1) * share)
        local = np.zeros(share, np.float32)
        mine = self._verify(prompts[own], responses[own], golds[own])
        local[: len(mine)] = mine
        rewards = self._gather_rows(local)[: len(responses)]
        self._check_same_on_every_process(rewards, responses, golds)
        return rewards

    def _verify(self, prompts: list, responses: list, golds: list[str]) -> np.ndarray:
        """THE outcome-reward call (`config.reward`): token-id rows and golds -> f32[rows]."""
        return self.reward(prompts, responses, golds)

    @staticmethod
    def _gather_rows(local: np.ndarray) -> np.ndarray:
        """Every process's f32[share] block, concatenated in process order."""
        if jax.process_count() == 1:
            return local
        return np.asarray(multihost_utils.process_allgather(local)).reshape(-1)

    def _check_same_on_every_process(self, rewards: np.ndarray, responses, golds) -> None:
        """Raises RewardMismatchError on every process when any process's rewards or rollout
        texts differ from process 0's (the processes would otherwise train apart silently)."""
        if jax.process_count() == 1:
            return
        digests = np.asarray(multihost_utils.process_allgather(_digest(rewards, responses, golds)))
        differ = [p for p, d in enumerate(digests) if not np.array_equal(d, digests[0])]
        if differ:
            raise RewardMismatchError(
                f"RL step {self.rl_step + 1}: the rewards or rollout texts of process(es) {differ} "
                "differ from process 0's; every process must run the same msjax, tokenizer and "
                f"reward settings. Nothing was trained on this step; the last checkpoint in "
                f"{self.workdir} is intact."
            )

    def _device_minibatches(self, tb: dict) -> tuple[list[dict], dict]:
        """The rollout batch as PPO mini-batches on the devices, with the old log-probs
        (recomputed by the train step's forward with the live parameters, unless
        loss.old_logprobs="sampler") and the reference log-probs computed there; and the
        on-device sums of the sampler's log-prob deviation from the recomputed ones."""
        c = self.config
        rows = c.train.ppo_mini_batch * c.rollout.group_size
        put = lambda x: global_arrays.rows_to_global(x, self.mesh)
        minis, devs = [], []
        for i in range(0, tb["tokens"].shape[0], rows):
            mb = {k: put(v[i : i + rows]) for k, v in tb.items()}
            seq = (mb["tokens"], mb["positions"], mb["valid"])
            if self.loss_cfg.old_logprobs == "recompute":
                logp = self.logprob_fn(self.state.params, *seq)
                devs.append(_logp_deviation(mb["old_logp"], logp, mb["loss_mask"]))
                mb["old_logp"] = logp
            if self.ref_params is not None:
                mb["ref_logp"] = self.logprob_fn(self.ref_params, *seq)
            minis.append(mb)
        return minis, devs

    def _update(self, tb: dict) -> dict:
        """PPO epochs over mini-batches of the rollout batch; returns averaged metrics.

        Metrics are read one update late (while the next update runs), so the host never waits
        for the devices inside the loop; the non-finite guard may stop the run one update late
        (a refused update leaves the state as it was, so no non-finite state is ever saved)."""
        minis, devs = self._device_minibatches(tb)
        sums: dict[str, float] = {}
        count = 0

        def record(m):
            nonlocal count
            m = jax.device_get(m)
            self._check_finite(bool(m["update_skipped"]))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1

        pending = None
        for _ in range(self.config.train.ppo_epochs):
            for mb in minis:
                self.state, m = self.train_step(self.state, mb)
                if pending is not None:
                    record(pending)
                pending = m
        record(pending)
        out = {k: v / count for k, v in sums.items()}
        if devs:
            devs = jax.device_get(devs)
            tokens = max(sum(float(d["response_tokens"]) for d in devs), 1.0)
            out["sampler_logp_dev"] = sum(float(d["sampler_logp_dev_sum"]) for d in devs) / tokens
            out["sampler_logp_dev_max"] = max(float(d["sampler_logp_dev_max"]) for d in devs)
        return out

    def _check_finite(self, skipped: bool) -> None:
        """Counts refused (non-finite) updates in a row; NonFiniteError after too many."""
        self._nonfinite_in_row = self._nonfinite_in_row + 1 if skipped else 0
        if not skipped:
            return
        log.warning(
            "RL step %d: non-finite loss or gradient; update refused (%d in a row).",
            self.rl_step,
            self._nonfinite_in_row,
        )
        if self._nonfinite_in_row >= self.config.train.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self._nonfinite_in_row} updates in a row had a non-finite loss or "
                f"gradient (RL step {self.rl_step}); the last good state is in "
                f"{self.workdir}. Lower the learning rates or check the data."
            )

    def run(self) -> dict:
        """Trains until config.total_steps (or SIGTERM); returns the last step's metrics."""
        c = self.config
        writer = MetricsWriter(
            self.workdir,
            tensorboard=c.log.tensorboard,
            tensorboard_dir=c.log.tensorboard_dir or None,
        )
        previous = signal.signal(signal.SIGTERM, self._request_stop)
        bar = progress_bar(
            total=c.total_steps,
            desc="RL+SPR",
            initial=self.rl_step,
            enabled=c.log.progress and jax.process_index() == 0,
        )
        last: dict = {}
        self.reward = OutcomeReward.from_config(c, self.tokenizer)
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
            bar.close()
            self.reward.close()
        return last

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _runtime_fields(cfg) -> dict:
    return {
        k: getattr(cfg, k)
        for k in ("remat", "attention", "attention_chunk", "head_dropout", "head_grad_scale")
    }
