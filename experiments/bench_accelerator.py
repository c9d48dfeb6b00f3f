"""Train-step and decoding speed of a recipe on whatever JAX backend is present: tokens/s and MFU.

    python experiments/bench_accelerator.py [--config experiments/configs/tiny.py] \
        [--config.<field>=VALUE ...] [--steps 3] [--decode_runs 2] [--json]

For a lent GPU / TPU host: the recipe's model (random weights, its mesh over all devices) runs
the real jitted RL+SPR train step on one PPO mini-batch (ppo_mini_batch x group_size sequences
of max_prompt_len + max_new_tokens tokens) and the real sampler on one call of
rollout.max_rows_per_call sequences (all prompts_per_step x group_size when 0), with no EOS so
every row decodes max_new_tokens tokens. Compile time is excluded (one warm-up call each) and each
figure is the minimum over the timed calls. FLOPs come from msjax.flops (matmuls, loops counted
by their trip counts, as msjax-aot counts them): train MFU = model FLOPs (3 x forward, plus the
SPR pre-pass) / (time x devices x peak); decode MFU = executed FLOPs / (time x devices x peak),
low by nature (decoding is memory-bound). Peak bf16 FLOP/s per device comes from
msjax.topology (TPU v4/v5e/v5p/v6e, H100/H200/A100); elsewhere (CPU) MFU is null. On a CPU the
default tiny recipe takes well under a minute.
"""

from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from flax import nnx
from ml_collections import config_flags

from msjax import sharding as sh
from msjax.cli import define_flag
from msjax.flops import jaxpr_flops, traced_flops
from msjax.generate import decode as decode_mod
from msjax.generate.config import SamplerConfig
from msjax.generate.sampler import Sampler
from msjax.models.reflective import create_model
from msjax.rl import config as rlc
from msjax.rl import train_step as ts
from msjax.rl.optimizer import make_optimizer
from msjax.topology import device_peak_flops

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/tiny.py", "Recipe file (get_config())."
)
STEPS = define_flag("integer", "steps", 3, "Timed train steps.")
DECODE_RUNS = define_flag("integer", "decode_runs", 2, "Timed sampler calls.")
JSON = define_flag("bool", "json", False, "Print one JSON object instead of lines.")


def _min_time(fn, runs: int) -> float:
    """Seconds of the fastest of `runs` calls of fn (which blocks), after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _train_batch(rows: int, prompt: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """A random mini-batch shaped like a rollout's: prompt then a full-length response."""
    rng = np.random.default_rng(seed)
    response = np.broadcast_to(np.arange(seq) >= prompt, (rows, seq))
    return {
        "tokens": rng.integers(0, 100, (rows, seq), dtype=np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(),
        "valid": np.ones((rows, seq), bool),
        "loss_mask": response.copy(),
        "old_logp": np.where(response, -2.0, 0.0).astype(np.float32),
        "ref_logp": np.where(response, -2.0, 0.0).astype(np.float32),
        "advantages": rng.standard_normal(rows).astype(np.float32),
        "labels": (rng.random(rows) < 0.5).astype(np.float32),
        "step_mask": response & (rng.random((rows, seq)) < 1 / 32),
    }


def bench(c) -> dict:
    """Measures the train step and one sampler call of recipe `c`; returns the figures."""
    mesh = sh.make_mesh(dict(c.mesh))
    devices = mesh.devices.size
    c.workdir = c.workdir or "bench"
    rlc.validate(c, batch_shards=mesh.shape["data"] * mesh.shape["fsdp"])
    cfg, loss_cfg = rlc.model_config(c), rlc.loss_config(c)
    tx = make_optimizer(rlc.optimizer_config(c))
    model = create_model(cfg, mesh, seed=c.seed)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    abstract = jax.eval_shape(lambda p: ts.init_train_state(p, tx, c.seed), params)
    state_sh = ts.train_state_shardings(abstract, param_sh, mesh)
    train_state = jax.jit(lambda p: ts.init_train_state(p, tx, c.seed), out_shardings=state_sh)(
        jax.tree.map(jnp.copy, params)
    )
    step = ts.make_train_step(graphdef, tx, loss_cfg, mesh=mesh, state_shardings=state_sh)

    r, prompt = c.rollout, c.data.max_prompt_len
    seq, rows = prompt + r.max_new_tokens, c.train.ppo_mini_batch * r.group_size
    host = _train_batch(rows, prompt, seq, c.seed)
    batch = {k: jax.device_put(v, sh.batch_sharding(mesh, v.ndim)) for k, v in host.items()}
    holder = [train_state]

    def train():
        holder[0], metrics = step(holder[0], batch)
        jax.block_until_ready(metrics)

    train_s = _min_time(train, STEPS.value)
    forward = functools.partial(ts._forward, graphdef, cfg=loss_cfg, dropout_rng=None)
    model_flops = 3 * traced_flops(lambda p, b: forward(p, b, with_logp=True), params, batch)
    if loss_cfg.num_microbatches > 1 and loss_cfg.spr_stats_scope == "minibatch":
        model_flops += traced_flops(lambda p, b: forward(p, b, with_logp=False), params, batch)

    # Decoding: one sampler call, no EOS, so every row generates max_new_tokens tokens.
    n = r.group_size
    prompts = (r.max_rows_per_call // n) or r.prompts_per_step
    scfg = SamplerConfig(
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        pad_id=0,
        step_ids=(2,),
        prompt_buckets=(prompt,),
    )
    sampler = Sampler(graphdef, cfg, scfg, mesh)
    rng = np.random.default_rng(c.seed + 1)
    prompt_tokens = rng.integers(3, cfg.vocab_size, (prompts, prompt), dtype=np.int32)
    key = jax.random.key(c.seed)
    params_live = holder[0].params

    def sample():
        return sampler(params_live, prompt_tokens, n=n, key=key).to_host()

    decode_s = _min_time(sample, DECODE_RUNS.value)
    generated = prompts * n * r.max_new_tokens
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    decode_flops = _sampler_flops(sampler, params_live, prompts, n, prompt, shards, mesh)

    peak = device_peak_flops(jax.devices()[0])
    mfu = lambda flops, s: None if peak is None else flops / (s * devices * peak)
    return {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "devices": devices,
        "mesh": dict(mesh.shape),
        "num_params": cfg.num_params(),
        "peak_flops_per_device": peak,
        "train_rows": rows,
        "train_seq": seq,
        "train_step_s": train_s,
        "train_tokens_per_s": rows * seq / train_s,
        "train_model_flops": model_flops,
        "train_flops_per_s": model_flops / train_s,
        "train_mfu": mfu(model_flops, train_s),
        "decode_rows": prompts * n,
        "decode_new_tokens": r.max_new_tokens,
        "decode_s": decode_s,
        "decode_tokens_per_s": generated / decode_s,
        "decode_flops": decode_flops,
        "decode_flops_per_s": decode_flops / decode_s,
        "decode_mfu": mfu(decode_flops, decode_s),
    }


def _sampler_flops(sampler, params, prompts, n, length, shards, mesh) -> float:
    """Executed FLOPs of one sampler call (prefill + every decode-loop trip), by msjax.flops."""
    program = decode_mod.DecodeProgram(sampler.graphdef, sampler.cfg, sampler.config, mesh, n)
    b = -(-prompts // shards) * shards
    rows = -(-prompts * n // shards) * shards
    S = jax.ShapeDtypeStruct
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (
        params,
        S((b, length), jnp.int32),
        S((b,), jnp.int32),
        S((rows,), jnp.int32),
        S((rows,), bool),
        S((rows,), jnp.int32),
        key,
    )
    with jax.set_mesh(mesh):
        pre = decode_mod.prefill.trace(program, *args)
        cache, state = jax.tree.map(lambda x: S(x.shape, x.dtype), pre.out_info)
        dec = decode_mod.decode.trace(program, params, cache, state)
    trips = max(sampler.config.max_new_tokens - 1, 1)
    return jaxpr_flops(pre.jaxpr) + jaxpr_flops(dec.jaxpr, while_trips=trips)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    out = bench(_CONFIG.value)
    if JSON.value:
        print(json.dumps(out))
        return
    pct = lambda x: "n/a (no peak FLOP/s for this device)" if x is None else f"{100 * x:.2f}%"
    print(
        f"{out['backend']} x{out['devices']} ({out['device_kind']}), mesh {out['mesh']}, "
        f"{out['num_params']:,} parameters"
    )
    print(
        f"train step: {out['train_rows']} x {out['train_seq']} tokens in "
        f"{out['train_step_s']:.4f} s = {out['train_tokens_per_s']:,.0f} tokens/s, "
        f"{out['train_flops_per_s'] / 1e9:,.1f} GFLOP/s, MFU {pct(out['train_mfu'])}"
    )
    print(
        f"decode: {out['decode_rows']} rows x {out['decode_new_tokens']} new tokens in "
        f"{out['decode_s']:.4f} s = {out['decode_tokens_per_s']:,.0f} tokens/s, "
        f"{out['decode_flops_per_s'] / 1e9:,.1f} GFLOP/s, MFU {pct(out['decode_mfu'])}"
    )


if __name__ == "__main__":
    app.run(main)
