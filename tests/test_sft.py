"""SFT warm start: CE and SPR against NumPy references, outcome labels, learning, errors."""

import jax
import numpy as np
import pytest
from flax import nnx

from msjax.data import (
    Difficulty,
    MixedSolutions,
    SftPipeline,
    generate_examples,
    gold_solution,
    parse_problem,
    step_positions,
)
from msjax.data.synthetic_tokenizer import build_synthetic_tokenizer
from msjax.models import ModelConfig, create_model
from msjax.rl.optimizer import OptimizerConfig, make_optimizer
from msjax.rl.train_step import init_train_state
from msjax.sft import (
    SftLossConfig,
    make_sft_step,
    outcome_labels,
    response_texts,
    step_label_array,
    train_sft,
)


@pytest.fixture(scope="module")
def tok():
    return build_synthetic_tokenizer()


@pytest.fixture(scope="module")
def records():
    exs = generate_examples(24, Difficulty(max_steps=3), np.random.default_rng(0))
    return [
        {"problem": e.problem.encode(), "answer": e.answer, "solution": e.solution} for e in exs
    ]


@pytest.fixture(scope="module")
def model_and_cfg():
    cfg = ModelConfig(
        vocab_size=384,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        head_dropout=0.0,  # deterministic step logits for the reference
    )
    return create_model(cfg, seed=3), cfg


def _batch(records, tok, flawed=0.5, batch_size=8, seed=0):
    pipe = SftPipeline(
        records,
        tok,
        batch_size=batch_size,
        max_len=96,
        response_fn=MixedSolutions(flawed),
        template="plain",
        suffix=None,
        seed=seed,
        shard_index=0,
        shard_count=1,
        shuffle=False,
    )
    return dict(next(iter(pipe)))


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_outcome_labels_mark_flawed_solutions(records, tok):
    batch = _batch(records, tok, flawed=0.5)
    labels = outcome_labels(batch, tok, [r["answer"] for r in records])
    texts = response_texts(batch, tok)
    gold = [gold_solution(parse_problem(records[i]["problem"].decode())) for i in batch["index"]]
    # A flawed solution always ends with a wrong answer; a gold one with the right one.
    np.testing.assert_array_equal(labels, [float(t == g) for t, g in zip(texts, gold)])
    assert 0 < labels.sum() < len(labels)


def _references(model, cfg, batch, tok, labels):
    """CE over response tokens and the original SPR loss, in NumPy from the model's outputs."""
    tokens = batch["tokens"]
    b, t = tokens.shape
    valid = np.arange(t)[None] < batch["lengths"][:, None]
    positions = np.broadcast_to(np.arange(t), (b, t))
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state):
        m = nnx.merge(graphdef, state)
        out = m(tokens, positions, valid)
        return out.logits, m.step_logits(out.penultimate)

    logits, step_logits = forward(state)
    logp = _log_softmax(np.asarray(logits, np.float64))
    w = batch["loss_mask"][:, 1:] * batch["weights"][:, None]
    picked = np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    ce = -(picked * w).sum() / w.sum()
    step_logits = np.asarray(step_logits, np.float64)
    s, y = [], []
    for row in range(b):
        n, p = int(batch["lengths"][row]), int(batch["prompt_lengths"][row])
        pos = step_positions(
            tokens[row, :n], tok.step_ids, tok.think_start_id, tok.think_end_id, scorable_from=p
        )
        s += list(step_logits[row, pos])
        y += [labels[row]] * len(pos)
    s, y = np.asarray(s), np.asarray(y)
    bce = np.maximum(s, 0) - s * y + np.log1p(np.exp(-np.abs(s)))
    keep = np.where(y > 0.5, s > 0, s < 0).astype(np.float64)
    pos_, neg_ = (keep * y).sum() + 1, (keep * (1 - y)).sum() + 1
    weight = 1.5 * keep * y * neg_ / (pos_ + neg_) + keep * (1 - y) * pos_ / (pos_ + neg_)
    spr = (weight * bce).sum() / (weight.sum() + 1e-5)
    return ce, spr, len(s)


def test_losses_match_numpy_reference(records, tok, model_and_cfg):
    model, cfg = model_and_cfg
    batch = _batch(records, tok)
    batch["weights"][-1] = 0.0  # a fill row counts for nothing
    batch["labels"] = outcome_labels(batch, tok, [r["answer"] for r in records])
    ce_ref, spr_ref, n_steps = _references(model, cfg, batch, tok, batch["labels"])
    graphdef, _ = nnx.split(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = make_optimizer(OptimizerConfig(lr=0.0, head_lr=0.0))
    step = make_sft_step(graphdef, tx, SftLossConfig(spr_coef=0.5), tokenizer=tok)
    state = init_train_state(jax.tree.map(np.copy, params), tx, 0)
    _, m = step(state, batch)
    assert float(m["ce"]) == pytest.approx(ce_ref, rel=1e-5)
    assert float(m["spr_loss"]) == pytest.approx(spr_ref, rel=1e-4, abs=1e-6)
    assert float(m["loss"]) == pytest.approx(ce_ref + 0.5 * spr_ref, rel=1e-5)
    # every step of the real rows is scored, the fill row's are not
    weights = batch["weights"]
    assert float(m["steps_per_response"]) * weights.sum() == pytest.approx(
        n_steps - _batch_steps_of_row(batch, tok, -1)
    )


def _batch_steps_of_row(batch, tok, row):
    n, p = int(batch["lengths"][row]), int(batch["prompt_lengths"][row])
    toks = batch["tokens"][row, :n]
    return len(step_positions(toks, tok.step_ids, tok.think_start_id, tok.think_end_id, p))


def test_training_lowers_ce_and_separates_scores(records, tok, model_and_cfg):
    model, cfg = model_and_cfg
    graphdef, _ = nnx.split(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    batch = _batch(records, tok, flawed=0.5)
    batches = iter(lambda: batch, None)  # the same batch again and again (overfit)
    tx = make_optimizer(OptimizerConfig(lr=3e-3, head_lr=1e-2))
    _, history = train_sft(
        jax.tree.map(np.copy, params),
        graphdef,
        tx,
        SftLossConfig(spr_coef=1.0, spr_variant="bce"),
        batches,
        tok,
        [r["answer"] for r in records],
        steps=30,
        progress=False,
    )
    assert history[-1]["ce"] < 0.5 * history[0]["ce"]
    # the head learns the outcome labels of this batch (bce: every step trains)
    assert history[-1]["spr_bce_mean"] < history[0]["spr_bce_mean"] - 0.03
    assert history[-1]["score_gap"] > history[0]["score_gap"] + 0.04


def test_step_label_array_follows_the_error(records, tok):
    batch = _batch(records, tok, flawed=0.5)
    batch["index"][-1] = -1  # a fill row gets no labels
    problems = [r["problem"].decode() for r in records]
    labels = step_label_array(batch, tok, problems)
    outcome = outcome_labels(batch, tok, [r["answer"] for r in records])
    assert labels.shape == batch["tokens"].shape
    assert np.all(labels[-1] == -1)
    n_flawed = 0
    for row in range(len(labels) - 1):
        n, p = int(batch["lengths"][row]), int(batch["prompt_lengths"][row])
        pos = step_positions(
            batch["tokens"][row, :n], tok.step_ids, tok.think_start_id, tok.think_end_id, p
        )
        assert len(pos) > 0
        # labelled exactly at the SPRM's step positions
        np.testing.assert_array_equal(np.flatnonzero(labels[row] >= 0), pos)
        y = labels[row, pos]
        if outcome[row]:
            assert np.all(y == 1)  # a gold solution is on track at every step
        else:
            n_flawed += 1
            # on track until the error, off track from it on (to the end)
            assert y[-1] == 0 and np.all(np.diff(y) <= 0)
    assert n_flawed > 0
    local = step_label_array(batch, tok, problems, label="locally_correct")
    assert np.all((local >= 0) == (labels >= 0))
    with pytest.raises(ValueError, match="label"):
        step_label_array(batch, tok, problems, label="outcome")


def test_step_label_loss_matches_numpy(records, tok, model_and_cfg):
    model, cfg = model_and_cfg
    batch = _batch(records, tok, flawed=0.5)
    batch["weights"][-1] = 0.0
    batch["index"][-1] = -1
    problems = [r["problem"].decode() for r in records]
    batch["step_labels"] = step_label_array(batch, tok, problems)
    ce_ref, _, _ = _references(model, cfg, batch, tok, np.zeros(len(batch["index"])))
    graphdef, state = nnx.split(model)
    tokens = batch["tokens"]
    b, t = tokens.shape
    valid = np.arange(t)[None] < batch["lengths"][:, None]
    positions = np.broadcast_to(np.arange(t), (b, t))

    @jax.jit
    def step_logits(state):
        m = nnx.merge(graphdef, state)
        return m.step_logits(m(tokens, positions, valid).penultimate)

    z = np.asarray(step_logits(state), np.float64)
    y = batch["step_labels"]
    known = y >= 0
    bce = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
    ref = bce[known].mean()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = make_optimizer(OptimizerConfig(lr=0.0, head_lr=0.0))
    step = make_sft_step(graphdef, tx, SftLossConfig(step_label_coef=2.0), tokenizer=tok)
    _, m = step(init_train_state(jax.tree.map(np.copy, params), tx, 0), batch)
    assert int(m["labelled_steps"]) == known.sum()
    assert float(m["step_label_loss"]) == pytest.approx(ref, rel=1e-5)
    assert float(m["loss"]) == pytest.approx(ce_ref + 2.0 * ref, rel=1e-5)
    with pytest.raises(KeyError, match="step_labels"):
        step(None, {k: v for k, v in batch.items() if k != "step_labels"})
    with pytest.raises(ValueError, match="step_labeler"):
        train_sft({}, graphdef, tx, SftLossConfig(step_label_coef=1.0), iter([]), tok, [], steps=1)
    with pytest.raises(ValueError, match="step_label_coef"):
        SftLossConfig(step_label_coef=-1.0)


def test_bad_inputs(records, tok, model_and_cfg):
    model, _ = model_and_cfg
    graphdef, _ = nnx.split(model)
    tx = make_optimizer(OptimizerConfig())
    with pytest.raises(ValueError, match="spr_variant"):
        SftLossConfig(spr_variant="nope")
    with pytest.raises(ValueError, match="spr_coef"):
        SftLossConfig(spr_coef=-1.0)
    with pytest.raises(ValueError, match="step delimiter"):
        make_sft_step(graphdef, tx, SftLossConfig())
    step = make_sft_step(graphdef, tx, SftLossConfig(spr_coef=1.0), tokenizer=tok)
    batch = _batch(records, tok)
    with pytest.raises(KeyError, match="labels"):
        step(None, batch)
    with pytest.raises(ValueError, match="steps"):
        train_sft({}, graphdef, tx, SftLossConfig(), iter([]), tok, [], steps=0)
