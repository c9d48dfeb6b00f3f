"""Greedy generation of an exported model: transformers' tokens against msjax's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from msjax import checkpoint as ckpt
from msjax.generate import Sampler, SamplerConfig
from msjax.tokenizer import Tokenizer


def _until_eos(ids: Sequence[int], eos: set[int]) -> list[int]:
    out = []
    for t in ids:
        out.append(int(t))
        if int(t) in eos:
            break
    return out


def msjax_greedy(
    ckpt_dir: Path, tokenizer: Tokenizer, prompts: list[list[int]], new_tokens: int, buckets
) -> list[list[int]]:
    """Greedy continuations (up to and including EOS) by msjax's sampler."""
    model, cfg = ckpt.load_model(ckpt_dir)
    config = SamplerConfig.from_tokenizer(
        tokenizer,
        max_new_tokens=new_tokens,
        temperature=0.0,
        score_steps=False,
        prompt_buckets=tuple(buckets),
    )
    out = Sampler(model, cfg, config)(model, prompts, key=jax.random.key(0)).to_host()
    return [out.response(r) for r in range(len(prompts))]


def hf_greedy(
    hf_dir: Path, tokenizer: Tokenizer, prompts: list[list[int]], new_tokens: int
) -> list[list[int]]:
    """Greedy continuations (up to and including EOS) by transformers' `generate`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_id,
            eos_token_id=list(tokenizer.eos_ids),
        )
    eos = set(tokenizer.eos_ids)
    return [_until_eos(row.tolist(), eos) for row in out[:, width:]]


def greedy_parity(
    ckpt_dir: Path,
    hf_dir: Path,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    new_tokens: int,
    *,
    buckets,
) -> dict:
    """{"hf_greedy_parity": all rows equal, "rows", "rows_equal", "tokens_compared"}."""
    ours = msjax_greedy(ckpt_dir, tokenizer, prompts, new_tokens, buckets)
    eos = set(tokenizer.eos_ids)
    ours = [_until_eos(r, eos) for r in ours]
    theirs = hf_greedy(hf_dir, tokenizer, prompts, new_tokens)
    equal = [a == b for a, b in zip(ours, theirs, strict=True)]
    return {
        "hf_greedy_parity": bool(all(equal)),
        "rows": len(prompts),
        "rows_equal": int(np.sum(equal)),
        "tokens_compared": int(sum(len(r) for r in ours)),
        "example": tokenizer.decode(ours[0]) if ours else "",
    }
