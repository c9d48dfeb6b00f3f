"""The queue between the HTTP handlers (asyncio) and the device (one worker thread).

A request becomes a `Job`: one generation (`backend.add`) or one text to score. The worker loop:
admit every waiting generation into the backend's continuous-batching engine (it joins the
decode at the next chunk boundary), run one decode chunk while the engine is busy, and score the
waiting texts in batches of up to `backend.max_batch_rows`, waiting at most `max_delay_s` after
the oldest text arrived for others to batch with. A job's future resolves when its work is done.
With `batching=False` one request runs at a time, alone (the original servers' design; the
benchmark's baseline).

The queue holds at most `max_queue` unfinished jobs (`QueueFull` beyond: HTTP 503). A cancelled
job (timeout, client gone) leaves the queue; if it was already decoding, its result is dropped.
`stop()` fails every unfinished job.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue already holds `max_queue` unfinished jobs."""


class ShuttingDown(Exception):
    """The server stopped before the job finished."""


class BackendError(Exception):
    """The device call that held the job failed (the message names the original error)."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request: kind "generate" (item: a backend Generation) or "score" (item: token ids)."""

    kind: str
    item: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False

    def _settle(self, fn: Callable, value: Any) -> None:
        def apply():
            if not self.future.done():
                fn(value)

        self.loop.call_soon_threadsafe(apply)

    def deliver(self, result: Any) -> None:
        self._settle(self.future.set_result, result)

    def fail(self, error: Exception) -> None:
        self._settle(self.future.set_exception, error)


@dataclasses.dataclass
class Stats:
    """Counters the /stats route reports: device calls (decode chunks and scoring calls),
    generations and texts run, tokens generated, seconds spent in device calls."""

    calls: int = 0
    generations: int = 0
    texts_scored: int = 0
    tokens_generated: int = 0
    busy_s: float = 0.0


class Batcher:
    """Feeds queued jobs to the backend from one worker thread.

    Args:
      backend: an `EngineBackend` (add, step, busy, reset, score, max_batch_rows).
      max_delay_s: longest a text to score waits for others to batch with.
      max_queue: most unfinished jobs. batching: False = one request at a time.
      warmup: called on the worker thread before serving (compiles); `ready` is set after it.
    """

    def __init__(
        self,
        backend,
        *,
        max_delay_s: float = 0.01,
        max_queue: int = 256,
        batching: bool = True,
        warmup: Callable[[], None] | None = None,
    ):
        self.backend = backend
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.batching = batching
        self.stats = Stats()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._warmup = warmup
        self._waiting: collections.deque[Job] = collections.deque()
        self._jobs: set[Job] = set()  # unfinished: waiting or in the backend
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="msjax-serve-device", daemon=True)

    # ----------------------------------------------------------------------------- asyncio side

    def start(self) -> None:
        self._thread.start()

    def submit(self, kind: str, item: Any) -> Job:
        """Queues a job (call on the event loop); QueueFull / ShuttingDown when refused."""
        loop = asyncio.get_running_loop()
        job = Job(kind, item, loop.create_future(), loop)
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"the queue holds {len(self._jobs)} requests (--max_queue)")
            self._jobs.add(job)
            self._waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Forgets a job: dropped if still waiting, its result dropped if already running."""
        with self._cond:
            job.cancelled = True
            self._jobs.discard(job)

    def queued(self) -> int:
        with self._cond:
            return len(self._jobs)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Fails every unfinished job and ends the worker after its current call."""
        with self._cond:
            self._stopping = True
            for job in self._jobs:
                job.fail(ShuttingDown("the server shut down before this request finished"))
            self._jobs.clear()
            self._waiting.clear()
            self._cond.notify()
        self._thread.join(timeout_s)

    # ----------------------------------------------------------------------------- worker side

    def _run(self) -> None:
        try:
            if self._warmup is not None:
                self._warmup()
        except BaseException as e:  # reported by /health; the process keeps answering
            log.exception("warm-up failed")
            self.error = e
            return
        self.ready.set()
        running: dict[int, Job] = {}  # id(job) -> job, for the generations in the backend
        while True:
            with self._cond:
                work = self._take(busy=bool(running))
            if work is None:
                return
            generations, texts = work
            for job in generations:
                running[id(job)] = job
                self._call(lambda job=job: self.backend.add(id(job), job.item), [job], running)
            if texts:
                self._score(texts)
            if running:
                self._step(running)

    def _take(self, busy: bool) -> tuple[list[Job], list[Job]] | None:
        """(generations to admit, texts to score now); waits while there is nothing to do."""
        while True:
            while self._waiting and self._waiting[0].cancelled:
                self._waiting.popleft()
            if self._stopping:
                return None
            waiting = [j for j in self._waiting if not j.cancelled]
            if not self.batching:
                if busy:
                    return [], []
                if waiting:
                    first = self._waiting.popleft()
                    return ([first], []) if first.kind == "generate" else ([], [first])
                self._cond.wait()
                continue
            generations = [j for j in waiting if j.kind == "generate"]
            texts = [j for j in waiting if j.kind == "score"][: self.backend.max_batch_rows]
            wait = None
            if texts:
                wait = texts[0].arrived + self.max_delay_s - time.monotonic()
                if wait > 0 and len(texts) < self.backend.max_batch_rows:
                    texts = []  # not yet: wait for company (decoding goes on meanwhile)
            if generations or texts or busy:
                taken = {id(j) for j in generations + texts}
                self._waiting = collections.deque(j for j in waiting if id(j) not in taken)
                return generations, texts
            self._cond.wait(wait)

    def _call(self, fn: Callable[[], Any], jobs: list[Job], running: dict[int, Job]) -> Any:
        """fn(); on failure, fails `jobs` (the server goes on) and returns None."""
        start = time.monotonic()
        try:
            return fn()
        except Exception as e:
            log.exception("a device call for %d requests failed", len(jobs))
            error = BackendError(f"{jobs[0].kind} failed: {type(e).__name__}: {e}")
            with self._cond:
                for job in jobs:
                    running.pop(id(job), None)
                    self._jobs.discard(job)
                    job.fail(error)
            return None
        finally:
            self.stats.busy_s += time.monotonic() - start

    def _step(self, running: dict[int, Job]) -> None:
        def step():
            try:
                return self.backend.step()
            except Exception:
                self.backend.reset()  # the engine's state is unknown: start afresh
                raise

        done = self._call(step, list(running.values()), running)
        self.stats.calls += 1
        with self._cond:
            for key, samples in done or []:
                job = running.pop(key)
                self.stats.generations += 1
                self.stats.tokens_generated += sum(len(s.tokens) for s in samples)
                if not job.cancelled:
                    self._jobs.discard(job)
                    job.deliver(samples)

    def _score(self, texts: list[Job]) -> None:
        results = self._call(lambda: self.backend.score([j.item for j in texts]), texts, {})
        self.stats.calls += 1
        if results is None:
            return
        with self._cond:
            self.stats.texts_scored += len(texts)
            for job, result in zip(texts, results, strict=True):
                self._jobs.discard(job)
                job.deliver(result)
