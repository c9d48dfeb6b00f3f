"""MetaStone-S1-1.5B recipe: GRPO + SPR from DeepScaleR-1.5B-Preview (REFERENCE section 4).

    msjax-aot --config experiments/configs/metastone_1p5b.py --topology v5p-16
    msjax-train --config experiments/configs/metastone_1p5b.py \
        --config.init=/path/to/DeepScaleR-1.5B-Preview --config.workdir=gs://BUCKET/ms1-1p5b \
        --config.data.data_dir=/path/to/tfds_data

Official hyper-parameters: actor LR 1e-6, SPRM head LR 1e-5, 32 prompts x 8 samples per step,
PPO mini-batch of 8 prompts (4 updates per step), prompts up to 1024 tokens, responses up to
8192, rollout temperature 0.6, top_p 1.0. The official run used 1 node x 8 GPUs; the target here
is a v5p-16 slice (8 chips, 95 GiB each), checked ahead of time with msjax-aot (docs/aot.md).
"""

from msjax.rl.config import default_config


def get_config():
    c = default_config()
    c.total_steps = 1000  # the official step count is not published; raise it on the CLI
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    # The start policy's weights and tokenizer: pass --config.init=/path/to/hf_or_msjax_dir (a
    # DeepScaleR-1.5B-Preview HF folder). Left empty so msjax-aot works without weights; the
    # architecture below (DeepSeek-R1-Distill-Qwen-1.5B's config.json) is what it compiles.
    c.init = ""
    c.model.update(
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
    # fp32 master weights (updates of lr 1e-6 vanish in bf16), bf16 compute; only layer inputs
    # are kept for the backward pass; attention 1024 queries at a time.
    c.model_overrides.update(
        dtype="bfloat16",
        param_dtype="float32",
        remat="full",
        attention="chunked",
        attention_chunk=1024,
    )
    c.data.update(name="local_math/default", template="r1", max_prompt_len=1024)
    c.rollout.update(
        prompts_per_step=32,
        group_size=8,
        max_new_tokens=8192,
        temperature=0.6,
        top_p=1.0,
        max_rows_per_call=0,  # all 256 rollouts in one sampler call (KV cache: 8.5 GiB/chip)
    )
    # 8 prompts x 8 samples = 64 sequences per update, in 4 micro-batches of 16 (2 per chip).
    c.train.update(ppo_mini_batch=8, ppo_epochs=1, micro_batch_size=16)
    c.optim.update(lr=1e-6, head_lr=1e-5)
    c.checkpoint.update(every_steps=10, keep=3)
    return c
