"""Velox's own multiply-add ceiling against the Velox CNN engine, measured in one run.

    python benchmarks/velox_ceiling.py [--images 8] [--rows 8192] [--length 576]

Ceiling: array_sum(zip_with(x, w, (a, b) -> a * b)) over rows of two REAL arrays, the primitive
the engine's convolutions and dense layers are made of.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa
import pyvelox.arrow as va
from pyvelox.plan_builder import PlanBuilder
from pyvelox.runner import LocalRunner

from cnnsql.engines import get_engine
from cnnsql.weights import random_weights

MACS_PER_IMAGE = 900 * 64 * 27 + 784 * 64 * 576 + 512 * 12544 + 10 * 512


def lists(mat):
    n, length = mat.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * length), pa.array(mat.ravel()))


def ceiling(rows: int, length: int, drivers: int, per_vector: int = 1024) -> float:
    rng = np.random.default_rng(0)
    x, w = rng.random((rows, length), np.float32), rng.random((rows, length), np.float32)
    vecs = [va.to_velox(pa.record_batch({"x": lists(x[i:i + per_vector]), "w": lists(w[i:i + per_vector])}))
            for i in range(0, rows, per_vector)]
    plan = PlanBuilder().values(vecs).project(["array_sum(zip_with(x, w, (a, b) -> a * b)) AS s"]).get_plan_node()
    best = float("inf")
    for _ in range(3):
        runner = LocalRunner(plan)
        t0 = time.perf_counter()
        out = [va.to_arrow(b) for b in runner.execute(drivers)]
        best = min(best, time.perf_counter() - t0)
        del out
        del runner
    return rows * length / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--length", type=int, default=576)
    args = ap.parse_args()
    print(f"{'measurement':<44}{'value':>16}")
    ceil = {}
    for d in (1, 2):
        ceil[d] = ceiling(args.rows, args.length, d)
        print(f"{f'ceiling, {d} driver(s), best of 3':<44}{ceil[d]:>12.3g} MAC/s")
    images = np.random.default_rng(0).integers(0, 256, (args.images, 3, 32, 32), dtype=np.uint8)
    for drivers in (1, 2):
        engine = get_engine("velox", random_weights(0), threads=drivers)
        engine.predict(images[:1])  # warm-up
        t0 = time.perf_counter()
        engine.predict(images)
        dt = time.perf_counter() - t0
        macs = args.images * MACS_PER_IMAGE / dt
        print(f"{f'engine, {drivers} driver(s), {args.images} images':<44}{args.images / dt:>10.2f} img/s "
              f"= {macs:.3g} MAC/s ({macs / max(ceil.values()):.0%} of the best ceiling)")


if __name__ == "__main__":
    main()
