"""The training configuration (ml_collections) and its translation into the typed configs.

Recipes in experiments/configs/ start from `default_config()` and override fields; every field
can also be overridden on the command line (`--config.rollout.group_size=4`).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from msjax.models.config import ModelConfig
from msjax.rl.optimizer import OptimizerConfig
from msjax.rl.train_step import LossConfig


def _fields(cls, **overrides) -> dict:
    out = {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }
    out.update(overrides)
    return out


def default_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with defaults from the official 1.5B recipe."""
    c = ml_collections.ConfigDict()
    c.workdir = ""
    c.seed = 0
    c.total_steps = 100
    # (data, fsdp, tensor) sizes within a slice; one may be -1 = all remaining devices.
    # dcn_data: slices of a multi-slice TPU joined over the data axis (msjax.sharding.make_mesh).
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1))
    # Where the policy starts: an HF folder or an msjax checkpoint dir; "" = random init from
    # `model` (tests, the demo's own warm start).
    c.init = ""
    c.model = ml_collections.ConfigDict(
        dict(
            vocab_size=384,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
        )
    )
    # Runtime settings applied to the model whatever its source ("" / 0 = keep).
    c.model_overrides = ml_collections.ConfigDict(
        dict(dtype="", param_dtype="", remat="", attention="", attention_chunk=0)
    )
    # Tokenizer folder; "" = the init folder's; "synthetic" = build the synthetic task's.
    c.tokenizer = ""
    c.data = ml_collections.ConfigDict(
        dict(
            name="synthetic_steps/default",
            data_dir="",  # "" = <workdir>/data
            split="train",
            template="r1",
            suffix="Let's think step by step and output the final answer within \\boxed{}.",
            max_prompt_len=1024,
            shuffle=True,
            # Build synthetic_steps/<config> under data_dir when it is missing.
            build_synthetic=False,
            synthetic_num_train=2000,
            synthetic_num_test=200,
            synthetic_seed=0,
        )
    )
    c.rollout = ml_collections.ConfigDict(
        dict(
            prompts_per_step=32,
            group_size=8,
            max_new_tokens=8192,
            temperature=0.6,
            top_p=1.0,
            top_k=0,
            # The official recipe's 0.1 for a wrong response that never reached EOS; < 0 = off.
            missing_eos_reward=-1.0,
            reward_workers=2,
            reward_timeout_s=10.0,
            # Sequences per sampler call (whole groups; bounds the KV cache, which holds
            # rows x (prompt + response) slots); 0 = all prompts_per_step x group_size at once.
            max_rows_per_call=0,
            # dtype of the rollout engine's copy of the weights (msjax.generate.weights):
            # "" = bfloat16 on accelerators, the training dtype on CPU; or float32 / bfloat16.
            decode_dtype="",
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            ppo_mini_batch=8,  # prompts per optimizer update (x group_size sequences)
            ppo_epochs=1,
            micro_batch_size=0,  # sequences per micro-batch; 0 = the whole mini-batch
            max_nonfinite_steps=3,  # stop after this many refused updates in a row
        )
    )
    c.loss = ml_collections.ConfigDict(_fields(LossConfig))
    # Derived: num_microbatches from train.micro_batch_size; temperature = rollout.temperature
    # (the log-probs must be those of the distribution the rollouts were sampled from).
    del c.loss.num_microbatches
    del c.loss.temperature
    c.optim = ml_collections.ConfigDict(_fields(OptimizerConfig))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=10, keep=3, async_save=True))
    # tensorboard_dir: "" = <workdir>/tensorboard; set a local dir when the workdir is gs://.
    c.log = ml_collections.ConfigDict(dict(tensorboard=True, tensorboard_dir="", progress=True))
    return c


def large_model_config(architecture: dict, *, tensor: int = 1) -> ml_collections.ConfigDict:
    """`default_config()` set up for a real checkpoint: the base of the shipped MetaStone recipes.

    architecture: ModelConfig fields of the start checkpoint's config.json (what `msjax-aot`
    compiles when `init` is empty; `--config.init=/path/to/hf_dir` supplies the weights, the
    tokenizer and the same architecture). Parameters are split over fsdp x `tensor`; fp32 master
    weights (optimizer updates of lr ~1e-6 vanish in bf16), bf16 compute, only layer inputs kept
    for the backward pass, attention 1024 queries at a time; math data from a local folder
    (`msjax.data.build_local_math`).
    """
    c = default_config()
    c.total_steps = 1000  # no official step count is published; raise it on the CLI
    c.mesh.update(data=1, fsdp=-1, tensor=tensor)
    c.init = ""
    c.model = ml_collections.ConfigDict(architecture)
    c.model_overrides.update(
        dtype="bfloat16",
        param_dtype="float32",
        remat="full",
        attention="chunked",
        attention_chunk=1024,
    )
    c.data.update(name="local_math/default")
    c.train.update(micro_batch_size=16)
    return c


def model_config(c: ml_collections.ConfigDict, base: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig: `base` (from the init folder) or config.model, plus model_overrides."""
    cfg = base if base is not None else ModelConfig(**c.model.to_dict())
    overrides = {k: v for k, v in c.model_overrides.to_dict().items() if v}
    if overrides.get("dtype") and not overrides.get("param_dtype"):
        overrides["param_dtype"] = overrides["dtype"]
    return cfg.replace(**overrides)


def loss_config(c: ml_collections.ConfigDict) -> LossConfig:
    """LossConfig with num_microbatches = mini-batch rows / train.micro_batch_size and the
    rollout temperature (1 for greedy rollouts)."""
    rows = c.train.ppo_mini_batch * c.rollout.group_size
    micro = c.train.micro_batch_size or rows
    if rows % micro:
        raise ValueError(
            f"config.train.micro_batch_size={micro} must divide the mini-batch of "
            f"{rows} sequences (ppo_mini_batch x group_size)."
        )
    temperature = c.rollout.temperature or 1.0
    return LossConfig(**c.loss.to_dict(), num_microbatches=rows // micro, temperature=temperature)


def optimizer_config(c: ml_collections.ConfigDict) -> OptimizerConfig:
    return OptimizerConfig(**c.optim.to_dict())


def validate(c: ml_collections.ConfigDict, batch_shards: int = 1) -> None:
    """Raises ValueError naming the field for an inconsistent config, before anything runs."""
    r, t = c.rollout, c.train
    positive = {
        "total_steps": c.total_steps,
        "rollout.prompts_per_step": r.prompts_per_step,
        "rollout.group_size": r.group_size,
        "rollout.max_new_tokens": r.max_new_tokens,
        "train.ppo_mini_batch": t.ppo_mini_batch,
        "train.ppo_epochs": t.ppo_epochs,
        "train.max_nonfinite_steps": t.max_nonfinite_steps,
        "checkpoint.every_steps": c.checkpoint.every_steps,
        "checkpoint.keep": c.checkpoint.keep,
        "data.max_prompt_len": c.data.max_prompt_len,
    }
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{name} must be an int >= 1, got {value!r}.")
    if not c.workdir:
        raise ValueError("config.workdir is empty; pass --config.workdir=DIR.")
    if r.prompts_per_step % t.ppo_mini_batch:
        raise ValueError(
            f"config.train.ppo_mini_batch={t.ppo_mini_batch} must divide "
            f"config.rollout.prompts_per_step={r.prompts_per_step}."
        )
    if (
        not isinstance(r.max_rows_per_call, int)
        or r.max_rows_per_call < 0
        or (r.max_rows_per_call % r.group_size)
    ):
        raise ValueError(
            f"config.rollout.max_rows_per_call={r.max_rows_per_call!r} must be 0 (all rows in one "
            f"call) or a positive multiple of rollout.group_size={r.group_size}."
        )
    if r.temperature < 0 or not 0 < r.top_p <= 1 or r.top_k < 0:
        raise ValueError("config.rollout: need temperature >= 0, 0 < top_p <= 1, top_k >= 0.")
    loss = loss_config(c)
    micro_rows = t.ppo_mini_batch * r.group_size // loss.num_microbatches
    if micro_rows % batch_shards:
        raise ValueError(
            f"A micro-batch of {micro_rows} sequences does not split over the {batch_shards} "
            "data x fsdp devices; change train.micro_batch_size, train.ppo_mini_batch or "
            "config.mesh."
        )
    optimizer_config(c)
