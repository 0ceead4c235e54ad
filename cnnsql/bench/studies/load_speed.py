"""Time loading a dataset into PostgreSQL: the whole `cnnsql load` command (read, verify, COPY, commit).

Runs `cnnsql load --quiet` with --source ARCHIVE (CIFAR-10), or --synthetic N, in a fresh process
each time: one untimed warm-up (starts the cluster, creates the tables), then --repetitions timed
runs; figures: median wall [min-max] and images/s (both splits). The load replaces the loaded data:
run it against a cluster whose data may be replaced (CNNSQL_HOME / CNNSQL_DB). Check: every run
exits 0 and the loaded row count is the same after each. Noise: the spread rule over the runs (the
CPU split between this command and the rest of the machine is not taken for child processes).
"""
from __future__ import annotations

import subprocess
import sys
import time

from cnnsql.bench.studies import check
from cnnsql.measure import stats

NAME = "load_speed"
NEEDS_DATABASE = True
SMOKE = ["--synthetic", "200", "--repetitions", "1"]


def arguments(ap) -> None:
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", help="cifar-10-python.tar.gz or an extracted folder")
    src.add_argument("--synthetic", type=int, metavar="N", help="N synthetic train images (+ N/5 test)")
    ap.add_argument("--repetitions", type=int, default=3)


def rows_loaded() -> int:
    from cnnsql import db

    with db.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM cifar_image")
        return int(cur.fetchone()[0])


def run(ctx, args) -> dict:
    what = ["--source", args.source] if args.source else ["--synthetic", str(args.synthetic)]
    cmd = [sys.executable, "-m", "cnnsql", "load", "--quiet", *what]
    subprocess.run(cmd, check=True, capture_output=True)  # warm-up: starts the cluster, creates tables
    n = rows_loaded()
    walls, counts, last = [], [], ""
    for i in range(args.repetitions):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        last = proc.stdout.strip()
        if proc.returncode:
            return {"rows": [], "checks": [check(f"run {i + 1} exits 0", False, proc.stderr.strip()[-300:])]}
        counts.append(rows_loaded())
        ctx.say(f"run {i + 1}: {walls[-1]:.2f} s")
    s = stats.summary(walls)
    spread = stats.spread(walls)
    noisy = spread > stats.NOISY_SPREAD and s["median"] >= stats.MIN_JUDGE_S
    ctx.record_noise("load", {"noisy": noisy, "noise_reasons": [f"runs spread {100 * spread:.0f}%"] if noisy else []})
    return {"rows": [{"what": " ".join(what), "images": n, "wall_s": s["median"], "range_s": [s["min"], s["max"]],
                      "images_per_s": n / s["median"], "runs": len(walls)}],
            "checks": [check("every run loads the same rows", all(c == n for c in counts), f"{counts} vs {n}")],
            "walls": walls, "last_output": last}
