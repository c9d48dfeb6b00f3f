"""msjax-serve: the original MetaStone-S1 /generate and /score HTTP API on one msjax model.

    msjax-serve --model DIR [--host 127.0.0.1] [--port 8000] [--max_batch_rows 32] [--chunk 32]
        [--max_len N] [--max_delay_ms 10] [--max_queue 256] [--request_timeout 600]
        [--max_response_num R] [--nobatching] [--dtype float32|bfloat16|auto] [--mesh D,F,T]
        [--default_repetition_penalty 1.05] [--warmup_max_tokens 64] [--allow_untrained_head]

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
from msjax.cli import define_flag, define_placement_flags
from msjax.tokenizer import Tokenizer

MODEL = define_flag("string", "model", None, "A Hugging Face folder or an msjax checkpoint.")
HOST = define_flag("string", "host", "127.0.0.1", "Address to listen on.")
PORT = define_flag("integer", "port", 8000, "Port to listen on.")
MAX_BATCH_ROWS = define_flag(
    "integer",
    "max_batch_rows",
    32,
    "Decode slots (samples decoded together); texts per scoring call.",
)
CHUNK = define_flag("integer", "chunk", 32, "Decode steps between admissions of new requests.")
MAX_LEN = define_flag(
    "integer",
    "max_len",
    None,
    "Tokens per slot, prompt + response (default: the context).",
)
MAX_DELAY_MS = define_flag(
    "float", "max_delay_ms", 10.0, "Longest a text to score waits for others to batch with."
)
MAX_QUEUE = define_flag("integer", "max_queue", 256, "Most queued requests (503 beyond).")
TIMEOUT = define_flag("float", "request_timeout", 600.0, "Seconds before a request gets 504.")
MAX_RESPONSE_NUM = define_flag(
    "integer", "max_response_num", None, "Largest response_num (default: --max_batch_rows)."
)
BATCHING = define_flag(
    "bool", "batching", True, "Batch concurrent requests (--nobatching: one request at a time)."
)
DTYPE, MESH = define_placement_flags()
PENALTY = define_flag(
    "float", "default_repetition_penalty", 1.05, "Default repetition penalty (the original's 1.05)."
)
WARM_N = define_flag(
    "integer",
    "warmup_max_tokens",
    64,
    "Tokens decoded at warm-up (the KV windows compiled).",
)
ALLOW_UNTRAINED = define_flag(
    "bool", "allow_untrained_head", False, "Serve even when the SPRM head is untrained."
)

log = logging.getLogger("msjax.serve")


def _int_list(flag) -> list[int]:
    try:
        return [int(x) for x in flag.value.split(",")]
    except ValueError as e:
        raise app.UsageError(f"--{flag.name}={flag.value!r} must be comma-separated ints.") from e


def max_response_num() -> int:
    return MAX_RESPONSE_NUM.value or MAX_BATCH_ROWS.value


def _check_flags() -> None:
    if not MODEL.value:
        raise app.UsageError("--model is required.")
    for holder in (MAX_BATCH_ROWS, CHUNK, MAX_QUEUE, MAX_RESPONSE_NUM, WARM_N):
        if holder.value is not None and holder.value < 1:
            raise app.UsageError(f"--{holder.name}={holder.value} must be >= 1.")
    if max_response_num() > MAX_BATCH_ROWS.value:
        raise app.UsageError(
            f"--max_response_num={MAX_RESPONSE_NUM.value} must be <= --max_batch_rows="
            f"{MAX_BATCH_ROWS.value} (a request's samples decode together)."
        )
    for holder in (MAX_DELAY_MS, TIMEOUT):
        if not holder.value >= 0:
            raise app.UsageError(f"--{holder.name}={holder.value} must be >= 0.")
    if not PENALTY.value > 0:
        raise app.UsageError(f"--default_repetition_penalty={PENALTY.value} must be > 0 (1 = off).")
    if not 0 < PORT.value < 65536:
        raise app.UsageError(f"--port={PORT.value} must be a TCP port (1-65535).")


def main(argv: list[str]) -> None:
    """argv: [program] (flags already parsed)."""
    import uvicorn

    from msjax.serve.app import CompileCounter, create_app
    from msjax.serve.backend import TOP_P, EngineBackend, untrained_head
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
        backend = EngineBackend(
            model,
            cfg,
            tokenizer,
            slots=MAX_BATCH_ROWS.value,
            chunk=CHUNK.value,
            max_len=MAX_LEN.value,
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
    engine = backend.engine
    log.info(
        "mesh %s; continuous batching over %d slots of %d tokens, chunks of %d steps, KV "
        "windows %s, prompt buckets %s; %s, score batches wait <= %.0f ms; queue %d, "
        "timeout %.0f s",
        "none (one device)" if mesh is None else dict(mesh.shape),
        engine.slots,
        engine.max_len,
        engine.chunk,
        engine.windows,
        tuple(b for b in engine.config.prompt_buckets if b < engine.max_len),
        "batching on" if BATCHING.value else "batching OFF (one request at a time)",
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
        backend.warmup(WARM_N.value)
        log.info(
            "warm: %d programs compiled in %.1f s (admission of 1..%d requests, decoding "
            "%d tokens, scoring); serving on http://%s:%d",
            compiles.count - n0,
            time.perf_counter() - t0,
            engine.slots,
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
        max_response_num=max_response_num(),
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
