"""Serving throughput: msjax-serve batching concurrent requests against the original's
one-request-at-a-time design (the same server with --nobatching), on a CPU model.

    python -m experiments.bench_serve [--json] [--rounds 3] [--requests 4] [--max_tokens 64]

The random Qwen2 of experiments/bench_model.py (hidden 256, 4 layers, vocab 2048, context 1024)
is saved as a Hugging Face folder with a word-level tokenizer and a random SPRM head, and two
servers are started on it: continuous batching over 16 slots, and the original's design, the
same server with --nobatching --max_batch_rows 1 (one request, one row at a time; with 16 idle
slots it would pay for rows it does not use). For C = 1, 4, 16 clients,
each client thread sends `--requests` /generate requests one after the other ({prefix_prompt: a
random 16-word prompt, max_tokens, response_num 1, temperature 0.8, a random seed}); a round
runs the C clients against one server, then against the other (interleaved round by round, so a
slow phase of a shared machine hits both alike). tokens/s = tokens generated in the round (from
the server's /stats) / the round's wall time; min and median over rounds are reported (the
median decides), and p50 / p99 of the request latencies over all rounds. Both servers are warm
(compiled) before timing, and neither compiles during the run (checked).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

from experiments.bench_model import MODEL, random_hf_qwen2  # noqa: E402
from msjax.serve.process import ServerProcess  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("json", False, "Print one JSON line instead of a table.")
flags.DEFINE_integer("rounds", 3, "Timed rounds per (clients, server).")
flags.DEFINE_integer("requests", 4, "Requests per client per round.")
flags.DEFINE_integer("max_tokens", 64, "max_tokens of every request.")
flags.DEFINE_list("clients", ["1", "4", "16"], "Concurrent clients.")
flags.DEFINE_integer("chunk", 32, "The batched server's --chunk (decode steps between admissions).")
flags.DEFINE_integer("seed", 0, "Seed for the weights, prompts and request seeds.")

WORDS = [f"w{i}" for i in range(MODEL["vocab_size"] - 3)]


def write_model(path: Path, seed: int) -> None:
    """bench_model's random Qwen2 + a random SPRM head + a word-level tokenizer over its vocab."""
    import torch
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    random_hf_qwen2(seed).save_pretrained(path)
    hidden = MODEL["hidden_size"]
    torch.manual_seed(seed + 1)
    head = torch.nn.Sequential(
        torch.nn.Linear(hidden, 2 * hidden),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(2 * hidden, 1),
    )
    torch.save(head.state_dict(), path / "score_module.pt")
    vocab = {t: i for i, t in enumerate(["<eos>", ".\n\n", "[UNK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<eos>", normalized=False)])
    tok.add_tokens([AddedToken(".\n\n", normalized=False)])
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def run_round(server: ServerProcess, clients: int, rng: random.Random) -> tuple[float, list]:
    """C client threads x --requests requests; (tokens/s, request latencies in s)."""
    bodies = [
        [
            {
                "prefix_prompt": " ".join(rng.choices(WORDS, k=16)),
                "max_tokens": FLAGS.max_tokens,
                "response_num": 1,
                "temperature": 0.8,
                "seed": rng.randrange(2**32),
            }
            for _ in range(FLAGS.requests)
        ]
        for _ in range(clients)
    ]
    latencies: list[float] = []
    lock = threading.Lock()

    def client(mine: list[dict]) -> None:
        for body in mine:
            start = time.perf_counter()
            assert len(post(server.url + "/generate", body)["results"]) == 1
            with lock:
                latencies.append(time.perf_counter() - start)

    before = server.stats()["tokens_generated"]
    threads = [threading.Thread(target=client, args=(b,)) for b in bodies]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return (server.stats()["tokens_generated"] - before) / wall, latencies


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def main(argv):
    del argv
    rng = random.Random(FLAGS.seed)
    warm = f"--warmup_max_tokens={FLAGS.max_tokens}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_model(tmp / "model", FLAGS.seed)
        servers = {
            "one_at_a_time": ServerProcess(
                tmp / "model", warm, "--nobatching", "--max_batch_rows=1", log=tmp / "off.log"
            ),
            "batched": ServerProcess(
                tmp / "model",
                warm,
                "--max_batch_rows=16",
                f"--chunk={FLAGS.chunk}",
                log=tmp / "on.log",
            ),
        }
        try:
            compiles = {k: s.stats()["compiles"] for k, s in servers.items()}
            results = {}
            for c in [int(x) for x in FLAGS.clients]:
                tps = {k: [] for k in servers}
                lat = {k: [] for k in servers}
                for _ in range(FLAGS.rounds):
                    for k, s in servers.items():
                        t, ls = run_round(s, c, rng)
                        tps[k].append(t)
                        lat[k] += ls
                row = {
                    k: {
                        "tokens_per_s_min": min(tps[k]),
                        "tokens_per_s_median": statistics.median(tps[k]),
                        "latency_p50_s": percentile(lat[k], 50),
                        "latency_p99_s": percentile(lat[k], 99),
                    }
                    for k in servers
                }
                row["speedup_median"] = (
                    row["batched"]["tokens_per_s_median"]
                    / row["one_at_a_time"]["tokens_per_s_median"]
                )
                results[f"C={c}"] = row
            recompiled = {k: s.stats()["compiles"] - compiles[k] for k, s in servers.items()}
        finally:
            for s in servers.values():
                s.stop()
    out = {
        "model": MODEL,
        "chunk": FLAGS.chunk,
        "max_tokens": FLAGS.max_tokens,
        "requests_per_client": FLAGS.requests,
        "rounds": FLAGS.rounds,
        "compiles_during_run": recompiled,
        "results": results,
    }
    if FLAGS.json:
        print(json.dumps(out))
        return
    print(f"max_tokens {FLAGS.max_tokens}, {FLAGS.requests} requests/client, {FLAGS.rounds} rounds")
    print(
        f"{'clients':>8} {'design':>14} {'tok/s min':>10} {'median':>10} {'p50 s':>8} {'p99 s':>8}"
    )
    for c, row in results.items():
        for k in servers:
            r = row[k]
            print(
                f"{c:>8} {k:>14} {r['tokens_per_s_min']:10.1f} {r['tokens_per_s_median']:10.1f} "
                f"{r['latency_p50_s']:8.3f} {r['latency_p99_s']:8.3f}"
            )
        print(f"{c:>8} {'speedup':>14} {row['speedup_median']:21.2f}x (median)")
    print(f"compiles during the run: {recompiled}")


if __name__ == "__main__":
    app.run(main)
