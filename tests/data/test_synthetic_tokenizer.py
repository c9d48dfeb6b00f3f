"""The synthetic task's BPE tokenizer: small, deterministic, the right single tokens, lossless."""

import numpy as np

from msjax.data.synthetic import Difficulty, flawed_solution, gold_solution, sample_problem
from msjax.data.synthetic_tokenizer import build_synthetic_tokenizer, train_synthetic_backend
from msjax.tokenizer import Tokenizer, render_prompt


def test_deterministic_small_and_single_tokens(tmp_path):
    tok = build_synthetic_tokenizer(tmp_path)
    assert train_synthetic_backend().to_str() == tok.backend.to_str()
    assert 300 <= tok.vocab_size <= 400
    for text in (
        ".\n\n",
        "<think>",
        "</think>",
        "<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜>",
    ):
        assert len(tok.encode(text)) == 1, text
    assert tok.step_ids == tuple(tok.encode(".\n\n"))
    # Digits stay single tokens (Qwen2's split), so every number is spelled digit by digit.
    assert [tok.decode([i]) for i in tok.encode("1234")] == ["1", "2", "3", "4"]
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.backend.to_str() == tok.backend.to_str()
    assert (loaded.eos_ids, loaded.bos_id, loaded.pad_id) == (tok.eos_ids, tok.bos_id, tok.pad_id)


def test_task_text_compresses_and_round_trips():
    tok = build_synthetic_tokenizer()
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = sample_problem(rng, Difficulty(max_steps=6))
        texts = [
            render_prompt(p.text, "r1"),
            render_prompt(p.text, "plain", None),
            gold_solution(p),
            flawed_solution(p, 0, "arithmetic", rng).text,
        ]
        for text in texts:
            ids = tok.encode(text)
            assert tok.decode(ids) == text
            assert len(ids) < len(text) / 1.5  # the task's words are merged
        # Every step of the gold solution ends in the delimiter token.
        assert tok.encode(gold_solution(p)).count(tok.step_ids[0]) == len(p.ops)
    odd = "ünïcödé 中文。 🙂 \t\r\n x.\n\n\n"
    assert tok.decode(tok.encode(odd)) == odd
