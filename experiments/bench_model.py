"""The random Qwen2 that the CPU benchmarks (bench_decode, bench_train_step) run on both sides."""

# hidden 256, 4 layers, 8 heads, 4 KV heads, MLP 688, vocab 2048 (transformers' field names).
MODEL = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=688,
    vocab_size=2048,
    max_position_embeddings=1024,
)


def random_hf_qwen2(seed: int):
    """A transformers Qwen2ForCausalLM with MODEL's shape, fp32, untied, weights from `seed`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen2Config(**MODEL, dtype="float32", tie_word_embeddings=False)
    return transformers.Qwen2ForCausalLM(config)
