"""Tiny CPU recipe: a 2-layer random Qwen2 on the synthetic step task, seconds per RL step.

    msjax-train --config experiments/configs/tiny.py --config.workdir=/tmp/tiny

It builds the synthetic tokenizer and dataset itself, so it runs on a fresh machine.
"""

from msjax.rl.config import default_config


def get_config():
    c = default_config()
    c.total_steps = 4
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.model.update(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    c.tokenizer = "synthetic"
    c.data.update(
        name="synthetic_steps/tiny",
        template="plain",
        suffix="",
        max_prompt_len=64,
        build_synthetic=True,
        synthetic_num_train=256,
        synthetic_num_test=32,
    )
    c.rollout.update(prompts_per_step=4, group_size=4, max_new_tokens=48, temperature=1.0)
    c.train.update(ppo_mini_batch=2, micro_batch_size=4)
    c.optim.update(lr=1e-4, head_lr=1e-3)
    c.checkpoint.update(every_steps=2, keep=2)
    return c
