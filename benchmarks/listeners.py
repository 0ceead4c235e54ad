"""Which TCP sockets listen while each cnnsql command runs, and on which address.

Runs every command against a fresh private cluster in a temporary CNNSQL_HOME (synthetic data,
random weights), samples every 0.1 s the listening sockets of the command's process tree and of
the private PostgreSQL server, and prints one line per command. Usage:
    python benchmarks/listeners.py [--keep]
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def tree_listeners(pids: list[int]) -> set[tuple[str, str, int]]:
    out = set()
    procs = []
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


def watch(args: list[str], env: dict, home: Path) -> tuple[int, set, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cnnsql", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = set()
    while proc.poll() is None:
        seen |= tree_listeners([proc.pid, *postmaster(home)])
        time.sleep(0.1)
    seen |= tree_listeners(postmaster(home))
    err = proc.stderr.read()
    if proc.returncode:
        print(f"  ! {' '.join(args)} failed: {err.strip().splitlines()[-1:]}", file=sys.stderr)
    return proc.returncode, seen, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the temporary CNNSQL_HOME")
    opts = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="cl", dir="/tmp"))
    os.chmod(base, 0o755)  # as root the server runs as 'postgres' and must traverse it
    home = base / "h"
    weights = base / "w.npz"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k not in ("CNNSQL_DSN", "CNNSQL_DB")}
    env.update(CNNSQL_HOME=str(home), CNNSQL_WEIGHTS=str(weights))
    from cnnsql.models import weights as W

    W.save_weights(weights, W.random_weights(1).arrays, {"trained_by": "random"})
    commands = [
        ["db", "start"],
        ["load", "--synthetic", "2000", "--quiet"],
        ["train", "--framework", "torch", "--epochs", "1", "--limit", "256", "--out", str(base / "t.npz"), "--quiet"],
        ["predict", "--engine", "torch", "--weights", str(weights), "--limit", "100", "--out", str(base / "p.csv"),
         "--quiet"],
        ["bench", "--engines", "torch", "--weights", str(weights), "--limit", "200", "--repetitions", "1",
         "--batch-sizes", "16", "--single-stream", "2", "--sql-single-stream", "1", "--quiet"],
        ["bench", "--cluster", "ray", "--engines", "torch", "--workers", "2", "--weights", str(weights),
         "--limit", "400", "--repetitions", "1", "--quiet"],
        ["shell", "-c", "SELECT id, TorchCNN(img) FROM pg.cifar_test WHERE id < 5;"],
        ["report", "--out", str(base / "report")],
        ["db", "stop"],
    ]
    print(f"{'command':<26}{'rc':>3}{'s':>7}  listeners (process ip:port) / beyond loopback")
    try:
        for args in commands:
            rc, seen, secs = watch(args, env, home)
            exposed = sorted(s for s in seen if not is_loopback(s[1]))
            kinds = sorted({f"{n} {ip}" for n, ip, _ in seen})
            print(f"{' '.join(args[:3]):<26}{rc:>3}{secs:>7.1f}  {len(seen)} sockets: {', '.join(kinds) or '-'}"
                  f" / {len(exposed)} beyond loopback{': ' + str(exposed) if exposed else ''}")
    finally:
        subprocess.run([sys.executable, "-m", "cnnsql", "db", "stop"], cwd=REPO, env=env, capture_output=True)
        if not opts.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
