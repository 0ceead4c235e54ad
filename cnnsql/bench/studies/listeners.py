"""Which TCP sockets listen while each cnnsql command runs, and on which address: none beyond loopback.

Runs cnnsql commands (`python -m cnnsql ...`, each a child process) against a fresh private cluster in a
temporary CNNSQL_HOME (synthetic data, random weights), and every 0.1 s reads the listening sockets of the
command's process tree and of the private PostgreSQL server (psutil). The commands, in order (--commands
picks some; `db` is `db start` first and `db stop` last, always run): db start, load --synthetic,
train (1 epoch, 256 images), predict, bench (torch, 200 images), bench --cluster ray (2 workers), shell
(the benchmark's offline query on 5 images), report, db stop. One row per command: exit code, seconds,
the sockets seen, how many beyond loopback. Checks: every command exited 0; no socket listened beyond
loopback. Each command's window carries the harness's noise verdict (its seconds are incidental).
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cnnsql.bench.studies import check

NAME = "listeners"
NEEDS_DATABASE = True
SMOKE = ["--commands", "db,load"]
ALL = ("db", "load", "train", "predict", "bench", "ray", "shell", "report")


def arguments(ap) -> None:
    ap.add_argument("--commands", default=",".join(ALL), help=f"which commands (default: all of {','.join(ALL)})")
    ap.add_argument("--synthetic", type=int, default=2000, help="synthetic train images loaded (default 2000)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary CNNSQL_HOME")


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def tree_listeners(pids: list[int]) -> set[tuple[str, str, int]]:
    import psutil

    out, procs = set(), []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
        except (psutil.NoSuchProcess, ValueError):
            continue
    for p in procs:
        try:
            name = p.name()
            out |= {(name, c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def postmaster(home: Path) -> list[int]:
    try:
        return [abs(int((home / "pg" / "data" / "postmaster.pid").read_text().split()[0]))]  # -PID: single-user
    except (OSError, ValueError, IndexError):
        return []


def watch(ctx, args: list[str], env: dict, home: Path, cwd: Path) -> tuple[int, set, float, str]:
    from cnnsql.bench.studies._dbstudy import ChildClock

    with ChildClock(tuple(postmaster(home))) as clock:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "cnnsql", *args], cwd=cwd, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seen = set()
        while proc.poll() is None:
            seen |= tree_listeners([proc.pid, *postmaster(home)])
            time.sleep(0.1)
        seen |= tree_listeners(postmaster(home))
        err = proc.stderr.read()
        secs = time.perf_counter() - t0
    ctx.record_noise(f"cnnsql {' '.join(args[:3])} (child process)", clock.verdict())
    return proc.returncode, seen, secs, (err.strip().splitlines() or [""])[-1]


def command_list(wanted: set[str], base: Path, weights: Path, synthetic: int) -> list[list[str]]:
    from cnnsql.bench.harness import query_text
    from cnnsql.placements.pgfunctions import sql_name

    shell_query = query_text("offline", function=sql_name("torch"), where=" WHERE id < 5")
    steps = [
        ("db", ["db", "start"]),
        ("load", ["load", "--synthetic", str(synthetic), "--quiet"]),
        ("train", ["train", "--framework", "torch", "--epochs", "1", "--limit", "256", "--out", str(base / "t.npz"),
                   "--quiet"]),
        ("predict", ["predict", "--engine", "torch", "--weights", str(weights), "--limit", "100", "--out",
                     str(base / "p.csv"), "--quiet"]),
        ("bench", ["bench", "--engines", "torch", "--weights", str(weights), "--limit", "200", "--repetitions", "1",
                   "--batch-sizes", "16", "--single-stream", "2", "--sql-single-stream", "1", "--quiet"]),
        ("ray", ["bench", "--cluster", "ray", "--engines", "torch", "--workers", "2", "--weights", str(weights),
                 "--limit", "400", "--repetitions", "1", "--quiet"]),
        ("shell", ["shell", "-c", shell_query]),
        ("report", ["report", "--out", str(base / "report")]),
        ("db", ["db", "stop"]),
    ]
    return [cmd for key, cmd in steps if key in wanted]


def run(ctx, args) -> dict:
    from cnnsql.models import weights as W

    wanted = {c for c in args.commands.split(",") if c}
    unknown = wanted - set(ALL)
    if unknown:
        raise SystemExit(f"listeners: unknown command(s) {sorted(unknown)}; choose from {','.join(ALL)}")
    wanted.add("db")
    base = Path(tempfile.mkdtemp(prefix="cl", dir="/tmp"))
    os.chmod(base, 0o755)  # as root the server runs as 'postgres' and must traverse it
    home, weights = base / "h", base / "w.npz"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PG") and k not in ("CNNSQL_DSN", "CNNSQL_DB", "CNNSQL_RESULTS_DIR")}
    env.update(CNNSQL_HOME=str(home), CNNSQL_WEIGHTS=str(weights), CNNSQL_RESULTS_DIR=str(base / "results"))
    W.save_weights(weights, W.random_weights(1).arrays, {"trained_by": "random"})
    rows, checks = [], []
    try:
        for cmd in command_list(wanted, base, weights, args.synthetic):
            ctx.say(f"cnnsql {' '.join(cmd[:3])} ...")
            rc, seen, secs, last = watch(ctx, cmd, env, home, base)
            exposed = sorted(s for s in seen if not is_loopback(s[1]))
            label = " ".join(cmd[:3] if cmd[0] != "shell" else cmd[:2])
            rows.append({"command": label, "rc": rc, "seconds": secs, "sockets": len(seen),
                         "listeners": ", ".join(sorted({f"{n} {ip}" for n, ip, _ in seen})) or "-",
                         "beyond_loopback": len(exposed)})
            checks.append(check(f"cnnsql {label} exited 0", rc == 0, last[:300]))
            checks.append(check(f"cnnsql {label}: no listener beyond loopback", not exposed, str(exposed)[:300]))
    finally:
        subprocess.run([sys.executable, "-m", "cnnsql", "db", "stop"], cwd=base, env=env, capture_output=True)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return {"rows": rows, "checks": checks, "home": str(home) if args.keep else None}
