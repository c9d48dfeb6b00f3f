"""The `math` outcome reward: the final answer of a response against the gold answer.

What is graded (`answer_span`): the text after the last `</think>`; nothing when a think span was
opened (`<think>` in the prompt or the response) and never closed (a truncated response earns no
reward for a box inside its thinking); the whole response otherwise.
The answer (`final_answer_items`): the last run of `\\boxed{}` that only separators join
("\\boxed{2} and \\boxed{3}", "$\\boxed{2}$, $\\boxed{3}$"), each box split at its top-level
commas into items ("1,000" is one number). A gold answer written as boxes gives its boxes' items.
Answer against gold (`grade_items`): one item each, or one side a single expression (a set
`\\{2, 3\\}` against the list "2, 3"): the two compared whole; the same number of items: equal
when the items pair off one-to-one in any order; otherwise wrong.

Comparison of two answers, `answers_match` (the first that decides wins):
  1. canonical strings equal (spaces, `$`, `\\left`/`\\right`, thin spaces and trailing
     punctuation removed, `\\dfrac`/`\\tfrac` -> `\\frac`) -> correct;
  2. both plain decimal numbers -> compared exactly as decimals; a number with a percent sign
     equals the same number or its hundredth (math-verify misses "12.5\\%" = 12.5);
  3. both plain words (after unwrapping `\\text{}`-like commands and "(B)"-style choices) ->
     compared case-insensitively (math-verify would read a word as a product of symbols);
  4. math-verify (`parse` of `\\boxed{answer}` for both, then `verify(gold, pred)`).
Step 4 can hang on pathological input (math-verify's own timeout uses signal.alarm, main thread
only), so `MathVerifier` runs it in worker processes with its own per-item timeout. The
differences from the original's rule (`msjax.rewards.official`) are listed in docs/rewards.md.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation

import numpy as np

from msjax.rewards.normalize import strings_equivalent
from msjax.rewards.official import (
    MANAGERS,
    THINK_END,
    THINK_START,
    check_text,
    gold_answer,
    math_verify_equal,
    official_prediction,
    reward_value,
)
from msjax.rewards.pool import TimeoutPool

REWARDS = ("math", "official")
# Official items this long (prediction + gold) skip the in-process string tests (their regexes
# are slow on long texts): the whole comparison runs in a worker, under its timeout.
_FAST_CHARS = 1000

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_SPACE_CMDS = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "$", " ", "\n", "\t")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox)\{([^{}]*)\}")
_WORD_RE = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")
_CHOICE_RE = re.compile(r"\(([A-Za-z])\)")
_SEPARATOR_RE = re.compile(
    r"(?:\s|[,;&$]|and|or|\\(?:quad|qquad|text\{\s*(?:and|or)?\s*\}|[,;:! ]|\\))*"
)
_THOUSANDS_RE = re.compile(r"\d,\d{3}(?!\d)")


def _box_at(text: str, i: int) -> tuple[str, int] | None:
    """(content, end index) of the box whose command ends at `i`: `{...}` with nested braces
    (`\\{` `\\}` don't count) or a `\\boxed 5`-style token; None when it never closes."""
    j = i
    while j < len(text) and text[j] == " ":
        j += 1
    if j >= len(text):
        return None
    if text[j] != "{":
        m = re.match(r"[^\s$]+", text[j:])
        return (m.group(0), j + m.end()) if m and i < j else None
    depth, start = 0, j + 1
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:j].strip(), j + 1
        j += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the LAST `\\boxed{...}` / `\\fbox{...}` (nested braces; `\\{` `\\}` don't count),
    or of a `\\boxed 5`-style box; None when there is no box or the last one never closes."""
    matches = list(_BOX_RE.finditer(text))
    box = _box_at(text, matches[-1].end()) if matches else None
    return box[0] if box else None


def final_boxes(text: str) -> list[str]:
    """Contents of the last run of boxes that only separators (spaces, ",", ";", "&", "$",
    "and", "or", `\\quad`, `\\text{ and }`, ...) join; [] when the last box is missing or
    never closes. "\\boxed{3}, wait: \\boxed{4}" -> ["4"];
    "\\boxed{2}, \\boxed{3}" -> ["2", "3"]."""
    run: list[tuple[int, int, str]] = []  # (start, end, content), text order
    for m in reversed(list(_BOX_RE.finditer(text))):
        box = _box_at(text, m.end())
        if box is None:
            break
        if run and not (box[1] <= run[0][0] and _SEPARATOR_RE.fullmatch(text[box[1] : run[0][0]])):
            break
        run.insert(0, (m.start(), box[1], box[0]))
    return [content for *_, content in run]


def answer_items(answer: str) -> list[str]:
    """`answer` split at commas outside brackets; a comma between a digit and exactly three
    digits is a thousands separator ("1,000"), not a split. Empty items are dropped."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(answer):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0 and not _THOUSANDS_RE.match(answer, i - 1 if i else 0):
            items.append(answer[start:i])
            start = i + 1
    items.append(answer[start:])
    return [s.strip() for s in items if s.strip()]


def answer_span(response: str, prompt: str = "") -> str | None:
    """The text holding the final answer (see the module docstring), or None."""
    if THINK_END in response:
        return response.rsplit(THINK_END, 1)[1]
    if THINK_START in prompt or THINK_START in response:
        return None
    return response


def final_answer_items(response: str, prompt: str = "") -> list[str]:
    """The items of the response's final answer ([] without one)."""
    span = answer_span(response, prompt)
    boxes = final_boxes(span) if span is not None else []
    return [item for box in boxes for item in answer_items(box)]


def gold_items(gold: str) -> list[str]:
    """The items of a gold answer: of each of its boxes when it has any, else of the whole."""
    boxes = [b for m in _BOX_RE.finditer(gold) if (b := _box_at(gold, m.end())) is not None]
    parts = [content for content, _ in boxes] if boxes else [gold]
    return [item for part in parts for item in answer_items(part)] or [gold.strip()]


def _perfect_pairing(ok: list[list[bool]]) -> bool:
    """Whether each row can take a distinct column where ok[row][column] (augmenting paths)."""
    owner = [-1] * len(ok)

    def take(row: int, seen: list[bool]) -> bool:
        for col, good in enumerate(ok[row]):
            if good and not seen[col]:
                seen[col] = True
                if owner[col] < 0 or take(owner[col], seen):
                    owner[col] = row
                    return True
        return False

    return all(take(row, [False] * len(ok)) for row in range(len(ok)))


def grade_items(
    pred: Sequence[str], gold: Sequence[str], match: Callable[[str, str], bool | None]
) -> bool | None:
    """Whether answer items `pred` equal gold items `gold` (module docstring), with
    `match(p, g) -> True / False / None (undecided)`; None when undecided pairs decide."""
    if not pred:
        return False
    if len(pred) == 1 or len(gold) == 1:
        return match(", ".join(pred), ", ".join(gold))
    if len(pred) != len(gold):
        return False
    table = [[match(p, g) for g in gold] for p in pred]
    if _perfect_pairing([[v is True for v in row] for row in table]):
        return True
    if not _perfect_pairing([[v is not False for v in row] for row in table]):
        return False
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


def math_reward(response: str, gold: str, *, prompt: str = "") -> float:
    """1.0 when the final answer of `response` (after `prompt`, which tells whether a think span
    was opened) equals `gold`, else 0.0. Runs in this process: use `MathVerifier` for untrusted
    batches."""
    pred = final_answer_items(response, prompt)
    return float(bool(grade_items(pred, gold_items(gold), answers_match)))


def _warm_up() -> None:
    _math_verify("1/2", "0.5", 5)


def _grade_in_worker(reward: str, pred, gold, timeout_s: int | None, compare=None) -> bool:
    """A pool item: the whole comparison, math-verify included. pred, gold: the official
    prediction and gold strings, or the math answer and gold items. `compare(pred, gold,
    timeout_s)` replaces math-verify (tests)."""
    if reward == "official":
        verify = compare or (lambda p, g, t: math_verify_equal(p, g))
        return strings_equivalent(pred, gold) or bool(verify(pred, gold, timeout_s))
    verify = compare or _math_verify

    def match(p: str, g: str) -> bool:
        decided = fast_match(p, g)
        return decided if decided is not None else bool(verify(p, g, timeout_s))

    return bool(grade_items(pred, gold, match))


class MathVerifier:
    """Batched outcome rewards with math-verify in worker processes and a per-item timeout.

    reward: "math" (`math_reward`: 1 / 0) or "official" (`official_reward` with `manager`:
    1 / 0.1 / 0). Extraction and the fast string tests run here; only undecided items go to the
    `num_workers` worker processes (started on first need). An item that takes longer than
    `timeout_s` is wrong, its worker is killed and replaced. Counters in `stats`: items, fast
    (decided without math-verify), verified, timeouts, errors, replaced. `compare_fn(pred, gold,
    timeout_s) -> bool`, a picklable module-level function, replaces math-verify (tests).
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        *,
        reward: str = "math",
        manager: str = "naive",
        math_verify_timeout_s: int | None = 5,
        compare_fn=None,
        start_method: str = "spawn",
    ):
        if reward not in REWARDS:
            raise ValueError(f"unknown reward {reward!r}; use one of {REWARDS}")
        if manager not in MANAGERS:
            raise ValueError(f"unknown reward manager {manager!r}; use one of {MANAGERS}")
        self.reward, self.manager = reward, manager
        self.math_verify_timeout_s = math_verify_timeout_s
        self._pool = TimeoutPool(
            functools.partial(_grade_in_worker, compare=compare_fn),
            num_workers,
            timeout_s,
            initializer=None if compare_fn else _warm_up,
            start_method=start_method,
        )
        self.stats = {"items": 0, "fast": 0, "verified": 0}

    def _prepare(self, response: str, gold: str, prompt: str) -> tuple[bool | None, tuple | None]:
        """(decided correctness or None, the pool item's arguments); arguments None when the
        response has no answer at all (the official reward is then 0, never 0.1)."""
        if self.reward == "official":
            pred = official_prediction(prompt + response, self.manager)
            if pred is None:
                return False, None
            if len(pred) + len(gold) <= _FAST_CHARS and strings_equivalent(pred, gold):
                return True, ()
            return None, ("official", pred, gold, self.math_verify_timeout_s)
        pred, golds = final_answer_items(response, prompt), gold_items(gold)
        decided = grade_items(pred, golds, fast_match)
        return decided, ("math", pred, golds, self.math_verify_timeout_s)

    def verify_batch(
        self,
        responses: Sequence[str],
        golds: Sequence[str],
        prompts: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Rewards f32[batch] of `responses` against `golds` (strings or numbers); `prompts`
        (optional, one per response) come before them: "math" reads whether they open a think
        span, "official" grades prompt + response. TypeError naming the row for a non-str text
        or a gold of another type, before anything is graded."""
        return np.asarray(self.rewards(responses, golds, prompts), np.float32)

    def rewards(
        self,
        responses: Sequence[str],
        golds: Sequence[str],
        prompts: Sequence[str] | None = None,
    ) -> list[float]:
        """`verify_batch` as a list of Python floats (the official 0.1 exactly)."""
        n = len(responses)
        if len(golds) != n:
            raise ValueError(f"{n} responses but {len(golds)} gold answers")
        prompts = [""] * n if prompts is None else list(prompts)
        if len(prompts) != n:
            raise ValueError(f"{n} responses but {len(prompts)} prompts")
        rows = []
        for i, (r, g, p) in enumerate(zip(responses, golds, prompts, strict=True)):
            try:
                rows.append((check_text(r), gold_answer(g), check_text(p)))
            except TypeError as e:
                raise TypeError(f"row {i}: {e}") from None
        correct, answered = np.zeros(n, bool), np.ones(n, bool)
        todo: list[tuple[int, tuple]] = []
        for i, (r, g, p) in enumerate(rows):
            decided, args = self._prepare(r, g, p)
            answered[i] = args is not None
            if decided is None:
                todo.append((i, args))
            else:
                correct[i] = decided
        outcomes = self._pool.map([args for _, args in todo]) if todo else []
        for (i, _), out in zip(todo, outcomes, strict=True):
            correct[i] = out.status == "ok" and bool(out.value)
        self.stats["items"] += n
        self.stats["fast"] += n - len(todo)
        self.stats["verified"] += len(todo)
        if self.reward == "math":
            return [float(c) for c in correct]
        texts = [p + r for r, _, p in rows]
        return [reward_value(t, c) if a else 0.0 for t, c, a in zip(texts, correct, answered)]

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
