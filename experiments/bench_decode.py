"""Decoding speed: msjax's fixed-batch Sampler and continuous Engine against transformers
`generate`, same model, every side timed in ONE process, interleaved call by call.

    python -m experiments.bench_decode [--json] [--runs 15] [--heavy_runs 5] [--batch 32]

A random Hugging Face Qwen2 (hidden 256, 4 layers, 8 heads, 4 kv heads, intermediate 688, vocab
2048, fp32) is saved with save_pretrained and loaded into msjax with `msjax.checkpoint.load_any`,
so both sides run the same weights. Every side decodes greedily with the KV cache. After one
warm-up call of each (compile time excluded), each round calls every side once, in turn, so a
slow phase of the shared machine hits them alike (the order rotates by one side per round); each
figure is given as min and median over the rounds, and the ratios use the medians. tokens/s
counts generated tokens per second of the whole call (prefill included, as in transformers); the
tokens are checked to be identical.

Default case: a batch of left-padded random prompts, `new_tokens` each (no early stop): the
Sampler (scores off, and scores streamed for two delimiter sets: "typical" = ids covering ~1/32
of the generated tokens, "dense" = half of the vocabulary, the worst case), the Engine with one
slot per row, transformers, and the original design's rescoring (a full forward over prompt +
response). `stream_overhead` = median over rounds of (scored call / plain call of the same
round) - 1, with a bootstrap 95% interval of that median, in wall time and in process CPU time.

Heavy-tailed case (reasoning RL): each row's response length is drawn from a lognormal
distribution (median `heavy_median` tokens, sigma 1, clipped to [8, heavy_max]); every side
produces exactly those tokens. The Engine gets the length as the row's max_new_tokens and refills
its `slots` as rows end; the fixed-batch Sampler and transformers run the batch until its
longest row ends, which is what they do when rows stop at EOS at those lengths (a fixed batch
keeps computing finished rows until the last one ends), so they are called with max_new_tokens =
the longest length. Useful tokens/s = the sum of the drawn lengths / seconds; `continuous_speedup`
= Engine / Sampler useful tokens/s (medians).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.bench_model import MODEL, interleaved_rounds, random_hf_qwen2  # noqa: E402
from msjax.generate import Sampler, SamplerConfig  # noqa: E402
from msjax.generate.engine import Engine, Request  # noqa: E402
from msjax.models import step_mask, trajectory_score  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("json", False, "Print one JSON line instead of a table.")
flags.DEFINE_integer("runs", 15, "Timed rounds of the default case (every side once per round).")
flags.DEFINE_integer("heavy_runs", 5, "Timed rounds of the heavy-tailed case.")
flags.DEFINE_integer("batch", 32, "Sequences per batch (both cases).")
flags.DEFINE_integer("prompt_len", 32, "Prompt length (left-padded, lengths vary by up to 8).")
flags.DEFINE_integer("new_tokens", 256, "New tokens per sequence (default case).")
flags.DEFINE_integer("heavy_median", 48, "Median response length of the heavy-tailed case.")
flags.DEFINE_integer("heavy_max", 512, "Longest response of the heavy-tailed case.")
flags.DEFINE_integer("slots", 8, "Engine slots in the heavy-tailed case.")
flags.DEFINE_integer("chunk", 16, "Engine decode steps per chunk.")
flags.DEFINE_integer("seed", 0, "Seed for the weights, prompts and lengths.")


def _rounds(fns: dict, runs: int) -> dict[str, dict[str, list[float]]]:
    """One warm-up call of each fn, then `interleaved_rounds`."""
    for fn in fns.values():
        fn()
    return interleaved_rounds(fns, runs)


def _paired_overhead(num: list[float], den: list[float], seed: int) -> dict[str, float]:
    """median over rounds of num/den - 1, with a bootstrap 95% interval of that median."""
    ratios = np.asarray(num) / np.asarray(den)
    rng = np.random.default_rng(seed)
    boot = np.median(rng.choice(ratios, size=(4000, len(ratios))), axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return dict(
        median=round(float(np.median(ratios)) - 1, 4),
        ci95=[round(float(lo) - 1, 4), round(float(hi) - 1, 4)],
    )


def _stats(times: list[float], tokens: int) -> dict[str, float]:
    return dict(
        min_s=round(min(times), 4),
        median_s=round(statistics.median(times), 4),
        tokens_per_s=round(tokens / statistics.median(times), 1),
        best_tokens_per_s=round(tokens / min(times), 1),
    )


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
    """A call of transformers `generate` on left-padded prompts, exactly `new_tokens` each."""
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


def default_case(hf, model, cfg, params, prompts) -> dict:
    """Fixed number of new tokens, no early stop: Sampler (3 scoring settings), Engine,
    transformers and the rescoring forward, interleaved."""
    n_new, key = FLAGS.new_tokens, jax.random.key(0)
    generated = len(prompts) * n_new
    base = SamplerConfig(
        max_new_tokens=n_new,
        temperature=0.0,
        pad_id=0,
        prompt_buckets=(FLAGS.prompt_len,),
        score_steps=False,
    )
    hf_run = _hf_generate(hf, prompts, n_new)
    out = Sampler(model, cfg, base)(params, prompts, key=key).to_host()
    same_hf = bool(np.array_equal(hf_run()[:, -n_new:].numpy(), out.tokens))
    typical = _delimiters_at_rate(out.tokens, 1 / 32)
    configs = {
        "plain": base,
        "typical": base.replace(score_steps=True, step_ids=typical),
        "dense": base.replace(score_steps=True, step_ids=tuple(range(0, cfg.vocab_size, 2))),
    }

    def sampler_run(config):
        sampler = Sampler(model, cfg, config)
        return lambda: jax.block_until_ready(sampler(params, prompts, key=key).tokens)

    engine = Engine(model, cfg, base, slots=len(prompts), chunk=FLAGS.chunk)
    requests = [Request(p, key=key) for p in prompts]
    engine_out = engine.generate(params, requests)
    same_engine = all(np.array_equal(r.tokens[0], out.tokens[i]) for i, r in enumerate(engine_out))
    tokens, valid = _texts(prompts, out, FLAGS.prompt_len + n_new)
    scorer = _full_forward_scorer(model, configs["typical"])
    fns = {"hf": hf_run} | {name: sampler_run(c) for name, c in configs.items()}
    fns["engine"] = lambda: engine.generate(params, requests)
    fns["full"] = lambda: jax.block_until_ready(scorer(params, tokens, valid))
    t = _rounds(fns, FLAGS.runs)
    wall = {name: v["wall"] for name, v in t.items()}
    med = {name: statistics.median(v) for name, v in wall.items()}
    return {
        "msjax_tokens_per_s": round(generated / med["plain"], 1),
        "hf_tokens_per_s": round(generated / med["hf"], 1),
        "ratio": round(med["hf"] / med["plain"], 2),
        "ratio_of_best": round(min(wall["hf"]) / min(wall["plain"]), 2),
        "engine_tokens_per_s": round(generated / med["engine"], 1),
        "same_tokens_as_hf": same_hf,
        "engine_same_tokens": same_engine,
        "stream_overhead": _paired_overhead(wall["typical"], wall["plain"], 1)["median"],
        "stream": {
            "typical_wall": _paired_overhead(wall["typical"], wall["plain"], 1),
            "typical_cpu": _paired_overhead(t["typical"]["cpu"], t["plain"]["cpu"], 2),
            "dense_wall": _paired_overhead(wall["dense"], wall["plain"], 3),
            "dense_cpu": _paired_overhead(t["dense"]["cpu"], t["plain"]["cpu"], 4),
            "steps_typical": int(
                Sampler(model, cfg, configs["typical"])(params, prompts, key=key).num_steps.sum()
            ),
        },
        "full_forward_overhead": round(med["full"] / med["plain"], 4),
        "sides": {name: _stats(v, generated) for name, v in wall.items() if name != "full"},
        "cpu_over_wall": {name: round(sum(v["cpu"]) / sum(v["wall"]), 2) for name, v in t.items()},
    }


def heavy_case(hf, model, cfg, params, prompts) -> dict:
    """Heavy-tailed response lengths: Engine (refills slots) vs Sampler vs transformers."""
    rng = np.random.default_rng(FLAGS.seed + 1)
    lengths = np.clip(
        np.round(FLAGS.heavy_median * np.exp(rng.standard_normal(len(prompts)))), 8, FLAGS.heavy_max
    ).astype(int)
    longest, useful, key = int(lengths.max()), int(lengths.sum()), jax.random.key(0)
    base = SamplerConfig(
        max_new_tokens=longest,
        temperature=0.0,
        pad_id=0,
        prompt_buckets=(FLAGS.prompt_len,),
        score_steps=False,
    )
    sampler = Sampler(model, cfg, base)
    engine = Engine(model, cfg, base, slots=FLAGS.slots, chunk=FLAGS.chunk)
    requests = [
        Request(p, key=key, row_id=i, max_new_tokens=int(n))
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    ]
    ref = sampler(params, prompts, key=key).to_host()
    got = engine.generate(params, requests)
    same = all(
        np.array_equal(r.tokens[0, :n], ref.tokens[i, :n])
        for i, (r, n) in enumerate(zip(got, lengths, strict=True))
    )
    fns = {
        "hf": _hf_generate(hf, prompts, longest),
        "sampler": lambda: jax.block_until_ready(sampler(params, prompts, key=key).tokens),
        "engine": lambda: engine.generate(params, requests),
    }
    t = _rounds(fns, FLAGS.heavy_runs)
    wall = {name: v["wall"] for name, v in t.items()}
    med = {name: statistics.median(v) for name, v in wall.items()}
    return {
        "continuous_speedup": round(med["sampler"] / med["engine"], 2),
        "engine_vs_hf": round(med["hf"] / med["engine"], 2),
        "sides_useful": {name: _stats(v, useful) for name, v in wall.items()},
        "engine_same_tokens": same,
        "lengths": dict(
            rows=len(prompts),
            median=int(np.median(lengths)),
            mean=round(float(lengths.mean()), 1),
            max=longest,
            useful_share_of_fixed_batch=round(useful / (len(prompts) * longest), 3),
        ),
        "slots": FLAGS.slots,
        "chunk": FLAGS.chunk,
    }


def main(argv):
    del argv
    import torch

    from msjax.checkpoint import load_any

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(FLAGS.seed)
    prompts = _prompts(rng, FLAGS.batch, FLAGS.prompt_len)
    with tempfile.TemporaryDirectory() as tmp:
        hf = _hf_model(FLAGS.seed, tmp)
        model, cfg = load_any(tmp)
    params = nnx.state(model)
    result = default_case(hf, model, cfg, params, prompts)
    heavy = heavy_case(hf, model, cfg, params, prompts)
    result["continuous_speedup"] = heavy.pop("continuous_speedup")
    result["heavy"] = heavy
    result.update(
        batch=FLAGS.batch,
        prompt_len=FLAGS.prompt_len,
        new_tokens=FLAGS.new_tokens,
        runs=FLAGS.runs,
        heavy_runs=FLAGS.heavy_runs,
        devices=f"{jax.devices()[0].platform} x{jax.device_count()}",
        torch_threads=torch.get_num_threads(),
    )
    if FLAGS.json:
        print(json.dumps(result))
        return
    for name, value in result.items():
        print(f"{name:28s} {value}")


if __name__ == "__main__":
    app.run(main)
