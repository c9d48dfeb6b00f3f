"""The sampler against independent references: transformers greedy generate, a full forward pass
(log-probs, step mask, trajectory scores), hand-built Markov models, and itself on other meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from msjax.generate import Sampler, SamplerConfig
from msjax.models import step_mask, trajectory_score
from msjax.sharding import make_mesh, state_shardings

TEMPERATURE, TOP_K, TOP_P = 0.7, 8, 0.95
N = 16
MAX_NEW = 40


def edge_prompts(sp):
    """Prompts that put the step rules' edges at the prompt/response boundary."""
    d = sp.delims[0]
    return [
        [7, sp.think, 8, d, d, 9],  # a delimiter run in the prompt, one <think>
        [9, sp.think],  # a delimiter right after <think> cannot count
        [7, 8, sp.delims[1]],  # prompt ends with a delimiter: a generated one is not first
        [sp.think, 9, sp.end_think, 10],  # text after </think>
        [9, 10, 11, 8],  # no think tags
    ]


def sampler_config(sp, **kw):
    base = dict(
        max_new_tokens=MAX_NEW,
        temperature=TEMPERATURE,
        top_k=TOP_K,
        top_p=TOP_P,
        eos_ids=(sp.eos,),
        pad_id=sp.pad,
        step_ids=sp.delims,
        think_start_id=sp.think,
        think_end_id=sp.end_think,
        prompt_buckets=(8, 16),
    )
    base.update(kw)
    return SamplerConfig(**base)


def full_forward(model, texts):
    """Right-padded batch forward over whole texts: (logits, step logits, tokens, valid)."""
    width = max(len(t) for t in texts)
    tokens = np.zeros((len(texts), width), np.int32)
    valid = np.zeros((len(texts), width), bool)
    for i, t in enumerate(texts):
        tokens[i, : len(t)], valid[i, : len(t)] = t, True
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, tokens, valid):
        m = nnx.merge(graphdef, state)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        out = m(tokens, positions, valid)
        return out.logits, m.step_logits(out.penultimate)

    logits, step_logits = fwd(state, tokens, valid)
    return np.asarray(logits), step_logits, tokens, valid


@pytest.fixture(scope="module")
def sampled(small_model, special):
    model, cfg = small_model
    sampler = Sampler(model, cfg, sampler_config(special))
    prompts = edge_prompts(special)
    result = sampler(nnx.state(model), prompts, n=N, key=jax.random.key(42)).to_host()
    prompt_of = [prompts[r // N] for r in range(len(prompts) * N)]
    texts = [p + result.response(r) for r, p in enumerate(prompt_of)]
    return dict(sampler=sampler, prompts=prompts, result=result, texts=texts, prompt_of=prompt_of)


def test_streamed_step_scores_equal_full_forward(small_model, special, sampled):
    model, _ = small_model
    r, texts, prompt_of = sampled["result"], sampled["texts"], sampled["prompt_of"]
    _, step_logits, tokens, valid = full_forward(model, texts)
    plen = np.array([len(p) for p in prompt_of])
    # The sampler scores steps whose delimiter is generated (scorable from the last prompt token).
    scorable = np.arange(tokens.shape[1])[None, :] >= plen[:, None] - 1
    mask = step_mask(
        tokens, valid, special.delims, special.think, special.end_think, scorable=scorable
    )
    ref_scores = np.asarray(trajectory_score(step_logits, mask))
    np.testing.assert_allclose(r.scores, ref_scores, atol=1e-5, rtol=0)
    probs = np.asarray(jax.nn.sigmoid(step_logits))
    mask = np.asarray(mask)
    for row in range(len(texts)):
        scores, positions = r.steps(row)
        assert positions == list(np.flatnonzero(mask[row])), row
        np.testing.assert_allclose(scores, probs[row, mask[row]], atol=1e-5, rtol=0)
    assert (r.num_steps > 0).sum() > 10

    # The cases the rules are about actually occurred in this sample.
    d = set(special.delims)
    resp = [r.response(row) for row in range(len(texts))]
    runs = sum(any(a in d and b in d for a, b in zip(x, x[1:], strict=False)) for x in resp)
    after_think = sum(x[:1] and x[0] in d for x in resp[N : 2 * N])
    after_end = sum(
        any(t in d for t in texts[row][texts[row].index(special.end_think) + 1 :])
        for row in range(len(texts))
        if texts[row].count(special.end_think) == 1
    )
    two_thinks = sum(t.count(special.think) >= 2 for t in texts)
    assert runs > 0 and after_think > 0 and after_end > 0 and two_thinks > 0
    # Resolution at the end mattered: some delimiter candidates fell outside the final span.
    candidates = sum(
        1
        for row, x in enumerate(texts)
        for i in range(plen[row], len(x))
        if x[i] in d and x[i - 1] not in d and x[i - 1] != special.think
    )
    assert candidates > r.num_steps.sum()


def test_logprobs_equal_training_forward(small_model, sampled):
    model, _ = small_model
    r, texts, prompt_of = sampled["result"], sampled["texts"], sampled["prompt_of"]
    logits, _, _, _ = full_forward(model, texts)
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits) / TEMPERATURE, axis=-1))
    for row, text in enumerate(texts):
        p, n = len(prompt_of[row]), int(r.lengths[row])
        ref = logp[row, np.arange(p - 1, p + n - 1), np.array(text[p:])]
        np.testing.assert_allclose(r.logprobs[row, :n], ref, atol=1e-4, rtol=0)
        assert np.all(r.logprobs[row, n:] == 0)
        assert np.all(r.tokens[row, n:] == 0)


def test_groups_finish_and_seed(small_model, special, sampled):
    model, _ = small_model
    r, sampler = sampled["result"], sampled["sampler"]
    reasons = r.finish_reasons()
    assert set(reasons) <= {"eos", "length"} and "eos" in reasons
    for row in range(len(reasons)):
        n = int(r.lengths[row])
        assert (r.tokens[row, n - 1] == special.eos) == (reasons[row] == "eos")
        assert (n == MAX_NEW) or reasons[row] == "eos"
    assert np.all(r.prompt_lengths == np.repeat([len(p) for p in sampled["prompts"]], N))
    # Same key: same output; another key: another output.
    raw_key = jax.random.PRNGKey(42)  # the legacy raw form of the same key
    again = sampler(nnx.state(model), sampled["prompts"], n=N, key=raw_key).to_host()
    np.testing.assert_array_equal(again.tokens, r.tokens)
    np.testing.assert_array_equal(again.scores, r.scores)
    other = sampler(nnx.state(model), sampled["prompts"], n=N, key=jax.random.key(7)).to_host()
    assert not np.array_equal(other.tokens, r.tokens)


def test_mesh_gives_same_tokens(small_model, special, sampled):
    model, cfg = small_model
    mesh = make_mesh((2, 2, 2))
    state = nnx.state(model)
    sharded = jax.device_put(state, state_shardings(state, mesh))
    sampler = Sampler(model, cfg, sampler_config(special), mesh=mesh)
    out = sampler(sharded, sampled["prompts"], n=N, key=jax.random.key(42))
    assert out.tokens.sharding.spec[0] == ("data", "fsdp")
    out = out.to_host()
    r = sampled["result"]
    np.testing.assert_array_equal(out.tokens, r.tokens)
    np.testing.assert_array_equal(out.step_positions, r.step_positions)
    np.testing.assert_allclose(out.scores, r.scores, atol=1e-5)
    np.testing.assert_allclose(out.logprobs, r.logprobs, atol=1e-4, rtol=1e-5)


def hf_greedy(hf, prompts, new_tokens, eos):
    torch = pytest.importorskip("torch")
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=eos,
        )
    gen = out[:, width:].numpy()
    return np.pad(gen, ((0, 0), (0, new_tokens - gen.shape[1])))


def test_greedy_matches_transformers(hf_pair):
    hf, model, cfg = hf_pair
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, size=n).tolist() for n in (5, 17, 11, 30)]
    eos = 37  # with these weights: rows 0 and 1 emit it at steps 22 and 29, rows 2 and 3 never
    ref = hf_greedy(hf, prompts, 64, eos=eos)
    config = SamplerConfig(
        max_new_tokens=64,
        temperature=0.0,
        pad_id=0,
        eos_ids=(eos,),
        score_steps=False,
        prompt_buckets=(32,),
    )
    out = Sampler(model, cfg, config)(model, prompts, key=jax.random.key(0)).to_host()
    np.testing.assert_array_equal(out.tokens, ref)
    assert out.finish_reasons() == ["eos", "eos", "length", "length"]
    np.testing.assert_array_equal(out.lengths, [23, 30, 64, 64])
    assert np.all(out.tokens[:2, 30:] == 0) and np.all(out.tokens[2:] != 0)
    assert len({tuple(row) for row in ref}) == 4


def test_eos_stop_and_length_on_a_markov_chain(make_markov):
    vocab = 14
    chain = {7: 8, 8: 9, 9: 3, 3: 10, 10: 11, 11: 1, 12: 12, 1: 1}
    logits = np.zeros((vocab, vocab), np.float32)
    for a, b in chain.items():
        logits[a, b] = 5.0
    model, cfg = make_markov(logits, np.zeros(vocab, np.float32))
    config = SamplerConfig(
        max_new_tokens=8,
        temperature=0.0,
        eos_ids=(1,),
        stop_sequences=((9, 3),),
        pad_id=0,
        step_ids=(3,),
        prompt_buckets=(4,),
    )
    out = Sampler(model, cfg, config)(model, [[7], [9], [12, 10], [12]], key=jax.random.key(0))
    out = out.to_host()
    assert out.finish_reasons() == ["stop", "eos", "eos", "length"]
    np.testing.assert_array_equal(out.lengths, [3, 4, 2, 8])
    np.testing.assert_array_equal(out.tokens[0], [8, 9, 3, 0, 0, 0, 0, 0])
    # (9, 3) spans the prompt boundary: not a stop.
    np.testing.assert_array_equal(out.tokens[1], [3, 10, 11, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(out.tokens[3], [12] * 8)


def test_bad_inputs_raise_before_compiling(small_model, special, sampled):
    model, cfg = small_model
    sampler, key = sampled["sampler"], jax.random.key(0)
    cases = [
        ([[7, 8], []], "prompt 1 is empty"),
        ([[7] * (cfg.max_position_embeddings - MAX_NEW + 1)], "exceeds the model's limit"),
        ([[7] * 17], "largest prompt bucket 16"),
        ([[7, cfg.vocab_size]], "outside the model's vocabulary"),
        (["hello"], "encode it with the tokenizer"),
        ([], "no prompts"),
    ]
    for prompts, message in cases:
        with pytest.raises(ValueError, match=message):
            sampler(model, prompts, key=key)
    with pytest.raises(ValueError, match="samples per prompt"):
        sampler(model, [[7]], n=0, key=key)
    with pytest.raises(ValueError, match="one threefry PRNG key"):
        sampler(model, [[7]], key=jax.random.split(key, 2))
    with pytest.raises(ValueError, match="distinct ints"):
        sampler(model, [[7], [8]], key=key, prompt_ids=[3, 3])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        Sampler(model, cfg, sampler_config(special, eos_ids=(cfg.vocab_size,)))
    with pytest.raises(ValueError, match="needs step_ids"):
        SamplerConfig(score_steps=True)
    with pytest.raises(ValueError, match="top_p"):
        SamplerConfig(score_steps=False, top_p=0.0)


def test_prompt_array_with_mask_matches_lists(small_model, sampled):
    model, _ = small_model
    prompts = sampled["prompts"]
    width = max(len(p) for p in prompts)
    arr = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):  # right-padded, as a training batch would be
        arr[i, : len(p)], mask[i, : len(p)] = p, True
    sampler = sampled["sampler"]
    a = sampler(model, arr, prompt_mask=mask, n=N, key=jax.random.key(42)).to_host()
    np.testing.assert_array_equal(a.tokens, sampled["result"].tokens)
