"""Figures with their spread, and the rule that calls a measurement noisy. One place for both.

Every timed figure of `cnnsql bench` is the median of its repetitions with their min and max; every
ratio is the median of per-repetition ratios of interleaved pairs (raw, SQL, raw, SQL, ...) with
their min and max; an accuracy carries its Wilson 95% interval and sample size.

A run is **noisy** when, during its timed repetitions, processes outside the benchmark's process
tree used more than NOISY_OTHERS_CPU of the machine's CPU time (the tree: this process, its children,
and the private PostgreSQL cluster's server processes, whose backends do the SQL path's work; an
external server's processes count as other), or when its repetitions spread
(max - min) / median more than NOISY_SPREAD. Single-stream phases (one-image calls whose spread is
the latency distribution itself) and runs whose median call is shorter than MIN_JUDGE_S (a 30 ms
fetch jitters more than 15% on an idle machine) are judged by the first rule only; a phase whose
timed calls last less than MIN_JUDGE_S in all is judged by neither (the kernel's CPU counters tick
every 10 ms: too coarse to split so short a window), and says so.
"""
from __future__ import annotations

import math
import os
import statistics
import time

import psutil

NOISY_SPREAD = 0.15        # (max - min) / median of a run's timed repetitions
NOISY_OTHERS_CPU = 0.10    # share of the machine's CPU used outside the benchmark's process tree
MIN_JUDGE_S = 1.0          # shorter runs / phases are not judged by the spread / by either rule


def summary(values) -> dict:
    """median, min, max and count of a list of numbers."""
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def spread(values) -> float:
    """(max - min) / median: 0 for one value."""
    s = summary(values)
    return (s["max"] - s["min"]) / s["median"] if s["median"] > 0 else 0.0


def paired_ratio(numerators, denominators) -> dict:
    """Per-pair ratios of interleaved repetitions: their median, min and max."""
    return summary([a / b for a, b in zip(numerators, denominators)])


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion (accuracy on n images)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def fmt_range(s: dict | None, digits: int = 1, scale: float = 1.0) -> str:
    """'median [min-max]' for a summary(), '-' for none."""
    if not s:
        return "-"
    return f"{s['median'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f}]"


def load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages (recorded when a session starts)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def process_tree(proc: psutil.Process | None) -> list[psutil.Process]:
    """The processes whose CPU counts as the benchmark's: `proc` (default: this one) and its children."""
    proc = proc or psutil.Process()
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def trees(roots: tuple[int, ...] = ()) -> list[psutil.Process]:
    """This process and its children plus the trees of `roots` (pids), each process once."""
    procs = {}
    for root in (None, *roots):
        try:
            tree = process_tree(psutil.Process(root) if root else None)
        except psutil.Error:  # the root is gone
            continue
        procs.update((p.pid, p) for p in tree)
    return list(procs.values())


def cpu_by_pid(procs: list[psutil.Process], own_first: bool) -> dict[int, float]:
    """User + system CPU seconds per process, threads included. This process's own comes from
    CLOCK_PROCESS_CPUTIME_ID (nanoseconds; /proc ticks at 10 ms, too coarse for one-image calls),
    read first after a call (own_first) and last before one, so the readings themselves are not
    counted (0.3 ms for 8 processes)."""
    me = os.getpid()
    out = {me: time.process_time()} if own_first else {}
    for p in procs:
        if p.pid == me:
            continue
        try:
            t = p.cpu_times()
        except psutil.Error:  # exited: its CPU since the last reading is lost (counted as other)
            continue
        out[p.pid] = t.user + t.system
    if not own_first:
        out[me] = time.process_time()
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two cpu_by_pid readings, over the processes read both times (one whose
    reading failed once is left out rather than charged its whole lifetime)."""
    return max(0.0, sum(c - before[pid] for pid, c in after.items() if pid in before))


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


class Clock:
    """Times the calls of one phase: wall and process-tree CPU per call, per key (the interleaved
    sides of a comparison), and what the rest of the machine used over the phase's timed window.

    `roots`: pids whose process trees also count as the benchmark's (the private PostgreSQL cluster's
    postmaster; a backend for the in-database placement); this process and its children always do.
    The trees are read when the timed window opens, after the warm-up calls have opened the
    connections (reading them costs ~4 ms, too much per call): a process started later (a PostgreSQL
    parallel worker, a new connection's backend) counts as other. Their CPU over the whole window is
    ours, the harness's work between calls included (a progress sampler, these readings): summing
    only the calls left 5 ms of it per one-image call to "other processes" and flagged idle
    single-stream phases noisy (others 18-48%)."""

    def __init__(self, roots: tuple[int, ...] = ()):
        self._roots = tuple(r for r in roots if r)
        self._procs: list[psutil.Process] = []
        self.walls: dict[str, list[float]] = {}
        self.cpus: dict[str, list[float]] = {}
        self._ours = 0.0
        self._window = None

    def __enter__(self):
        self._procs = trees(self._roots)
        self._cpu0 = cpu_by_pid(self._procs, own_first=False)
        self._window = (machine_busy_s(), time.perf_counter())
        return self

    def __exit__(self, *exc):
        busy0, t0 = self._window
        self._window = (machine_busy_s() - busy0, time.perf_counter() - t0)
        self._ours = cpu_delta(self._cpu0, cpu_by_pid(self._procs, own_first=True))
        return False

    def time(self, key: str, call):
        before = cpu_by_pid(self._procs, own_first=False)
        t0 = time.perf_counter()
        out = call()
        wall = time.perf_counter() - t0
        cpu = cpu_delta(before, cpu_by_pid(self._procs, own_first=True))
        self.walls.setdefault(key, []).append(wall)
        self.cpus.setdefault(key, []).append(cpu)
        return out

    def others_share(self) -> float:
        """Share of the machine's CPU (all cores) used outside our tree during the phase."""
        busy, wall = self._window
        cores = psutil.cpu_count() or 1
        return max(0.0, busy - self._ours) / (wall * cores) if wall > 0 else 0.0

    def verdict(self, key: str, judge_spread: bool = True) -> dict:
        """One side's noise figures and flag, with the reasons that set it."""
        share = self.others_share()
        walls = self.walls[key]
        sp = spread(walls)
        reasons = []
        if self._window[1] < MIN_JUDGE_S:
            reasons_not = [f"phase too short to judge ({1000 * self._window[1]:.0f} ms timed)"]
        else:
            reasons_not = []
            if share > NOISY_OTHERS_CPU:
                reasons.append(f"other processes used {100 * share:.0f}% of the machine's CPU "
                               f"(threshold {100 * NOISY_OTHERS_CPU:.0f}%)")
        if judge_spread and statistics.median(walls) >= MIN_JUDGE_S and sp > NOISY_SPREAD:
            reasons.append(f"repetitions spread {100 * sp:.0f}% (max-min over median; threshold "
                           f"{100 * NOISY_SPREAD:.0f}%)")
        return {"noisy": bool(reasons), "others_cpu_share": round(share, 4), "spread": round(sp, 4),
                "noise_reasons": reasons, **({"noise_not_judged": reasons_not[0]} if reasons_not else {})}


def interleave(calls: dict, reps: int, warmup: int = 1, roots: tuple[int, ...] = (), around=None,
               warm: dict | None = None):
    """The one timing loop of every measurement (`cnnsql bench` phases and the studies): `warmup` untimed
    rounds (each call's `warm[key]` or the call itself), then `reps` rounds of one call of each key in
    turn, so drift on a shared machine hits every side alike. `around(key)` (optional) gives a context
    entered around each timed call (a resource monitor). -> (Clock, {key: the last call's output})."""
    from contextlib import nullcontext

    warm = warm or {}
    for _ in range(warmup):
        for key, call in calls.items():
            warm.get(key, call)()
    last = {}
    with Clock(roots) as clock:
        for _ in range(reps):
            for key, call in calls.items():
                with (around(key) if around else nullcontext()):
                    last[key] = clock.time(key, call)
    return clock, last


def timing(clock: Clock, key: str, n_items: int = 1, judge_spread: bool = True) -> dict:
    """One side of an interleaved measurement as figures: wall median [min-max], items/s with its range,
    CPU seconds, and the noise verdict (Clock.verdict)."""
    walls = clock.walls[key]
    wall = summary(walls)
    return {"wall_s": wall["median"], "wall_min_s": wall["min"], "wall_max_s": wall["max"], "repetitions": len(walls),
            "per_s": n_items / wall["median"], "per_s_range": [n_items / wall["max"], n_items / wall["min"]],
            "cpu_s": statistics.median(clock.cpus[key]), "walls": walls, **clock.verdict(key, judge_spread)}
