"""Batch test-time-scaling inference over a JSONL file (the library behind `msjax-infer`).

Input rows: {"prompt": str} used verbatim, or {"problem": str} rendered with the prompt
template (`msjax.tokenizer.render_prompt`); optional "answer" (the gold final answer).
Output: one row per non-blank input line, in order:
    {"line", "response", "score", "answer", "correct", "candidates": [{"response", "tokens",
     "score", "step_scores", "step_positions", "finish_reason", "answer", "correct"}]}
"answer" is the chosen response's last \\boxed{} content; "correct" is null without a gold
answer. A row that cannot be run (malformed JSON, no prompt, empty prompt, prompt too long for
the model) gives nulls and an "error" naming the line, and is counted as skipped. The output is
written to a temporary file next to OUTPUT and renamed when complete.

Sample j of the prompt on input line l is drawn with id (l * k + j), so results do not depend on
--batch_size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import jax

from msjax.generate.config import SamplerConfig
from msjax.generate.engine import EngineSampler
from msjax.generate.pruning import PruneRule
from msjax.generate.tts import (
    SELECTIONS,
    Choice,
    bon_at_k,
    generate_and_select,
    maj_at_k,
    pass_at_1,
    random_at_k,
    token_stats,
    weighted_at_k,
)

log = logging.getLogger(__name__)

_NULL_ROW = {"response": None, "score": None, "answer": None, "correct": None, "candidates": []}


@dataclasses.dataclass(frozen=True)
class InferOptions:
    """Decoding and selection settings of a JSONL run.

    k: candidates per prompt; temperature (0 = greedy), top_p, top_k (0 = off);
    max_new_tokens; seed; prune: optional PruneRule; batch_size: prompts per sampler call;
    template: prompt template for "problem" rows ("r1" or "plain"); selection: "bon",
    "majority" or "weighted".
    """

    k: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 1024
    seed: int = 0
    prune: PruneRule | None = None
    batch_size: int = 8
    template: str = "r1"
    selection: str = "bon"

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k={self.k!r} candidates per prompt must be an int >= 1.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} must be an int >= 1.")
        SamplerConfig(  # validates the decoding settings before any model is loaded
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            score_steps=False,
        )
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection!r}; choose one of {SELECTIONS}.")
        from msjax.tokenizer import TEMPLATES

        if self.template not in TEMPLATES:
            raise ValueError(f"template={self.template!r}; choose one of {sorted(TEMPLATES)}.")


def parse_row(line: str, template: str) -> tuple[str, str | None]:
    """(prompt text, gold answer or None) of one JSONL row; ValueError naming the problem."""
    from msjax.tokenizer import render_prompt

    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from e
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, found {type(row).__name__}")
    answer = row.get("answer")
    if answer is not None:
        if isinstance(answer, int | float) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            raise ValueError("'answer' must be a string or a number")
    if "prompt" in row:
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            raise ValueError("'prompt' must be a string")
    elif "problem" in row:
        if not isinstance(row["problem"], str):
            raise ValueError("'problem' must be a string")
        if not row["problem"].strip():
            raise ValueError("'problem' is empty")
        prompt = render_prompt(row["problem"], template)
    else:
        raise ValueError("a row needs 'prompt' or 'problem'")
    if not prompt.strip():
        raise ValueError("'prompt' is empty")
    return prompt, answer


def prompt_buckets(max_prompt: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from `smallest` up to and including the first >= max_prompt."""
    out = [smallest]
    while out[-1] < max_prompt:
        out.append(out[-1] * 2)
    return tuple(out)


def build_sampler(model, cfg, tokenizer, options: InferOptions, mesh=None) -> EngineSampler:
    """The continuous engine, called like a Sampler, for `options` (EOS, pad, step and think ids
    from the tokenizer)."""
    limit = cfg.max_position_embeddings - options.max_new_tokens
    if limit < 1:
        raise ValueError(
            f"max_new_tokens={options.max_new_tokens} leaves no room for a prompt within the "
            f"model's {cfg.max_position_embeddings} positions; lower it."
        )
    config = SamplerConfig.from_tokenizer(
        tokenizer,
        max_new_tokens=options.max_new_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        prompt_buckets=prompt_buckets(limit, min(64, limit)),
        prune=options.prune,
    )
    return EngineSampler(model, cfg, config, mesh=mesh)


def _candidate_row(c, correct: bool | None) -> dict[str, Any]:
    return {
        "response": c.response,
        "tokens": c.tokens,
        "score": c.score,
        "step_scores": c.step_scores,
        "step_positions": c.step_positions,
        "finish_reason": c.finish_reason,
        "answer": c.answer,
        "correct": correct,
    }


def _grade(choices: list[Choice], golds: list[str | None], verifier) -> list[list | None]:
    """Per prompt: correctness of each candidate (None for a pruned one), or None without gold."""
    todo = [
        (p, i)
        for p, (ch, g) in enumerate(zip(choices, golds, strict=True))
        if g is not None
        for i, c in enumerate(ch.candidates)
        if not c.pruned
    ]
    rewards = []
    if todo:
        responses = [choices[p].candidates[i].response for p, i in todo]
        rewards = verifier.verify_batch(responses, [golds[p] for p, _ in todo])
    out: list[list | None] = [
        None if g is None else [None] * len(ch.candidates)
        for ch, g in zip(choices, golds, strict=True)
    ]
    for (p, i), r in zip(todo, rewards, strict=True):
        out[p][i] = bool(r > 0.5)
    return out


def infer_file(
    model,
    cfg,
    tokenizer,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    options: InferOptions,
    *,
    mesh=None,
    progress: bool = True,
    verifier=None,
) -> dict[str, Any]:
    """Runs test-time scaling over a JSONL file (see the module docstring).

    Args:
      model: a ReflectiveModel (its current state is used); cfg: its ModelConfig.
      tokenizer: an msjax.tokenizer.Tokenizer. options: InferOptions. mesh: optional mesh the
        model is sharded on.
      progress: show a tqdm bar. verifier: an object with verify_batch(responses, golds) ->
        rewards; default: a msjax.rewards.math.MathVerifier, started only if answers exist.
    Returns a summary dict: rows, run, skipped, tokens_generated, pruned, tokens_saved_max,
    and with gold answers: graded, pass@1, maj@k, bon@k, weighted@k, random@k, computed over
    the candidates that were not pruned.
    """
    from flax import nnx
    from tqdm import tqdm

    from msjax.rewards.math import MathVerifier

    sampler = build_sampler(model, cfg, tokenizer, options, mesh)
    rows = _read_rows(input_path, tokenizer, options, cfg)
    todo = [r for r in rows if "error" not in r]
    own_verifier = None
    if verifier is None and any(r["gold"] is not None for r in todo):
        verifier = own_verifier = MathVerifier()
    graded: dict[str, list] = {"correct": [], "scores": [], "answers": []}
    totals = {"tokens_generated": 0, "pruned": 0, "tokens_saved_max": 0}

    def results():
        """Output rows of `todo`, in order, one chunk of batch_size prompts at a time."""
        params = nnx.state(model)
        key = jax.random.key(options.seed)
        spare = max(r["line"] for r in rows) + 1
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        with tqdm(total=len(todo), disable=not progress, unit="prompt") as bar:
            for start in range(0, len(todo), options.batch_size):
                chunk = todo[start : start + options.batch_size]
                # Pad the last chunk to batch_size (one compiled shape); padding is dropped.
                fill = options.batch_size - len(chunk)
                choices = generate_and_select(
                    sampler,
                    params,
                    [r["ids"] for r in chunk] + [chunk[0]["ids"]] * fill,
                    options.k,
                    key,
                    decode=decode,
                    method=options.selection,
                    prompt_ids=[r["line"] for r in chunk] + list(range(spare, spare + fill)),
                )[: len(chunk)]
                for name, value in token_stats(choices, options.max_new_tokens).items():
                    totals[name] += value
                flags = _grade(choices, [r["gold"] for r in chunk], verifier)
                for r, choice, fl in zip(chunk, choices, flags, strict=True):
                    if fl is not None:
                        keep = [i for i, c in enumerate(choice.candidates) if not c.pruned]
                        graded["correct"].append([fl[i] for i in keep])
                        graded["scores"].append([choice.candidates[i].score for i in keep])
                        graded["answers"].append([choice.candidates[i].answer for i in keep])
                    yield _output_row(r["line"], choice, fl)
                bar.update(len(chunk))

    output_path = Path(output_path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{output_path.name}.", suffix=".tmp", dir=output_path.parent
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as dst:
            ready = results()
            for r in rows:
                if "error" in r:
                    out = {"line": r["line"], **_NULL_ROW, "error": r["error"]}
                else:
                    out = next(ready)
                dst.write(json.dumps(out) + "\n")
        os.replace(tmp, output_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        if own_verifier is not None:
            own_verifier.close()
    summary: dict[str, Any] = {
        "rows": len(rows),
        "run": len(todo),
        "skipped": len(rows) - len(todo),
        "k": options.k,
        **totals,
    }
    if graded["correct"]:
        c, s, a = graded["correct"], graded["scores"], graded["answers"]
        summary.update(
            {
                "graded": len(c),
                "pass@1": pass_at_1(c),
                "maj@k": maj_at_k(c, a),
                "bon@k": bon_at_k(c, s),
                "weighted@k": weighted_at_k(c, a, s),
                "random@k": random_at_k(c),
            }
        )
    return summary


def _read_rows(input_path, tokenizer, options: InferOptions, cfg) -> list[dict[str, Any]]:
    """Every non-blank line as {"line", "ids", "gold"} or {"line", "error"} (logged)."""
    limit = cfg.max_position_embeddings - options.max_new_tokens
    rows = []
    with open(input_path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                text, gold = parse_row(line, options.template)
                ids = tokenizer.encode(text)
                if not ids:
                    raise ValueError("the prompt encodes to no tokens")
                if len(ids) > limit:
                    raise ValueError(
                        f"the prompt has {len(ids)} tokens; with max_new_tokens="
                        f"{options.max_new_tokens} that exceeds the model's limit of "
                        f"{cfg.max_position_embeddings} positions"
                    )
                rows.append({"line": n, "ids": ids, "gold": gold})
            except ValueError as e:
                log.warning("%s line %d skipped: %s", input_path, n, e)
                rows.append({"line": n, "error": f"line {n}: {e}"})
    return rows


def _output_row(line: int, choice: Choice, flags: list | None) -> dict[str, Any]:
    best = choice.best
    return {
        "line": line,
        "response": best.response,
        "score": best.score,
        "answer": best.answer,
        "correct": None if flags is None else flags[choice.chosen],
        "candidates": [
            _candidate_row(c, None if flags is None else flags[i])
            for i, c in enumerate(choice.candidates)
        ],
    }


def summary_table(summary: dict[str, Any]) -> str:
    """A small text table of a summary from `infer_file`."""
    lines = [
        f"rows {summary['rows']}  run {summary['run']}  skipped {summary['skipped']}  "
        f"k {summary['k']}",
        f"tokens generated {summary['tokens_generated']}  pruned candidates {summary['pruned']}  "
        f"(<= {summary['tokens_saved_max']} tokens saved)",
    ]
    if "graded" in summary:
        names = ["pass@1", "maj@k", "bon@k", "weighted@k", "random@k"]
        lines.append(f"graded {summary['graded']} problems")
        lines.append("  ".join(f"{n:>10s}" for n in names))
        lines.append("  ".join(f"{summary[n]:10.4f}" for n in names))
    return "\n".join(lines)
