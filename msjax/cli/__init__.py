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
    in which case the existing flag is returned (its first definition's default and help win).

    kind: "string", "integer", "float", "bool", "enum", ... Returns a FlagHolder.
    """
    if name in flags.FLAGS:
        return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
    return getattr(flags, f"DEFINE_{kind}")(name=name, default=default, help=help_text, **kwargs)
