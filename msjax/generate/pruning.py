"""SPRM-guided early pruning: drop weak candidates of a prompt while they are still being decoded.

Every `every` generated tokens the sampler compares the n samples of each prompt (a GRPO/BoN
group) by their RUNNING trajectory score, i.e. the score that the final rule (REFERENCE section 2,
`msjax.models.sprm`) would give the text generated so far if it ended there (see
`msjax.generate.steps.resolve_mask`). A candidate is JUDGED only once it has at least `min_steps`
scored steps; candidates with fewer steps are never pruned and do not set the group's bar.
Finished candidates are judged with their final score and can set the bar, but are never pruned.

Rules (`kind`):
- "margin": prune a running candidate whose score is below (best judged score of its group) -
  `value`. The best candidate is never pruned.
- "keep": keep the ceil(`value` * m) best of the m judged candidates of the group (ties broken
  by sample index); prune the running ones ranked below. Repeated checks give successive halving.

A pruned candidate stops at once: its finish reason is "pruned", its tokens so far are kept, it
stops counting as generated tokens, and the decode loop ends as soon as every row is finished or
pruned.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

PRUNE_KINDS = ("margin", "keep")


@dataclasses.dataclass(frozen=True)
class PruneRule:
    """When and whom to prune; see the module docstring.

    kind: "margin" or "keep"; value: the margin (>= 0) or the kept fraction (0, 1];
    every: check every `every` generated tokens (> 0); min_steps: judge a candidate only once
    it has this many scored steps (>= 1).
    """

    kind: str
    value: float
    every: int = 64
    min_steps: int = 1

    def __post_init__(self):
        if self.kind not in PRUNE_KINDS:
            raise ValueError(f"prune kind {self.kind!r}; choose one of {PRUNE_KINDS}.")
        if self.kind == "margin" and not self.value >= 0:
            raise ValueError(f"prune margin={self.value} must be >= 0.")
        if self.kind == "keep" and not 0 < self.value <= 1:
            raise ValueError(f"prune keep={self.value} must be a fraction in (0, 1].")
        if not isinstance(self.every, int) or self.every <= 0:
            raise ValueError(f"prune every={self.every!r} must be a positive int (tokens).")
        if not isinstance(self.min_steps, int) or self.min_steps < 1:
            raise ValueError(f"prune min_steps={self.min_steps!r} must be an int >= 1.")

    @classmethod
    def parse(cls, text: str) -> PruneRule:
        """Parses "KIND=VALUE[,every=M][,min_steps=J]", e.g. "margin=0.2,every=64" or
        "keep=0.5,every=128,min_steps=2". Raises ValueError naming the bad part."""
        fields: dict[str, str] = {}
        for part in (p.strip() for p in text.split(",")):
            name, sep, value = part.partition("=")
            if not sep or not value.strip():
                raise ValueError(
                    f"prune rule {text!r}: {part!r} is not NAME=VALUE; write e.g. "
                    "'margin=0.2,every=64,min_steps=1' or 'keep=0.5,every=128'."
                )
            fields[name.strip()] = value.strip()
        kinds = [k for k in PRUNE_KINDS if k in fields]
        unknown = sorted(set(fields) - set(PRUNE_KINDS) - {"every", "min_steps"})
        if unknown or len(kinds) != 1:
            raise ValueError(
                f"prune rule {text!r}: needs exactly one of {PRUNE_KINDS} and optional every=, "
                f"min_steps= (unknown: {unknown})."
            )
        try:
            return cls(
                kind=kinds[0],
                value=float(fields[kinds[0]]),
                every=int(fields.get("every", 64)),
                min_steps=int(fields.get("min_steps", 1)),
            )
        except ValueError as e:
            raise ValueError(f"prune rule {text!r}: {e}") from e


def prune_decision(
    rule: PruneRule,
    scores: jax.Array,
    num_steps: jax.Array,
    running: jax.Array,
    active: jax.Array,
    group_size: int,
) -> jax.Array:
    """Which rows to prune now.

    Args:
      scores: f32[rows] running trajectory scores; num_steps: int32[rows] scored steps so far.
      running: bool[rows] still decoding; active: bool[rows] real rows not pruned (running or
        finished). Rows r and r' share a group iff r // group_size == r' // group_size.
    Returns bool[rows]: running rows that the rule drops.
    """
    rows = scores.shape[0]
    groups = math.ceil(rows / group_size)
    pad = groups * group_size - rows

    def grouped(x, fill):
        return jnp.pad(x, (0, pad), constant_values=fill).reshape(groups, group_size)

    s = grouped(scores.astype(jnp.float32), 0.0)
    judged = grouped(active, False) & grouped(num_steps >= rule.min_steps, False)
    run = grouped(running, False)
    if rule.kind == "margin":
        best = jnp.max(jnp.where(judged, s, -jnp.inf), axis=1, keepdims=True)
        drop = s < best - rule.value
    else:
        idx = jnp.arange(group_size)
        better = (s[:, None, :] > s[:, :, None]) | (
            (s[:, None, :] == s[:, :, None]) & (idx[None, None, :] < idx[None, :, None])
        )
        rank = jnp.sum(better & judged[:, None, :], axis=2)
        keep = jnp.ceil(rule.value * judged.sum(axis=1, keepdims=True)).astype(jnp.int32)
        drop = rank >= keep
    return (drop & judged & run).reshape(-1)[:rows]
