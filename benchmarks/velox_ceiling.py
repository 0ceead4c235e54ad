"""The Velox engine against its predecessor and against Velox's own multiply-add ceiling, one run.

    python benchmarks/velox_ceiling.py [--images 32] [--old-images 8] [--rounds 3] [--old-ref 2454080]

- Ceiling: `cast(array_sum(zip_with(x, w, (a, b) -> a * b)) AS real)` over rows of two flat REAL
  arrays (length 576) from a values node: the primitive every layer is made of, at its best (no
  captures, no joins). A values node runs on one driver only, so the 2-driver ceiling is taken as
  twice the 1-driver one (an upper bound, not a measurement). Measured before and after the engines.
- Engines, interleaved in rounds (new 1 driver, old 1 driver, new 2 drivers, old 2 drivers), each
  after a warm-up call: `predict` of the same random images (random asymmetric weights, seed 0).
  The old engine is cnnsql/engines/velox_engine.py as of git commit --old-ref, loaded from git.
- Profile: Velox's operator CPU time per stage of the new plan (print_plan_with_stats), per image.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cnnsql.engines import get_engine
from cnnsql.engines import velox_runtime
from cnnsql.engines.base import Engine, tune_malloc
from cnnsql.models.weights import random_weights, reference_forward

ROOT = Path(__file__).resolve().parent.parent
DIRECT_MACS = 900 * 64 * 27 + 784 * 64 * 576 + 512 * 12544 + 10 * 512      # 36.9 M: direct convolutions
NEW_MACS = 900 * 64 * 27 + 36 * 49 * 64 * 64 + 512 * 12544 + 10 * 512        # 15.2 M: conv2 as Winograd F(4,3)


def ceiling(rows: int = 8192, length: int = 576, per_vector: int = 1024, reps: int = 3) -> float:
    v = velox_runtime.load()
    rng = np.random.default_rng(0)
    x, w = rng.random((rows, length), np.float32), rng.random((rows, length), np.float32)
    from cnnsql.engines.velox_plan import list_array

    vecs = [v.va.to_velox(v.pa.record_batch({"x": list_array(v.pa, x[i:i + per_vector]),
                                             "w": list_array(v.pa, w[i:i + per_vector])}))
            for i in range(0, rows, per_vector)]
    plan = v.PlanBuilder().values(vecs).project(
        ["cast(array_sum(zip_with(x, w, (a, b) -> a * b)) AS real) AS s"]).get_plan_node()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        with velox_runtime.execute(plan, 1, {}):
            best = min(best, time.perf_counter() - t0)
    return rows * length / best


def old_engine_class(ref: str):
    """VeloxEngine from cnnsql/engines/velox_engine.py at git `ref`, imported beside the package."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:cnnsql/engines/velox_engine.py"],
                            capture_output=True, text=True, check=True).stdout
    with tempfile.TemporaryDirectory(prefix="cnnsql-velox-old-") as folder:
        path = Path(folder) / "velox_engine_old.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("cnnsql.engines._velox_engine_old", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    old = module.VeloxEngine
    if "forward" not in vars(old):  # before engines implemented one call, `forward`, it was predict_proba
        old = type("VeloxEngine", (old,), {"forward": old.predict_proba, "predict_proba": Engine.predict_proba})
    return old


def timed(engine, images) -> float:
    t0 = time.perf_counter()
    engine.predict(images)
    return len(images) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32, help="images per timed call of the new engine (default 32)")
    ap.add_argument("--old-images", type=int, default=8, help="images per timed call of the old engine (default 8)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--old-ref", default="2454080", help="git commit holding the old engine (default 2454080)")
    ap.add_argument("--skip-old", action="store_true")
    args = ap.parse_args()
    print("tune_malloc:", tune_malloc())
    weights = random_weights(0)
    images = np.random.default_rng(0).integers(0, 256, (max(args.images, args.old_images), 3, 32, 32), np.uint8)
    ceil_before = ceiling()
    print(f"ceiling, 1 driver, best of 3 (before): {ceil_before:.3g} MAC/s")
    engines = {}
    for d in (1, 2):
        engines[("new", d)] = get_engine("velox", weights, threads=d)
        if not args.skip_old:
            engines[("old", d)] = old_engine_class(args.old_ref)(weights, threads=d)
    ref = reference_forward(weights, images[:args.images])
    diff = np.abs(engines[("new", 2)].predict(images[:args.images]) - ref).max()
    for key, engine in engines.items():
        engine.predict(images[:2])  # warm-up
    rates: dict[tuple, list[float]] = {key: [] for key in engines}
    for r in range(args.rounds):
        for key, engine in engines.items():
            n = args.images if key[0] == "new" else args.old_images
            rates[key].append(timed(engine, images[:n]))
            print(f"round {r + 1}: {key[0]} engine, {key[1]} driver(s), {n} images: {rates[key][-1]:.2f} img/s",
                  flush=True)
    ceil_after = ceiling()
    ceil = max(ceil_before, ceil_after)
    print(f"ceiling, 1 driver, best of 3 (after): {ceil_after:.3g} MAC/s")
    print(f"\nnew engine max |p - float64 NumPy| on {args.images} images, 2 drivers: {diff:.2g}\n")
    print("| engine | drivers | images/call | images/s (median; range) | effective MAC/s (36.9 M/img) "
          "| executed MAC/s | share of ceiling |")
    print("|---|---|---|---|---|---|---|")
    for key, values in rates.items():
        med = statistics.median(values)
        macs = NEW_MACS if key[0] == "new" else DIRECT_MACS
        n = args.images if key[0] == "new" else args.old_images
        print(f"| {key[0]} | {key[1]} | {n} | **{med:.2f}** ({min(values):.2f}-{max(values):.2f}) | "
              f"{med * DIRECT_MACS:.3g} | {med * macs:.3g} | {med * macs / (key[1] * ceil):.0%} |")
    print(f"\n(ceiling {ceil:.3g} MAC/s per driver, best of before/after; executed MACs: new {NEW_MACS / 1e6:.1f} M "
          f"per image, old {DIRECT_MACS / 1e6:.1f} M; 2-driver share against twice the 1-driver ceiling)\n")
    for d in (1, 2):
        prof = engines[("new", d)].profile(images[:args.images])
        total = sum(prof.values())
        print(f"profile, new engine, {d} driver(s), {args.images} images: Velox operator CPU ms per image "
              f"(total {total / args.images:.1f})")
        for stage, ms in sorted(prof.items(), key=lambda kv: -kv[1]):
            print(f"  {stage:<14}{ms / args.images:8.2f}  ({ms / total:.0%})")
    for engine in engines.values():
        if hasattr(engine, "close"):
            engine.close()


if __name__ == "__main__":
    main()
