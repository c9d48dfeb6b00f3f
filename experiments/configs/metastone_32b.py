"""MetaStone-S1-32B recipe: GRPO + SPR from QwQ-32B (REFERENCE section 4).

    msjax-aot --config experiments/configs/metastone_32b.py --topology v5p-256
    msjax-train --config experiments/configs/metastone_32b.py \
        --config.init=/path/to/QwQ-32B --config.workdir=gs://BUCKET/ms1-32b \
        --config.data.data_dir=/path/to/tfds_data

Official hyper-parameters: actor LR 1e-7, SPRM head LR 3e-6, 128 prompts x 8 samples per step,
prompts up to 2048 tokens, responses up to 32768, rollout temperature 1.0, top_p 1.0. The
official PPO mini-batch is 256 prompts, larger than the 128 prompts a step samples: the step's
whole batch (1024 sequences) is then ONE mini-batch, so here ppo_mini_batch = 128, one update
per RL step. The official run used 16 nodes x 8 GPUs; the target here is a v5p-256 slice (128
chips, 95 GiB each) with parameters split 16 ways (fsdp) x 8 ways (tensor, one KV head per
chip), checked with msjax-aot (docs/aot.md).

QwQ-32B's own chat template is ChatML; msjax has the "r1" and "plain" templates, and "plain"
(problem, suffix, then "<think>") is the closest.
"""

from msjax.rl.config import default_config


def get_config():
    c = default_config()
    c.total_steps = 1000  # the official step count is not published; raise it on the CLI
    c.mesh.update(data=1, fsdp=-1, tensor=8)
    # The start policy's weights and tokenizer: pass --config.init=/path/to/hf_or_msjax_dir (a
    # QwQ-32B HF folder). Left empty so msjax-aot works without weights; the architecture below
    # is QwQ-32B's config.json.
    c.init = ""
    c.model.update(
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
    # fp32 master weights (a 1e-7 update vanishes in bf16), bf16 compute, layer inputs only
    # kept for the backward pass, attention 1024 queries at a time.
    c.model_overrides.update(
        dtype="bfloat16",
        param_dtype="float32",
        remat="full",
        attention="chunked",
        attention_chunk=1024,
    )
    c.data.update(name="local_math/default", template="plain", max_prompt_len=2048)
    c.rollout.update(
        prompts_per_step=128,
        group_size=8,
        max_new_tokens=32768,
        temperature=1.0,
        top_p=1.0,
        # 256 of the 1024 rollouts per sampler call: the KV cache of one 34816-token sequence
        # is 8.5 GiB, so one call's cache is 17 GiB per chip on v5p-256.
        max_rows_per_call=256,
    )
    # 1024 sequences per update in micro-batches of 16 (one sequence per tensor group).
    c.train.update(ppo_mini_batch=128, ppo_epochs=1, micro_batch_size=16)
    c.optim.update(lr=1e-7, head_lr=3e-6)
    c.checkpoint.update(every_steps=5, keep=3)
    return c
