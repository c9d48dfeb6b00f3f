"""The training configuration (ml_collections) and its translation into the typed configs.

Recipes in experiments/configs/ start from `default_config()` and override fields; every field
can also be overridden on the command line (`--config.rollout.group_size=4`).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from msjax.models.config import ModelConfig
from msjax.rewards.outcome import check_reward_config
from msjax.rl.optimizer import OptimizerConfig
from msjax.rl.train_step import LossConfig
from msjax.tokenizer import STEP_MODES


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
    # Step delimiters of a tokenizer folder: "default" (".\n\n") or "chinese" (the 32B run's
    # `--lang zh` rule, msjax.tokenizer.chinese_step_ids).
    c.step_mode = "default"
    c.data = ml_collections.ConfigDict(
        dict(
            name="synthetic_steps/default",
            data_dir="",  # "" = <workdir>/data
            split="train",
            # Data files (.parquet / .jsonl / .json, comma-separated) built into local_math on
            # first use; they replace `name` and form the "train" split.
            files="",
            # chat | none | r1 | plain (msjax.templates); "" = its default rule: chat when the
            # tokenizer has a chat template, else r1 (prompt rows: none).
            template="",
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
            reward_workers=2,
            reward_timeout_s=10.0,
            # Sequences per sampler call (whole groups; bounds the KV cache, which holds
            # rows x (prompt + response) slots); 0 = all prompts_per_step x group_size at once.
            max_rows_per_call=0,
            # Training widths of the responses: max_new_tokens / 2^i, i < response_buckets; a
            # rollout batch trains at the smallest that holds its longest response (one compile
            # of the train step per width); 1 = always max_new_tokens.
            response_buckets=4,
            # dtype of the rollout engine's copy of the weights (msjax.generate.weights):
            # "" = bfloat16 on accelerators, the training dtype on CPU; or float32 / bfloat16.
            decode_dtype="",
        )
    )
    # The outcome reward (msjax.rewards.outcome): name "math" | "official" (the original's
    # rule), manager "naive" | "prime" (the original's reward manager, "official" only).
    c.reward = ml_collections.ConfigDict(dict(name="math", manager="naive"))
    c.train = ml_collections.ConfigDict(
        dict(
            ppo_mini_batch=8,  # prompts per optimizer update (x group_size sequences)
            ppo_epochs=1,
            micro_batch_size=0,  # sequences per micro-batch; 0 = the whole mini-batch
            max_nonfinite_steps=3,  # stop after this many refused updates in a row
            # The SPRM head's training settings (REFERENCE 1), applied whatever the start
            # checkpoint saved: gradient scale into the backbone, dropout before its last layer.
            head_grad_scale=1e-4,
            head_dropout=0.5,
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
    (`msjax.data.build_local_math`); the original's outcome reward ("official", "naive"
    manager as in the 1.5B run; the 32B recipe sets "prime").
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
    c.reward.update(name="official", manager="naive")
    c.train.update(micro_batch_size=16)
    return c


# Training-only settings: where config.train holds them, compared on resume with the run's own.
HEAD_FIELDS = ("head_grad_scale", "head_dropout")


def model_config(c: ml_collections.ConfigDict, base: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig: `base` (from the init folder) or config.model, plus model_overrides and
    the head's training settings of config.train (a start checkpoint's own are not used)."""
    cfg = base if base is not None else ModelConfig(**c.model.to_dict())
    overrides = {k: v for k, v in c.model_overrides.to_dict().items() if v}
    if overrides.get("dtype") and not overrides.get("param_dtype"):
        overrides["param_dtype"] = overrides["dtype"]
    overrides.update({k: c.train[k] for k in HEAD_FIELDS})
    return cfg.replace(**overrides)


def check_resume(
    c: ml_collections.ConfigDict, saved: dict, saved_model: ModelConfig, where
) -> None:
    """Raises ValueError when a training-only setting of `c` differs from the run saved in
    `where` (its config.json `saved` and model config `saved_model`): resuming would silently
    change the objective half-way."""
    now = model_config(c, saved_model)
    diffs = [
        (f"train.{k}", getattr(saved_model, k), getattr(now, k))
        for k in HEAD_FIELDS
        if getattr(saved_model, k) != getattr(now, k)
    ]
    loss = c.loss.to_dict()
    diffs += [
        (f"loss.{k}", v, loss[k])
        for k, v in saved.get("loss", {}).items()
        if k in loss and loss[k] != v
    ]
    if diffs:
        lines = "; ".join(f"{n} was {old!r}, the config now gives {new!r}" for n, old, new in diffs)
        flags = " ".join(f"--config.{n}={old!r}" for n, old, _ in diffs)
        raise ValueError(
            f"{where} was trained with other training settings: {lines}. Resume with {flags}, "
            "or start a fresh workdir."
        )


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
        "rollout.response_buckets": r.response_buckets,
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
    from msjax.templates import TEMPLATE_NAMES

    if c.data.template not in ("", *TEMPLATE_NAMES):
        raise ValueError(
            f"config.data.template={c.data.template!r}; choose one of {TEMPLATE_NAMES} or '' "
            "(msjax.templates' default rule)."
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
    check_reward_config(c)
    if c.step_mode not in STEP_MODES:
        raise ValueError(f"config.step_mode={c.step_mode!r} must be one of {STEP_MODES}.")
    if c.step_mode != "default" and c.tokenizer == "synthetic":
        raise ValueError("config.step_mode applies to tokenizer folders, not 'synthetic'.")
