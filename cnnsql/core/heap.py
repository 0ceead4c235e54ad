"""Keep a long-running inference process's memory flat: give the heap's freed pages back to the system.

glibc's malloc keeps the memory a process frees for reuse. A process that classifies batch after batch
frees, every batch, buffers of many sizes (decoded images, activations, result frames, rows) among
objects that stay, and the freed memory it keeps resident grows with the images passed although the
memory in use does not. Measured with mallinfo2 on the 2-core development VM, torch engine, 1.5 x 10^5
synthetic images written back: the EvaDB client's heap in use stayed at 161 MB while its free but
resident heap grew from 30 to 146 MB (its RssAnon 333 -> 465 MB); inside PostgreSQL, a backend's free
heap grew from 60 to 81 MB with 139-140 MB in use.

`after_batch()` (called by the predictor after every batch it runs) reads this process's anonymous
resident memory (/proc/self/statm: resident minus file-backed and shared pages, ~3 us). The level
after the first batch on a trimmed heap is the mark: it holds what a batch uses, the buffers the batch
freed and the next one reuses included. When memory has grown by more than SLACK over the mark (and no
trim happened in the last MIN_INTERVAL_S seconds), it calls glibc's malloc_trim(0), which returns every
arena's free pages to the system, and the next batch sets the mark again. Memory in use is never
touched. Trimming after every batch instead cost 6% (EvaDB) to 13% (inside PostgreSQL) of a pass's
speed, each batch faulting its freed buffers in again; the interval bounds that cost whatever the
batches are. Where there is no glibc or no /proc, it does nothing.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time

SLACK = 32 << 20  # bytes of anonymous memory growth tolerated between two trims
MIN_INTERVAL_S = 5.0  # and at most one trim per this many seconds
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


_statm: list = [None, None]  # [pid, fd] of /proc/self/statm as this process opened it


def _anon_bytes() -> int:
    """This process's anonymous resident bytes (a forked child opens its own /proc/self/statm)."""
    pid = os.getpid()
    if _statm[0] != pid:
        _statm[:] = [pid, os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)]
    fields = os.pread(_statm[1], 128, 0).split()
    return (int(fields[1]) - int(fields[2])) * PAGE  # resident - (file-backed + shared memory)


def _anon_reader():
    """_anon_bytes, or None where /proc is absent."""
    try:
        _anon_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return _anon_bytes


def _malloc_trim():
    """glibc's malloc_trim from the C library already loaded in this process, or None (another C
    library, or none to be found): no search for the library (ctypes.util.find_library runs ldconfig)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class HeapKeeper:
    """One per process (`KEEPER`): trims the heap when anonymous memory grew by more than `slack` over
    its level after the batch that followed the last trim, at most once per `interval` seconds."""

    def __init__(self, slack: int = SLACK, interval: float = MIN_INTERVAL_S):
        self.slack, self.interval = slack, interval
        self._anon = _anon_reader()
        self._trim = _malloc_trim() if self._anon else None
        self._lock = threading.Lock()
        self.settled: int | None = None  # anonymous bytes after the first batch since the last trim
        self._last = -float("inf")
        self.checks = self.trims = self.released = 0

    @property
    def active(self) -> bool:
        return self._trim is not None

    def after_batch(self) -> None:
        if self._trim is None:
            return
        with self._lock:
            self.checks += 1
            try:
                anon = self._anon()
            except (OSError, ValueError, IndexError):  # /proc gone (a closed descriptor, a sandbox): stop checking
                self._trim = None
                return
            if self.settled is None:
                # the level of a batch on a trimmed heap: what the batches use, their freed buffers included
                self.settled = anon
            elif anon > self.settled + self.slack and time.monotonic() - self._last >= self.interval:
                self._trim(0)
                self._last = time.monotonic()
                self.trims += 1
                self.settled = None
                try:
                    self.released += max(0, anon - self._anon())
                except (OSError, ValueError, IndexError):
                    self._trim = None

    def stats(self) -> dict:
        return {"heap_trim": self.active, "heap_checks": self.checks, "heap_trims": self.trims,
                "heap_released_mb": round(self.released / 2**20, 1), "heap_slack_mb": self.slack >> 20}


KEEPER = HeapKeeper()


def after_batch() -> None:
    KEEPER.after_batch()
