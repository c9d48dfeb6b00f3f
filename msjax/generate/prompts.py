"""Host-side prompt packing: validate prompts, pick a length bucket, left-pad, pad the batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def prompt_lists(prompts, prompt_mask=None) -> list[list[int]]:
    """Token-id lists from a list of id sequences, or from an int array [batch, L] with an
    optional bool mask [batch, L] of real tokens (any padding side; None = all real)."""
    if isinstance(prompts, np.ndarray) or hasattr(prompts, "shape"):
        arr = np.asarray(prompts)
        if arr.ndim != 2:
            raise ValueError(f"prompts array must be [batch, length], got shape {arr.shape}.")
        mask = np.ones(arr.shape, bool) if prompt_mask is None else np.asarray(prompt_mask, bool)
        if mask.shape != arr.shape:
            raise ValueError(f"prompt_mask shape {mask.shape} != prompts shape {arr.shape}.")
        return [[int(t) for t in row[m]] for row, m in zip(arr, mask, strict=True)]
    if prompt_mask is not None:
        raise ValueError("prompt_mask is only meaningful with a prompts array.")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            raise ValueError(f"prompt {i} is a string; encode it with the tokenizer first.")
        out.append([int(t) for t in p])
    return out


def choose_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length; ValueError when none is."""
    for b in buckets:
        if b >= length:
            return int(b)
    raise ValueError(
        f"a prompt of {length} tokens is longer than the largest prompt bucket {max(buckets)}; "
        "shorten it or add a larger bucket to SamplerConfig.prompt_buckets."
    )


def pack_prompts(
    prompts: list[list[int]],
    *,
    buckets: Sequence[int],
    pad_id: int,
    vocab_size: int,
    max_total: int,
    max_new_tokens: int,
    batch_multiple: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads prompts into int32[batch', L] with L the bucket of the longest prompt.

    batch' is len(prompts) rounded up to `batch_multiple` (extra rows: empty prompts, length 0).
    Raises ValueError naming the prompt for: no prompts, an empty prompt, an id outside
    [0, vocab_size), and prompt + max_new_tokens > max_total (the model's position limit).
    Returns (tokens int32[batch', L], lengths int32[batch']).
    """
    if not prompts:
        raise ValueError("no prompts given; pass at least one prompt.")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token.")
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"prompt {i} holds token id {lo if lo < 0 else hi} outside the model's "
                f"vocabulary [0, {vocab_size}); was it encoded with this model's tokenizer?"
            )
        if len(p) + max_new_tokens > max_total:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that "
                f"exceeds the model's limit of {max_total} positions; shorten the prompt or "
                "lower max_new_tokens."
            )
    length = choose_bucket(max(len(p) for p in prompts), buckets)
    batch = -(-len(prompts) // batch_multiple) * batch_multiple
    tokens = np.full((batch, length), pad_id, np.int32)
    lengths = np.zeros((batch,), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p) :] = p
        lengths[i] = len(p)
    return tokens, lengths
