"""The bounded-queue stream of tile stages (wsi_ircr.slide.stream)."""

from __future__ import annotations

import threading

import pytest

from wsi_ircr.slide.stream import Stage, stream


def test_every_item_passes_every_stage_in_order_with_one_thread():
    out = list(stream(range(20), [Stage("a", lambda x: x + 1), Stage("b", lambda x: x * 10)]))
    assert out == [(x + 1) * 10 for x in range(20)]


def test_several_threads_give_every_item_once():
    out = list(stream(range(50), [Stage("a", lambda x: x), Stage("b", lambda x: -x, threads=3)]))
    assert sorted(out) == sorted(-x for x in range(50))


def test_items_in_flight_are_bounded():
    """No barrier: the last stage gets the first item before the source is drained, and the
    source runs at most stages x (depth + thread) items ahead of the consumer."""
    pulled = []
    held = threading.Lock()
    ahead = []

    def source():
        for i in range(100):
            with held:
                pulled.append(i)
            yield i

    def last(x):
        return x

    depth = 2
    for k, x in enumerate(stream(source(), [Stage("a", lambda x: x), Stage("b", last)], depth=depth)):
        with held:
            ahead.append(len(pulled) - k)
        if k == 0:
            assert len(pulled) < 100
    # queues: source->a, a->b, b->out (depth each) + one item inside each stage + one in the feeder
    assert max(ahead) <= 3 * depth + 2 + 1


def test_the_first_error_stops_the_stream_and_is_raised():
    seen = []

    def boom(x):
        if x == 5:
            raise RuntimeError("tile 5 failed")
        return x

    def record(x):
        seen.append(x)
        return x

    with pytest.raises(RuntimeError, match="tile 5 failed"):
        list(stream(range(1000), [Stage("a", boom), Stage("b", record)]))
    assert len(seen) < 1000


def test_an_error_of_the_source_is_raised():
    def source():
        yield 1
        raise ValueError("unreadable")

    with pytest.raises(ValueError, match="unreadable"):
        list(stream(source(), [Stage("a", lambda x: x)]))


def test_busy_seconds_are_summed_per_stage():
    seconds = {"a": 1.0}
    list(stream(range(3), [Stage("a", lambda x: sum(range(10000))), Stage("b", lambda x: x)], seconds=seconds))
    assert seconds["a"] > 1.0 and seconds["b"] >= 0.0


def test_closing_early_stops_the_threads():
    before = threading.active_count()
    gen = stream(iter(range(10**6)), [Stage("a", lambda x: x, threads=2)])
    assert next(gen) in range(10**6)
    gen.close()
    assert threading.active_count() == before


@pytest.mark.parametrize("stages, depth", [([], 1), ([Stage("a", abs)], 0), ([Stage("a", abs, threads=0)], 1)])
def test_bad_arguments(stages, depth):
    with pytest.raises(ValueError):
        list(stream(range(3), stages, depth=depth))
