"""MetaStone-S1-7B recipe: GRPO + SPR from DeepSeek-R1-Distill-Qwen-7B.

    msjax-aot --config experiments/configs/metastone_7b.py --topology v5p-32
    msjax-train --config experiments/configs/metastone_7b.py \
        --config.init=/path/to/DeepSeek-R1-Distill-Qwen-7B --config.workdir=gs://BUCKET/ms1-7b \
        --config.data.files=/path/to/train.parquet

The official 7B recipe is not published (REFERENCE section 4). This one is the 1.5B recipe (same
model family, tokenizer, prompt template and response budget: 32 prompts x 8 samples, PPO
mini-batch of 8 prompts, 1024 / 8192 tokens, temperature 0.6) with both learning rates halved,
actor 5e-7 and SPRM head 5e-6, between the published 1.5B (1e-6 / 1e-5) and 32B (1e-7 / 3e-6)
values. Target: a v5p-32 slice (16 chips, 95 GiB each), checked with msjax-aot (docs/aot.md).
Shared settings (precision, remat, attention chunks, data): `msjax.rl.config.large_model_config`.
"""

from msjax.rl.config import large_model_config

# DeepSeek-R1-Distill-Qwen-7B's config.json.
ARCHITECTURE = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    max_position_embeddings=131072,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def get_config():
    c = large_model_config(ARCHITECTURE)
    c.data.update(template="chat", max_prompt_len=1024)
    c.rollout.update(prompts_per_step=32, max_new_tokens=8192, temperature=0.6)
    # 64 sequences per update in 4 micro-batches of 16 (one per chip on v5p-32).
    c.train.update(ppo_mini_batch=8)
    c.optim.update(lr=5e-7, head_lr=5e-6)
    c.checkpoint.update(every_steps=10)
    return c
