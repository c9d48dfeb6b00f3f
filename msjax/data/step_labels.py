"""True step labels for any response to a synthetic-step problem, in text and in token space.

Where the steps are (REFERENCE section 2). In text (`split_steps`): the think span runs from just
after `<think>` (when the text holds exactly one, else from the start) to `</think>` (when the text
holds exactly one, else to the end); each ".\\n\\n" inside it ends a step, except a delimiter that
directly follows another one (only the first of a run counts) or opens the span (right after
`<think>`, or at the very start of a response). A step's text is everything between the end of
the previous delimiter (counted or not; or the span start) and its own delimiter. In tokens
(`token_step_labels`): the same rule on token ids, exactly as
msjax.models.sprm.step_mask(rule="inference") applies it to prompt+response with the response as
the scorable part, so labels line up 1:1 with SPRM scores. The two agree on text in the task's
format; on odd text (e.g. ".\n\n\n") a tokenizer may not produce the delimiter token where the
text rule sees one, so evaluate the SPRM with `token_step_labels`.

The labels of step i (0-based), given the problem's operations (op_i, b_i) and gold values v_i:
  - `locally_correct`: the step reads "a op b = c" (integers, any spacing), i is within the
    problem's operation count, op == op_i and b == b_i, a equals the response's own previous value
    (the problem's start value for i = 0, else the c of step i-1, when that step parsed), and
    c == a op b. That is: a correct step given its own inputs.
  - `on_track`: the step parses and is exactly gold step i: (a, op, b, c) == (v_{i-1}, op_i, b_i,
    v_i). That is: correct overall.
Unparseable steps and steps beyond the problem's operation count are neither.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from msjax.data.synthetic import Problem, apply_op, parse_problem
from msjax.tokenizer import STEP_DELIMITER, THINK_END, THINK_START, Tokenizer

_STEP_RE = re.compile(r"\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*")


@dataclasses.dataclass(frozen=True)
class StepLabels:
    """Per-step labels of one response (see the module docstring for the rule)."""

    steps: tuple[str, ...]
    locally_correct: tuple[bool, ...]
    on_track: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.steps)


@dataclasses.dataclass(frozen=True)
class TokenStepLabels:
    """Labels aligned with the SPRM's step positions in prompt+response token space.

    positions: int32[steps], the scored positions (the token JUST BEFORE each delimiter), indices
    into prompt+response; locally_correct / on_track: bool[steps]; steps: the decoded step texts.
    """

    positions: np.ndarray
    locally_correct: np.ndarray
    on_track: np.ndarray
    steps: tuple[str, ...]


def label_step_texts(problem: str | Problem, steps: Sequence[str]) -> StepLabels:
    """Labels already-split step texts (no delimiters) against `problem`."""
    p = parse_problem(problem) if isinstance(problem, str) else problem
    gold_prev = (p.start, *p.values[:-1])
    own_prev: int | None = p.start
    local, track = [], []
    for i, text in enumerate(steps):
        m = _STEP_RE.fullmatch(text)
        local.append(_step_error(p, i, m, own_prev) is None)
        gold = (gold_prev[i], *p.ops[i], p.values[i]) if i < len(p.ops) else None
        track.append(m is not None and _fields(m) == gold)
        own_prev = int(m.group(4)) if m else None
    return StepLabels(tuple(steps), tuple(local), tuple(track))


def _fields(m: re.Match) -> tuple[int, str, int, int]:
    """(a, op, b, c) of a step matched by _STEP_RE."""
    return int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))


def _step_error(p: Problem, i: int, m: re.Match | None, own_prev: int | None) -> str | None:
    """Why step i (its _STEP_RE match, None when it does not parse) is not locally correct given
    the response's previous value `own_prev`, or None when it is (kinds: see first_error)."""
    if m is None:
        return "format"
    if i >= len(p.ops):
        return "extra_step"
    a, op, b, c = _fields(m)
    if (op, b) != p.ops[i]:
        return "operand"
    if a != own_prev:
        return "copy"
    if c != apply_op(a, op, b):
        return "arithmetic"
    return None


STEP_ERRORS = ("format", "extra_step", "operand", "copy", "arithmetic", "missing_steps")


def first_error(problem: str | Problem, response: str) -> tuple[int, str] | None:
    """(step index, kind) of the first step of `response` that is not locally correct, or None
    when every step is locally correct and there is one per operation (the chain is then right,
    whatever the boxed answer says).

    Kinds, checked in this order on a step: "format" (not "a op b = c"), "extra_step" (past the
    problem's last operation), "operand" (another operator or operand than the problem's step i:
    a skipped, repeated or misread operation), "copy" (a is not the previous step's c, or the
    start value), "arithmetic" (c != a op b); "missing_steps" (index = the step count) when the
    steps are right but fewer than the operations. "operand", "copy" and "arithmetic" are the
    error kinds `msjax.data.flawed_solution` injects (`ERROR_KINDS`).
    """
    p = parse_problem(problem) if isinstance(problem, str) else problem
    steps = split_steps(response)
    own_prev: int | None = p.start
    for i, text in enumerate(steps):
        m = _STEP_RE.fullmatch(text)
        if kind := _step_error(p, i, m, own_prev):
            return i, kind
        own_prev = int(m.group(4))
    return (len(steps), "missing_steps") if len(steps) < len(p.ops) else None


def split_steps(text: str) -> list[str]:
    """The step texts of a response (or prompt+response) text, by the text rule above."""
    lo = text.index(THINK_START) + len(THINK_START) if text.count(THINK_START) == 1 else 0
    hi = text.index(THINK_END) if text.count(THINK_END) == 1 else len(text)
    steps, seg_start = [], lo
    while (d := text.find(STEP_DELIMITER, seg_start, hi)) >= 0:
        if d > seg_start:  # else it opens the span or directly follows another delimiter
            steps.append(text[seg_start:d])
        seg_start = d + len(STEP_DELIMITER)
    return steps


def label_steps(problem: str | Problem, response: str) -> StepLabels:
    """Splits `response` into steps and labels each one (rule in the module docstring)."""
    return label_step_texts(problem, split_steps(response))


def step_positions(
    tokens: Sequence[int],
    step_ids: Sequence[int],
    think_start_id: int | None,
    think_end_id: int | None,
    scorable_from: int = 0,
) -> np.ndarray:
    """Scored positions (token before each counted delimiter) of one unpadded sequence.

    The inference rule of REFERENCE section 2: the delimiter is the first of its run and does not
    follow `<think>`; the scored position p satisfies think_start < p < think_end (single `<think>`
    position else 0; single `</think>` position else the length) and p >= scorable_from.
    Returns int32[steps].
    """
    t = np.asarray(tokens, np.int64)
    delim = np.isin(t, np.asarray(list(step_ids), np.int64))
    prev_delim = np.concatenate([[False], delim[:-1]])
    prev_tok = np.concatenate([[-1], t[:-1]])
    first = delim & ~prev_delim
    if think_start_id is not None:
        first &= prev_tok != think_start_id

    def single(tag_id: int | None) -> int | None:
        hits = np.flatnonzero(t == tag_id) if tag_id is not None else []
        return int(hits[0]) if len(hits) == 1 else None

    start, end = single(think_start_id), single(think_end_id)
    lo = 0 if start is None else start
    hi = len(t) if end is None else end
    p = np.flatnonzero(first) - 1
    keep = (p > lo) & (p < hi) & (p >= scorable_from)
    return p[keep].astype(np.int32)


def token_step_labels(
    tokenizer: Tokenizer,
    problem: str | Problem,
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
) -> TokenStepLabels:
    """True labels for the SPRM's steps of prompt+response (response = the scorable part).

    Step j's text is the decoded tokens between the previous delimiter token (or the start of the
    think span within the response) and its own delimiter; it is labelled by the rule above.
    """
    prompt_ids, response_ids = list(prompt_ids), list(response_ids)
    tokens = prompt_ids + response_ids
    pos = step_positions(
        tokens,
        tokenizer.step_ids,
        tokenizer.think_start_id,
        tokenizer.think_end_id,
        scorable_from=len(prompt_ids),
    )
    starts = [i for i, t in enumerate(tokens) if t == tokenizer.think_start_id]
    base = max(len(prompt_ids), starts[0] + 1 if len(starts) == 1 else 0)
    delims = np.flatnonzero(np.isin(tokens, tokenizer.step_ids))
    texts = []
    for p in pos:
        before = delims[delims <= p]
        seg_start = max(base, int(before[-1]) + 1 if len(before) else 0)
        texts.append(tokenizer.decode(tokens[seg_start : p + 1]))
    labels = label_step_texts(problem, texts)
    return TokenStepLabels(
        positions=pos,
        locally_correct=np.asarray(labels.locally_correct, bool),
        on_track=np.asarray(labels.on_track, bool),
        steps=labels.steps,
    )
