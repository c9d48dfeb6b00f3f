"""Outcome rewards for math: the last boxed answer of a response against the gold answer.

Comparison order (the first that decides wins):
  1. canonical strings equal (spaces, `$`, `\\left`/`\\right`, thin spaces and trailing
     punctuation removed, `\\dfrac`/`\\tfrac` -> `\\frac`) -> correct;
  2. both plain decimal numbers -> compared exactly as decimals; a number with a percent sign
     equals the same number or its hundredth (math-verify misses "12.5\\%" = 12.5);
  3. both plain words (after unwrapping `\\text{}`-like commands and "(B)"-style choices) ->
     compared case-insensitively (math-verify would read a word as a product of symbols);
  4. math-verify (`parse` of `\\boxed{answer}` for both, then `verify(gold, pred)`).
Step 4 can hang on pathological input (math-verify's own timeout uses signal.alarm, main thread
only), so `MathVerifier` runs it in worker processes with its own per-item timeout.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

import numpy as np

from msjax.rewards.pool import TimeoutPool

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_SPACE_CMDS = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "$", " ", "\n", "\t")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox)\{([^{}]*)\}")
_WORD_RE = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")
_CHOICE_RE = re.compile(r"\(([A-Za-z])\)")


def extract_boxed(text: str) -> str | None:
    """Content of the LAST `\\boxed{...}` / `\\fbox{...}` (nested braces; `\\{` `\\}` don't count),
    or of a `\\boxed 5`-style box; None when there is no box or the last one never closes."""
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m and matches[-1].end() < i else None
    depth, start = 0, i + 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
        i += 1
    return None


def clean_answer(answer: str) -> str:
    """Strips whitespace, surrounding `$`, a trailing `.`/`,`/`;`/`:` and a nested `\\boxed{}`."""
    s = answer.strip()
    inner = extract_boxed(s) if _BOX_RE.search(s) else None
    if inner is not None:
        s = inner
    s = s.strip().strip("$").strip()
    while s and s[-1] in ".,;:" and not s.endswith("\\."):
        s = s[:-1].rstrip()
    return s


def canonical(answer: str) -> str:
    """The string form used by the exact-match fast path."""
    s = clean_answer(answer).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for t in _SPACE_CMDS:
        s = s.replace(t, "")
    return s


def _number(s: str) -> tuple[Decimal, bool] | None:
    """(value, had a percent sign) of a canonical plain number, else None."""
    percent = s.endswith("%")
    s = s.removesuffix("%").removesuffix("\\") if percent else s
    if not _NUMBER_RE.fullmatch(s):
        return None
    try:
        return Decimal(s), percent
    except InvalidOperation:
        return None


def _word(answer: str) -> str | None:
    s = clean_answer(answer)
    s = _TEXT_CMD_RE.sub(lambda m: m.group(1), s).strip()
    if m := _CHOICE_RE.fullmatch(s):
        s = m.group(1)
    s = " ".join(s.split())
    return s.casefold() if _WORD_RE.fullmatch(s) else None


def fast_match(pred: str, gold: str) -> bool | None:
    """Steps 1-3 of the module docstring: True/False when they decide, else None."""
    cp, cg = canonical(pred), canonical(gold)
    if cp == cg and cp:
        return True
    np_, ng = _number(cp), _number(cg)
    if np_ is not None and ng is not None:
        (vp, pp), (vg, pg) = np_, ng
        return vp == vg or (pp and not pg and vp / 100 == vg) or (pg and not pp and vg / 100 == vp)
    wp, wg = _word(pred), _word(gold)
    if wp is not None and wg is not None:
        return wp == wg
    return None


def _math_verify(pred: str, gold: str, timeout_s: int | None) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if threading.current_thread() is not threading.main_thread():
        timeout_s = None  # signal.alarm only works in the main thread
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    g = parse(
        f"\\boxed{{{clean_answer(gold)}}}", extraction_config=config, parsing_timeout=timeout_s
    )
    p = parse(
        f"\\boxed{{{clean_answer(pred)}}}", extraction_config=config, parsing_timeout=timeout_s
    )
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=timeout_s))


def answers_match(pred: str, gold: str, math_verify_timeout_s: int | None = 5) -> bool:
    """Whether answer `pred` equals `gold` (both without `\\boxed`), in this process."""
    decided = fast_match(pred, gold)
    return decided if decided is not None else _math_verify(pred, gold, math_verify_timeout_s)


def math_reward(
    response: str,
    gold: str,
    *,
    finished: bool = True,
    missing_eos_reward: float | None = None,
) -> float:
    """1.0 when the last boxed answer of `response` equals `gold`, else 0.0; a wrong response
    that never reached EOS (`finished=False`) gets `missing_eos_reward` when given (the original
    recipe's 0.1). Runs in this process: use `MathVerifier` for untrusted batches."""
    pred = extract_boxed(response)
    if pred is not None and answers_match(pred, gold):
        return 1.0
    if not finished and missing_eos_reward is not None:
        return float(missing_eos_reward)
    return 0.0


def _warm_up() -> None:
    _math_verify("1/2", "0.5", None)


def _pool_compare(pred: str, gold: str, timeout_s: int | None) -> bool:
    return _math_verify(pred, gold, timeout_s)


class MathVerifier:
    """Batched `math_reward` with math-verify in worker processes and a per-item timeout.

    Extraction and the fast path run here; only undecided pairs go to the `num_workers` worker
    processes (started on first need). An item that takes longer than `timeout_s` scores 0, its
    worker is killed and replaced. Counters in `stats`: items, fast (decided without
    math-verify), verified, timeouts, errors, replaced. `compare_fn(pred, gold, timeout_s) ->
    bool`, a picklable module-level function, replaces math-verify (tests).
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        *,
        missing_eos_reward: float | None = None,
        math_verify_timeout_s: int | None = 5,
        compare_fn=None,
        start_method: str = "spawn",
    ):
        self.missing_eos_reward = missing_eos_reward
        self.math_verify_timeout_s = math_verify_timeout_s
        self._pool = TimeoutPool(
            compare_fn or _pool_compare,
            num_workers,
            timeout_s,
            initializer=None if compare_fn else _warm_up,
            start_method=start_method,
        )
        self.stats = {"items": 0, "fast": 0, "verified": 0}

    def verify_batch(
        self,
        responses: Sequence[str],
        golds: Sequence[str],
        finished: Sequence[bool] | np.ndarray | None = None,
    ) -> np.ndarray:
        """Rewards f32[batch] (1.0 / 0.0, or missing_eos_reward for unfinished wrong ones)."""
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        if finished is None:
            finished = np.ones(len(responses), bool)
        finished = np.asarray(finished, bool)
        if finished.shape != (len(responses),):
            raise ValueError(f"finished has shape {finished.shape}, expected ({len(responses)},)")
        correct = np.zeros(len(responses), bool)
        todo: list[int] = []
        for i, (r, g) in enumerate(zip(responses, golds, strict=True)):
            pred = extract_boxed(r)
            if pred is None:
                continue
            decided = fast_match(pred, g)
            if decided is None:
                todo.append(i)
            else:
                correct[i] = decided
        args = [(extract_boxed(responses[i]), golds[i], self.math_verify_timeout_s) for i in todo]
        for i, out in zip(todo, self._pool.map(args) if args else [], strict=True):
            correct[i] = out.status == "ok" and bool(out.value)
        self.stats["items"] += len(responses)
        self.stats["fast"] += len(responses) - len(todo)
        self.stats["verified"] += len(todo)
        rewards = correct.astype(np.float32)
        if self.missing_eos_reward is not None:
            rewards[~correct & ~finished] = self.missing_eos_reward
        return rewards

    @property
    def timeouts(self) -> int:
        return self._pool.timeouts

    def counters(self) -> dict[str, int]:
        """stats plus the pool's timeouts / errors / replaced."""
        p = self._pool
        return {**self.stats, "timeouts": p.timeouts, "errors": p.errors, "replaced": p.replaced}

    def close(self) -> None:
        """Stops the worker processes."""
        self._pool.close()

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
