"""The FastAPI application of `msjax-serve`: the original /generate and /score routes, /health,
/stats, request logging, per-request timeouts and JSON errors.

Routes (REFERENCE section 5 for the original fields):
  POST /generate {prefix_prompt, max_tokens=1024, response_num=8, stop=null, temperature=0.8,
      seed=null} -> {"results": [response texts]}; msjax extensions: "return_scores": true adds
      "scores", "step_scores", "finish_reasons" (streamed during decoding); "mode": "low" |
      "medium" | "high" sets response_num to 2 / 8 / 32 and adds "best" (the SPRM's choice);
      "repetition_penalty" overrides the server's (--repetition_penalty, default 1.05).
  POST /score {text, return_all_scores=false} -> {"value"} or {"value", "all_scores",
      "token_ids", "score_positions"}.
  GET /health -> 200 {"status": "ok", ...} once warm, 503 before.
  GET /stats -> counters: responses, device calls, generations, tokens, compiles, queue, memory.
Every error is HTTP 4xx/5xx with {"error": message}: 400 bad input, 404/405 unknown route or
method, 503 queue full / warming up / shutting down, 504 past --request_timeout.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import resource
import secrets
import sys
import time
from typing import Any

import jax
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from msjax.generate.tts import best_of_n
from msjax.serve.backend import Generation
from msjax.serve.batcher import BackendError, Batcher, QueueFull, ShuttingDown
from msjax.serve.schema import ApiError, parse_generate, parse_score

log = logging.getLogger("msjax.serve")
_POLL_S = 0.5  # how often a waiting handler checks that its client is still connected


async def read_body(request: Request) -> bytes:
    """The request body; ApiError 499 when the client hangs up before sending all of it."""
    try:
        return await request.body()
    except ClientDisconnect:
        raise ApiError("the client disconnected before sending the whole body.", 499) from None


class CompileCounter:
    """Counts XLA compilations in this process (jax.monitoring's backend-compile event)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == self.EVENT:
            self.count += 1


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)


def rss_mb() -> float:
    """Current resident memory of this process in MiB (the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return peak_rss_mb()
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def create_app(
    backend,
    batcher: Batcher,
    *,
    request_timeout_s: float = 600.0,
    max_response_num: int = 64,
    repetition_penalty: float = 1.05,
    model_name: str = "",
    compiles: CompileCounter | None = None,
) -> FastAPI:
    """The app; the batcher's worker starts with the app and stops at shutdown."""
    tokenizer = backend.tokenizer
    statuses: collections.Counter[str] = collections.Counter()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        log.info("shutting down: failing %d queued requests", batcher.queued())
        await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="msjax-serve", lifespan=lifespan, docs_url=None, redoc_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    @app.middleware("http")
    async def log_requests(request: Request, call_next):
        start = time.perf_counter()
        request.state.info = ""
        response = await call_next(request)
        statuses[f"{request.url.path} {response.status_code}"] += 1
        log.info(
            "%s %s %d %.0f ms %s",
            request.method,
            request.url.path,
            response.status_code,
            1000 * (time.perf_counter() - start),
            request.state.info,
        )
        return response

    async def run(request: Request, kind: str, item: Any) -> Any:
        """Queues the work and waits for it (timeout, client gone and queue full handled)."""
        if not batcher.ready.is_set():
            return error(503, "the server is warming up; retry when GET /health answers 200.")
        try:
            job = batcher.submit(kind, item)
        except QueueFull as e:
            return error(503, f"{e}; retry later.")
        except ShuttingDown as e:
            return error(503, str(e))
        deadline = time.monotonic() + request_timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return error(504, f"no result within --request_timeout={request_timeout_s} s.")
                try:
                    return await asyncio.wait_for(asyncio.shield(job.future), min(_POLL_S, left))
                except TimeoutError:
                    if await request.is_disconnected():
                        request.state.info = "client disconnected"
                        return error(499, "the client disconnected.")
        except ShuttingDown as e:
            return error(503, str(e))
        except BackendError as e:  # logged by the batcher
            return error(500, str(e))
        finally:
            batcher.cancel(job)

    @app.post("/generate")
    async def generate(request: Request):
        try:
            req = parse_generate(await read_body(request), max_response_num)
            prompt = tuple(tokenizer.encode(req.prefix_prompt))
            if not prompt:
                raise ApiError("'prefix_prompt' encodes to no tokens.")
            if len(prompt) > backend.max_prompt_tokens():
                raise ApiError(
                    f"'prefix_prompt' has {len(prompt)} tokens, leaving no room to generate in "
                    f"the model's context of {backend.context} positions (at most "
                    f"{backend.max_prompt_tokens()} prompt tokens)."
                )
        except ApiError as e:
            request.state.info = e.message
            return error(e.status, e.message)
        gen = Generation(
            prompt=prompt,
            n=req.response_num,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            seed=secrets.randbits(64) if req.seed is None else req.seed,
            stop=req.stop,
            repetition_penalty=req.repetition_penalty or repetition_penalty,
        )
        samples = await run(request, "generate", gen)
        if isinstance(samples, JSONResponse):
            return samples
        generated = sum(len(s.tokens) for s in samples)
        request.state.info = f"prompt {len(prompt)} tok, {gen.n} responses, {generated} tok"
        out: dict[str, Any] = {"results": [s.text for s in samples]}
        if req.return_scores:
            out["scores"] = [s.score for s in samples]
            out["step_scores"] = [s.step_scores for s in samples]
            out["finish_reasons"] = [s.finish for s in samples]
        if req.mode is not None:
            out["best"] = best_of_n([s.score for s in samples])
        return out

    @app.post("/score")
    async def score(request: Request):
        try:
            req = parse_score(await read_body(request))
            ids = tokenizer.encode(req.text)
            if len(ids) > backend.context:
                raise ApiError(
                    f"'text' has {len(ids)} tokens, more than the model's context of "
                    f"{backend.context} positions."
                )
        except ApiError as e:
            request.state.info = e.message
            return error(e.status, e.message)
        r = await run(request, "score", ids)
        if isinstance(r, JSONResponse):
            return r
        request.state.info = f"text {len(ids)} tok, {len(r['step_scores'])} steps"
        if not req.return_all_scores:
            return {"value": r["value"]}
        return {
            "value": r["value"],
            "all_scores": r["step_scores"],
            "token_ids": ids,
            "score_positions": r["step_positions"],
        }

    @app.get("/health")
    async def health():
        if batcher.error is not None:
            return error(500, f"warm-up failed: {batcher.error}")
        if not batcher.ready.is_set():
            return error(503, "warming up")
        return {"status": "ok", "model": model_name}

    @app.get("/stats")
    async def stats():
        return {
            "warm": batcher.ready.is_set(),
            "queued": batcher.queued(),
            **dataclasses.asdict(batcher.stats),
            "compiles": None if compiles is None else compiles.count,
            "rss_mb": rss_mb(),
            "peak_rss_mb": peak_rss_mb(),
            "responses": dict(statuses),
        }

    return app
