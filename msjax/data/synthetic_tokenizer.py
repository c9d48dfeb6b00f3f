"""A small byte-level BPE tokenizer for the synthetic step task, built with `tokenizers`.

Same machinery as the Qwen2 tokenizer (NFC, Qwen2's split regex with single digits, byte-level
BPE), trained on generated task text, so the tiny demo model is a real Hugging Face model:
".\\n\\n" is one merged token, `<think>` / `</think>` are added tokens, and the R1 chat tokens
(BOS, EOS, User, Assistant) and a pad token are special tokens. Any text round-trips.
"""

from __future__ import annotations

import os
import re

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers

from msjax.data.synthetic import (
    ERROR_KINDS,
    Difficulty,
    flawed_solution,
    gold_solution,
    sample_problem,
)
from msjax.tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    MATH_SUFFIX,
    PAD_TOKEN,
    STEP_DELIMITER,
    THINK_END,
    THINK_START,
    USER_TOKEN,
    Tokenizer,
    render_prompt,
)

# Qwen2's pre-tokenizer split pattern: letters runs, single digits, punctuation runs with their
# trailing newlines (which is what makes ".\n\n" one pre-token), whitespace.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)


def _corpus(num_problems: int, seed: int) -> list[str]:
    """Prompts (both templates, with and without the math suffix), gold and flawed solutions,
    cut at the special and added tokens (which must not feed merges)."""
    rng = np.random.default_rng(seed)
    difficulties = [Difficulty(), Difficulty(min_steps=1, max_steps=8, max_operand=20)]
    texts = []
    for i in range(num_problems):
        p = sample_problem(rng, difficulties[i % len(difficulties)])
        template = ("r1", "plain")[i % 2]
        texts.append(render_prompt(p.text, template, MATH_SUFFIX if i % 3 else None))
        texts.append(gold_solution(p))
        k = int(rng.integers(len(p.ops)))
        texts.append(flawed_solution(p, k, ERROR_KINDS[i % len(ERROR_KINDS)], rng).text)
    pattern = "|".join(re.escape(t) for t in (*SPECIAL_TOKENS, THINK_START, THINK_END))
    return [piece for text in texts for piece in re.split(pattern, text) if piece]


def train_synthetic_backend(
    vocab_size: int = 384, num_problems: int = 2000, seed: int = 0
) -> tokenizers.Tokenizer:
    """Trains the byte-level BPE; `vocab_size` counts every id (added tokens included)."""
    n_added = 2  # <think>, </think>
    if vocab_size < 256 + len(SPECIAL_TOKENS) + n_added + 16:
        raise ValueError(f"vocab_size {vocab_size} too small: need >= 256 bytes + specials + 16")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(num_problems, seed), trainer=trainer)
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in (THINK_START, THINK_END)]
    )
    return tok


def build_synthetic_tokenizer(
    out_dir: str | os.PathLike | None = None,
    *,
    vocab_size: int = 384,
    num_problems: int = 2000,
    seed: int = 0,
) -> Tokenizer:
    """Builds the task's tokenizer (deterministic for fixed arguments) and, when `out_dir` is
    given, saves it there (tokenizer.json, tokenizer_config.json, special_tokens_map.json) so that
    `Tokenizer.from_dir` and `transformers.AutoTokenizer.from_pretrained` load it."""
    backend = train_synthetic_backend(vocab_size, num_problems, seed)
    ids = {t: backend.token_to_id(t) for t in (*SPECIAL_TOKENS, THINK_START, THINK_END)}
    delim = backend.encode(STEP_DELIMITER, add_special_tokens=False).ids
    if len(delim) != 1 or any(i is None for i in ids.values()):
        raise RuntimeError(
            f"synthetic tokenizer is missing single tokens (delimiter -> {delim}, specials "
            f"{ids}); raise vocab_size or num_problems"
        )
    tok = Tokenizer(
        backend,
        eos_ids=[ids[EOS_TOKEN]],
        bos_id=ids[BOS_TOKEN],
        pad_id=ids[PAD_TOKEN],
        extra_config={"model_max_length": 4096},
    )
    if out_dir is not None:
        tok.save(out_dir)
    return tok
