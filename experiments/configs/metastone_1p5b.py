"""MetaStone-S1-1.5B recipe: GRPO + SPR from DeepScaleR-1.5B-Preview (REFERENCE section 4).

    msjax-aot --config experiments/configs/metastone_1p5b.py --topology v5p-16
    msjax-train --config experiments/configs/metastone_1p5b.py \
        --config.init=/path/to/DeepScaleR-1.5B-Preview --config.workdir=gs://BUCKET/ms1-1p5b \
        --config.data.files=/path/to/train.parquet

Official hyper-parameters: actor LR 1e-6, SPRM head LR 1e-5, 32 prompts x 8 samples per step,
PPO mini-batch of 8 prompts (4 updates per step), prompts up to 1024 tokens, responses up to
8192, rollout temperature 0.6, top_p 1.0. The official run used 1 node x 8 GPUs; the target here
is a v5p-16 slice (8 chips, 95 GiB each), checked ahead of time with msjax-aot (docs/aot.md).
Shared settings (precision, remat, attention chunks, data): `msjax.rl.config.large_model_config`.
"""

from msjax.rl.config import large_model_config

# DeepSeek-R1-Distill-Qwen-1.5B's config.json (DeepScaleR-1.5B-Preview's architecture).
ARCHITECTURE = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_layers=28,
    num_heads=12,
    num_kv_heads=2,
    max_position_embeddings=131072,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def get_config():
    c = large_model_config(ARCHITECTURE)
    c.data.update(template="chat", max_prompt_len=1024)
    # All 256 rollouts in one sampler call (KV cache: 8.5 GiB per chip).
    c.rollout.update(prompts_per_step=32, max_new_tokens=8192, temperature=0.6)
    # 8 prompts x 8 samples = 64 sequences per update, in 4 micro-batches of 16 (2 per chip).
    c.train.update(ppo_mini_batch=8)
    c.optim.update(lr=1e-6, head_lr=1e-5)
    c.checkpoint.update(every_steps=10)
    return c
