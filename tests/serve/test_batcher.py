"""The batching queue with a stand-in backend (no model): what runs together, the delay bound,
one-request-at-a-time mode, the queue bound, cancellation and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from msjax.serve.batcher import BackendError, Batcher, QueueFull, ShuttingDown


class FakeBackend:
    """Rows are (group, value); generate returns value * 10; records every call."""

    max_batch_rows = 4

    def __init__(self, delay_s: float = 0.0):
        self.calls: list[tuple[str, list]] = []
        self.delay_s = delay_s
        self.release = threading.Event()
        self.release.set()

    def group(self, row):
        return row[0]

    def generate(self, rows):
        self.release.wait(10)
        time.sleep(self.delay_s)
        self.calls.append(("generate", list(rows)))
        return [Out(r[1] * 10) for r in rows]

    def score(self, texts):
        self.calls.append(("score", list(texts)))
        return [len(t) for t in texts]


class Out:
    def __init__(self, value):
        self.value = value
        self.tokens = [0] * value


async def _run(batcher, kind, items):
    return await batcher.submit(kind, items).future


def test_concurrent_requests_share_calls_by_group():
    backend = FakeBackend()
    backend.release.clear()  # hold the worker until everything is queued
    batcher = Batcher(backend, max_delay_s=0.05)
    batcher.start()

    async def main():
        jobs = [
            _run(batcher, "generate", [("a", 1), ("a", 2)]),
            _run(batcher, "generate", [("b", 3)]),
            _run(batcher, "generate", [("a", 4), ("a", 5), ("a", 6)]),
            _run(batcher, "score", [[1, 2, 3]]),
            _run(batcher, "score", [[1]]),
        ]
        tasks = [asyncio.ensure_future(j) for j in jobs]
        await asyncio.sleep(0.01)
        backend.release.set()
        return await asyncio.gather(*tasks)

    a, b, c, s1, s2 = asyncio.run(main())
    batcher.stop()
    assert [o.value for o in a] == [10, 20] and [o.value for o in b] == [30]
    assert [o.value for o in c] == [40, 50, 60] and s1 == [3] and s2 == [1]
    # Oldest first; up to max_batch_rows rows of the oldest entry's group per call.
    assert backend.calls == [
        ("generate", [("a", 1), ("a", 2), ("a", 4), ("a", 5)]),
        ("generate", [("b", 3)]),
        ("generate", [("a", 6)]),
        ("score", [[1, 2, 3], [1]]),
    ]
    assert batcher.stats.batches == 4 and batcher.stats.rows == 8
    assert batcher.stats.tokens_generated == 210


def test_without_batching_one_request_per_call():
    backend = FakeBackend()
    backend.release.clear()
    batcher = Batcher(backend, batching=False)
    batcher.start()

    async def main():
        tasks = [
            asyncio.ensure_future(_run(batcher, "generate", [("a", i), ("a", i + 1)]))
            for i in (1, 3, 5)
        ]
        await asyncio.sleep(0.01)
        backend.release.set()
        return await asyncio.gather(*tasks)

    asyncio.run(main())
    batcher.stop()
    assert [len(rows) for _, rows in backend.calls] == [2, 2, 2]


def test_a_request_waits_at_most_the_delay_for_company():
    backend = FakeBackend()
    batcher = Batcher(backend, max_delay_s=0.2)
    batcher.start()

    async def main():
        start = time.monotonic()
        await _run(batcher, "generate", [("a", 1)])
        return time.monotonic() - start

    waited = asyncio.run(main())
    batcher.stop()
    assert waited >= 0.2  # it waited for company, then ran alone
    assert backend.calls == [("generate", [("a", 1)])]


def test_queue_bound_cancel_and_shutdown():
    backend = FakeBackend()
    backend.release.clear()
    batcher = Batcher(backend, max_queue=2, max_delay_s=0)
    batcher.start()

    async def main():
        first = batcher.submit("generate", [("a", 1)])
        await asyncio.sleep(0.05)  # the worker holds it (blocked in generate)
        second = batcher.submit("generate", [("a", 2)])
        with pytest.raises(QueueFull):
            batcher.submit("generate", [("a", 3)])
        batcher.cancel(second)  # dropped before it runs
        third = batcher.submit("generate", [("a", 4)])
        backend.release.set()
        assert [o.value for o in await first.future] == [10]
        assert [o.value for o in await third.future] == [40]
        backend.release.clear()
        fourth = batcher.submit("generate", [("a", 5)])
        await asyncio.sleep(0.05)
        fifth = batcher.submit("generate", [("a", 6)])
        stopper = asyncio.get_running_loop().run_in_executor(None, batcher.stop)
        await asyncio.sleep(0.05)
        backend.release.set()
        await stopper
        for job in (fourth, fifth):  # running or queued at shutdown: both get an error
            with pytest.raises(ShuttingDown):
                await job.future
        with pytest.raises(ShuttingDown):
            batcher.submit("generate", [("a", 7)])

    asyncio.run(main())
    assert [rows for _, rows in backend.calls][:2] == [[("a", 1)], [("a", 4)]]
    assert ("a", 2) not in [r for _, rows in backend.calls for r in rows]


def test_a_failed_call_fails_its_requests_and_the_worker_goes_on():
    batcher = Batcher(FakeBackend(), max_delay_s=0)
    batcher.start()

    async def main():
        with pytest.raises(BackendError, match="generate failed: TypeError"):
            await _run(batcher, "generate", [("a", None)])  # None * 10 fails in the backend
        batcher.backend.generate = lambda rows: next(iter([]))  # StopIteration: still delivered
        with pytest.raises(BackendError, match="StopIteration"):
            await _run(batcher, "generate", [("a", 1)])
        del batcher.backend.generate
        return await _run(batcher, "generate", [("a", 2)])

    assert [o.value for o in asyncio.run(main())] == [20]
    batcher.stop()
