"""MetaStone-S1-32B recipe: GRPO + SPR from QwQ-32B (REFERENCE section 4).

    msjax-aot --config experiments/configs/metastone_32b.py --topology v5p-256
    msjax-train --config experiments/configs/metastone_32b.py \
        --config.init=/path/to/QwQ-32B --config.workdir=gs://BUCKET/ms1-32b \
        --config.data.files=/path/to/train.parquet

Official hyper-parameters: actor LR 1e-7, SPRM head LR 3e-6, 128 prompts x 8 samples per step,
prompts up to 2048 tokens, responses up to 32768, rollout temperature 1.0, top_p 1.0. The
official PPO mini-batch is 256 prompts, larger than the 128 prompts a step samples: the step's
whole batch (1024 sequences) is then ONE mini-batch, so here ppo_mini_batch = 128, one update
per RL step. The official run used 16 nodes x 8 GPUs; the target here is a v5p-256 slice (128
chips, 95 GiB each) with parameters split 16 ways (fsdp) x 8 ways (tensor, one KV head per
chip), checked with msjax-aot (docs/aot.md). Shared settings (precision, remat, attention
chunks, data): `msjax.rl.config.large_model_config`.

Prompts are rendered with QwQ-32B's own (ChatML) chat template from its tokenizer files.
"""

from msjax.rl.config import large_model_config

# QwQ-32B's config.json.
ARCHITECTURE = dict(
    vocab_size=152064,
    hidden_size=5120,
    intermediate_size=27648,
    num_layers=64,
    num_heads=40,
    num_kv_heads=8,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def get_config():
    c = large_model_config(ARCHITECTURE, tensor=8)
    c.data.update(template="chat", max_prompt_len=2048)
    # 256 of the 1024 rollouts per sampler call: the KV cache of one 34816-token sequence is
    # 8.5 GiB, so one call's cache is 17 GiB per chip on v5p-256.
    c.rollout.update(
        prompts_per_step=128, max_new_tokens=32768, temperature=1.0, max_rows_per_call=256
    )
    # 1024 sequences per update in micro-batches of 16 (one sequence per tensor group).
    c.train.update(ppo_mini_batch=128)
    c.optim.update(lr=1e-7, head_lr=3e-6)
    c.checkpoint.update(every_steps=5)
    c.reward.update(manager="prime")  # the original 32B run's reward manager
    return c
