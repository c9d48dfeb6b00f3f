"""The two optimizers of the reflective model: AdamW for the backbone, AdamW for the SPRM head.

Each group has its own learning rate (with optional linear warm-up), weight decay and global
grad-norm clip, combined with `optax.multi_transform` over the top-level parameter groups
("backbone", "head") of the model's pure parameter dict.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

GROUPS = ("backbone", "head")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Hyper-parameters of both AdamW optimizers (defaults: the official 1.5B recipe)."""

    lr: float = 1e-6
    head_lr: float = 1e-5
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    head_weight_decay: float = 0.01
    grad_clip: float = 1.0
    head_grad_clip: float = 1.0
    warmup_steps: int = 0

    def __post_init__(self):
        for name in ("lr", "head_lr", "weight_decay", "head_weight_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"OptimizerConfig.{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("grad_clip", "head_grad_clip"):
            if getattr(self, name) <= 0:
                raise ValueError(f"OptimizerConfig.{name} must be > 0, got {getattr(self, name)}.")


def _schedule(lr: float, warmup: int):
    if warmup <= 0:
        return optax.constant_schedule(lr)
    return optax.linear_schedule(0.0, lr, warmup)


def _adamw(cfg: OptimizerConfig, lr: float, weight_decay: float, clip: float):
    return optax.chain(
        optax.clip_by_global_norm(clip),
        optax.adamw(
            _schedule(lr, cfg.warmup_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=weight_decay,
        ),
    )


def param_groups(params: dict) -> dict:
    """Labels tree for `multi_transform`: every leaf under params[g] is labelled g."""
    unknown = sorted(set(params) - set(GROUPS))
    if unknown:
        raise ValueError(f"Parameter groups {unknown} have no optimizer; expected {GROUPS}.")
    return {g: jax.tree.map(lambda _, g=g: g, params[g]) for g in params}


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Backbone AdamW + head AdamW, each clipped by its own global grad norm."""
    return optax.multi_transform(
        {
            "backbone": _adamw(cfg, cfg.lr, cfg.weight_decay, cfg.grad_clip),
            "head": _adamw(cfg, cfg.head_lr, cfg.head_weight_decay, cfg.head_grad_clip),
        },
        param_groups,
    )
