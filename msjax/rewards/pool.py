"""A process pool with a per-item timeout that replaces hung workers.

`concurrent.futures` and `multiprocessing.Pool` cannot stop one stuck task. Here each worker owns a
pipe; the parent hands out one item at a time, waits on the pipes, and a worker that overruns the
item's deadline is killed and replaced (its item is reported as timed out). Workers are started
with the "spawn" method by default: fork is unsafe in a process that already runs JAX's threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

_READY = "ready"


def _worker_main(conn: Connection, fn: Callable, initializer: Callable | None) -> None:
    if initializer is not None:
        initializer()
    conn.send(_READY)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        index, args = msg
        try:
            out = ("ok", fn(*args))
        except Exception as e:  # the item fails, the worker lives on
            out = ("error", f"{type(e).__name__}: {e}")
        conn.send((index, out))


@dataclasses.dataclass
class _Worker:
    process: Any
    conn: Connection
    ready: bool = False
    item: int | None = None
    deadline: float = 0.0


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One item's result: status "ok" (value set), "error" (value: the message) or "timeout"."""

    status: str
    value: Any = None


class TimeoutPool:
    """Runs `fn(*args)` for many items in `num_workers` processes, at most `timeout_s` each.

    `fn` and `initializer` must be picklable (module-level functions). Workers start lazily on the
    first `map` and wait for `initializer` (e.g. heavy imports) before taking items; starting may
    take up to `start_timeout_s`. Counters: `timeouts`, `errors`, `replaced`.
    """

    def __init__(
        self,
        fn: Callable,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        *,
        initializer: Callable | None = None,
        start_method: str = "spawn",
        start_timeout_s: float = 300.0,
    ):
        if num_workers < 1 or timeout_s <= 0:
            raise ValueError(
                f"need num_workers >= 1 and timeout_s > 0, got {num_workers}, {timeout_s}"
            )
        self.fn, self.initializer = fn, initializer
        self.num_workers, self.timeout_s = num_workers, timeout_s
        self.start_timeout_s = start_timeout_s
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self.timeouts = self.errors = self.replaced = 0

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        p = self._ctx.Process(
            target=_worker_main, args=(child, self.fn, self.initializer), daemon=True
        )
        p.start()
        child.close()
        return _Worker(p, parent, deadline=time.monotonic() + self.start_timeout_s)

    def _kill(self, w: _Worker) -> None:
        if w.process.is_alive():
            w.process.kill()
        w.process.join()
        w.conn.close()

    def _replace(self, w: _Worker) -> None:
        self._kill(w)
        self._workers[self._workers.index(w)] = self._spawn()
        self.replaced += 1

    def map(self, items: Sequence[tuple]) -> list[Outcome]:
        """Outcomes for `items` (argument tuples), in order."""
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())
        results: list[Outcome | None] = [None] * len(items)
        todo = list(range(len(items)))[::-1]
        pending = len(items)
        while pending:
            for w in self._workers:
                if w.ready and w.item is None and todo:
                    w.item = todo.pop()
                    w.deadline = time.monotonic() + self.timeout_s
                    w.conn.send((w.item, items[w.item]))
            busy = [w.deadline for w in self._workers if w.item is not None or not w.ready]
            wait_s = max(0.0, min(busy) - time.monotonic())
            ready = wait([w.conn for w in self._workers], timeout=wait_s)
            now = time.monotonic()
            for w in list(self._workers):
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):  # the worker died
                        msg = None
                    if msg == _READY:
                        w.ready = True
                        continue
                    if msg is None:
                        if not w.ready:
                            raise RuntimeError("a pool worker died while starting; see its stderr")
                        if w.item is not None:
                            results[w.item], pending = Outcome("error", "worker died"), pending - 1
                            self.errors += 1
                        self._replace(w)
                        continue
                    index, (status, value) = msg
                    results[index], pending = Outcome(status, value), pending - 1
                    self.errors += status == "error"
                    w.item = None
                elif (w.item is not None or not w.ready) and now >= w.deadline:
                    if not w.ready:
                        raise RuntimeError(
                            f"a pool worker did not start within {self.start_timeout_s} s"
                        )
                    results[w.item], pending = Outcome("timeout"), pending - 1
                    self.timeouts += 1
                    self._replace(w)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Stops every worker."""
        for w in self._workers:
            with contextlib.suppress(BrokenPipeError, OSError):
                w.conn.send(None)
        for w in self._workers:
            w.process.join(timeout=5)
            self._kill(w)
        self._workers = []

    def __enter__(self) -> TimeoutPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
