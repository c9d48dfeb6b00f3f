"""From sampled responses to the train step's batch (host-side NumPy).

A row is one sampled response; the samples of one prompt are contiguous (GRPO groups). Training
sequences are the prompt, LEFT-padded to the prompt batch's bucket, followed by the response,
right-padded to the smallest of a few fixed widths (`response_widths`) that holds the batch's
longest response, so the train step works on the lengths generated, not on max_new_tokens, and
compiles at most once per (prompt bucket, response width).
"""

from __future__ import annotations

import numpy as np

from msjax.models.sprm import step_mask
from msjax.rl import grpo


def response_widths(max_new_tokens: int, count: int) -> tuple[int, ...]:
    """The response widths a rollout batch is padded to: max_new_tokens / 2^i for i < count,
    rounded up to a multiple of 8, smallest first (count = 1: always max_new_tokens)."""
    if count < 1:
        raise ValueError(f"rollout.response_buckets={count} must be >= 1.")
    widths = {max_new_tokens}
    for i in range(1, count):
        widths.add(min(max_new_tokens, -(-max_new_tokens // (2**i * 8)) * 8))
    return tuple(sorted(widths))


def response_width(lengths: np.ndarray, widths: tuple[int, ...]) -> int:
    """The smallest of `widths` that holds the longest of `lengths` (int[rows])."""
    longest = int(np.max(lengths, initial=0))
    fits = [w for w in widths if w >= longest]
    if not fits:
        raise ValueError(f"A response of {longest} tokens exceeds the widths {widths}.")
    return fits[0]


def sequence_arrays(
    prompt_tokens: np.ndarray,
    prompt_lengths: np.ndarray,
    response_tokens: np.ndarray,
    response_lengths: np.ndarray,
    n: int,
) -> dict[str, np.ndarray]:
    """Joins left-padded prompts with right-padded responses.

    Args:
      prompt_tokens: int32[prompts, L] left-padded; prompt_lengths: int32[prompts].
      response_tokens: int32[prompts * n, N]; response_lengths: int32[prompts * n].
      n: samples per prompt (row r belongs to prompt r // n).
    Returns tokens, positions int32[rows, L + N]; valid, response bool[rows, L + N].
    """
    p, width = prompt_tokens.shape
    rows, new = response_tokens.shape
    if rows != p * n:
        raise ValueError(f"{rows} responses for {p} prompts x n={n}.")
    prompt_rows = np.repeat(np.arange(p), n)
    tokens = np.concatenate([prompt_tokens[prompt_rows], response_tokens], axis=1).astype(np.int32)
    prompt_valid = np.arange(width)[None] >= width - prompt_lengths[prompt_rows][:, None]
    resp_valid = np.arange(new)[None] < response_lengths[:, None]
    valid = np.concatenate([prompt_valid, resp_valid], axis=1)
    response = np.concatenate([np.zeros_like(prompt_valid), resp_valid], axis=1)
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    return {"tokens": tokens, "positions": positions, "valid": valid, "response": response}


def train_batch(
    prompt_tokens: np.ndarray,
    prompt_lengths: np.ndarray,
    response_tokens: np.ndarray,
    response_lengths: np.ndarray,
    response_logprobs: np.ndarray,
    rewards: np.ndarray,
    n: int,
    *,
    step_ids,
    think_start_id,
    think_end_id,
) -> dict[str, np.ndarray]:
    """The train step's batch for one rollout (see msjax.rl.train_step for the keys).

    response_logprobs: f32[rows, N] sampler log-probs (old policy). rewards: f32[rows].
    ref_logp is zeros; the trainer fills it when the KL term is on. The SPRM scores the token
    before each delimiter of the response (inference span rule), as the sampler does.
    """
    seq = sequence_arrays(prompt_tokens, prompt_lengths, response_tokens, response_lengths, n)
    width = prompt_tokens.shape[1]
    old_logp = np.zeros(seq["tokens"].shape, np.float32)
    old_logp[:, width:] = np.where(seq["response"][:, width:], response_logprobs, 0.0)
    # The scored token is the one before the delimiter; the delimiter must be in the response.
    scorable = np.zeros_like(seq["response"])
    scorable[:, :-1] = seq["response"][:, 1:]
    steps = step_mask(
        seq["tokens"], seq["valid"], step_ids, think_start_id, think_end_id, scorable=scorable
    )
    rewards = np.asarray(rewards, np.float32)
    return {
        "tokens": seq["tokens"],
        "positions": seq["positions"],
        "valid": seq["valid"],
        "loss_mask": seq["response"],
        "old_logp": old_logp,
        "ref_logp": np.zeros_like(old_logp),
        "advantages": np.asarray(grpo.group_advantages(rewards, n), np.float32),
        "labels": (rewards > 0.5).astype(np.float32),
        "step_mask": np.asarray(steps),
    }
