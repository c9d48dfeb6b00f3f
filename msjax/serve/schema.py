"""The HTTP request bodies of `msjax-serve`, parsed and checked by hand so that every bad input
gets an `ApiError` (HTTP 4xx, JSON `{"error": ...}`) that names the field and the fix.

Field names, defaults and meanings are the original servers' (REFERENCE section 5); the msjax
extensions are `return_scores`, `mode` and `repetition_penalty` on /generate. Unknown fields are
ignored, as the original's pydantic models do.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from msjax.generate.tts import MODES

MAX_SEED = 2**64 - 1


class ApiError(Exception):
    """A request the server refuses: `status` (HTTP code) and `message` (names the field)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """A checked /generate body. temperature 0 = greedy; seed None = a random seed; mode None or
    "low" | "medium" | "high" (then response_num is 2 / 8 / 32); repetition_penalty None = the
    server's (--repetition_penalty, the original's 1.05)."""

    prefix_prompt: str
    max_tokens: int = 1024
    response_num: int = 8
    stop: tuple[str, ...] = ()
    temperature: float = 0.8
    seed: int | None = None
    return_scores: bool = False
    mode: str | None = None
    repetition_penalty: float | None = None


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
    """A checked /score body."""

    text: str
    return_all_scores: bool = False


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        msg = f"the request body is not valid UTF-8 (byte {e.start}); send UTF-8 JSON."
        raise ApiError(msg) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(
            f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})."
        ) from None
    if not isinstance(data, dict):
        raise ApiError(f"the request body must be a JSON object, found {type(data).__name__}.")
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _int(data: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int:
    v = data.get(name, default)
    if not _is_int(v):
        raise ApiError(f"'{name}' must be an integer, got {json.dumps(v)}.")
    if v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ApiError(f"'{name}' must be {bound}, got {v}.")
    return v


def _bool(data: dict, name: str) -> bool:
    v = data.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(f"'{name}' must be true or false, got {json.dumps(v)}.")
    return v


def _text(data: dict, name: str) -> str:
    if name not in data:
        raise ApiError(f"'{name}' is required (a string).")
    v = data[name]
    if not isinstance(v, str):
        raise ApiError(f"'{name}' must be a string, got {type(v).__name__}.")
    return v


def parse_generate(body: bytes, max_response_num: int) -> GenerateRequest:
    """The /generate body: {prefix_prompt, max_tokens=1024, response_num=8, stop=null,
    temperature=0.8, seed=null, return_scores=false, mode=null}."""
    data = _json_object(body)
    prompt = _text(data, "prefix_prompt")
    if not prompt:
        raise ApiError("'prefix_prompt' is empty; send the chat-rendered prompt text.")
    mode = data.get("mode")
    if mode is not None and mode not in MODES:
        raise ApiError(f"'mode' must be one of {sorted(MODES)} or null, got {json.dumps(mode)}.")
    if mode is not None:
        given = data.get("response_num")
        if given is not None and given != MODES[mode]:
            raise ApiError(
                f"'response_num' {json.dumps(given)} contradicts 'mode' {mode!r} "
                f"({MODES[mode]} responses); send one of them."
            )
        if MODES[mode] > max_response_num:
            raise ApiError(
                f"'mode' {mode!r} needs {MODES[mode]} responses, above this server's limit of "
                f"{max_response_num} (--max_response_num)."
            )
        n = MODES[mode]
    else:
        n = _int(data, "response_num", 8, 1, max_response_num)
    stop = data.get("stop")
    if stop is None:
        stop = []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(
            f"'stop' must be null or a list of non-empty strings, got {json.dumps(stop)}."
        )
    temperature = data.get("temperature", 0.8)
    if temperature is None:
        temperature = 0.8
    if not _is_number(temperature) or temperature < 0:
        raise ApiError(
            f"'temperature' must be a number >= 0 (0 = greedy), got {json.dumps(temperature)}."
        )
    penalty = data.get("repetition_penalty")
    if penalty is not None and (not _is_number(penalty) or penalty <= 0):
        raise ApiError(
            f"'repetition_penalty' must be a number > 0 (1 = off), got {json.dumps(penalty)}."
        )
    seed = data.get("seed")
    if seed is not None:
        seed = _int(data, "seed", None, 0, MAX_SEED)
    return GenerateRequest(
        prefix_prompt=prompt,
        max_tokens=_int(data, "max_tokens", 1024, 1),
        response_num=n,
        stop=tuple(stop),
        temperature=float(temperature),
        seed=seed,
        return_scores=_bool(data, "return_scores"),
        mode=mode,
        repetition_penalty=None if penalty is None else float(penalty),
    )


def parse_score(body: bytes) -> ScoreRequest:
    """The /score body: {text, return_all_scores=false}."""
    data = _json_object(body)
    all_scores = _bool(data, "return_all_scores")
    return ScoreRequest(text=_text(data, "text"), return_all_scores=all_scores)
