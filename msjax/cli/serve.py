"""msjax-serve: the original MetaStone-S1 /generate and /score HTTP API on one msjax model.

    msjax-serve --model DIR [--host 127.0.0.1] [--port 8000] [--max_batch_rows 32]
        [--row_buckets 1,4,16,32] [--max_delay_ms 10] [--max_queue 256] [--request_timeout 600]
        [--max_response_num 64] [--nobatching] [--dtype float32|bfloat16|auto] [--mesh D,F,T]
        [--repetition_penalty 1.05] [--warmup_temperature 0.8] [--warmup_max_tokens 1024]
        [--allow_untrained_head]

DIR is a Hugging Face folder (with score_module.pt) or an msjax checkpoint, with tokenizer files.
The original client takes a policy URL and a reward URL: point both at this server. Routes and
fields: msjax.serve.app. SIGTERM / Ctrl-C: stop accepting, let in-flight requests finish (up to
--request_timeout), fail what is still queued, exit.
"""

from __future__ import annotations

import logging
import time

from absl import app

from msjax import checkpoint
from msjax.cli import define_flag
from msjax.tokenizer import Tokenizer

MODEL = define_flag("string", "model", None, "A Hugging Face folder or an msjax checkpoint.")
HOST = define_flag("string", "host", "127.0.0.1", "Address to listen on.")
PORT = define_flag("integer", "port", 8000, "Port to listen on.")
MAX_BATCH_ROWS = define_flag(
    "integer", "max_batch_rows", 32, "Most rows (samples or texts) in one compiled call."
)
ROW_BUCKETS = define_flag(
    "string", "row_buckets", None, "Padded batch sizes, e.g. '1,4,16,32' (default: powers of 2)."
)
MAX_DELAY_MS = define_flag(
    "float", "max_delay_ms", 10.0, "Longest a queued request waits for later ones to batch with."
)
MAX_QUEUE = define_flag("integer", "max_queue", 256, "Most queued requests (503 beyond).")
TIMEOUT = define_flag("float", "request_timeout", 600.0, "Seconds before a request gets 504.")
MAX_RESPONSE_NUM = define_flag("integer", "max_response_num", 64, "Largest response_num.")
BATCHING = define_flag(
    "bool", "batching", True, "Batch concurrent requests (--nobatching: one request at a time)."
)
DTYPE = define_flag(
    "enum",
    "dtype",
    None,
    "Parameter dtype (default float32).",
    enum_values=["auto", "float32", "bfloat16"],
)
MESH = define_flag("string", "mesh", None, "Mesh sizes 'data,fsdp,tensor' (default: no mesh).")
WARM_T = define_flag(
    "float", "warmup_temperature", 0.8, "Warm-up compiles generation at this temperature."
)
PENALTY = define_flag(
    "float", "repetition_penalty", 1.05, "Default repetition penalty (the original's 1.05)."
)
WARM_N = define_flag("integer", "warmup_max_tokens", 1024, "... and this max_tokens.")
ALLOW_UNTRAINED = define_flag(
    "bool", "allow_untrained_head", False, "Serve even when the SPRM head is untrained."
)

log = logging.getLogger("msjax.serve")


def _int_list(flag) -> list[int] | None:
    if not flag.value:
        return None
    try:
        return [int(x) for x in flag.value.split(",")]
    except ValueError as e:
        raise app.UsageError(f"--{flag.name}={flag.value!r} must be comma-separated ints.") from e


def _check_flags() -> None:
    if not MODEL.value:
        raise app.UsageError("--model is required.")
    for holder, lo in ((MAX_BATCH_ROWS, 1), (MAX_QUEUE, 1), (MAX_RESPONSE_NUM, 1), (WARM_N, 1)):
        if holder.value < lo:
            raise app.UsageError(f"--{holder.name}={holder.value} must be >= {lo}.")
    for holder in (MAX_DELAY_MS, TIMEOUT, WARM_T):
        if not holder.value >= 0:
            raise app.UsageError(f"--{holder.name}={holder.value} must be >= 0.")
    if not PENALTY.value > 0:
        raise app.UsageError(f"--repetition_penalty={PENALTY.value} must be > 0 (1 = off).")
    if not 0 < PORT.value < 65536:
        raise app.UsageError(f"--port={PORT.value} must be a TCP port (1-65535).")


def main(argv: list[str]) -> None:
    """argv: [program] (flags already parsed)."""
    import uvicorn

    from msjax.serve.app import CompileCounter, create_app
    from msjax.serve.backend import TOP_P, SamplerBackend, untrained_head
    from msjax.serve.batcher import Batcher

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    _check_flags()
    logging.getLogger().setLevel(logging.INFO)
    why = untrained_head(MODEL.value)
    if why is not None and not ALLOW_UNTRAINED.value:
        raise app.UsageError(
            f"{why}: its scores would be noise. Serve a model with a trained head, or pass "
            "--allow_untrained_head to serve it anyway."
        )
    tok_dir = checkpoint.tokenizer_dir(MODEL.value)
    if tok_dir is None:
        raise app.UsageError(f"{MODEL.value} has no tokenizer.json (needed to encode prompts).")
    tokenizer = Tokenizer.from_dir(tok_dir)
    mesh = None
    if MESH.value:
        from msjax.sharding import make_mesh

        try:
            mesh = make_mesh(_int_list(MESH))
        except ValueError as e:
            raise app.UsageError(f"--mesh={MESH.value!r}: {e}") from e
    compiles = CompileCounter()
    start = time.perf_counter()
    model, cfg = checkpoint.load_any(MODEL.value, mesh, dtype=DTYPE.value or "float32")
    try:
        backend = SamplerBackend(
            model,
            cfg,
            tokenizer,
            max_batch_rows=MAX_BATCH_ROWS.value,
            row_buckets=_int_list(ROW_BUCKETS),
            mesh=mesh,
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    log.info(
        "model %s: %d layers, hidden %d, vocab %d, context %d, %s, loaded in %.1f s%s",
        MODEL.value,
        cfg.num_layers,
        cfg.hidden_size,
        cfg.vocab_size,
        cfg.max_position_embeddings,
        cfg.param_dtype,
        time.perf_counter() - start,
        "" if why is None else f" (UNTRAINED HEAD: {why})",
    )
    log.info(
        "mesh %s; batch rows %s; prompt buckets %s; decode lengths: powers of 2 from 16; "
        "batching %s, max delay %.0f ms, queue %d, timeout %.0f s",
        "none (one device)" if mesh is None else dict(mesh.shape),
        backend.row_buckets,
        backend.prompt_buckets,
        "on" if BATCHING.value else "OFF (one request at a time)",
        MAX_DELAY_MS.value,
        MAX_QUEUE.value,
        TIMEOUT.value,
    )
    log.info(
        "sampling: top_p %.2f, repetition penalty %g; temperature 0 = greedy, seed 0 = seed 0",
        TOP_P,
        PENALTY.value,
    )

    def warmup() -> None:
        t0, n0 = time.perf_counter(), compiles.count
        backend.warmup(WARM_T.value, WARM_N.value, PENALTY.value)
        log.info(
            "warm: %d programs compiled in %.1f s (generation at temperature %g, max_tokens "
            "%d; scoring); serving on http://%s:%d",
            compiles.count - n0,
            time.perf_counter() - t0,
            WARM_T.value,
            WARM_N.value,
            HOST.value,
            PORT.value,
        )

    batcher = Batcher(
        backend,
        max_delay_s=MAX_DELAY_MS.value / 1000,
        max_queue=MAX_QUEUE.value,
        batching=BATCHING.value,
        warmup=warmup,
    )
    api = create_app(
        backend,
        batcher,
        request_timeout_s=TIMEOUT.value,
        max_response_num=MAX_RESPONSE_NUM.value,
        repetition_penalty=PENALTY.value,
        model_name=str(MODEL.value),
        compiles=compiles,
    )
    config = uvicorn.Config(
        api,
        host=HOST.value,
        port=PORT.value,
        access_log=False,
        timeout_graceful_shutdown=int(TIMEOUT.value) + 5,
        log_level="info",
    )
    uvicorn.Server(config).run()


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
