"""What the CPU benchmarks (bench_decode, bench_train_step) share: the random Qwen2 both sides
run, and the interleaved timing rounds."""

import time

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


def interleaved_rounds(fns: dict, runs: int) -> dict[str, dict[str, list[float]]]:
    """{name: {"wall": seconds, "cpu": process CPU seconds}} of each call of each fn (warm them
    up before). Every round calls every fn once, in turn, so a slow phase of a shared machine hits
    all alike; the order rotates by one fn per round, so no side always follows the same one
    (torch's OpenMP threads keep spinning for a while after its call ends)."""
    out = {name: {"wall": [], "cpu": []} for name in fns}
    names = list(fns)
    for r in range(runs):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            fns[name]()
            out[name]["cpu"].append(time.process_time() - cpu)
            out[name]["wall"].append(time.perf_counter() - wall)
    return out
