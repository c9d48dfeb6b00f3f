"""The continuous-batching engine against the fixed-batch Sampler (itself tested against
transformers and a full forward pass): same tokens, log-probs and streamed scores with slots
refilled many times, pruning, stop sequences, per-request settings, meshes; bounded compiles."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from msjax.generate import PruneRule, Sampler, SamplerConfig
from msjax.generate import slots as sl
from msjax.generate.engine import Engine, Request
from msjax.sharding import make_mesh, state_shardings

MAX_NEW = 24
N = 2
SLOTS = 4  # fewer than the rows of a call: slots are refilled many times
CHUNK = 4
pytestmark = pytest.mark.expensive(minutes=1.5)


def config(sp, **kw):
    base = dict(
        max_new_tokens=MAX_NEW,
        temperature=0.0,
        eos_ids=(sp.eos,),
        pad_id=sp.pad,
        step_ids=sp.delims,
        think_start_id=sp.think,
        think_end_id=sp.end_think,
        prompt_buckets=(16,),
    )
    base.update(kw)
    return SamplerConfig(**base)


def prompts_of(sp):
    """Mixed lengths (1 to 13 tokens) that put the step rules' edges at the prompt boundary."""
    d = sp.delims[0]
    return [
        [7, sp.think, 8, d, d, 9],
        [9, sp.think],
        [7, 8, sp.delims[1]],
        [sp.think, 9, sp.end_think, 10],
        [9, 10, 11, 8, 7, 7, 2, 9, 10, 11, 8, 7, 2],
        [8],
        [sp.think, 7, 9, 10, 2, 11],
    ]


def requests(prompts, n, key, **settings):
    """The Sampler's rows as requests: prompt p's sample j draws from fold_in(key, p * n + j)."""
    return [Request(p, n=n, key=key, row_id=i * n, **settings) for i, p in enumerate(prompts)]


def concat(results):
    """Concatenates per-request results (equal widths) into one dict of arrays."""
    names = ("tokens", "logprobs", "lengths", "finish", "scores", "step_scores", "step_positions")
    out = {k: np.concatenate([np.asarray(getattr(r, k)) for r in results]) for k in names}
    out["num_steps"] = np.concatenate([r.num_steps for r in results])
    out["reasons"] = [x for r in results for x in r.finish_reasons()]
    return out


def assert_same(got, ref, exact_tokens=True):
    ref = ref.to_host()
    if exact_tokens:
        np.testing.assert_array_equal(got["tokens"], ref.tokens)
    np.testing.assert_array_equal(got["lengths"], ref.lengths)
    assert got["reasons"] == ref.finish_reasons()
    np.testing.assert_allclose(got["logprobs"], ref.logprobs, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got["num_steps"], ref.num_steps)
    np.testing.assert_array_equal(got["step_positions"], ref.step_positions)
    np.testing.assert_allclose(got["step_scores"], ref.step_scores, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["scores"], ref.scores, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def greedy(small_model, special):
    """The Sampler's greedy rows, and the engine's through a session (requests with ids)."""
    model, cfg = small_model
    c = config(special)
    prompts = prompts_of(special)
    ref = Sampler(model, cfg, c)(model, prompts, n=N, key=jax.random.key(0))
    engine = Engine(model, cfg, c, slots=SLOTS, chunk=CHUNK, max_len=64, windows=(32, 64))
    session = engine.session(model)
    for i, r in enumerate(requests(prompts, N, jax.random.key(0))):
        session.add(dataclasses.replace(r, id=f"req{i}"))
    done, order = {}, []
    while session.busy:
        for rid, result in session.step():
            done[rid] = result
            order.append(rid)
    results = [done[f"req{i}"] for i in range(len(prompts))]
    return dict(
        engine=engine, ref=ref, prompts=prompts, session=session, results=results, order=order
    )


def test_greedy_equals_sampler_with_refills(small_model, greedy):
    model, _ = small_model
    engine, ref, prompts = greedy["engine"], greedy["ref"], greedy["prompts"]
    got = concat(greedy["results"])
    assert_same(got, ref)
    # The cases the comparison is about occurred: EOS at several lengths, "length", steps.
    eos_lengths = {
        int(x) for x, r in zip(got["lengths"], got["reasons"], strict=True) if r == "eos"
    }
    assert len(eos_lengths) >= 3 and "length" in got["reasons"]
    assert got["num_steps"].sum() > 5
    # 14 rows through 4 slots: every slot was refilled; chunks used both KV windows.
    assert len(prompts) * N > 3 * SLOTS
    assert sl.run_chunk._cache_size() >= 2
    # `generate` (the same engine, a new session) gives the same results in request order.
    again = engine.generate(model, requests(prompts, N, jax.random.key(0)))
    assert [r.n for r in again] == [N] * len(prompts)
    np.testing.assert_array_equal(concat(again)["tokens"], got["tokens"])


def test_session_returns_each_request_once(greedy):
    session, order = greedy["session"], greedy["order"]
    assert sorted(order) == sorted(f"req{i}" for i in range(len(greedy["prompts"])))
    assert order != sorted(order, key=lambda r: int(r[3:]))  # short ones came back first
    assert session.chunks > MAX_NEW // CHUNK
    assert not session.busy and sorted(session.free_slots) == list(range(SLOTS))


def test_sampled_tokens_independent_of_slots_and_equal_to_sampler(small_model, special, greedy):
    model, cfg = small_model
    c = config(special, temperature=0.8, top_k=8, top_p=0.95)
    prompts = prompts_of(special)
    ref = Sampler(model, cfg, c)(model, prompts, n=N, key=jax.random.key(3))
    outs = []
    for slots in (SLOTS, 8):
        chunks = sl.run_chunk._cache_size()
        engine = Engine(model, cfg, c, slots=slots, chunk=CHUNK, max_len=64, windows=(64,))
        outs.append(concat(engine.generate(model, requests(prompts, N, jax.random.key(3)))))
        if slots == SLOTS:  # the greedy engine's programs: the sampling defaults do not shape them
            assert sl.run_chunk._cache_size() == chunks
    np.testing.assert_array_equal(outs[0]["tokens"], outs[1]["tokens"])
    assert_same(outs[1], ref)
    assert len({tuple(t) for t in outs[0]["tokens"]}) > len(prompts)  # samples differ


def test_mixed_settings_share_programs_and_equal_separate_calls(small_model, special, greedy):
    model, _ = small_model
    engine = greedy["engine"]
    d = special.delims[0]
    mixed = [
        Request([7, 8, 9], n=2, key=1, temperature=0.0),
        Request([7, 8, 9], n=3, key=1, temperature=1.3, top_p=0.7),
        Request([9, special.think], n=1, key=2, temperature=0.9, top_k=3),
        Request([10, 11], n=2, key=3, temperature=0.6, repetition_penalty=1.5),
        Request([10, 11], n=2, key=3, max_new_tokens=7, temperature=0.0),
        Request([8, 8], n=2, key=4, temperature=1.0, stop_sequences=((d,), (9, 10))),
    ]
    before = {f: f._cache_size() for f in (sl.admit, sl.run_chunk, sl.collect)}
    together = engine.generate(model, mixed)
    alone = [engine.generate(model, [r])[0] for r in mixed]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5, rtol=0)
    assert together[4].tokens.shape == (2, 7) and together[4].finish_reasons() == ["length"] * 2
    assert "stop" in together[5].finish_reasons()
    # Greedy rows of the same prompt agree; sampled ones differ.
    assert np.array_equal(together[0].tokens[0], together[0].tokens[1])
    assert len({tuple(t) for t in together[1].tokens}) > 1
    # New settings compiled nothing: only admit shapes already seen could be needed.
    assert sl.run_chunk._cache_size() == before[sl.run_chunk]
    assert sl.collect._cache_size() == before[sl.collect]
    assert sl.admit._cache_size() <= before[sl.admit] + 1  # at most one new prompt count


def test_pruning_equals_sampler(small_model, special):
    model, cfg = small_model
    c = config(special, temperature=1.0, prune=PruneRule("keep", 0.5, every=4))
    prompts = prompts_of(special)
    n = 4
    ref = Sampler(model, cfg, c)(model, prompts, n=n, key=jax.random.key(5))
    engine = Engine(model, cfg, c, slots=8, chunk=CHUNK, max_len=64, windows=(64,))
    got = concat(engine.generate(model, requests(prompts, n, jax.random.key(5))))
    assert_same(got, ref)
    assert got["reasons"].count("pruned") >= 3


def test_mesh_equals_one_device(small_model, special, greedy):
    model, cfg = small_model
    mesh = make_mesh((2, 2, 2))
    state = nnx.state(model)
    sharded = jax.device_put(state, state_shardings(state, mesh))
    c = config(special)
    engine = Engine(
        model, cfg, c, slots=SLOTS, chunk=CHUNK, max_len=64, windows=(32, 64), mesh=mesh
    )
    got = concat(engine.generate(sharded, requests(greedy["prompts"], N, jax.random.key(0))))
    assert_same(got, greedy["ref"])


def test_stop_eos_and_context_limit_on_a_markov_chain(make_markov):
    vocab = 14
    chain = {7: 8, 8: 9, 9: 3, 3: 10, 10: 11, 11: 1, 12: 12, 1: 1}
    logits = np.zeros((vocab, vocab), np.float32)
    for a, b in chain.items():
        logits[a, b] = 5.0
    model, cfg = make_markov(logits, np.zeros(vocab, np.float32))
    c = SamplerConfig(
        max_new_tokens=8,
        temperature=0.0,
        eos_ids=(1,),
        pad_id=0,
        step_ids=(3,),
        prompt_buckets=(4,),
    )
    engine = Engine(model, cfg, c, slots=2, chunk=3, max_len=cfg.max_position_embeddings)
    stop = dict(stop_sequences=((9, 3),))
    out = engine.generate(
        model,
        [
            Request([7], **stop),
            Request([9], **stop),  # (9, 3) spans the prompt boundary: not a stop
            Request([12, 10]),
            Request([12]),
            Request([12] * 500, max_new_tokens=100),  # 12 positions left in the context
        ],
    )
    assert [r.finish_reasons()[0] for r in out] == ["stop", "eos", "eos", "length", "length"]
    assert [int(r.lengths[0]) for r in out] == [3, 4, 2, 8, 12]
    np.testing.assert_array_equal(out[0].tokens[0], [8, 9, 3, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out[1].tokens[0], [3, 10, 11, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(out[4].tokens[0, :13], [12] * 12 + [0])
    assert out[4].tokens.shape == (1, 100)


def test_bad_requests_raise_before_compiling(small_model, special, greedy):
    model, cfg = small_model
    engine = greedy["engine"]
    cases = [
        (Request([]), "empty"),
        (Request("hello"), "encode it with the tokenizer"),
        (Request([7, cfg.vocab_size]), "outside the model's vocabulary"),
        (Request([7] * 64), "leaves no room"),
        (Request([7], n=SLOTS + 1), r"n=5 must be an int in \[1, 4\]"),
        (Request([7], temperature=-1.0), "temperature"),
        (Request([7], repetition_penalty=0.0), "repetition_penalty"),
        (Request([7], stop_sequences=[[1]] * 5), "stop_capacity"),
        (Request([7], key=jax.random.split(jax.random.key(0))), "one threefry PRNG key"),
    ]
    for request, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.generate(model, [request])
    with pytest.raises(ValueError, match="multiple of"):
        Engine(model, cfg, config(special), slots=3, mesh=make_mesh((2, 2, 2)))
    with pytest.raises(ValueError, match="max_len"):
        Engine(model, cfg, config(special), max_len=cfg.max_position_embeddings + 1)
