"""Command-line entry points (absl). Each module parses flags and calls library functions.

Several CLI modules may be imported into one process (tests, `python -m`), and absl keeps ONE
global flag registry, so a flag that two CLIs share (e.g. --dtype, --model) must be defined
through `define_flag`, which reuses an existing definition instead of raising DuplicateFlagError.
"""

from __future__ import annotations

from typing import Any

from absl import flags


def define_flag(kind: str, name: str, default: Any, help_text: str, **kwargs: Any):
    """`flags.DEFINE_<kind>(name, default, help_text, **kwargs)` unless `name` is already defined,
    in which case the existing flag is returned (its first definition's help wins). Two
    definitions with different defaults raise ValueError: the second CLI would get the first's.

    kind: "string", "integer", "float", "bool", "enum", ... Returns a FlagHolder.
    """
    if name in flags.FLAGS:
        existing = flags.FLAGS[name]
        if existing.default != default:
            raise ValueError(
                f"--{name} is defined twice with different defaults ({existing.default!r} and "
                f"{default!r}): one process would silently use the first; give one a new name."
            )
        return flags.FlagHolder(flags.FLAGS, existing)
    return getattr(flags, f"DEFINE_{kind}")(name=name, default=default, help=help_text, **kwargs)


def define_head_flags() -> tuple[flags.FlagHolder, flags.FlagHolder]:
    """--lang and --allow_untrained_head, the flags of every tool that reads SPRM scores.
    Returns their FlagHolders (lang, allow_untrained_head)."""
    lang = define_flag(
        "enum",
        "lang",
        "en",
        "Step delimiters: en = the '.\\n\\n' token, zh = the Chinese mode (REFERENCE section 2).",
        enum_values=["en", "zh"],
    )
    allow = define_flag(
        "bool", "allow_untrained_head", False, "Run with an untrained (random) SPRM head."
    )
    return lang, allow


def define_placement_flags() -> tuple[flags.FlagHolder, flags.FlagHolder]:
    """--dtype and --mesh of the tools that load a model for decoding (msjax-infer, msjax-serve).
    Returns their FlagHolders (dtype, mesh)."""
    dtype = define_flag(
        "enum",
        "dtype",
        None,
        "Parameter dtype (default float32).",
        enum_values=["auto", "float32", "bfloat16"],
    )
    mesh = define_flag("string", "mesh", None, "Mesh sizes 'data,fsdp,tensor' (default: no mesh).")
    return dtype, mesh


def define_decoding_flags() -> dict[str, flags.FlagHolder]:
    """The decoding, prompt and grading flags that msjax-infer and eval.py share, by the
    `msjax.generate.infer.InferOptions` field each sets, plus "preset" (--preset official)."""
    from msjax.rewards import MANAGERS, REWARDS
    from msjax.templates import TEMPLATE_NAMES
    from msjax.tokenizer import MATH_SUFFIX

    return {
        "preset": define_flag(
            "enum", "preset", None, "The original's test-time settings.", enum_values=["official"]
        ),
        "temperature": define_flag(
            "float", "temperature", 0.6, "Sampling temperature; 0 = greedy."
        ),
        "top_p": define_flag("float", "top_p", 0.95, "Nucleus sampling mass in (0, 1]."),
        "repetition_penalty": define_flag(
            "float", "repetition_penalty", 1.0, "vLLM-style repetition penalty (1 = off)."
        ),
        "max_new_tokens": define_flag(
            "integer", "max_new_tokens", 1024, "Generated tokens per candidate."
        ),
        "template": define_flag(
            "enum",
            "template",
            None,
            "Prompt template (default: chat when the checkpoint has one, else none / r1).",
            enum_values=list(TEMPLATE_NAMES),
        ),
        "suffix": define_flag(
            "string", "suffix", MATH_SUFFIX, "Text after a bare problem ('' = none)."
        ),
        "reward": define_flag(
            "enum",
            "reward",
            "math",
            "Grading rule (--preset official: official).",
            enum_values=list(REWARDS),
        ),  # fmt: skip
        "manager": define_flag(
            "enum",
            "manager",
            "naive",
            "Official reward manager: naive (1.5B/7B) or prime (32B).",
            enum_values=list(MANAGERS),
        ),
    }


def options_over_preset(holders: dict[str, flags.FlagHolder]) -> dict[str, Any]:
    """InferOptions field values from `holders` (those of `define_decoding_flags`, and more):
    the preset's values (--preset official: `msjax.generate.infer.OFFICIAL_PRESET`), each
    replaced by its flag's value when the flag is given or the preset lacks the field. An empty
    --suffix is None (no suffix)."""
    from msjax.generate.infer import OFFICIAL_PRESET

    preset = holders["preset"].value
    values = dict(OFFICIAL_PRESET) if preset == "official" else {}
    for name, holder in holders.items():
        if name != "preset" and (holder.present or name not in values):
            values[name] = holder.value
    values["suffix"] = values["suffix"] or None
    return values
