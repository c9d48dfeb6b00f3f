"""The synthetic step task: multi-step arithmetic chains, gold and deliberately flawed solutions.

A problem is a chain of operations on a running value:

    problem:  "Start with 7. Add 5. Multiply by 3. Subtract 4."
    solution: "7 + 5 = 12.\\n\\n12 * 3 = 36.\\n\\n36 - 4 = 32.\\n\\n</think>\\n\\n"
              "The answer is \\\\boxed{32}."

The solution is the response that follows a prompt ending in `<think>\\n` (see msjax.tokenizer
templates): one step per operation, each ending with the step delimiter ".\\n\\n", then `</think>`
and the boxed answer. Gold running values stay in [0, max_value] so that a tiny model can learn the
task; operands are >= 1 (>= 2 for "*"), so an error in any step changes every later value and the
final answer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

OPS = "+-*"
_OP_TEXT = {"+": "Add {}.", "-": "Subtract {}.", "*": "Multiply by {}."}
_PROBLEM_RE = re.compile(r"Start with (\d+)\.((?:\s+(?:Add|Subtract|Multiply by) \d+\.)+)\s*")
_OP_RE = re.compile(r"(Add|Subtract|Multiply by) (\d+)\.")
_WORD_OP = {"Add": "+", "Subtract": "-", "Multiply by": "*"}
ERROR_KINDS = ("arithmetic", "operand", "copy")


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """How hard the generated problems are.

    Attributes:
      min_steps / max_steps: number of operations (inclusive range).
      max_start: the start value is drawn from [1, max_start].
      max_operand: operands are drawn from [1, max_operand] ([2, max_operand] for "*").
      max_value: every gold running value stays in [0, max_value].
      ops: the allowed operators, a subset of "+-*".
    """

    min_steps: int = 2
    max_steps: int = 4
    max_start: int = 20
    max_operand: int = 9
    max_value: int = 99
    ops: str = OPS

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self}")
        if not 1 <= self.max_start <= self.max_value:
            raise ValueError(f"need 1 <= max_start <= max_value, got {self}")
        if self.max_operand < 2:
            raise ValueError(f"max_operand must be >= 2, got {self.max_operand}")
        if not self.ops or set(self.ops) - set(OPS) or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops {self.ops!r} must be distinct characters from {OPS!r}")
        if "+" not in self.ops and "-" not in self.ops:
            raise ValueError(f"ops {self.ops!r} needs '+' or '-' so that every value can continue")


@dataclasses.dataclass(frozen=True)
class Problem:
    """A parsed problem: the start value and the (operator, operand) chain."""

    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def values(self) -> tuple[int, ...]:
        """The gold running value after each operation."""
        out, v = [], self.start
        for op, b in self.ops:
            v = apply_op(v, op, b)
            out.append(v)
        return tuple(out)

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def text(self) -> str:
        return " ".join(
            [f"Start with {self.start}."] + [_OP_TEXT[op].format(b) for op, b in self.ops]
        )


@dataclasses.dataclass(frozen=True)
class Example:
    """One generated example: problem text, gold answer, gold solution (response), step count."""

    problem: str
    answer: str
    solution: str
    num_steps: int


@dataclasses.dataclass(frozen=True)
class FlawedSolution:
    """A solution with an error injected at `error_step` (0-based) and its true step labels."""

    text: str
    answer: str
    error_step: int
    kind: str
    locally_correct: tuple[bool, ...]
    on_track: tuple[bool, ...]


def apply_op(a: int, op: str, b: int) -> int:
    """a op b for op in "+-*"."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operator {op!r}; known: {OPS!r}")


def parse_problem(text: str) -> Problem:
    """Problem text -> Problem; ValueError naming the text when it is not in the task's format."""
    m = _PROBLEM_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(
            f"not a synthetic-step problem: {text!r}; expected 'Start with N. Add N. "
            "Subtract N. Multiply by N.' (any chain of those)"
        )
    ops = tuple((_WORD_OP[w], int(b)) for w, b in _OP_RE.findall(m.group(2)))
    return Problem(int(m.group(1)), ops)


def format_step(a: int, op: str, b: int, c: int) -> str:
    """One step's text without its delimiter: "a op b = c"."""
    return f"{a} {op} {b} = {c}"


def format_solution(steps: Sequence[str], answer: int | str) -> str:
    """Steps (without delimiters) -> the full response text after the prompt's `<think>\\n`."""
    body = "".join(f"{s}.\n\n" for s in steps)
    return f"{body}</think>\n\nThe answer is \\boxed{{{answer}}}."


def gold_solution(problem: Problem) -> str:
    """The gold response of `problem`."""
    steps, a = [], problem.start
    for (op, b), c in zip(problem.ops, problem.values, strict=True):
        steps.append(format_step(a, op, b, c))
        a = c
    return format_solution(steps, problem.answer)


def sample_problem(
    rng: np.random.Generator, difficulty: Difficulty, max_tries: int = 100
) -> Problem:
    """Draws a problem whose gold running values stay in [0, max_value] (a chain that gets stuck,
    e.g. at max_value with only "+" and "*" allowed, is drawn again)."""
    d = difficulty
    for _ in range(max_tries):
        n = int(rng.integers(d.min_steps, d.max_steps + 1))
        v = start = int(rng.integers(1, d.max_start + 1))
        ops = []
        for _ in range(n):
            # Operand range [lo, hi] that keeps the value in [0, max_value], per operator.
            ranges = {
                "+": (1, min(d.max_operand, d.max_value - v)),
                "-": (1, min(d.max_operand, v)),
                "*": (2, min(d.max_operand, d.max_value // v) if v > 0 else 0),
            }
            feasible = [op for op in d.ops if ranges[op][0] <= ranges[op][1]]
            if not feasible:
                break
            op = feasible[int(rng.integers(len(feasible)))]
            lo, hi = ranges[op]
            b = int(rng.integers(lo, hi + 1))
            v = apply_op(v, op, b)
            ops.append((op, b))
        if len(ops) == n:
            return Problem(start, tuple(ops))
    raise ValueError(f"{d} keeps getting stuck (no operator fits); allow '-' or raise max_value")


def make_example(problem: Problem) -> Example:
    """Problem -> Example with its gold solution."""
    return Example(problem.text, str(problem.answer), gold_solution(problem), len(problem.ops))


def generate_examples(
    num: int,
    difficulty: Difficulty,
    rng: np.random.Generator,
    exclude: set[str] | None = None,
    max_tries_per_example: int = 200,
) -> list[Example]:
    """`num` distinct examples whose problem texts are not in `exclude`."""
    seen = set(exclude or ())
    out: list[Example] = []
    tries = 0
    while len(out) < num:
        p = sample_problem(rng, difficulty)
        tries += 1
        if tries > max_tries_per_example * max(num, 1):
            raise ValueError(
                f"could only draw {len(out)} distinct problems of {num} with {difficulty}; "
                "ask for fewer examples or a harder difficulty (more steps, larger operands)"
            )
        if p.text in seen:
            continue
        seen.add(p.text)
        out.append(make_example(p))
    return out


def _wrong_value(rng: np.random.Generator, right: int, lo: int = 0) -> int:
    """A nearby value != right and >= lo."""
    while True:
        delta = int(rng.integers(1, 4)) * (1 if rng.random() < 0.5 else -1)
        if right + delta >= lo:
            return right + delta


def flawed_solution(
    problem: Problem,
    error_step: int,
    kind: str,
    rng: np.random.Generator,
) -> FlawedSolution:
    """The gold solution with one error at `error_step` (0-based), continued consistently.

    kinds: "arithmetic" (a op b = wrong c), "operand" (uses a wrong operand: a op b' = c, with
    correct arithmetic), "copy" (starts from a miscopied value: a' op b = c). Later steps continue
    from the wrong value with correct arithmetic. True labels (see msjax.data.step_labels): steps
    before the error are locally correct and on track; the error step is neither; later steps are
    locally correct but off track.
    """
    n = len(problem.ops)
    if not 0 <= error_step < n:
        raise ValueError(f"error_step {error_step} outside [0, {n}) for {problem.text!r}")
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}; known: {ERROR_KINDS}")
    steps, a = [], problem.start
    for i, (op, b) in enumerate(problem.ops):
        if i == error_step:
            if kind == "arithmetic":
                c = _wrong_value(rng, apply_op(a, op, b))
            elif kind == "operand":
                b = _wrong_value(rng, b, lo=2 if op == "*" else 1)
                c = apply_op(a, op, b)
            else:
                a = _wrong_value(rng, a)
                c = apply_op(a, op, b)
        else:
            c = apply_op(a, op, b)
        steps.append(format_step(a, op, b, c))
        a = c
    flags = [i != error_step for i in range(n)]
    return FlawedSolution(
        text=format_solution(steps, a),
        answer=str(a),
        error_step=error_step,
        kind=kind,
        locally_correct=tuple(flags),
        on_track=tuple(i < error_step for i in range(n)),
    )


class MixedSolutions:
    """SFT response function: the gold solution, or with probability `flawed_fraction` a flawed
    one (error step and kind drawn uniformly). Call as `fn(record, rng) -> str`, where record has
    a "problem" (str or UTF-8 bytes)."""

    def __init__(self, flawed_fraction: float = 0.3, kinds: Sequence[str] = ERROR_KINDS):
        if not 0.0 <= flawed_fraction <= 1.0:
            raise ValueError(f"flawed_fraction must be in [0, 1], got {flawed_fraction}")
        bad = set(kinds) - set(ERROR_KINDS)
        if not kinds or bad:
            raise ValueError(f"kinds {list(kinds)} must be a non-empty subset of {ERROR_KINDS}")
        self.flawed_fraction = flawed_fraction
        self.kinds = tuple(kinds)

    def __call__(self, record: dict, rng: np.random.Generator) -> str:
        text = record["problem"]
        problem = parse_problem(text.decode("utf-8") if isinstance(text, bytes) else text)
        if rng.random() >= self.flawed_fraction:
            return gold_solution(problem)
        k = int(rng.integers(len(problem.ops)))
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        return flawed_solution(problem, k, kind, rng).text
