"""The benchmarks' interleaved timing rounds: every side once per round, the order rotating."""

from experiments.bench_model import interleaved_rounds


def test_rounds_call_every_side_once_per_round_in_rotating_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("hf", "plain", "engine")}
    out = interleaved_rounds(fns, runs=4)
    assert calls == ["hf", "plain", "engine"] + ["plain", "engine", "hf"] + [
        "engine",
        "hf",
        "plain",
    ] + ["hf", "plain", "engine"]
    for name in fns:
        assert len(out[name]["wall"]) == len(out[name]["cpu"]) == 4
        assert all(t >= 0 for t in out[name]["wall"])
