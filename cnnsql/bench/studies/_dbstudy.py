"""What the studies that read the loaded dataset share: the weights (--weights or the default file), the
dataset (the dataset API: its info, its test split, its view names) and the benchmark's query templates
(sql/queries/, the same text `cnnsql bench` runs) pointed at that dataset's view."""
from __future__ import annotations

import os
from pathlib import Path

from cnnsql import db
from cnnsql.core import config
from cnnsql.core.errors import CnnsqlError
from cnnsql.data import datasets


def add_weights_and_dataset(ap) -> None:
    ap.add_argument("--weights", type=Path, help="weights file (default: the default weights file, "
                                                 "written by `cnnsql bench` or `cnnsql train`)")
    ap.add_argument("--dataset", default=None, help=f"loaded dataset (default: {datasets.DEFAULT})")


def weights_path(args) -> Path:
    """--weights, or the default weights file; one line naming the fix when neither exists."""
    path = Path(args.weights) if getattr(args, "weights", None) else config.default_weights()
    if not path.is_file():
        raise CnnsqlError(f"no weights file at {path}", "run `cnnsql bench` or `cnnsql train` first, or pass --weights")
    return path.absolute()


def open_dataset(args, ctx, target: db.Target | None = None):
    """-> (target, connection, DatasetInfo) of the loaded dataset (CIFAR-10 loaded first when missing)."""
    target = target or db.resolve()
    conn = db.connect(target)
    db.ensure_schema(conn)
    ds = datasets.ensure(conn, target, getattr(args, "dataset", None), ctx.progress, ctx.say)
    return target, conn, ds


def query(name: str, ds: datasets.DatasetInfo, **values) -> str:
    """The benchmark's query template NAME (sql/queries/NAME.sql) on the dataset's test view."""
    from cnnsql.bench.harness import query_text

    return query_text(name, **values).replace("pg.cifar_test", f"pg.{ds.view('test')}")


def server_roots(conn, target: db.Target) -> tuple[int, ...]:
    """The private cluster's postmaster: its processes' CPU is the measurement's own (stats.Clock roots)."""
    pid = db.private_server_pid(conn) if target.private else None
    return (pid,) if pid else ()


class ChildClock:
    """The noise verdict of a window in which child processes (a whole command, forked readers) did the
    work: measure.stats.Clock's two rules, with the children's CPU counted as ours through the kernel's
    RUSAGE_CHILDREN (children waited for in the window) — a Clock reads only processes alive when it
    opens, and a child reaped before it closes leaves no reading. `roots`: pids whose process trees are
    also ours (the private server's postmaster), including the processes they start in the window (a
    child's connection gets a new backend): those alive at the end count whole, those the root reaped
    in the window through the root's own children's CPU (psutil's children_user/children_system)."""

    def __init__(self, roots: tuple[int, ...] = ()):
        self.roots = tuple(r for r in roots if r)

    @staticmethod
    def _children_cpu() -> float:
        import resource

        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    def _reaped(self) -> float:
        """CPU seconds of the roots' children that the roots have waited for (exited backends)."""
        import psutil

        total = 0.0
        for root in self.roots:
            try:
                t = psutil.Process(root).cpu_times()
            except psutil.Error:
                continue
            total += t.children_user + t.children_system
        return total

    def __enter__(self):
        import time

        from cnnsql.measure import stats

        self._procs = stats.trees(self.roots)
        self._reaped0 = self._reaped()
        self._cpu0 = stats.cpu_by_pid(self._procs, own_first=False)
        self._ch0 = self._children_cpu()
        self._busy0, self._t0 = stats.machine_busy_s(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        import time

        from cnnsql.measure import stats

        self.window_s = time.perf_counter() - self._t0
        busy = stats.machine_busy_s() - self._busy0
        ours = stats.cpu_delta(self._cpu0, stats.cpu_by_pid(self._procs, own_first=True))
        ours += self._children_cpu() - self._ch0
        born = [p for p in stats.trees(self.roots) if p.pid not in self._cpu0]
        ours += sum(stats.cpu_by_pid(born, own_first=True).get(p.pid, 0.0) for p in born)
        ours += max(0.0, self._reaped() - self._reaped0)
        cores = os.cpu_count() or 1
        self.others_share = max(0.0, busy - ours) / (self.window_s * cores) if self.window_s > 0 else 0.0
        return False

    def verdict(self, walls: list[float] | None = None) -> dict:
        """{"noisy", "others_cpu_share", "spread", "noise_reasons"} as stats.Clock.verdict words them."""
        import statistics

        from cnnsql.measure import stats

        walls = walls or [self.window_s]
        sp, reasons, extra = stats.spread(walls), [], {}
        if self.window_s < stats.MIN_JUDGE_S:
            extra["noise_not_judged"] = f"phase too short to judge ({1000 * self.window_s:.0f} ms timed)"
        elif self.others_share > stats.NOISY_OTHERS_CPU:
            reasons.append(f"other processes used {100 * self.others_share:.0f}% of the machine's CPU "
                           f"(threshold {100 * stats.NOISY_OTHERS_CPU:.0f}%)")
        if len(walls) > 1 and statistics.median(walls) >= stats.MIN_JUDGE_S and sp > stats.NOISY_SPREAD:
            reasons.append(f"repetitions spread {100 * sp:.0f}% (max-min over median; threshold "
                           f"{100 * stats.NOISY_SPREAD:.0f}%)")
        return {"noisy": bool(reasons), "others_cpu_share": round(self.others_share, 4), "spread": round(sp, 4),
                "noise_reasons": reasons, **extra}
