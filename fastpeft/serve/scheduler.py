"""The batching scheduler: requests that arrive within a short window run as one batch.

One *lane* per key (the server uses one per base model group): an asyncio queue, a worker task, and one
worker thread that runs ``runner(key, items) -> [answer or exception per item]``.  The worker takes the
first waiting request, then whatever else arrives within ``window_s`` (or is already waiting), up to
``max_batch``, whatever adapter each asks for; the batch runs in the lane's thread while the next one
gathers.  The queue is bounded: with ``max_queue`` requests waiting or running, :meth:`submit` raises
:class:`QueueFull` (the server answers 503).  Each request waits at most ``timeout_s``
(:class:`RequestTimeout`, the server answers 504); a request that times out before its batch starts is
dropped from it, one already running is told through ``item.cancelled``.  :meth:`close` runs what was
submitted, then stops.

Equivalent without batching: ``await loop.run_in_executor(None, runner, key, [item])`` per request.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass


class QueueFull(Exception):
    pass


class RequestTimeout(Exception):
    pass


class Closed(Exception):
    pass


_STOP = object()


@dataclass
class _Lane:
    queue: asyncio.Queue
    executor: concurrent.futures.ThreadPoolExecutor
    task: asyncio.Task = None


class Scheduler:
    def __init__(self, runner, *, max_batch: int = 32, window_s: float = 0.005, max_queue: int = 256,
                 timeout_s: float = 60.0, on_batch=None):
        if max_batch < 1 or max_queue < 1 or window_s < 0 or timeout_s <= 0:
            raise ValueError("Scheduler: max_batch and max_queue must be >= 1, window_s >= 0, timeout_s > 0")
        self.runner, self.max_batch, self.window_s = runner, max_batch, window_s
        self.max_queue, self.timeout_s, self.on_batch = max_queue, timeout_s, on_batch
        self.lanes: dict = {}
        self.pending = 0
        self.closed = False

    def _lane(self, key) -> _Lane:
        lane = self.lanes.get(key)
        if lane is None:
            lane = _Lane(asyncio.Queue(), concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fastpeft-serve"))
            lane.task = asyncio.get_running_loop().create_task(self._work(key, lane))
            self.lanes[key] = lane
        return lane

    async def submit(self, key, item, timeout_s: float | None = None):
        """Run ``item`` in the next batch of lane ``key``; returns its answer (raises its exception)."""
        if self.closed:
            raise Closed("the server is shutting down")
        if self.pending >= self.max_queue:
            raise QueueFull(f"the request queue is full ({self.max_queue} requests waiting or running); retry later")
        fut = asyncio.get_running_loop().create_future()
        self.pending += 1
        try:
            self._lane(key).queue.put_nowait((item, fut))
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout_s or self.timeout_s)
            except asyncio.TimeoutError:
                item.cancelled = True
                raise RequestTimeout(f"the request did not finish within {timeout_s or self.timeout_s:g} s") from None
            except asyncio.CancelledError:  # the client went away
                item.cancelled = True
                raise
        finally:
            self.pending -= 1

    async def _gather(self, lane: _Lane, first) -> list:
        batch = [first]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.window_s
        while len(batch) < self.max_batch:
            try:
                nxt = lane.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(lane.queue.get(), left)
                except asyncio.TimeoutError:
                    break
            if nxt is _STOP:
                lane.queue.put_nowait(_STOP)  # stop after this batch
                break
            batch.append(nxt)
        return batch

    async def _work(self, key, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await lane.queue.get()
            if first is _STOP:
                return
            batch = [(it, f) for it, f in await self._gather(lane, first) if not f.done() and not it.cancelled]
            if not batch:
                continue
            items = [it for it, _ in batch]
            if self.on_batch is not None:
                self.on_batch(key, len(items))
            try:
                answers = await loop.run_in_executor(lane.executor, self.runner, key, items)
            except Exception as e:  # noqa: BLE001 -- the whole batch failed: every request hears why
                answers = [e] * len(items)
            for (_, fut), ans in zip(batch, answers):
                if fut.done():
                    continue
                if isinstance(ans, BaseException):
                    fut.set_exception(ans)
                else:
                    fut.set_result(ans)

    async def close(self) -> None:
        """Finish every submitted request, then stop the lanes."""
        self.closed = True
        for lane in self.lanes.values():
            lane.queue.put_nowait(_STOP)
        for lane in self.lanes.values():
            await lane.task
            lane.executor.shutdown(wait=True)
        self.lanes.clear()
