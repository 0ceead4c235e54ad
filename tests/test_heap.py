"""The heap keeper (cnnsql/core/heap.py): freed heap pages go back to the system once memory has grown by
more than the slack, memory in use is kept, one trim per interval, and the predictor checks after each batch."""
from __future__ import annotations

import numpy as np
import pytest

from cnnsql.core import heap

KEEPER_ACTIVE = heap.HeapKeeper().active
needs_glibc = pytest.mark.skipif(not KEEPER_ACTIVE, reason="no glibc malloc_trim or no /proc here")

MB = 1 << 20


def fragment(n: int = 2000):
    """n freed 64 KiB heap blocks, each held apart from the next by a small live object: free memory that
    stays resident (malloc cannot give it back from the top of the heap)."""
    big, small = [], []
    for i in range(n):
        big.append(bytes([i % 251 + 1]) * 65536)  # below the mmap threshold: on the heap, pages touched
        small.append(bytes([i % 13 + 1]) * 700)   # above pymalloc's limit: malloc'd between the big ones
    del big
    return small


@needs_glibc
def test_freed_heap_memory_is_given_back_after_growth_beyond_the_slack():
    keeper = heap.HeapKeeper(slack=16 * MB, interval=0)
    keeper.after_batch()  # the mark
    kept = fragment()
    grown = heap._anon_bytes()
    keeper.after_batch()
    after = heap._anon_bytes()
    assert keeper.trims == 1
    assert grown - after > 64 * MB, (grown >> 20, after >> 20)
    assert keeper.stats()["heap_released_mb"] > 64
    assert all(len(s) == 700 for s in kept)  # memory in use untouched


@needs_glibc
def test_no_trim_within_the_slack_or_the_interval():
    keeper = heap.HeapKeeper(slack=1 << 40, interval=0)
    keeper.after_batch()
    kept = fragment()
    keeper.after_batch()
    assert keeper.trims == 0 and keeper.checks == 2

    keeper = heap.HeapKeeper(slack=1 * MB, interval=3600)
    keeper.after_batch()
    kept += fragment(3000)  # more than the memory freed above: the process grows
    keeper.after_batch()  # the first trim
    keeper.after_batch()  # sets the mark again
    kept += fragment(3000)
    keeper.after_batch()  # grown again, but within the interval
    assert keeper.trims == 1
    assert kept


def test_where_there_is_no_proc_or_glibc_nothing_happens(monkeypatch):
    monkeypatch.setattr(heap, "_anon_reader", lambda: None)
    keeper = heap.HeapKeeper()
    keeper.after_batch()
    assert not keeper.active and keeper.stats() == {"heap_trim": False, "heap_checks": 0, "heap_trims": 0,
                                                    "heap_released_mb": 0.0, "heap_slack_mb": 32}


def test_the_predictor_checks_the_heap_after_each_batch(monkeypatch):
    from cnnsql.models.weights import random_weights
    from cnnsql.placements.predictor import Predictor, process_memory

    calls = []
    monkeypatch.setattr(heap, "after_batch", lambda: calls.append(1))
    p = Predictor.load("torch", random_weights(0), threads=1)
    p.predict(np.zeros((3, *p.shape), np.uint8))
    p.classify([bytes(p.input_size)] * 2)
    assert len(calls) == 2
    assert {"heap_trim", "heap_trims", "heap_released_mb"} <= set(process_memory())


def test_a_failing_read_stops_the_checks_and_never_fails_a_batch():
    keeper = heap.HeapKeeper()

    def gone():
        raise OSError("no /proc")

    keeper._anon, keeper._trim = gone, (lambda pad: 0)
    keeper.after_batch()
    keeper.after_batch()
    assert not keeper.active and keeper.checks == 1
