"""Training speed: msjax's full GRPO + SPR train step against transformers forward+backward+AdamW.

    python -m experiments.bench_train_step [--json] [--runs 5] [--batch 8] [--seq 256]

A random Hugging Face Qwen2 (hidden 256, 4 layers, 8 heads, 4 kv heads, intermediate 688, vocab
2048, fp32; the bench_decode model) is saved with save_pretrained and loaded into msjax with
`msjax.hf.load_hf`, so both sides train the same weights on the same tokens (batch x seq, no
padding).

- msjax: ONE jitted `make_train_step` call with the default LossConfig and OptimizerConfig
  (forward without full logits, chunked log-probs + entropy, SPRM logits with dropout, PPO clip +
  k3 KL + entropy + SPR losses, gradients, two clipped AdamW groups, the non-finite guard). The
  response is the last `seq - prompt_len` tokens; a step delimiter every 16 tokens gives the SPRM
  its steps.
- transformers: the bare loop `loss = cross_entropy(logits[:, :-1], tokens[:, 1:])` on every
  token, `loss.backward()`, `torch.optim.AdamW.step()`, `zero_grad()` (torch CPU, fp32).

Compile time and one warm-up step per side are excluded. The timed steps are interleaved: each of
`--runs` rounds runs one msjax step, then one transformers step, so load on a shared host hits
both sides alike. tokens/s and `ratio` come from the medians (the figure that decides);
`ratio_of_min_times` from the fastest steps; tokens/s = batch * seq / step time. Both sides use
the same number of CPU threads:
`--threads N` pins the process to N of the cores it may use before either library starts its
thread pool (XLA sizes its pool from that affinity; torch.set_num_threads(N)); the default is
every such core. The CPU time per step (both threads together) is reported too.

Other processes on a shared host distort the result, torch's multi-threaded steps most of all
(its OpenMP threads spin at every barrier while one of them waits for a core). The 1-minute
load average (os.getloadavg) is printed before and after the timed rounds: trust a run only when it
stays below about 0.5 per thread, or compare with --threads 1.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.bench_model import MODEL, interleaved_rounds, random_hf_qwen2  # noqa: E402
from msjax.hf import load_hf  # noqa: E402
from msjax.models import step_mask  # noqa: E402
from msjax.rl.optimizer import OptimizerConfig, make_optimizer  # noqa: E402
from msjax.rl.train_step import LossConfig, init_train_state, make_train_step  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("json", False, "Print one JSON line instead of a table.")
flags.DEFINE_integer("runs", 7, "Interleaved rounds of one timed step per side.")
flags.DEFINE_integer("batch", 8, "Sequences per step.")
flags.DEFINE_integer("seq", 256, "Tokens per sequence.")
flags.DEFINE_integer("prompt_len", 32, "Leading tokens of each sequence that are the prompt.")
flags.DEFINE_integer("microbatches", 1, "msjax LossConfig.num_microbatches.")
flags.DEFINE_integer("seed", 0, "Seed for the weights and tokens.")
flags.DEFINE_integer("threads", 0, "CPU threads for both sides (0 = every core allowed).")

STEP_ID = 13


def _use_threads(n: int) -> int:
    """Pins this process to n of its allowed cores (0 = all); returns the thread count."""
    if not hasattr(os, "sched_getaffinity"):
        return os.cpu_count() or 1
    allowed = sorted(os.sched_getaffinity(0))
    if n < 0 or n > len(allowed):
        raise ValueError(f"--threads={n}: this process may use {len(allowed)} cores.")
    if n:
        os.sched_setaffinity(0, allowed[:n])
    return len(os.sched_getaffinity(0))


def _hf_model(seed: int, path: str):
    model = random_hf_qwen2(seed)
    model.save_pretrained(path)
    return model.train()


def _batch(rng: np.random.Generator, b: int, t: int, prompt_len: int) -> dict[str, np.ndarray]:
    """A full-length RL batch: random tokens with a step delimiter every 16 response tokens."""
    tokens = rng.integers(20, MODEL["vocab_size"], (b, t)).astype(np.int32)
    tokens[:, prompt_len + 15 :: 16] = STEP_ID
    valid = np.ones((b, t), bool)
    loss_mask = valid.copy()
    loss_mask[:, :prompt_len] = False
    return dict(
        tokens=tokens,
        positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        valid=valid,
        loss_mask=loss_mask,
        old_logp=rng.normal(-7.6, 0.1, (b, t)).astype(np.float32),
        ref_logp=rng.normal(-7.6, 0.1, (b, t)).astype(np.float32),
        advantages=rng.normal(size=b).astype(np.float32),
        labels=(np.arange(b) % 2).astype(np.float32),
        step_mask=np.asarray(step_mask(tokens, valid, [STEP_ID], None, None, scorable=loss_mask)),
    )


def _hf_step(model, tokens):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
    ids = torch.as_tensor(tokens, dtype=torch.long)

    def step():
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main(argv):
    del argv
    import torch

    threads = _use_threads(FLAGS.threads)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(FLAGS.seed)
    b, t = FLAGS.batch, FLAGS.seq
    host_batch = _batch(rng, b, t, FLAGS.prompt_len)
    with tempfile.TemporaryDirectory() as tmp:
        hf = _hf_model(FLAGS.seed, tmp)
        model, _ = load_hf(tmp)

    tx = make_optimizer(OptimizerConfig())
    graphdef, state = nnx.split(model)
    train_state = init_train_state(nnx.to_pure_dict(state), tx, seed=FLAGS.seed)
    step = make_train_step(graphdef, tx, LossConfig(num_microbatches=FLAGS.microbatches))
    batch = {k: jnp.asarray(v) for k, v in host_batch.items()}

    start = time.perf_counter()
    lowered = step.lower(train_state, batch)
    trace_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start

    holder = [train_state]

    def msjax_step():
        holder[0], metrics = compiled(holder[0], batch)
        return float(jax.block_until_ready(metrics["loss"]))

    hf_step = _hf_step(hf, host_batch["tokens"])
    msjax_step()  # warm-up
    hf_step()
    loads = [os.getloadavg()[0]]
    times = interleaved_rounds({"msjax": msjax_step, "hf": hf_step}, FLAGS.runs)
    loads.append(os.getloadavg()[0])
    msjax_times, msjax_cpu = times["msjax"]["wall"], times["msjax"]["cpu"]
    hf_times, hf_cpu = times["hf"]["wall"], times["hf"]["cpu"]
    t_msjax, t_hf = statistics.median(msjax_times), statistics.median(hf_times)

    tokens = b * t
    result = {
        "msjax_tokens_per_s": round(tokens / t_msjax, 1),
        "hf_tokens_per_s": round(tokens / t_hf, 1),
        "ratio": round(t_hf / t_msjax, 3),  # of the medians: the figure that decides
        "ratio_of_min_times": round(min(hf_times) / min(msjax_times), 3),
        "msjax_step_s": round(t_msjax, 4),
        "hf_step_s": round(t_hf, 4),
        "msjax_step_min_s": round(min(msjax_times), 4),
        "hf_step_min_s": round(min(hf_times), 4),
        "msjax_step_cpu_s": round(statistics.median(msjax_cpu), 4),
        "hf_step_cpu_s": round(statistics.median(hf_cpu), 4),
        "msjax_step_times": [round(x, 4) for x in msjax_times],
        "hf_step_times": [round(x, 4) for x in hf_times],
        "msjax_trace_s": round(trace_s, 2),
        "msjax_compile_s": round(compile_s, 2),
        "batch": b,
        "seq": t,
        "microbatches": FLAGS.microbatches,
        "runs": FLAGS.runs,
        "torch_threads": torch.get_num_threads(),
        "xla_cpu_threads": threads,
        "devices": f"{jax.devices()[0].platform} x{jax.device_count()}",
        "loadavg_1m": [round(x, 2) for x in loads],  # before / after the timed rounds
        "versions": f"jax {jax.__version__}, torch {torch.__version__}",
    }
    if FLAGS.json:
        print(json.dumps(result))
        return
    for name, value in result.items():
        print(f"{name:22s} {value}")


if __name__ == "__main__":
    app.run(main)
