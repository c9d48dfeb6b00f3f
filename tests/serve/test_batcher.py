"""The worker queue with a stand-in backend (no model): generations join the decode between
steps, texts to score are batched (delay bound), one-request-at-a-time mode, the queue bound,
cancellation, failures and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from msjax.serve.batcher import BackendError, Batcher, QueueFull, ShuttingDown


class Out:
    def __init__(self, value):
        self.value = value
        self.tokens = [0] * value


class FakeBackend:
    """A generation item is (value, steps): it completes after `steps` steps with [Out(10 *
    value)]. `gate` holds each step until set. Every call is recorded."""

    max_batch_rows = 4

    def __init__(self):
        self.calls: list[tuple] = []
        self.live: dict = {}
        self.gate = threading.Event()
        self.gate.set()

    @property
    def busy(self):
        return bool(self.live)

    def add(self, key, item):
        self.calls.append(("add", item[0]))
        self.live[key] = list(item)

    def step(self):
        self.gate.wait(10)
        self.calls.append(("step", sorted(v for v, _ in self.live.values())))
        done = []
        for key, item in list(self.live.items()):
            item[1] -= 1
            if item[1] == 0:
                done.append((key, [Out(10 * item[0])]))
                del self.live[key]
        return done

    def reset(self):
        self.live.clear()

    def score(self, texts):
        self.calls.append(("score", list(texts)))
        return [len(t) for t in texts]


def start(**kwargs):
    backend = FakeBackend()
    batcher = Batcher(backend, **kwargs)
    batcher.start()
    return backend, batcher


async def result(batcher, kind, item):
    return await batcher.submit(kind, item).future


def test_generations_join_between_steps():
    backend, batcher = start()
    backend.gate.clear()

    async def main():
        a = asyncio.ensure_future(result(batcher, "generate", (1, 2)))
        await asyncio.sleep(0.1)  # A is in its first step (held by the gate)
        b = asyncio.ensure_future(result(batcher, "generate", (2, 1)))
        c = asyncio.ensure_future(result(batcher, "generate", (3, 2)))
        await asyncio.sleep(0.05)
        backend.gate.set()
        return await asyncio.gather(a, b, c)

    a, b, c = asyncio.run(main())
    batcher.stop()
    assert [o.value for o in a + b + c] == [10, 20, 30]
    assert backend.calls == [
        ("add", 1),
        ("step", [1]),
        ("add", 2),
        ("add", 3),
        ("step", [1, 2, 3]),
        ("step", [3]),
    ]
    s = batcher.stats
    assert (s.calls, s.generations, s.tokens_generated) == (3, 3, 60)


def test_texts_are_scored_in_batches():
    backend, batcher = start(max_delay_s=0.5)

    async def main():
        jobs = [result(batcher, "score", [1] * k) for k in (1, 2, 3, 4, 5)]
        return await asyncio.gather(*jobs)

    assert asyncio.run(main()) == [1, 2, 3, 4, 5]
    batcher.stop()
    # Four arrived within the delay: one call; the fifth waited its delay, then ran alone.
    assert [len(c[1]) for c in backend.calls] == [4, 1]


def test_without_batching_one_request_at_a_time():
    backend, batcher = start(batching=False)
    backend.gate.clear()

    async def main():
        jobs = [asyncio.ensure_future(result(batcher, "generate", (v, 2))) for v in (1, 2)] + [
            asyncio.ensure_future(result(batcher, "score", [1, 2]))
        ]
        await asyncio.sleep(0.05)
        backend.gate.set()
        return await asyncio.gather(*jobs)

    asyncio.run(main())
    batcher.stop()
    assert backend.calls == [
        ("add", 1),
        ("step", [1]),
        ("step", [1]),
        ("add", 2),
        ("step", [2]),
        ("step", [2]),
        ("score", [[1, 2]]),
    ]


def test_a_text_waits_for_company_at_least_the_delay():
    backend, batcher = start(max_delay_s=0.2)

    async def main():
        t0 = time.monotonic()
        await result(batcher, "score", [1])
        return time.monotonic() - t0

    assert asyncio.run(main()) >= 0.2
    batcher.stop()


def test_queue_bound_cancel_and_shutdown():
    backend, batcher = start(max_queue=2)
    backend.gate.clear()

    async def main():
        first = batcher.submit("generate", (1, 1))
        await asyncio.sleep(0.05)  # decoding, held by the gate
        second = batcher.submit("score", [1])
        with pytest.raises(QueueFull):
            batcher.submit("generate", (3, 1))
        batcher.cancel(second)  # dropped before it runs; frees its place
        third = batcher.submit("generate", (4, 1))
        backend.gate.set()
        assert [o.value for o in await first.future] == [10]
        assert [o.value for o in await third.future] == [40]
        backend.gate.clear()
        fourth = batcher.submit("generate", (5, 1))
        await asyncio.sleep(0.05)
        fifth = batcher.submit("score", [1])
        stopper = asyncio.get_running_loop().run_in_executor(None, batcher.stop)
        await asyncio.sleep(0.05)
        backend.gate.set()
        await stopper
        for job in (fourth, fifth):  # running or waiting at shutdown: both get an error
            with pytest.raises(ShuttingDown):
                await job.future
        with pytest.raises(ShuttingDown):
            batcher.submit("generate", (7, 1))

    asyncio.run(main())
    assert ("score", [[1]]) not in backend.calls


def test_failed_calls_fail_their_requests_and_the_worker_goes_on():
    backend, batcher = start(max_delay_s=0)

    async def main():
        with pytest.raises(BackendError, match="generate failed: TypeError"):
            await result(batcher, "generate", (None, "x"))  # "x" - 1 fails in step
        assert not backend.live  # reset after the failed step
        backend.score = lambda texts: next(iter([]))  # StopIteration: still delivered
        with pytest.raises(BackendError, match="score failed: StopIteration"):
            await result(batcher, "score", [1])
        return await result(batcher, "generate", (2, 1))

    assert [o.value for o in asyncio.run(main())] == [20]
    batcher.stop()
