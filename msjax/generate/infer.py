"""Batch test-time-scaling inference over a data file (the library behind `msjax-infer`).

Input: a .jsonl / .parquet / .json file in any shape `msjax.data.local_math` reads (the
original work's AIME JSONL, verl parquet and C-Eval JSON included); rows without a gold answer
are run and left ungraded. Each prompt is rendered by `msjax.templates.render_prompt`
(`InferOptions.template`, default: the checkpoint's chat template when it has one).
Output: one row per input row (non-blank line of a JSONL file), in order:
    {"line", "prompt", "gold", "response", "score", "answer", "correct", "candidates":
     [{"response", "tokens", "score", "step_scores", "step_positions", "finish_reason",
       "answer", "correct"}]}
"line" is the row's line (JSONL) or 1-based row number; "prompt" the rendered prompt; "gold"
the input's gold answer; "answer" the chosen response's extracted one; "correct" is null
without a gold answer. A row that cannot be run (bad JSON, not UTF-8, no prompt, a chat prompt
with an unknown role, a prompt too long for the model, a template that fails on it) gives nulls
and an "error" naming the line, and is counted as skipped; a file that cannot hold rows at all is
a ValueError before anything is written. The output is written to a temporary file next to
OUTPUT and renamed when complete. Grading: math rows by the training reward of
`InferOptions.reward` / `manager` (`msjax.rewards.outcome.OutcomeReward`, which hands each rule
the prompt and response as the original's reward managers do), C-Eval rows (`model_input` + a
letter) by the letter rule on the rendered prompt + response (`msjax.rewards.ceval_reward`).

Sample j of the prompt on input line l is drawn with id (l * k + j), so results do not depend on
--batch_size. The summary's disjoint-group metrics (`pooled_metrics`) follow the original's
metric: a problem's candidates (pooled over runs / files) cut into groups of N, the first
maximum score chosen per group, accuracy averaged over groups.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from msjax.evaluation import pool_candidates, pooled_best_of_n
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
from msjax.progress import progress as progress_bar
from msjax.rewards import MANAGERS, REWARDS, ceval_reward
from msjax.rewards.outcome import OutcomeReward
from msjax.tokenizer import MATH_SUFFIX

log = logging.getLogger(__name__)

_NULL_ROW = {"response": None, "score": None, "answer": None, "correct": None, "candidates": []}
GROUP_SIZES = (2, 8, 32)  # the low / medium / high modes
# The original's test-time settings (REFERENCE section 5), `--preset official`.
OFFICIAL_PRESET = dict(
    k=16,
    temperature=0.6,
    top_p=0.95,
    top_k=0,
    repetition_penalty=1.05,
    max_new_tokens=32768,
    clamp_max_new_tokens=True,
    reward="official",
)


@dataclasses.dataclass(frozen=True)
class InferOptions:
    """Decoding, prompt and grading settings of a run.

    k: candidates per prompt; temperature (0 = greedy), top_p, top_k (0 = off),
    repetition_penalty (1 = off); max_new_tokens, and clamp_max_new_tokens: lower it to what the
    model's context leaves after the longest prompt (else a prompt that does not fit is a row
    error); seed; prune: optional PruneRule; batch_size: prompts per sampler call;
    template: "chat" | "none" | "r1" | "plain" | None (the default rule of msjax.templates);
    suffix: appended to bare problems; selection: "bon", "majority" or "weighted";
    reward: "math" or "official" (the original's rule, `manager` "naive" or "prime").
    """

    k: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 1024
    clamp_max_new_tokens: bool = False
    seed: int = 0
    prune: PruneRule | None = None
    batch_size: int = 8
    template: str | None = None
    suffix: str | None = MATH_SUFFIX
    selection: str = "bon"
    reward: str = "math"
    manager: str = "naive"

    def __post_init__(self):
        from msjax.templates import TEMPLATE_NAMES

        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k={self.k!r} candidates per prompt must be an int >= 1.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} must be an int >= 1.")
        SamplerConfig(  # validates the decoding settings before any model is loaded
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            score_steps=False,
        )
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection!r}; choose one of {SELECTIONS}.")
        if self.template is not None and self.template not in TEMPLATE_NAMES:
            raise ValueError(f"template={self.template!r}; choose one of {TEMPLATE_NAMES}.")
        if self.reward not in REWARDS:
            raise ValueError(f"reward={self.reward!r}; choose one of {REWARDS}.")
        if self.manager not in MANAGERS:
            raise ValueError(f"manager={self.manager!r}; choose one of {MANAGERS}.")

    @classmethod
    def official(cls, **changes: Any) -> InferOptions:
        """The original's test-time settings (OFFICIAL_PRESET) with `changes` applied."""
        return cls(**{**OFFICIAL_PRESET, **changes})


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
        repetition_penalty=options.repetition_penalty,
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


def _grade(chunk, choices: list[Choice], reward) -> list[list | None]:
    """Per prompt: correctness of each candidate (None for a pruned one), or None without gold.

    Math rows: `reward(prompt ids, response ids, golds)`, the training reward
    (`msjax.rewards.outcome.OutcomeReward`: each rule reads the prompt and response as it does in
    training). C-Eval rows: the letter rule on the rendered prompt + response."""
    out: list[list | None] = [
        None if r["gold"] is None else [None] * len(ch.candidates)
        for r, ch in zip(chunk, choices, strict=True)
    ]
    todo = [
        (p, i)
        for p, (r, ch) in enumerate(zip(chunk, choices, strict=True))
        if r["gold"] is not None
        for i, c in enumerate(ch.candidates)
        if not c.pruned
    ]
    graded = []
    for p, i in todo:
        if chunk[p]["task"] == "ceval":
            text = chunk[p]["prompt"] + choices[p].candidates[i].response
            out[p][i] = ceval_reward(text, chunk[p]["gold"]) > 0.5
        else:
            graded.append((p, i))
    if graded:
        rewards = reward(
            [chunk[p]["ids"] for p, _ in graded],
            [choices[p].candidates[i].tokens for p, i in graded],
            [chunk[p]["gold"] for p, _ in graded],
        )
        for (p, i), r in zip(graded, rewards, strict=True):
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
    reward=None,
) -> dict[str, Any]:
    """Runs test-time scaling over a data file (see the module docstring).

    Args:
      model: a ReflectiveModel (its current state is used); cfg: its ModelConfig.
      tokenizer: an msjax.tokenizer.Tokenizer. options: InferOptions. mesh: optional mesh the
        model is sharded on.
      progress: show a tqdm bar. reward: a callable (prompt ids, response ids, golds) ->
        rewards f32[rows] grading the math rows; default: the training reward
        `msjax.rewards.outcome.OutcomeReward` of options.reward / options.manager, started only
        if a math row has a gold answer.
    Returns a summary dict: rows, run, skipped, k, max_new_tokens, tokens_generated, pruned,
    tokens_saved_max, and with gold answers: graded, pass@1, maj@k, bon@k, weighted@k, random@k
    (over the candidates that were not pruned) and "groups" (`pooled_metrics`).
    """
    from flax import nnx

    rows, options = read_prompts(input_path, tokenizer, options, cfg)
    sampler = build_sampler(model, cfg, tokenizer, options, mesh)
    todo = [r for r in rows if "error" not in r]
    own_reward = None
    if reward is None and any(r["gold"] is not None and r["task"] != "ceval" for r in todo):
        reward = own_reward = OutcomeReward(tokenizer, options.reward, options.manager)
    graded: list[dict[str, Any]] = []
    totals = {"tokens_generated": 0, "pruned": 0, "tokens_saved_max": 0}

    def results():
        """Output rows of `todo`, in order, one chunk of batch_size prompts at a time."""
        params = nnx.state(model)
        key = jax.random.key(options.seed)
        spare = max(r["line"] for r in rows) + 1
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        with progress_bar(total=len(todo), desc="infer", unit="prompt", enabled=progress) as bar:
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
                flags = _grade(chunk, choices, reward)
                for r, choice, fl in zip(chunk, choices, flags, strict=True):
                    out = _output_row(r, choice, fl)
                    if fl is not None:
                        graded.append(out)
                    yield out
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
                    out = {"line": r["line"], "prompt": None, "gold": r.get("gold"), **_NULL_ROW}
                    out["error"] = r["error"]
                else:
                    out = next(ready)
                dst.write(json.dumps(out, ensure_ascii=False) + "\n")
        os.replace(tmp, output_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        if own_reward is not None:
            own_reward.close()
    summary: dict[str, Any] = {
        "rows": len(rows),
        "run": len(todo),
        "skipped": len(rows) - len(todo),
        "k": options.k,
        "max_new_tokens": options.max_new_tokens,
        **totals,
    }
    if graded:
        keep = [[c for c in r["candidates"] if c["finish_reason"] != "pruned"] for r in graded]
        c = [[x["correct"] for x in cands] for cands in keep]
        s = [[x["score"] for x in cands] for cands in keep]
        a = [[x["answer"] for x in cands] for cands in keep]
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
        try:
            summary["groups"] = pooled_metrics(graded)
        except ValueError as e:  # one prompt with two gold answers: no pooled metric
            log.warning("%s: no disjoint-group metric: %s", input_path, e)
    return summary


def read_prompts(
    input_path, tokenizer, options: InferOptions, cfg
) -> tuple[list[dict[str, Any]], InferOptions]:
    """Every row as {"line", "ids", "prompt", "gold", "task"} or {"line", "error"} (logged), and
    the options with max_new_tokens clamped when options.clamp_max_new_tokens. ValueError for a
    file that cannot hold rows, or a template that cannot be used at all."""
    from msjax.data.local_math import RowError, normalize_row, read_rows
    from msjax.templates import ChatTemplate, render_prompt

    chat = ChatTemplate.of(tokenizer)  # a template that does not compile raises here
    if options.template == "chat" and chat is None:
        render_prompt("x", template="chat")  # raises the "no chat template" error
    positions = cfg.max_position_embeddings
    limit = positions - (1 if options.clamp_max_new_tokens else options.max_new_tokens)
    rows = []
    for n, raw in read_rows(input_path, require_answer=False):
        gold = None
        try:
            if isinstance(raw, RowError):
                raise raw
            row = normalize_row(raw, 1 << 30, 1 << 20, require_answer=False)
            gold = row.answer
            text = render_prompt(
                row.prompt,
                kind=row.kind,
                template=options.template,
                chat=chat,
                suffix=options.suffix,
            )
            ids = tokenizer.encode(text)
            if not ids:
                raise ValueError("the prompt encodes to no tokens")
            if len(ids) > limit:
                raise ValueError(
                    f"the prompt has {len(ids)} tokens; with max_new_tokens="
                    f"{options.max_new_tokens} that exceeds the model's limit of {positions} "
                    "positions"
                )
            task = "ceval" if "model_input" in {str(k).lower() for k in raw} else "math"
            rows.append({"line": n, "ids": ids, "prompt": text, "gold": gold, "task": task})
        except (RowError, ValueError) as e:
            log.warning("%s line %d skipped: %s", input_path, n, e)
            rows.append({"line": n, "gold": gold, "error": f"line {n}: {e}"})
    longest = max((len(r["ids"]) for r in rows if "ids" in r), default=0)
    if options.clamp_max_new_tokens and longest + options.max_new_tokens > positions:
        clamped = positions - longest
        log.info(
            "max_new_tokens %d -> %d: the longest prompt has %d tokens of the model's %d",
            options.max_new_tokens,
            clamped,
            longest,
            positions,
        )
        options = dataclasses.replace(options, max_new_tokens=clamped)
    return rows, options


def _output_row(row: dict[str, Any], choice: Choice, flags: list | None) -> dict[str, Any]:
    best = choice.best
    return {
        "line": row["line"],
        "prompt": row["prompt"],
        "gold": row["gold"],
        "response": best.response,
        "score": best.score,
        "answer": best.answer,
        "correct": None if flags is None else flags[choice.chosen],
        "candidates": [
            _candidate_row(c, None if flags is None else flags[i])
            for i, c in enumerate(choice.candidates)
        ],
    }


def pooled_metrics(
    rows: Sequence[dict[str, Any]], sizes: Sequence[int] = GROUP_SIZES
) -> dict[str, dict[str, float]]:
    """The original's metric over graded output rows (of one or several runs / files):
    `msjax.evaluation.pool_candidates` by "prompt", then `pooled_best_of_n` for each group size
    N that every problem has candidates for (a pruned candidate is never chosen while its group
    has another). Returns {str(N): {"bon": accuracy, "groups": K}}; ValueError naming the
    problem when one prompt has two gold answers."""
    problems = pool_candidates(
        (
            r["prompt"],
            r.get("gold"),
            [bool(c["correct"]) for c in r["candidates"]],
            [-math.inf if c["finish_reason"] == "pruned" else c["score"] for c in r["candidates"]],
        )
        for r in rows
        if r.get("correct") is not None
    )
    fewest = min((len(p.scores) for p in problems), default=0)
    out = {}
    for n in (n for n in sizes if n <= fewest):
        m = pooled_best_of_n(problems, n)
        out[str(n)] = {"bon": m["accuracy"], "groups": m["groups"]}
    return out


def pool_files(paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """`pooled_metrics` over the output files of several runs; ValueError naming a line that is
    not an msjax-infer output row."""
    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n} is not an msjax-infer output row") from e
                if not isinstance(row, dict) or "candidates" not in row:
                    raise ValueError(f"{path} line {n} is not an msjax-infer output row")
                rows.append(row)
    problems = {r["prompt"] for r in rows if r.get("correct") is not None}
    return {"files": len(paths), "problems": len(problems), "groups": pooled_metrics(rows)}


def summary_table(summary: dict[str, Any]) -> str:
    """A small text table of a summary from `infer_file` (or `pool_files`)."""
    lines = []
    if "rows" in summary:
        lines += [
            f"rows {summary['rows']}  run {summary['run']}  skipped {summary['skipped']}  "
            f"k {summary['k']}  max_new_tokens {summary['max_new_tokens']}",
            f"tokens generated {summary['tokens_generated']}  pruned candidates "
            f"{summary['pruned']}  (<= {summary['tokens_saved_max']} tokens saved)",
        ]
    if "graded" in summary:
        names = ["pass@1", "maj@k", "bon@k", "weighted@k", "random@k"]
        lines.append(f"graded {summary['graded']} problems")
        lines.append("  ".join(f"{n:>10s}" for n in names))
        lines.append("  ".join(f"{summary[n]:10.4f}" for n in names))
    if summary.get("groups"):
        lines.append("disjoint groups of N (first maximum score per group):")
        for n, m in summary["groups"].items():
            lines.append(f"  N={n:>2s}: BoN {m['bon']:.4f}  ({m['groups']} groups per problem)")
    return "\n".join(lines)
