"""Peak memory of one SQL query as the split grows: streaming keeps the reading path flat.

    .venv/bin/python benchmarks/sql_memory.py --weights W.npz [--rows 10000,50000] [--stock]

Each size runs in a fresh child process: connect, then
`SELECT id, TorchCNN(img).label FROM pg.cifar_train WHERE id < N;`; the child reports its peak
RSS (ru_maxrss) before and after the query, rows returned and wall time. `--stock` repeats each size
on unpatched EvaDB (fetchall of the whole view). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time



def child(weights: str, rows: int, stock: bool) -> dict:
    from cnnsql.placements import evadb_patch
    from cnnsql.placements import evadb_session

    if stock:
        evadb_patch.install = lambda: False
    cursor = evadb_session.connect(weights=weights, threads=2)
    evadb_session.run(cursor, "SELECT id, TorchCNN(img).label FROM pg.cifar_train WHERE id < 2;")  # engine loaded
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    out = evadb_session.run(cursor, f"SELECT id, TorchCNN(img).label FROM pg.cifar_train WHERE id < {rows};")
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": len(out), "wall_s": wall, "rss_before_mb": before, "peak_rss_mb": peak,
            "query_growth_mb": peak - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--rows", default="10000,50000")
    ap.add_argument("--stock", action="store_true")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-stock", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.weights, args.child, args.child_stock)))
        return
    out = {}
    for mode in ["patched"] + (["stock"] if args.stock else []):
        for n in map(int, args.rows.split(",")):
            cmd = [sys.executable, __file__, "--weights", args.weights, "--child", str(n)]
            proc = subprocess.run(cmd + (["--child-stock"] if mode == "stock" else []), capture_output=True,
                                  text=True, check=True)
            out[f"{mode}/{n}"] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(mode, n, out[f"{mode}/{n}"], file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
