"""The `make demo` recipe: the synthetic step task, SFT warm start, GRPO + SPR, evaluation.

    python -m experiments.demo                                   # this recipe, out in demo_out/
    python -m experiments.demo --config=experiments/configs/demo.py:micro --config.out_dir=DIR

The RL part is a regular trainer config (msjax.rl.config.default_config); `task`, `sft`, `eval`
and `out_dir` are the demo's own sections. The trainer's workdir, init, data dir and tokenizer
are derived from out_dir by the demo (out_dir/rl, out_dir/sft, out_dir/data, the SFT tokenizer).
Variant "micro" is a few steps of everything (the pipeline test).
"""

import ml_collections

from msjax.rl.config import default_config


def get_config(variant: str = ""):
    c = default_config()
    c.out_dir = "demo_out"
    c.stop_after = ""  # a stage name: stop once it is done (the next run resumes)
    c.compilation_cache = True  # persistent XLA cache in out_dir/jax_cache
    c.seed = 0
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.model.update(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=256,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    # The synthetic step task (msjax.data.Difficulty fields + split sizes).
    c.task = ml_collections.ConfigDict(
        dict(
            min_steps=3,
            max_steps=5,
            max_start=9,
            max_operand=5,
            max_value=9,
            ops="+-*",
            num_train=4000,
            num_test=256,
            seed=0,
        )
    )
    c.data.update(
        name="synthetic_steps/demo",
        template="plain",
        suffix="",
        max_prompt_len=48,
        build_synthetic=False,
    )
    c.sft = ml_collections.ConfigDict(
        dict(
            steps=1000,
            batch_size=32,
            max_len=80,
            flawed_fraction=0.3,
            # Errors of the flawed solutions: arithmetic only (a step's own numbers show it is
            # wrong; see docs/experiments.md for all three kinds).
            error_kinds=("arithmetic",),
            lr=4e-3,
            head_lr=1e-3,
            warmup_steps=20,
            # SPRM warm-up on the SFT data's outcome labels (flawed solution -> wrong answer -> 0).
            spr_coef=1.0,
            spr_variant="bce",
            spr_threshold=0.5,
            head_grad_scale=1e-4,
            # Stand-in for pre-training (msjax.sft), run before the steps above: a head trained
            # on the TRUE step labels of the SFT data, its gradient into the backbone unscaled,
            # shapes the backbone's features; it is then discarded (the SPRM starts afresh).
            # 0 = off.
            feature_steps=2000,
            feature_coef=1.0,
            feature_label="locally_correct",  # or "on_track"
        )
    )
    c.total_steps = 80
    c.rollout.update(
        prompts_per_step=16,
        group_size=8,
        max_new_tokens=64,
        temperature=1.0,
        reward_workers=1,
    )
    c.train.update(ppo_mini_batch=8, micro_batch_size=0)
    c.loss.update(kl_coef=0.0, entropy_coef=0.0)
    c.optim.update(lr=2e-4, head_lr=1e-3)
    c.checkpoint.update(every_steps=5, keep=2, async_save=False)
    c.log.update(tensorboard=False, progress=True)
    c.eval = ml_collections.ConfigDict(
        dict(
            num_problems=64,
            k_max=32,
            k_before=32,
            ks=(2, 8, 32),
            temperature=1.0,
            max_new_tokens=64,
            batch_size=64,
            prune="keep=0.5,every=16,min_steps=2",
            parity_prompts=8,
            parity_new_tokens=48,
            seed=1,
        )
    )
    if variant == "micro":
        c.model.update(hidden_size=32, intermediate_size=64, num_layers=2)
        c.task.update(num_train=128, num_test=16, max_steps=3)
        c.sft.update(steps=3, feature_steps=2, batch_size=8, warmup_steps=0)
        c.total_steps = 2
        c.rollout.update(prompts_per_step=2, group_size=4, max_new_tokens=40)
        c.train.update(ppo_mini_batch=2)
        c.checkpoint.update(every_steps=1)
        c.eval.update(
            num_problems=2,
            k_max=32,
            k_before=32,
            max_new_tokens=40,
            batch_size=4,
            prune="keep=0.5,every=8,min_steps=1",
            parity_prompts=2,
            parity_new_tokens=16,
        )
    elif variant:
        raise ValueError(f"unknown demo config variant {variant!r}; known: '' (default), 'micro'")
    return c
