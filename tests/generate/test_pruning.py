"""SPRM-guided early pruning: the rule parser, the decision on hand-worked groups, and a constructed
Markov case where pruning saves tokens and Best-of-N still picks the same (right) answer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msjax.generate import PruneRule, Sampler, SamplerConfig
from msjax.generate.pruning import prune_decision
from msjax.generate.tts import generate_and_select, token_stats

SCORES = [0.9, 0.5, 0.7, 0.2, 0.3, 0.3, 0.1, 0.8]
STEPS = [3, 3, 0, 3, 1, 1, 1, 1]
RUNNING = [True, True, True, True, True, False, True, True]


def decide(rule, scores=SCORES, steps=STEPS, running=RUNNING, active=None, group=4):
    active = [True] * len(scores) if active is None else active
    out = prune_decision(
        rule,
        jnp.asarray(scores, jnp.float32),
        jnp.asarray(steps, jnp.int32),
        jnp.asarray(running),
        jnp.asarray(active),
        group,
    )
    return np.asarray(out).tolist()


def test_margin_rule_hand_worked():
    # group 0: row 2 has no step (not judged); best 0.9 -> drop < 0.65: rows 1, 3.
    # group 1: best 0.8 -> drop < 0.55: rows 4, 6 (row 5 is finished: never pruned).
    expect = [False, True, False, True, True, False, True, False]
    assert decide(PruneRule("margin", 0.25)) == expect
    # A pruned row no longer sets the bar: without row 0 the best of group 0 is 0.5.
    active = [False] + [True] * 7
    running = [False] + RUNNING[1:]
    got = decide(PruneRule("margin", 0.25), active=active, running=running)
    assert got[:4] == [False, False, False, True]
    # min_steps=2: group 1 has no judged row, nothing happens there.
    assert decide(PruneRule("margin", 0.25, min_steps=2))[4:] == [False] * 4


def test_keep_rule_hand_worked():
    # group 0: 3 judged, keep 2 -> drop row 3; group 1: keep 2 of 4; row 4 ties row 5 and wins
    # by index; rows 5 (finished) and 6 rank below -> only row 6 is dropped.
    expect = [False, False, False, True, False, False, True, False]
    assert decide(PruneRule("keep", 0.5)) == expect
    # A partial last group (6 rows, groups of 4) works and keeps its best.
    assert decide(PruneRule("keep", 0.5), SCORES[:6], STEPS[:6], RUNNING[:6], None) == (
        expect[:4] + [False, False]
    )


def test_parse_and_validate():
    assert PruneRule.parse("margin=0.2,every=32,min_steps=2") == PruneRule("margin", 0.2, 32, 2)
    assert PruneRule.parse(" keep = 0.5 ") == PruneRule("keep", 0.5, 64, 1)
    for bad, message in [
        ("margin", "NAME=VALUE"),
        ("margin=0.1,keep=0.5", "exactly one"),
        ("cut=0.1", "exactly one"),
        ("keep=1.5", "fraction"),
        ("margin=-1", ">= 0"),
        ("margin=0.1,every=0", "positive"),
        ("margin=x", "could not convert"),
    ]:
        with pytest.raises(ValueError, match=message):
            PruneRule.parse(bad)


# A Markov "reasoner": after <think> it commits to a good (G) or bad (B) line of steps, each step
# "G D_g" or "B D_b", and ends with answer A (good line) or B (bad line), </think>, EOS.
PAD, EOS, D_G, D_B, THINK, END, G, B, A_G, A_B, START = range(11)
VOCAB = 12
NAMES = {A_G: "A", A_B: "B"}


def reasoner():
    p = np.full((VOCAB, VOCAB), 1e-13)
    rows = {
        START: {THINK: 1.0},
        THINK: {G: 0.3, B: 0.7},  # most lines are bad: the majority answer is wrong
        G: {D_G: 1.0},
        D_G: {G: 0.85, A_G: 0.15},
        B: {D_B: 1.0},
        D_B: {B: 0.85, A_B: 0.15},
        A_G: {END: 1.0},
        A_B: {END: 1.0},
        END: {EOS: 1.0},
    }
    for a in range(VOCAB):
        for b, q in rows.get(a, {a: 1.0}).items():
            p[a, b] = q
    step = np.zeros(VOCAB, np.float32)
    step[G], step[B] = 3.0, -1.0
    return np.log(p).astype(np.float32), step


def test_pruning_saves_tokens_and_keeps_the_choice(make_markov):
    from msjax.generate.tts import maj_at_k

    model, cfg = make_markov(*reasoner())
    config = SamplerConfig(
        max_new_tokens=96,
        temperature=1.0,
        eos_ids=(EOS,),
        pad_id=PAD,
        step_ids=(D_G, D_B),
        think_start_id=THINK,
        think_end_id=END,
        prompt_buckets=(2,),
    )
    prune = PruneRule("margin", 0.3, every=8)
    decode = lambda ids: "".join(NAMES.get(t, ".") for t in ids)
    extract = lambda text: next((c for c in reversed(text) if c in "AB"), None)
    runs = {}
    for name, rule in (("full", None), ("pruned", prune)):
        sampler = Sampler(model, cfg, config.replace(prune=rule))
        runs[name] = generate_and_select(
            sampler, model, [[START, THINK]], 16, jax.random.key(5), decode=decode, extract=extract
        )
    (full,), (pruned,) = runs["full"], runs["pruned"]
    full_stats, stats = token_stats([full], 96), token_stats([pruned], 96)

    answers = [c.answer for c in full.candidates]
    assert answers.count("B") > answers.count("A") > 0  # the majority is wrong ...
    assert maj_at_k([[a == "A" for a in answers]], [answers]) == 0.0
    assert full.best.answer == "A"  # ... and the SPRM picks the right line
    assert pruned.best.answer == "A" and pruned.chosen == full.chosen
    # Every bad line still running at token 8 was pruned; the good lines are untouched.
    bad = [i for i, c in enumerate(full.candidates) if c.answer == "B"]
    assert stats["pruned"] == sum(len(full.candidates[i].tokens) > 8 for i in bad) > 0
    for f, p in zip(full.candidates, pruned.candidates, strict=True):
        if p.pruned:
            assert f.answer == "B" and len(p.tokens) == 8 and p.tokens == f.tokens[:8]
        else:
            assert p.tokens == f.tokens and p.score == pytest.approx(f.score, abs=1e-6)
    assert stats["tokens_generated"] < full_stats["tokens_generated"]
    saved = full_stats["tokens_generated"] - stats["tokens_generated"]
    assert 0 < saved <= stats["tokens_saved_max"]
