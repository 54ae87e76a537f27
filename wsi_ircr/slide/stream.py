"""A stream of items through stages in threads, joined by bounded queues.

Each stage is a function of one item run by its own threads; an item leaves a stage as
soon as it is done, so a slow stage never waits for the whole input to pass the one before
it, and at most ``depth`` items wait between two stages (memory stays bounded however many
items flow). The first error stops the stream and is raised to the caller. Per stage, the
seconds its threads spent working are summed (busy time, not wall time).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

_DONE = object()


@dataclass(frozen=True)
class Stage:
    """``fn(item) -> item`` run by ``threads`` threads (output order follows input order
    only with one thread)."""

    name: str
    fn: Callable
    threads: int = 1


class _Stopped(Exception):
    """Raised in a worker when another stage failed."""


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            q.put(item, timeout=0.05)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue, stop: threading.Event):
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            continue


def stream(items: Iterable, stages: list[Stage], depth: int = 2, seconds: dict[str, float] | None = None) -> Iterator:
    """Yield ``stages[-1].fn(...(stages[0].fn(item)))`` for every item, stages overlapping.

    Args:
        items: the inputs (consumed lazily by a feeder thread).
        stages: the stages, in order.
        depth: items waiting at most between two stages (queue size), >= 1.
        seconds: if given, ``seconds[stage.name]`` is increased by the stage's busy time.

    Raises:
        The first exception of any stage (or of iterating ``items``); the other threads stop.
    """
    if depth < 1 or not stages or any(s.threads < 1 for s in stages):
        raise ValueError("stream needs depth >= 1 and stages of >= 1 thread each")
    stop = threading.Event()
    errors: list[BaseException] = []
    lock = threading.Lock()
    queues = [queue.Queue(maxsize=depth) for _ in range(len(stages) + 1)]
    busy = {s.name: 0.0 for s in stages}

    def fail(e: BaseException) -> None:
        with lock:
            errors.append(e)
        stop.set()

    def feed() -> None:
        try:
            for item in items:
                _put(queues[0], item, stop)
            for _ in range(stages[0].threads):
                _put(queues[0], _DONE, stop)
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            fail(e)

    remaining = [s.threads for s in stages]

    def work(k: int) -> None:
        stage, inbox, outbox = stages[k], queues[k], queues[k + 1]
        try:
            while True:
                item = _get(inbox, stop)
                if item is _DONE:
                    break
                t0 = time.perf_counter()
                out = stage.fn(item)
                with lock:
                    busy[stage.name] += time.perf_counter() - t0
                _put(outbox, out, stop)
            with lock:
                remaining[k] -= 1
                last = remaining[k] == 0
            if last:  # the stage's last thread tells the next stage that nothing more comes
                for _ in range(stages[k + 1].threads if k + 1 < len(stages) else 1):
                    _put(outbox, _DONE, stop)
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            fail(e)

    threads = [threading.Thread(target=feed, name="stream-feed", daemon=True)]
    threads += [threading.Thread(target=work, args=(k,), name=f"stream-{s.name}", daemon=True)
                for k, s in enumerate(stages) for _ in range(s.threads)]
    for t in threads:
        t.start()
    try:
        while True:
            try:
                item = _get(queues[-1], stop)
            except _Stopped:
                break
            if item is _DONE:
                break
            yield item
    finally:
        stop.set()
        for t in threads:
            t.join()
        if seconds is not None:
            for name, v in busy.items():
                seconds[name] = seconds.get(name, 0.0) + v
    if errors:
        raise errors[0]
