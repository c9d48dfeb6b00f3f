"""Grain pipelines: order, epochs, shards, padding/buckets, filters, SFT masks, exact resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pipeline_child import batches_to_arrays, make_pipeline

from msjax.data.pipeline import PromptPipeline, SftPipeline, bucket_length, default_buckets
from msjax.data.synthetic import Difficulty, MixedSolutions, generate_examples
from msjax.data.synthetic_steps import build_synthetic_steps
from msjax.data.synthetic_tokenizer import build_synthetic_tokenizer
from msjax.tokenizer import render_prompt

CHILD = Path(__file__).with_name("pipeline_child.py")


@pytest.fixture(scope="module")
def tok():
    return build_synthetic_tokenizer()


def _records(n, seed=0):
    exs = generate_examples(n, Difficulty(), np.random.default_rng(seed))
    return [
        {"problem": e.problem.encode(), "answer": e.answer, "solution": e.solution} for e in exs
    ]


def _prompts(source, tok, **kw):
    args = dict(batch_size=4, max_prompt_len=64, template="plain", suffix=None)
    args.update(shard_index=0, shard_count=1)
    args.update(kw)
    return PromptPipeline(source, tok, **args)


def _indices(pipeline, num_batches=None):
    it = iter(pipeline)
    batches = list(it) if num_batches is None else [next(it) for _ in range(num_batches)]
    return [int(i) for b in batches for i in b["index"]]


def test_buckets():
    assert default_buckets(100) == (16, 32, 64, 100)
    assert default_buckets(64) == (16, 32, 64)
    assert bucket_length(17, (16, 32)) == 32
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        bucket_length(33, (16, 32))


def test_same_seed_same_order(tok):
    src = _records(40)
    a = _indices(_prompts(src, tok, seed=3), 12)
    b = _indices(_prompts(src, tok, seed=3), 12)
    c = _indices(_prompts(src, tok, seed=4), 12)
    assert a == b and a != c
    assert sorted(a[:40]) == list(range(40))  # the first epoch is a permutation


def test_epochs_are_reshuffled_permutations(tok):
    src = _records(20)
    idx = _indices(_prompts(src, tok, batch_size=5, num_epochs=2, seed=1))
    assert len(idx) == 40  # exactly two epochs, then StopIteration
    assert sorted(idx[:20]) == sorted(idx[20:]) == list(range(20))
    assert idx[:20] != idx[20:]
    assert _indices(_prompts(src, tok, batch_size=5, num_epochs=1, shuffle=False)) == list(
        range(20)
    )


def test_two_processes_get_disjoint_shards_covering_the_data(tok):
    src = _records(21)
    shards = [
        _prompts(src, tok, batch_size=2, num_epochs=1, shard_index=i, shard_count=2)
        for i in range(2)
    ]
    seen = [set(_indices(p)) for p in shards]
    assert not seen[0] & seen[1]
    assert len(seen[0]) == len(seen[1]) == 10  # equal shards: the same number of batches
    assert len(seen[0] | seen[1]) == 20 and shards[0].stats["dropped_for_sharding"] == 1
    # Default sharding is jax.process_index() / jax.process_count(): one process, everything.
    default = PromptPipeline(src, tok, batch_size=3, max_prompt_len=64, num_epochs=1)
    assert set(_indices(default)) == set(range(21))


def test_prompt_batch_layout(tok):
    src = _records(12)
    p = _prompts(src, tok, batch_size=4, buckets=(8, 16, 24, 32, 64), num_epochs=1, shuffle=False)
    for batch in p:
        lengths = batch["prompt_lengths"]
        length = batch["prompt_tokens"].shape[1]
        assert length == min(b for b in (8, 16, 24, 32, 64) if b >= lengths.max())
        assert batch["prompt_tokens"].dtype == np.int32 and batch["index"].dtype == np.int64
        for row, i in enumerate(batch["index"]):
            want = tok.encode(render_prompt(src[i]["problem"].decode(), "plain", None))
            tokens = batch["prompt_tokens"][row]
            assert lengths[row] == len(want)
            assert tokens[length - len(want) :].tolist() == want  # left-padded
            assert (tokens[: length - len(want)] == tok.pad_id).all()
            assert batch["problem"][row] == src[i]["problem"].decode()
            assert batch["answer"][row] == src[i]["answer"]
        assert (batch["weights"] == 1).all()


def test_length_filter_and_empty_problems_are_counted(tok):
    src = _records(30)
    for i in (3, 7, 8):
        src[i] = {**src[i], "problem": src[i]["problem"] + b" Add 1." * 20}
    src[5] = {**src[5], "problem": b"  "}
    p = _prompts(src, tok, max_prompt_len=48, num_epochs=1, batch_size=1)
    lengths = [len(tok.encode(render_prompt(r["problem"].decode(), "plain", None))) for r in src]
    assert sum(n > 48 for n in lengths) == 3  # the independent count
    assert p.stats == {
        "examples": 30,
        "empty": 1,
        "too_long": 3,
        "dropped_for_sharding": 0,
        "shard_size": 26,
    }
    assert sorted(_indices(p)) == [i for i in range(30) if i not in (3, 5, 7, 8)]
    with pytest.raises(ValueError, match="cannot fill 1 shards"):
        _prompts(src, tok, max_prompt_len=4)


def test_final_partial_batch_is_filled_with_zero_weight_rows(tok):
    p = _prompts(_records(10), tok, num_epochs=1, shuffle=False, drop_remainder=False)
    batches = list(p)
    assert len(batches) == len(p) == 3
    last = batches[-1]
    assert last["prompt_tokens"].shape[0] == 4
    assert last["index"].tolist() == [8, 9, -1, -1]
    assert last["weights"].tolist() == [1, 1, 0, 0]
    assert len(_prompts(_records(10), tok, num_epochs=1)) == 2


def test_sft_batches_mask_the_response(tok):
    src = _records(16)
    fn = MixedSolutions(0.5)
    p = SftPipeline(
        src, tok, batch_size=4, max_len=128, response_fn=fn, template="plain", suffix=None,
        seed=2, num_epochs=2, shard_index=0, shard_count=1,
    )  # fmt: skip
    responses = {}
    for batch in p:
        assert batch["tokens"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
        for row, i in enumerate(batch["index"]):
            tokens, mask = batch["tokens"][row], batch["loss_mask"][row]
            n, k = batch["lengths"][row], batch["prompt_lengths"][row]
            prompt = render_prompt(src[i]["problem"].decode(), "plain", None)
            assert tok.decode(tokens[:k]) == prompt
            assert tokens[n - 1] == tok.eos_id and (tokens[n:] == tok.pad_id).all()
            assert mask.tolist() == [0.0] * k + [1.0] * (n - k) + [0.0] * (len(mask) - n)
            response = tok.decode(tokens[k : n - 1])
            assert response == fn(src[i], np.random.default_rng([2, int(i)]))
            assert responses.setdefault(int(i), response) == response  # same in both epochs
    assert len(responses) == 16
    assert sum(responses[i] != src[i]["solution"] for i in responses) >= 3  # some flawed
    gold = SftPipeline(src, tok, batch_size=2, max_len=128, shard_index=0, shard_count=1)
    batch = next(iter(gold))
    i, n, k = batch["index"][0], batch["lengths"][0], batch["prompt_lengths"][0]
    assert tok.decode(batch["tokens"][0][k : n - 1]) == src[i]["solution"]


def test_state_restores_exactly_in_a_fresh_process(tmp_path):
    build_synthetic_steps(tmp_path / "data", num_train=50, num_test=5)
    it = iter(make_pipeline(str(tmp_path / "data")))
    for _ in range(15):  # past the first epoch (50 examples / 4 per batch)
        next(it)
    state = it.get_state()
    (tmp_path / "state.json").write_text(json.dumps(state))
    want = [next(it) for _ in range(4)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run(
        [sys.executable, str(CHILD), str(tmp_path / "data"), str(tmp_path / "state.json"),
         str(tmp_path / "out.npz"), "4"],
        check=True, env=env, cwd=Path(__file__).parents[2], timeout=300,
    )  # fmt: skip
    got = np.load(tmp_path / "out.npz")
    expected = batches_to_arrays(want)
    assert sorted(got.files) == sorted(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    # The same in this process, on a fresh iterator.
    again = iter(make_pipeline(str(tmp_path / "data")))
    again.set_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(next(again)["index"], want[0]["index"])


def test_state_from_another_configuration_is_rejected(tok):
    src = _records(20)
    state = iter(_prompts(src, tok, seed=1)).get_state()
    with pytest.raises(ValueError, match="different|configured"):
        iter(_prompts(src, tok, seed=2)).set_state(state)


def test_bad_arguments(tok):
    src = _records(8)
    with pytest.raises(ValueError, match="batch_size"):
        _prompts(src, tok, batch_size=0)
    with pytest.raises(ValueError, match="unknown template"):
        _prompts(src, tok, template="chatml")
    with pytest.raises(ValueError, match="shard_index"):
        _prompts(src, tok, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="buckets"):
        _prompts(src, tok, buckets=(8, 16))
