"""pass@1 and the three reasoning-effort modes on a local file of math problems.

    python -m experiments.eval --model DIR --input problems.jsonl|.parquet|.json [--k_max 32]
        [--preset official] [--max_new_tokens 1024] [--template chat|none|r1|plain]
        [--suffix TEXT] [--temperature 0.6] [--top_p 0.95] [--repetition_penalty 1.0]
        [--reward math|official] [--manager naive|prime] [--batch_size 8] [--seed 0]
        [--dtype float32|bfloat16|auto] [--allow_untrained_head] [--lang en|zh]
        [--output report.json]

DIR is a Hugging Face folder (a released MetaStone-S1 checkpoint with score_module.pt) or an
msjax checkpoint, with tokenizer files; a model without a trained SPRM head (e.g. an R1-distill
folder) is refused unless --allow_untrained_head. The input is any file msjax-infer reads (the
original AIME JSONL / verl parquet / C-Eval JSON, {problem, answer} rows); prompts are rendered
by msjax.templates (default: the checkpoint's chat template when it has one). `--preset
official` sets the original's decoding settings and reward (msjax.generate.infer.OFFICIAL_PRESET;
k_max stays the flag's); flags given explicitly override it.

k_max candidates are drawn per problem once (msjax.generate.infer, written next to the report as
<output>.candidates.jsonl); accuracy at k = 2 / 8 / 32 (low / medium / high, the k that divide
k_max) is then averaged over the k_max // k disjoint groups of k candidates, for Best-of-k by
SPRM score, majority vote, SPRM-weighted vote and a random pick (msjax.evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

from absl import app

from msjax.cli import define_decoding_flags, define_flag, define_head_flags, options_over_preset
from msjax.generate.infer import InferOptions
from msjax.tokenizer import atomic_write_text

MODES = {"low": 2, "medium": 8, "high": 32}
# Shared flag names go through define_flag (one absl registry per process; see msjax.cli); the
# decoding, grading and head flags are msjax-infer's own definitions (msjax.cli).
_MODEL = define_flag("string", "model", None, "Hugging Face folder or msjax checkpoint.")
_INPUT = define_flag("string", "input", None, "Input .jsonl / .parquet / .json file.")
_OUTPUT = define_flag("string", "output", None, "Where to write the report (default report.json).")
_K_MAX = define_flag("integer", "k_max", 32, "Candidates drawn per problem.")
_DECODING = define_decoding_flags()
_LANG, _ALLOW_UNTRAINED = define_head_flags()
_BATCH = define_flag("integer", "batch_size", 8, "Problems per sampler call (x k_max rows).")
_SEED = define_flag("integer", "seed", 0, "Sampling seed.")
_DTYPE = define_flag(
    "enum",
    "dtype",
    None,
    "Weights dtype (default float32).",
    enum_values=["auto", "float32", "bfloat16"],
)


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
    options: InferOptions | None = None,
    dtype: str = "float32",
    allow_untrained_head: bool = False,
    lang: str = "en",
    progress: bool = True,
    **settings,
) -> dict:
    """Runs the evaluation (see the module docstring) and writes the report to `output`.

    options: the InferOptions (its k is set to k_max); or `settings`, InferOptions fields
    (max_new_tokens, template, suffix, temperature, top_p, batch_size, seed, ...).
    lang: "en" or "zh", the step delimiters (msjax.tokenizer.LANG_STEP_MODES)."""
    from msjax import checkpoint
    from msjax.generate.infer import infer_file
    from msjax.tokenizer import LANG_STEP_MODES, Tokenizer

    options = dataclasses.replace(options or InferOptions(**settings), k=k_max)
    tok_dir = checkpoint.tokenizer_dir(model_dir)
    if tok_dir is None:
        raise ValueError(f"{model_dir} has no tokenizer.json (needed to encode the problems).")
    checkpoint.require_trained_head(model_dir, allow_untrained_head)
    tokenizer = Tokenizer.from_dir(tok_dir, step_mode=LANG_STEP_MODES[lang])
    model, cfg = checkpoint.load_any(model_dir, None, dtype=dtype)
    output.parent.mkdir(parents=True, exist_ok=True)
    candidates = output.with_name(output.stem + ".candidates.jsonl")
    summary = infer_file(model, cfg, tokenizer, input_path, candidates, options, progress=progress)
    with open(candidates, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    no_answer = sum(1 for r in rows if "error" not in r and r["gold"] is None)
    report = {
        "model": str(model_dir),
        "input": str(input_path),
        "rows": summary["rows"],
        "skipped": summary["skipped"],
        "rows_without_answer": no_answer,
        "tokens_generated": summary["tokens_generated"],
        "temperature": options.temperature,
        "top_p": options.top_p,
        "repetition_penalty": options.repetition_penalty,
        "max_new_tokens": summary["max_new_tokens"],
        "reward": options.reward,
        **modes_from_candidates(candidates, k_max),
        "candidates_file": str(candidates),
    }
    atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    return report


def options_from_flags() -> InferOptions:
    """InferOptions from the flags over the preset's values (explicit flags win)."""
    values = options_over_preset(_DECODING)
    values.update(k=_K_MAX.value, batch_size=_BATCH.value, seed=_SEED.value)
    return InferOptions(**values)


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
            options=options_from_flags(),
            dtype=_DTYPE.value or "float32",
            allow_untrained_head=_ALLOW_UNTRAINED.value,
            lang=_LANG.value,
            progress=sys.stderr.isatty(),
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
