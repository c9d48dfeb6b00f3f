"""The queue between the HTTP handlers (asyncio) and the device (one worker thread).

Each request becomes a `Job`: its generation rows (one per sample) or its one text to score. The
worker takes the oldest waiting entry, waits at most `max_delay_s` after that entry arrived for
more work of the same kind (`backend.group` for generation rows), and runs up to
`backend.max_batch_rows` entries as one compiled call; a job's future resolves once all its
entries are done. With `batching=False` each call holds the rows of one request only (the
original servers' one-request-at-a-time design; the benchmark's baseline).

The queue holds at most `max_queue` unfinished jobs (`QueueFull` beyond: HTTP 503). A cancelled
job (timeout, client gone) drops its waiting entries. `stop()` fails every unfinished job.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
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
    """One request's work: kind "generate" (items: backend Rows) or "score" (items: one id list);
    groups[i]: entries with equal groups can share a call."""

    kind: str
    items: list[Any]
    groups: list[Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    results: list[Any] = dataclasses.field(default_factory=list)
    left: int = 0
    cancelled: bool = False

    def __post_init__(self):
        self.results = [None] * len(self.items)
        self.left = len(self.items)

    def _settle(self, fn: Callable, value: Any) -> None:
        def apply():
            if not self.future.done():
                fn(value)

        self.loop.call_soon_threadsafe(apply)

    def deliver(self, index: int, result: Any) -> None:
        self.results[index] = result
        self.left -= 1
        if self.left == 0:
            self._settle(self.future.set_result, self.results)

    def fail(self, error: BaseException) -> None:
        self.left = 0
        self._settle(self.future.set_exception, error)


@dataclasses.dataclass
class Stats:
    """Counters the /stats route reports."""

    batches: int = 0
    rows: int = 0
    tokens_generated: int = 0
    busy_s: float = 0.0


class Batcher:
    """Batches queued jobs into backend calls on one worker thread.

    Args:
      backend: a `SamplerBackend` (generate, score, group, max_batch_rows).
      max_delay_s: longest wait for later work once an entry is queued.
      max_queue: most unfinished jobs. batching: False = one request per call.
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
        self._warmup = warmup
        self._entries: collections.deque[tuple[Job, int]] = collections.deque()
        self._jobs: set[Job] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="msjax-serve-device", daemon=True)
        self.error: BaseException | None = None

    # ----------------------------------------------------------------------------- asyncio side

    def start(self) -> None:
        self._thread.start()

    def submit(self, kind: str, items: list[Any]) -> Job:
        """Queues a job (call on the event loop); QueueFull / ShuttingDown when refused."""
        loop = asyncio.get_running_loop()
        if kind == "generate":
            groups = [("generate", self.backend.group(row)) for row in items]
        else:
            groups = [("score",)] * len(items)
        job = Job(kind, items, groups, loop.create_future(), loop)
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"the queue holds {len(self._jobs)} requests (--max_queue)")
            self._jobs.add(job)
            self._entries.extend((job, i) for i in range(len(items)))
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drops a job's waiting entries (its running ones finish and are discarded)."""
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
            self._entries.clear()
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
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _next_batch(self) -> list[tuple[Job, int]] | None:
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._stopping:
                    return None
                if not self._entries:
                    self._cond.wait()
                    continue
                first = self._entries[0]
                wait = first[0].arrived + self.max_delay_s - time.monotonic()
                batch = self._compatible(*first)
                if wait <= 0 or len(batch) >= self.backend.max_batch_rows or not self.batching:
                    for entry in batch:
                        self._entries.remove(entry)
                    return batch
                self._cond.wait(wait)

    def _drop_cancelled(self) -> None:
        if any(job.cancelled for job, _ in self._entries):
            self._entries = collections.deque(e for e in self._entries if not e[0].cancelled)

    def _compatible(self, first: Job, index: int) -> list[tuple[Job, int]]:
        """The entries that can run with the oldest one, oldest first, up to max_batch_rows."""
        if self.batching:
            group = first.groups[index]
            fits = (e for e in self._entries if e[0].groups[e[1]] == group)
        else:
            fits = (e for e in self._entries if e[0] is first)
        return list(itertools.islice(fits, self.backend.max_batch_rows))

    def _execute(self, batch: list[tuple[Job, int]]) -> None:
        start = time.monotonic()
        kind = batch[0][0].kind
        items = [job.items[i] for job, i in batch]
        try:
            call = self.backend.generate if kind == "generate" else self.backend.score
            results = call(items)
        except Exception as e:  # a failed call fails its jobs; the server keeps serving
            log.exception("%s call of %d rows failed", kind, len(batch))
            error = BackendError(f"{kind} failed: {type(e).__name__}: {e}")
            with self._cond:
                for job in {job for job, _ in batch}:
                    self._jobs.discard(job)
                    job.fail(error)
            return
        with self._cond:
            self.stats.batches += 1
            self.stats.rows += len(batch)
            self.stats.busy_s += time.monotonic() - start
            if kind == "generate":
                self.stats.tokens_generated += sum(len(r.tokens) for r in results)
            for (job, i), result in zip(batch, results, strict=True):
                if job.left > 0:
                    job.deliver(i, result)
                    if job.left == 0:
                        self._jobs.discard(job)
