"""Time loading CIFAR-10 into PostgreSQL: the whole `cnnsql load` (read, verify, COPY, commit).

    python benchmarks/load_speed.py --source cifar-10-python.tar.gz [--repetitions 3]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True)
    ap.add_argument("--repetitions", type=int, default=3)
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "cnnsql", "load", "--quiet", "--source", args.source]
    subprocess.run(cmd, check=True, capture_output=True)  # warm-up: starts the cluster, creates tables
    walls, last = [], ""
    for _ in range(args.repetitions):
        t0 = time.perf_counter()
        last = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
        walls.append(time.perf_counter() - t0)
    print(f"cnnsql load of {args.source}: median {statistics.median(walls):.2f} s over {args.repetitions} runs "
          f"(all: {', '.join(f'{w:.2f}' for w in walls)}) after 1 warm-up")
    print(f"last run reported: {last}")


if __name__ == "__main__":
    main()
