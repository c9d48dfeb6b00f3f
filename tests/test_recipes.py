"""The shipped MetaStone recipes: they load, validate, and describe the published checkpoints."""

import importlib.util
import math
from pathlib import Path

import jax
import pytest

from msjax.models import abstract_model
from msjax.rl.config import model_config, validate

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"

# Parameter counts of the published start checkpoints (the sum of their safetensors), and the
# REFERENCE hyper-parameters the recipes must carry: (actor lr, head lr, prompts per step,
# max new tokens, temperature).
PUBLISHED = {
    "metastone_1p5b": (1_777_088_000, (1e-6, 1e-5, 32, 8192, 0.6)),  # DeepSeek-R1-Distill-Qwen-1.5B
    "metastone_7b": (7_615_616_512, (5e-7, 5e-6, 32, 8192, 0.6)),  # DeepSeek-R1-Distill-Qwen-7B
    "metastone_32b": (32_763_876_352, (1e-7, 3e-6, 128, 32768, 1.0)),  # QwQ-32B
}


def _load(name):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_recipe_matches_the_published_model(name):
    c = _load(name)
    c.workdir = "/tmp/unused"
    validate(c)
    cfg = model_config(c)
    assert (cfg.dtype, cfg.param_dtype, cfg.remat, cfg.attention) == (
        "bfloat16",
        "float32",
        "full",
        "chunked",
    )
    _, state = abstract_model(cfg)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(state))
    backbone, (lr, head_lr, prompts, new_tokens, temperature) = PUBLISHED[name]
    c_ = cfg.hidden_size
    head = c_ * 2 * c_ + 2 * c_ + 2 * c_ + 1  # Linear(C, 2C) + Linear(2C, 1)
    assert n == backbone + head
    assert (c.optim.lr, c.optim.head_lr) == (lr, head_lr)
    assert (c.rollout.prompts_per_step, c.rollout.group_size) == (prompts, 8)
    assert (c.rollout.max_new_tokens, c.rollout.temperature) == (new_tokens, temperature)
