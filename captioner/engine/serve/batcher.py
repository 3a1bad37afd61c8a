"""Dynamic batching: items submitted from many requests run through one function in shared batches.

    batcher = DynamicBatcher(run, max_batch=32, max_wait=0.010, capacity=256)
    futures = batcher.submit([item1, item2])     # raises QueueFull when capacity would be exceeded
    results = [f.result() for f in futures]      # run(items) -> one result per item, in order
    batcher.close()                              # finishes what is queued, then stops the thread

One thread owns the model: it takes the oldest item, waits at most max_wait for more (as TorchServe's
max_batch_delay and Triton's max_queue_delay do), then calls run() on up to max_batch items. Callers never
wait on the model to be accepted or refused: submit() only touches a bounded deque under a lock. A future
cancelled before its batch starts (its request timed out) is dropped and never computed.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

log = logging.getLogger("captioner")


class QueueFull(Exception):
    """The queue cannot take these items now; the caller should answer 'retry later'."""


class DynamicBatcher:
    def __init__(self, run: Callable[[list], list], max_batch: int, max_wait: float, capacity: int):
        if max_batch < 1 or capacity < 1 or max_wait < 0:
            raise ValueError(f"max_batch {max_batch} and capacity {capacity} must be >= 1, max_wait {max_wait} >= 0")
        self.run, self.max_batch, self.max_wait, self.capacity = run, max_batch, max_wait, capacity
        self._queue: collections.deque[tuple[Any, Future, float]] = collections.deque()
        self._ready = threading.Condition()
        self._closing = False
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # batch size -> batches run
        self.busy_seconds = 0.0
        self._thread = threading.Thread(target=self._loop, name="captioner-batcher", daemon=True)
        self._thread.start()

    def submit(self, items: list) -> list[Future]:
        """Queue items (all or none); one Future per item, resolved with run()'s result for it."""
        futures = [Future() for _ in items]
        with self._ready:
            if self._closing:
                raise QueueFull("shutting down")
            if len(self._queue) + len(items) > self.capacity:
                raise QueueFull(f"{len(self._queue)} images are waiting (capacity {self.capacity})")
            now = time.monotonic()
            self._queue.extend((item, future, now) for item, future in zip(items, futures))
            self._ready.notify()
        return futures

    @property
    def queued(self) -> int:
        return len(self._queue)

    def stats(self) -> dict:
        sizes = dict(sorted(self.batch_sizes.items()))
        batches = sum(sizes.values())
        images = sum(size * count for size, count in sizes.items())
        return {"batches": batches, "images": images, "batch_sizes": {str(k): v for k, v in sizes.items()},
                "mean_batch": round(images / batches, 2) if batches else None, "queued": self.queued,
                "busy_seconds": round(self.busy_seconds, 3)}

    def close(self, timeout: float | None = None) -> None:
        """Refuse new items, finish the queued ones, stop the thread."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join(timeout)

    def _take(self) -> list[tuple[Any, Future]] | None:
        """Block until a batch is due: max_batch items queued, the oldest waited max_wait, or closing."""
        with self._ready:
            while not self._queue:
                if self._closing:
                    return None
                self._ready.wait()
            deadline = self._queue[0][2] + self.max_wait
            while len(self._queue) < self.max_batch and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._ready.wait(left)
            taken = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
        # A cancelled future (its request gave up) is dropped here; the others can no longer be cancelled.
        return [(item, future) for item, future, _ in taken if future.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            if not batch:
                continue
            items, futures = zip(*batch)
            start = time.perf_counter()
            try:
                results = self.run(list(items))
            except BaseException as e:  # noqa: BLE001 - one failing batch fails its requests, never the thread
                log.exception("batch of %d failed", len(items))
                for future in futures:
                    future.set_exception(e)
                continue
            finally:
                self.busy_seconds += time.perf_counter() - start
                self.batch_sizes[len(items)] += 1
            for future, result in zip(futures, results):
                future.set_result(result)
