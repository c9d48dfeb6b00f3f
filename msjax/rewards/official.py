"""The original work's outcome reward (REFERENCE 4), restated exactly: `official_reward`.

`text` is what the original's reward manager hands to its reward function:
  "naive" (the 1.5B / 7B recipes): the decoded prompt + response, special tokens kept;
  "prime" (the 32B recipe): the decoded response alone, special tokens skipped.
The rule:
  1. The response is the text after the first assistant header ("Assistant:", else
     "<|im_start|>assistant", else "<｜Assistant｜>"). No header: 0 ("naive"), or the whole text
     ("prime").
  2. "naive" only: the response must hold exactly one `<think>` and one `</think>`, `<think>`
     first; else 0.
  3. The tail is the text after the LAST `</think>`, leading whitespace stripped and then every
     trailing character that occurs in "<｜end▁of▁sentence｜>" (a character set, as Python's
     `rstrip`: "5 cents" loses "cents"). No `</think>`, or an empty tail: 0.
  4. The prediction is the content of the last `\\boxed{...}` of the tail (outer double braces
     stripped); with no such box (or an empty one), the whole tail.
  5. Correct (`msjax.rewards.normalize.strings_equivalent`, then math-verify's
     `verify(parse(prediction), parse(gold))`) -> 1.0. Wrong: 0.1 when `text` lacks the EOS
     literal "<｜end▁of▁sentence｜>", else 0.0 (the trainer turns 0.1 into 0).
Some inputs make step 5 run for minutes (the original's regexes are quadratic on e.g. 100k
"oxed{"; sympy on huge expressions), so `official_reward` runs it in a worker process under a
timeout, as `MathVerifier` does for batches; an answer that runs out of time is wrong.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing as mp
import numbers
import re
import threading

from msjax.rewards.normalize import strings_equivalent

MANAGERS = ("naive", "prime")
HEADERS = ("Assistant:", "<|im_start|>assistant", "<｜Assistant｜>")
EOS_LITERAL = "<｜end▁of▁sentence｜>"
THINK_START, THINK_END = "<think>", "</think>"
UNFINISHED_REWARD = 0.1
DEFAULT_TIMEOUT_S = 10.0
_DOUBLE_BRACES_RE = re.compile(r"^\{(.*)\}$")


def _check_manager(manager: str) -> None:
    if manager not in MANAGERS:
        raise ValueError(f"unknown reward manager {manager!r}; use one of {MANAGERS}")


def response_part(text: str, manager: str = "naive") -> str | None:
    """Step 1: the text after the assistant header, or None (no header, "naive")."""
    _check_manager(manager)
    for header in HEADERS:
        if header in text:
            return text.split(header, 1)[1]
    return text if manager == "prime" else None


def think_format_ok(response: str) -> bool:
    """Step 2: exactly one `<think>` and one `</think>`, in that order."""
    return (
        response.count(THINK_START) == 1
        and response.count(THINK_END) == 1
        and response.find(THINK_START) < response.find(THINK_END)
    )


def answer_tail(response: str) -> str | None:
    """Step 3: the stripped text after the last `</think>`, or None without one."""
    if THINK_END not in response:
        return None
    return response.rsplit(THINK_END, 1)[1].lstrip().rstrip(EOS_LITERAL)


def last_box(tail: str) -> str | None:
    """Step 4's box: the content of the last `\\boxed{...}` (braces counted from the box on,
    escaped or not; a `\\boxed` not directly followed by "{", or an `\\fbox`, gives None), with
    one pair of outer braces stripped; None when the box never closes."""
    start = tail.rfind("\\boxed")
    if start < 0:
        start = tail.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for end in range(start, len(tail)):
        if tail[end] == "{":
            depth += 1
        elif tail[end] == "}":
            depth -= 1
            if depth == 0:
                break
    else:
        return None
    box = tail[start : end + 1]
    if not box.startswith("\\boxed{"):
        return None
    inner = box[len("\\boxed{") : -1]
    if m := _DOUBLE_BRACES_RE.match(inner):
        inner = m.group(1)
    return inner


def official_prediction(text: str, manager: str = "naive") -> str | None:
    """Steps 1-4: the string compared with the gold answer, or None when the reward is 0
    whatever the answer (no header, bad think format, no `</think>`, nothing after it)."""
    response = response_part(text, manager)
    if response is None or (manager == "naive" and not think_format_ok(response)):
        return None
    tail = answer_tail(response)
    if not tail:
        return None
    return last_box(tail) or tail


def math_verify_equal(pred: str, gold: str) -> bool:
    """Step 5's last test: math-verify's `verify(parse(pred), parse(gold))` with its default
    settings (its 5 s timeouts use signal.alarm, so they apply in the main thread only)."""
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return bool(
        verify(
            parse(pred, parsing_timeout=timeout),
            parse(gold, parsing_timeout=timeout),
            timeout_seconds=timeout,
        )
    )


def official_equal(pred: str, gold: str) -> bool:
    """Step 5: the string tests, then math-verify."""
    return strings_equivalent(pred, gold) or math_verify_equal(pred, gold)


def reward_value(text: str, correct: bool) -> float:
    """Step 5's value: 1.0, else 0.1 without the EOS literal, else 0.0."""
    if correct:
        return 1.0
    return UNFINISHED_REWARD if EOS_LITERAL not in text else 0.0


def gold_answer(gold) -> str:
    """The gold answer as a string: a str as is, a number as `str(number)`; TypeError else."""
    if isinstance(gold, str):
        return gold
    if isinstance(gold, numbers.Number) and not isinstance(gold, bool):
        return str(gold)
    hint = " (a verl ground_truth: pass its 'target')" if isinstance(gold, dict) else ""
    raise TypeError(
        f"the gold answer must be a string or a number, got {type(gold).__name__}{hint}"
    )


def check_text(text) -> str:
    """`text` itself; TypeError unless it is a str."""
    if not isinstance(text, str):
        raise TypeError(f"the graded text must be a decoded str, got {type(text).__name__}")
    return text


def _reward_here(text: str, gold: str, manager: str) -> float:
    """`official_reward` in this process, with no timeout but math-verify's own (5 s alarms,
    main thread only): for processes that cannot start workers."""
    pred = official_prediction(text, manager)
    return 0.0 if pred is None else reward_value(text, official_equal(pred, gold))


_lock = threading.Lock()


@functools.cache
def _shared_verifier(manager: str, timeout_s: float):
    from msjax.rewards.math import MathVerifier  # msjax.rewards.math builds on this module

    verifier = MathVerifier(1, timeout_s, reward="official", manager=manager)
    atexit.register(verifier.close)
    return verifier


def official_reward(
    text: str, gold: str | float, *, manager: str = "naive", timeout_s: float = DEFAULT_TIMEOUT_S
) -> float:
    """The original's reward of `text` (see the module docstring) against `gold` (a string, or
    a number). Extraction and short string tests run here; the rest runs in one worker process
    per (manager, timeout_s), started on first need and shared by the threads of this process,
    and counts as wrong after `timeout_s` seconds. A daemonic process (a `multiprocessing.Pool`
    worker) cannot start one and grades here, under math-verify's own timeouts only.
    Batches: `MathVerifier`."""
    _check_manager(manager)
    text, gold = check_text(text), gold_answer(gold)
    if mp.current_process().daemon:
        return _reward_here(text, gold, manager)
    with _lock:
        return _shared_verifier(manager, float(timeout_s)).rewards([text], [gold])[0]
