"""pass@1 and the three reasoning-effort modes on a local JSONL of math problems.

    python -m experiments.eval --model DIR --input problems.jsonl [--k_max 32]
        [--max_new_tokens 1024] [--template r1|plain] [--suffix TEXT] [--temperature 0.6]
        [--top_p 0.95] [--batch_size 8] [--seed 0] [--dtype float32|bfloat16|auto]
        [--output report.json]

DIR is a Hugging Face folder (a released MetaStone-S1 checkpoint with score_module.pt, or an
R1-distill model, whose SPRM head is then random) or an msjax checkpoint, with tokenizer files.
Each input row is {"problem": str, "answer": str}; the prompt is the problem rendered with the
template and the suffix (default: the math suffix of the official recipe).

k_max candidates are drawn per problem once (msjax.generate.infer, written next to the report as
<output>.candidates.jsonl); accuracy at k = 2 / 8 / 32 (low / medium / high, the k that divide
k_max) is then averaged over the k_max // k disjoint groups of k candidates, for Best-of-k by
SPRM score, majority vote, SPRM-weighted vote and a random pick (msjax.evaluation).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from absl import app

from msjax.cli import define_flag
from msjax.tokenizer import MATH_SUFFIX, TEMPLATES, atomic_write_text, render_prompt

MODES = {"low": 2, "medium": 8, "high": 32}
# Shared flag names go through define_flag (one absl registry per process; see msjax.cli).
_MODEL = define_flag("string", "model", None, "Hugging Face folder or msjax checkpoint.")
_INPUT = define_flag("string", "input", None, 'JSONL with {"problem", "answer"} rows.')
_OUTPUT = define_flag("string", "output", None, "Where to write the report (default report.json).")
_K_MAX = define_flag("integer", "k_max", 32, "Candidates drawn per problem.")
_MAX_NEW = define_flag("integer", "max_new_tokens", 1024, "Generated tokens per candidate.")
_TEMPLATE = define_flag("enum", "template", "r1", "Prompt template.", enum_values=list(TEMPLATES))
_SUFFIX = define_flag("string", "suffix", MATH_SUFFIX, "Text after the problem ('' = none).")
_TEMPERATURE = define_flag("float", "temperature", 0.6, "Sampling temperature.")
_TOP_P = define_flag("float", "top_p", 0.95, "Nucleus sampling mass.")
_BATCH = define_flag("integer", "batch_size", 8, "Problems per sampler call (x k_max rows).")
_SEED = define_flag("integer", "seed", 0, "Sampling seed.")
_DTYPE = define_flag(
    "enum",
    "dtype",
    None,
    "Weights dtype (default float32).",
    enum_values=["auto", "float32", "bfloat16"],
)


def prompt_rows(input_path: Path, template: str, suffix: str | None) -> tuple[list[str], int]:
    """JSONL lines {"prompt", "answer"} for msjax.generate.infer from {"problem", "answer"} rows
    (a row that is not an object with a string problem is passed on as it is, so that infer
    counts and names it); returns (lines, rows without an answer)."""
    lines, no_answer = [], 0
    with open(input_path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                lines.append("")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                lines.append(line.rstrip("\n"))
                continue
            if not isinstance(row, dict) or not isinstance(row.get("problem"), str):
                lines.append(line.rstrip("\n"))
                continue
            if row.get("answer") is None:
                no_answer += 1
            prompt = (
                render_prompt(row["problem"], template, suffix) if row["problem"].strip() else ""
            )
            lines.append(json.dumps({"prompt": prompt, "answer": row.get("answer")}))
    return lines, no_answer


def modes_from_candidates(candidates_path: Path, k_max: int) -> dict:
    """pass@1 and BoN / majority / weighted / random accuracy at each mode's k from infer's
    output rows (rows without a gold answer or with an error are left out)."""
    from msjax.evaluation import scaling_metrics

    correct, scores, answers = [], [], []
    with open(candidates_path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            cands = row.get("candidates") or []
            if len(cands) != k_max or any(c["correct"] is None for c in cands):
                continue
            correct.append([bool(c["correct"]) for c in cands])
            scores.append([float(c["score"]) for c in cands])
            answers.append([c["answer"] for c in cands])
    if not correct:
        raise ValueError(
            f"{candidates_path}: no problem with a gold answer was evaluated; give each row an "
            '"answer".'
        )
    ks = [k for k in MODES.values() if k <= k_max and k_max % k == 0]
    metrics = scaling_metrics(correct, scores, answers, ks)
    modes = {m: k for m, k in MODES.items() if k in ks}
    return {"problems": len(correct), "k_max": k_max, "modes": modes, **metrics}


def evaluate(
    model_dir: str,
    input_path: Path,
    output: Path,
    *,
    k_max: int = 32,
    max_new_tokens: int = 1024,
    template: str = "r1",
    suffix: str | None = MATH_SUFFIX,
    temperature: float = 0.6,
    top_p: float = 0.95,
    batch_size: int = 8,
    seed: int = 0,
    dtype: str = "float32",
    progress: bool = True,
) -> dict:
    """Runs the evaluation (see the module docstring) and writes the report to `output`."""
    from msjax import checkpoint
    from msjax.generate.infer import InferOptions, infer_file
    from msjax.tokenizer import Tokenizer

    tok_dir = checkpoint.tokenizer_dir(model_dir)
    if tok_dir is None:
        raise ValueError(f"{model_dir} has no tokenizer.json (needed to encode the problems).")
    options = InferOptions(
        k=k_max,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        template=template,
    )
    lines, no_answer = prompt_rows(input_path, template, suffix or None)
    tokenizer = Tokenizer.from_dir(tok_dir)
    model, cfg = checkpoint.load_any(model_dir, None, dtype=dtype)
    output.parent.mkdir(parents=True, exist_ok=True)
    candidates = output.with_name(output.stem + ".candidates.jsonl")
    fd, prompts = tempfile.mkstemp(prefix=".prompts.", suffix=".jsonl", dir=output.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        summary = infer_file(model, cfg, tokenizer, prompts, candidates, options, progress=progress)
    finally:
        Path(prompts).unlink(missing_ok=True)
    report = {
        "model": str(model_dir),
        "input": str(input_path),
        "rows": summary["rows"],
        "skipped": summary["skipped"],
        "rows_without_answer": no_answer,
        "tokens_generated": summary["tokens_generated"],
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        **modes_from_candidates(candidates, k_max),
        "candidates_file": str(candidates),
    }
    atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for holder in (_MODEL, _INPUT):
        if not holder.value:
            raise app.UsageError(f"--{holder.name} is required.")
    if not Path(_INPUT.value).is_file():
        raise app.UsageError(f"--input {_INPUT.value} does not exist.")
    if _K_MAX.value < 1:
        raise app.UsageError(f"--k_max={_K_MAX.value} must be >= 1.")
    logging.getLogger().setLevel(logging.INFO)
    try:
        report = evaluate(
            _MODEL.value,
            Path(_INPUT.value),
            Path(_OUTPUT.value or "report.json"),
            k_max=_K_MAX.value,
            max_new_tokens=_MAX_NEW.value,
            template=_TEMPLATE.value,
            suffix=_SUFFIX.value,
            temperature=_TEMPERATURE.value,
            top_p=_TOP_P.value,
            batch_size=_BATCH.value,
            seed=_SEED.value,
            dtype=_DTYPE.value or "float32",
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    print(f"pass@1 {report['pass1']:.4f} over {report['problems']} problems")
    for mode, k in report["modes"].items():
        k = str(k)
        print(
            f"{mode:>6s} (k={k:>2s}): BoN {report['bon'][k]:.4f}  maj {report['maj'][k]:.4f}  "
            f"weighted {report['weighted'][k]:.4f}  random {report['random'][k]:.4f}"
        )
    print(f"-> {_OUTPUT.value or 'report.json'}")


if __name__ == "__main__":
    app.run(main)
