"""The heap keeper (cnnsql/core/heap.py): freed heap pages go back to the system once memory has grown by
more than the slack, memory in use is kept, one trim per interval, and the predictor checks after each batch."""
from __future__ import annotations

import numpy as np
import pytest

from cnnsql.core import heap

KEEPER_ACTIVE = heap.HeapKeeper().active
needs_glibc = pytest.mark.skipif(not KEEPER_ACTIVE, reason="no glibc malloc_trim or no /proc here")

MB = 1 << 20


FRAGMENT = """
def fragment(n=2000):
    # n freed 64 KiB heap blocks, each held apart from the next by a small live object: free memory
    # that stays resident (malloc cannot give it back from the top of the heap)
    big, small = [], []
    for i in range(n):
        big.append(bytes([i % 251 + 1]) * 65536)  # below the mmap threshold: on the heap, pages touched
        small.append(bytes([i % 13 + 1]) * 700)   # above pymalloc's limit: malloc'd between the big ones
    del big
    return small
"""


def in_fresh_process(body: str) -> dict:
    """Run `body` in a new Python process (a heap no earlier test has used or tuned, no allocator settings
    from the environment); it sets `out`."""
    import json
    import os
    import subprocess
    import sys
    import textwrap

    code = "import json\nfrom cnnsql.core import heap\nMB = 1 << 20\n" + FRAGMENT + textwrap.dedent(body) + \
        "\nprint(json.dumps(out))"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_glibc
def test_freed_heap_memory_is_given_back_after_growth_beyond_the_slack():
    out = in_fresh_process("""
        keeper = heap.HeapKeeper(slack=16 * MB, interval=0)
        keeper.after_batch()  # the mark
        kept = fragment()
        grown = heap._anon_bytes()
        keeper.after_batch()
        after = heap._anon_bytes()
        out = {"trims": keeper.trims, "grown": grown >> 20, "after": after >> 20,
               "released": keeper.stats()["heap_released_mb"], "kept": all(len(s) == 700 for s in kept)}
    """)
    assert out["trims"] == 1, out
    assert out["grown"] - out["after"] > 64, out
    assert out["released"] > 64, out
    assert out["kept"]  # memory in use untouched


@needs_glibc
def test_no_trim_within_the_slack_or_the_interval():
    out = in_fresh_process("""
        keeper = heap.HeapKeeper(slack=1 << 40, interval=0)
        keeper.after_batch()
        kept = fragment()
        keeper.after_batch()
        first = {"trims": keeper.trims, "checks": keeper.checks}

        keeper = heap.HeapKeeper(slack=1 * MB, interval=3600)
        heap.KEEPER._trim(0)
        keeper.after_batch()  # the mark, on a trimmed heap
        kept += fragment(3000)  # touches freed pages again: the process grows
        keeper.after_batch()  # the first trim
        keeper.after_batch()  # sets the mark again
        kept += fragment(3000)
        keeper.after_batch()  # grown again, but within the interval
        out = {"first": first, "trims": keeper.trims}
    """)
    assert out["first"] == {"trims": 0, "checks": 2}, out
    assert out["trims"] == 1, out


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
