"""The repetition penalty against vLLM's rule restated in NumPy, and greedy decoding with it
against transformers' `generate(repetition_penalty=...)` (the same rule over prompt + output)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msjax.generate import Sampler, SamplerConfig
from msjax.generate.sampling import apply_repetition_penalty, mark_seen, token_logprob

PENALTY = 1.7


def reference_penalty(logits, seen_lists, penalty):
    """vLLM: logits of tokens in the prompt or output, / penalty if > 0, * penalty otherwise."""
    out = np.array(logits, np.float64)
    for row, seen in enumerate(seen_lists):
        for t in set(seen):
            v = out[row, t]
            out[row, t] = v / penalty[row] if v > 0 else v * penalty[row]
    return out


def test_penalised_logits_equal_numpy_rule():
    rng = np.random.default_rng(0)
    rows, vocab = 6, 50
    logits = rng.standard_normal((rows, vocab)).astype(np.float32) * 3
    logits[0, :5] = 0.0  # the sign edge
    history = [rng.integers(0, vocab, size=int(rng.integers(1, 30))) for _ in range(rows)]
    width = max(len(h) for h in history)
    tokens = np.zeros((rows, width), np.int32)
    valid = np.zeros((rows, width), bool)
    for i, h in enumerate(history):
        tokens[i, : len(h)], valid[i, : len(h)] = h, True
    tokens[0, len(history[0]) :] = 7  # padding ids must not count as seen
    seen = mark_seen(jnp.zeros((rows, vocab), bool), jnp.asarray(tokens), jnp.asarray(valid))
    penalty = np.array([1.0, 1.05, 1.3, 2.0, 0.8, PENALTY], np.float32)
    got = apply_repetition_penalty(jnp.asarray(logits), seen, jnp.asarray(penalty))
    ref = reference_penalty(logits, history, penalty)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=0)
    assert not np.asarray(seen)[0, 7] or 7 in history[0]
    # Scalar penalty form.
    got = apply_repetition_penalty(jnp.asarray(logits), seen, PENALTY)
    ref = reference_penalty(logits, history, [PENALTY] * rows)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=0)


def test_token_logprob_is_the_unpenalised_tempered_one():
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((3, 9)), jnp.float32)
    tokens = jnp.asarray([0, 4, 8])
    for t in (0.0, 0.7):
        ref = jax.nn.log_softmax(logits / (t or 1.0))[jnp.arange(3), tokens]
        np.testing.assert_allclose(token_logprob(logits, tokens, t), ref, atol=1e-6)


def hf_greedy_one(hf, prompt, new_tokens, penalty):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            repetition_penalty=penalty,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out[0, len(prompt) :].numpy()


def greedy_prompts(cfg):
    rng = np.random.default_rng(0)
    return [rng.integers(3, cfg.vocab_size, size=n).tolist() for n in (5, 17, 11)]


@pytest.fixture(scope="module")
def hf_penalised(hf_pair):
    hf, _, cfg = hf_pair
    prompts = greedy_prompts(cfg)
    return prompts, np.stack([hf_greedy_one(hf, p, 48, PENALTY) for p in prompts])


def test_sampler_greedy_with_penalty_equals_transformers(hf_pair, hf_penalised):
    _, model, cfg = hf_pair
    prompts, ref = hf_penalised
    base = dict(max_new_tokens=48, temperature=0.0, score_steps=False, prompt_buckets=(32,))
    out = Sampler(model, cfg, SamplerConfig(**base, repetition_penalty=PENALTY))(
        model, prompts, key=jax.random.key(0)
    ).to_host()
    np.testing.assert_array_equal(out.tokens, ref)
    plain = Sampler(model, cfg, SamplerConfig(**base))(model, prompts, key=jax.random.key(0))
    # The penalty changed the output (so the comparison above can fail).
    assert not np.array_equal(np.asarray(plain.to_host().tokens), ref)
    # Fewer repeats with the penalty than without.
    repeats = lambda rows: sum(len(r) - len(set(r)) for r in rows)
    assert repeats(ref.tolist()) < repeats(np.asarray(plain.tokens).tolist())


def test_config_rejects_bad_penalty():
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="repetition_penalty"):
            SamplerConfig(score_steps=False, repetition_penalty=bad)
