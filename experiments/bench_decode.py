"""Decoding speed: msjax's jitted KV-cache sampler against transformers `generate`, same model.

    python -m experiments.bench_decode [--json] [--runs 5] [--hf_runs 3] [--batch 32]

A random Hugging Face Qwen2 (hidden 256, 4 layers, 8 heads, 4 kv heads, intermediate 688, vocab
2048, fp32) is saved with save_pretrained and loaded into msjax with `msjax.checkpoint.load_any`,
so both sides run the same weights. Both decode greedily, KV cache on, no early stop, from a
batch of left-padded random prompts; compile time is excluded (one warm-up call each). Each
figure is the MINIMUM over the timed calls (the msjax variants interleaved round by round): on a
machine shared with other jobs the minimum is the stable estimate of a call's own cost (medians
are printed too, as *_median_s). tokens/s counts generated tokens (batch * new tokens) per
second of the whole generate call (prefill included, as in transformers); the tokens are
checked to be identical on both sides.

The streaming-score overhead compares the same msjax decode with `score_steps` on and off, for
two delimiter sets: "typical" (ids covering ~1/32 of the generated tokens: a step every ~30
tokens, as in reasoning text) and "dense" (half of the vocabulary: some row has a step on nearly
every decode step, the worst case). It is also compared with what the original design pays: a
separate full forward over prompt + response to score each finished text ("full_forward_overhead"
= its time / the decode time). Because end-to-end differences of a few percent drown in the
noise of a shared machine, "stream_work" also times the streaming work alone (the same
functions, replayed over the generated tokens) as a fraction of the plain decode time.
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

from experiments.bench_model import MODEL, random_hf_qwen2  # noqa: E402
from msjax.generate import Sampler, SamplerConfig  # noqa: E402
from msjax.generate import steps as st  # noqa: E402
from msjax.models import step_mask, trajectory_score  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("json", False, "Print one JSON line instead of a table.")
flags.DEFINE_integer("runs", 7, "Timed runs of each msjax variant.")
flags.DEFINE_integer("hf_runs", 3, "Timed transformers runs.")
flags.DEFINE_integer("batch", 32, "Sequences per batch.")
flags.DEFINE_integer("prompt_len", 32, "Prompt length (left-padded, lengths vary by up to 8).")
flags.DEFINE_integer("new_tokens", 256, "New tokens per sequence.")
flags.DEFINE_integer("seed", 0, "Seed for the weights and prompts.")


def _times(fns: dict, runs: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, after one warm-up call each; the calls are interleaved
    round by round so that a slow phase of a shared machine hits every fn alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _hf_model(seed: int, path: str):
    model = random_hf_qwen2(seed).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    return model


def _prompts(rng: np.random.Generator, batch: int, length: int) -> list[list[int]]:
    lengths = rng.integers(max(1, length - 8), length + 1, size=batch)
    return [rng.integers(1, MODEL["vocab_size"], size=n).tolist() for n in lengths]


def _hf_generate(model, prompts, new_tokens: int):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1

    def run():
        with torch.no_grad():
            return model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )

    return run


def _delimiters_at_rate(tokens: np.ndarray, rate: float) -> tuple[int, ...]:
    """Token ids, rarest first, whose share of `tokens` adds up to about `rate`."""
    ids, counts = np.unique(tokens, return_counts=True)
    chosen, total = [], 0
    for i in np.argsort(counts, kind="stable"):
        if total + counts[i] > rate * tokens.size:
            continue
        chosen.append(int(ids[i]))
        total += counts[i]
    return tuple(chosen)


def _texts(prompts, out, width: int):
    """prompt + response of every row, right-padded: (tokens, valid) device arrays."""
    tokens = np.zeros((len(prompts), width), np.int32)
    valid = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        row = p + out.response(i)
        tokens[i, : len(row)], valid[i, : len(row)] = row, True
    return jnp.asarray(tokens), jnp.asarray(valid)


def _full_forward_scorer(model, sampler_config: SamplerConfig):
    """What the original reward server does: one more forward over prompt + response."""
    graphdef, _ = nnx.split(model)
    c = sampler_config

    @jax.jit
    def score(params, tokens, valid):
        m = nnx.merge(graphdef, params)
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        out = m(tokens, positions, valid, compute_logits=False)
        mask = step_mask(tokens, valid, c.step_ids, c.think_start_id, c.think_end_id)
        return trajectory_score(m.step_logits(out.penultimate), mask)

    return score


def _stream_work(model, config: SamplerConfig, prompts, out):
    """The streaming-score work of one decode call replayed ALONE over its generated tokens (the
    candidate test, the SPRM head under lax.cond, the slot write and the think-tag counts, once
    per decode step, as `DecodeProgram` does): its cost without the model around it."""
    graphdef, _ = nnx.split(model)
    c = config
    tokens = jnp.asarray(out.tokens)
    prev0 = jnp.asarray([p[-1] for p in prompts], jnp.int32)
    plen = jnp.asarray([len(p) for p in prompts], jnp.int32)
    rows, steps = tokens.shape

    @jax.jit
    def run(params, hidden):
        m = nnx.merge(graphdef, params)
        is_step = jnp.zeros((m.cfg.vocab_size,), bool).at[jnp.asarray(c.step_ids)].set(True)
        ones = jnp.ones((rows, 1), bool)
        state = st.init_step_state(prev0[:, None], ones, c.step_capacity, None, None)

        def body(t, carry):
            state, prev = carry
            y = tokens[:, t]
            cand = st.is_candidate(prev, y, is_step, c.think_start_id)
            h = hidden + t.astype(hidden.dtype)  # a new hidden state every step
            logit = jax.lax.cond(
                jnp.any(cand),
                lambda h: m.step_logits(h),
                lambda h: jnp.zeros(h.shape[:1], jnp.float32),
                h,
            )
            state = st.record(state, cand, logit, plen + t - 1)
            live = jnp.ones_like(cand)
            state = st.observe_tags(state, y, plen + t, live, c.think_start_id, c.think_end_id)
            return state, y

        state, _ = jax.lax.fori_loop(0, steps, body, (state, prev0))
        return st.final_steps(state, plen + steps)[0]

    hidden = jnp.ones((rows, model.cfg.hidden_size), jnp.float32)
    return lambda: jax.block_until_ready(run(nnx.state(model), hidden))


def main(argv):
    del argv
    import torch

    from msjax.checkpoint import load_any

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(FLAGS.seed)
    prompts = _prompts(rng, FLAGS.batch, FLAGS.prompt_len)
    n_new = FLAGS.new_tokens
    generated = FLAGS.batch * n_new
    with tempfile.TemporaryDirectory() as tmp:
        hf = _hf_model(FLAGS.seed, tmp)
        model, cfg = load_any(tmp)
    params = nnx.state(model)
    key = jax.random.key(0)

    def msjax_run(config):
        sampler = Sampler(model, cfg, config)
        return lambda: jax.block_until_ready(sampler(params, prompts, key=key).tokens)

    base = SamplerConfig(
        max_new_tokens=n_new,
        temperature=0.0,
        pad_id=0,
        prompt_buckets=(FLAGS.prompt_len,),
        score_steps=False,
    )
    hf_run = _hf_generate(hf, prompts, n_new)
    hf_times = _times({"hf": hf_run}, FLAGS.hf_runs)["hf"]
    out = Sampler(model, cfg, base)(params, prompts, key=key).to_host()
    same = bool(np.array_equal(hf_run()[:, -n_new:].numpy(), out.tokens))

    # Delimiter sets (greedy tokens do not depend on them): "typical" = ids covering ~1/32 of
    # the generated tokens (a step every ~30 tokens, as in reasoning text); "dense" = half of
    # the vocabulary (some row has a step on nearly every decode step: the worst case).
    typical = _delimiters_at_rate(out.tokens, 1 / 32)
    dense = tuple(range(0, cfg.vocab_size, 2))
    configs = {
        "plain": base,
        "typical": base.replace(score_steps=True, step_ids=typical),
        "dense": base.replace(score_steps=True, step_ids=dense),
    }
    steps = {
        name: int(Sampler(model, cfg, c)(params, prompts, key=key).num_steps.sum())
        for name, c in configs.items()
        if c.score_steps
    }
    tokens, valid = _texts(prompts, out, FLAGS.prompt_len + n_new)
    scorer = _full_forward_scorer(model, configs["typical"])
    fns = {name: msjax_run(c) for name, c in configs.items()}
    fns["full"] = lambda: jax.block_until_ready(scorer(params, tokens, valid))
    fns["work_typical"] = _stream_work(model, configs["typical"], prompts, out)
    fns["work_dense"] = _stream_work(model, configs["dense"], prompts, out)
    times = _times(fns, FLAGS.runs)
    t = {name: min(v) for name, v in times.items()}
    result = {
        "msjax_tokens_per_s": round(generated / t["plain"], 1),
        "hf_tokens_per_s": round(generated / min(hf_times), 1),
        "ratio": round(min(hf_times) / t["plain"], 2),
        "same_tokens_as_hf": same,
        "msjax_scored_tokens_per_s": round(generated / t["typical"], 1),
        "stream_overhead": round(t["typical"] / t["plain"] - 1, 4),
        "stream_overhead_dense": round(t["dense"] / t["plain"] - 1, 4),
        "stream_work": round(t["work_typical"] / t["plain"], 4),
        "stream_work_dense": round(t["work_dense"] / t["plain"], 4),
        "full_forward_overhead": round(t["full"] / t["plain"], 4),
        "steps_typical": steps["typical"],
        "steps_dense": steps["dense"],
        "hf_median_s": round(statistics.median(hf_times), 3),
        **{f"{name}_median_s": round(statistics.median(v), 3) for name, v in times.items()},
        "batch": FLAGS.batch,
        "prompt_len": FLAGS.prompt_len,
        "new_tokens": n_new,
        "runs": FLAGS.runs,
        "devices": f"{jax.devices()[0].platform} x{jax.device_count()}",
        "torch_threads": torch.get_num_threads(),
    }
    if FLAGS.json:
        print(json.dumps(result))
        return
    for name, value in result.items():
        print(f"{name:28s} {value}")


if __name__ == "__main__":
    app.run(main)
