"""EvaDB's own Ray mode against its plain path, on the same query, in one process.

EvaDB 0.3.9 parallelises function evaluation with Ray when its catalog setting `ray` is true.
`SET ray = True;` is accepted but, as measured here, leaves the setting false, so this script
also sets it through EvaDB's catalog API. Usage:
    python benchmarks/evadb_ray_mode.py [--rows 1000] [--repetitions 3]

EvaDB's `ray` extra asks for ray<2.5; the pinned ray 2.55.1 runs its Ray mode all the same
(measured). EvaDB starts Ray itself: the environment below keeps that instance on loopback
(see cnnsql/placements/ray_local.py), since EvaDB passes no such option.
"""
from __future__ import annotations

import argparse
import os
import secrets

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # node IP = 127.0.0.1: loopback listeners
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
import statistics
import tempfile
import time
from pathlib import Path

from cnnsql.placements import evadb_session
from cnnsql.placements.evadb_function import default_weights


def timed(cursor, query: str, reps: int) -> list[float]:
    evadb_session.run(cursor, query)  # warm-up (and, in Ray mode, Ray start-up)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        evadb_session.run(cursor, query)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--repetitions", type=int, default=3)
    args = ap.parse_args()
    if not default_weights().exists():
        raise SystemExit(f"no weights at {default_weights()}: run `cnnsql bench` or `cnnsql train` first")
    query = f"SELECT id, TorchCNN(img) FROM pg.cifar_test WHERE id < {int(args.rows)};"  # pushed down
    with tempfile.TemporaryDirectory() as tmp:
        cursor = evadb_session.connect(evadb_dir=Path(tmp))
        plain = timed(cursor, query, args.repetitions)
        evadb_session.run(cursor, "SET ray = True;")
        catalog = cursor._evadb.catalog()
        after_set = catalog.get_configuration_catalog_value("ray")
        catalog.upsert_configuration_catalog_entry("ray", True)
        plan = cursor.query("EXPLAIN " + query).df().iloc[0, 0].split()[1]
        ray_mode = timed(cursor, query, args.repetitions)
    print(f"query: {query} ({args.rows} rows), {args.repetitions} timed runs after 1 warm-up, medians")
    print(f"`SET ray = True;` leaves the setting: {after_set!r}; set through the catalog API, plan root: {plan}")
    print(f"plain EvaDB : {statistics.median(plain):7.2f} s  ({args.rows / statistics.median(plain):7.1f} images/s)")
    print(f"EvaDB + Ray : {statistics.median(ray_mode):7.2f} s  ({args.rows / statistics.median(ray_mode):7.1f} images/s)")
    print(f"ratio (ray / plain): {statistics.median(ray_mode) / statistics.median(plain):.2f}")


if __name__ == "__main__":
    main()
