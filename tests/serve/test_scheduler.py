"""The batching scheduler alone, with a fake runner (no model)."""
import asyncio
import threading
from dataclasses import dataclass

import pytest

from fastpeft.serve.scheduler import Closed, QueueFull, RequestTimeout, Scheduler


@dataclass
class Item:
    value: object
    cancelled: bool = False


class Runner:
    def __init__(self, gate=None):
        self.batches = []
        self.gate = gate

    def __call__(self, key, items):
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append((key, [it.value for it in items]))
        return [ValueError(f"bad {it.value}") if it.value == "bad" else (key, it.value * 2) for it in items]


def run(coro):
    return asyncio.run(coro)


def test_requests_within_the_window_share_a_batch_whatever_their_adapter():
    async def main():
        r = Runner()
        s = Scheduler(r, window_s=0.05, max_batch=8)
        out = await asyncio.gather(*(s.submit("g", Item(i)) for i in range(5)))
        await s.close()
        return r, out
    r, out = run(main())
    assert out == [("g", 2 * i) for i in range(5)]
    assert r.batches == [("g", [0, 1, 2, 3, 4])]


def test_max_batch_and_lanes():
    async def main():
        r = Runner()
        s = Scheduler(r, window_s=0.05, max_batch=3)
        out = await asyncio.gather(*(s.submit("a" if i % 2 else "b", Item(i)) for i in range(10)))
        await s.close()
        return r, out
    r, out = run(main())
    assert out == [("a" if i % 2 else "b", 2 * i) for i in range(10)]
    assert all(len(b) <= 3 for _, b in r.batches)
    assert sorted(v for k, b in r.batches if k == "a" for v in b) == [1, 3, 5, 7, 9]
    assert sorted(v for k, b in r.batches if k == "b" for v in b) == [0, 2, 4, 6, 8]


def test_a_failing_item_fails_alone_and_a_failing_batch_fails_all():
    async def main():
        s = Scheduler(Runner(), window_s=0.05)
        res = await asyncio.gather(s.submit("g", Item("bad")), s.submit("g", Item(1)), return_exceptions=True)
        assert isinstance(res[0], ValueError) and res[1] == ("g", 2)

        def boom(key, items):
            raise RuntimeError("model broke")
        s2 = Scheduler(boom, window_s=0.05)
        res = await asyncio.gather(s2.submit("g", Item(1)), s2.submit("g", Item(2)), return_exceptions=True)
        assert all(isinstance(e, RuntimeError) and "model broke" in str(e) for e in res)
        await s.close()
        await s2.close()
    run(main())


def test_bounded_queue_answers_queue_full():
    async def main():
        gate = threading.Event()
        s = Scheduler(Runner(gate), window_s=0, max_queue=2)
        t1 = asyncio.ensure_future(s.submit("g", Item(1)))
        t2 = asyncio.ensure_future(s.submit("g", Item(2)))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull, match="queue is full"):
            await s.submit("g", Item(3))
        gate.set()
        assert await t1 == ("g", 2) and await t2 == ("g", 4)
        assert await s.submit("g", Item(3)) == ("g", 6)  # room again
        await s.close()
    run(main())


def test_timeout_cancels_a_waiting_request():
    async def main():
        gate = threading.Event()
        r = Runner(gate)
        s = Scheduler(r, window_s=0, timeout_s=0.1)
        first = asyncio.ensure_future(s.submit("g", Item(1), timeout_s=5))
        await asyncio.sleep(0.02)
        waiting = Item(2)
        with pytest.raises(RequestTimeout):
            await s.submit("g", waiting)
        assert waiting.cancelled
        gate.set()
        assert await first == ("g", 2)
        await s.close()
        return r
    r = run(main())
    assert all(2 not in b for _, b in r.batches)  # the timed-out request never ran


def test_close_finishes_submitted_requests_then_refuses():
    async def main():
        gate = threading.Event()
        s = Scheduler(Runner(gate), window_s=0.01)
        pending = [asyncio.ensure_future(s.submit("g", Item(i))) for i in range(4)]
        await asyncio.sleep(0.02)
        closing = asyncio.ensure_future(s.close())
        await asyncio.sleep(0.02)
        with pytest.raises(Closed):
            await s.submit("g", Item(9))
        gate.set()
        await closing
        return [await p for p in pending]
    assert run(main()) == [("g", 2 * i) for i in range(4)]


def test_bad_settings():
    with pytest.raises(ValueError, match="max_batch"):
        Scheduler(Runner(), max_batch=0)
