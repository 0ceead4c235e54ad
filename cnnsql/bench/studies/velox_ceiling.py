"""The Velox engine against Velox's own multiply-add ceiling, per model and driver count, with a profile.

- Ceiling: `cast(array_sum(zip_with(x, w, (a, b) -> a * b)) AS real)` over rows of two flat REAL arrays
  (length 576, 8,192 rows) from a values node: the primitive every layer is made of, at its best (no
  captures, no joins), best of 3, 1 driver, measured before and after the engines (the best of the two
  is used). A values node runs on one driver only, so a 2-driver share is against twice the 1-driver
  ceiling (an upper bound, not a measurement).
- Engines: for each --models entry (random weights, seed 7; random images, seed 8) and each --drivers
  count, `predict` of --images images, timed in the harness's interleaved loop (1 warm-up round, then
  --rounds rounds). Executed multiply-adds per image: the study CNN's own plan runs conv2 as Winograd
  F(4,3) (15.2 M); generated plans run the direct form (velox_layers.macs).
- Check: max |p - NumPy float64 reference| <= 1e-4 for every model and driver count.
- --profile: Velox's operator CPU time per stage of the study plan (print_plan_with_stats), per image.
"""
from __future__ import annotations

import time

import numpy as np

from cnnsql.bench.studies import check

NAME = "velox_ceiling"
NEEDS_DATABASE = False
SMOKE = ["--images", "2", "--rounds", "1", "--drivers", "1", "--ceiling-rows", "1024", "--models", "study,lenet5"]

# conv1 + conv2 as Winograd F(4,3) (36 tiles x 49 element products x 64 x 64) + fc1 + fc2
STUDY_PLAN_MACS = 900 * 64 * 27 + 36 * 49 * 64 * 64 + 512 * 12544 + 10 * 512


def arguments(ap) -> None:
    ap.add_argument("--models", default="study", help="comma-separated built-ins or .json descriptions")
    ap.add_argument("--images", type=int, default=32, help="images per timed call (default 32)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--drivers", default="1,2")
    ap.add_argument("--ceiling-rows", type=int, default=8192)
    ap.add_argument("--profile", action="store_true", help="also the study plan's CPU per stage")


def ceiling(rows: int = 8192, length: int = 576, per_vector: int = 1024, reps: int = 3) -> float:
    """Velox's best multiply-add rate (MAC/s, 1 driver) on the primitive the plans are made of."""
    from cnnsql.engines import velox_runtime
    from cnnsql.engines.velox_plan import list_array

    v = velox_runtime.load()
    rng = np.random.default_rng(0)
    x, w = rng.random((rows, length), np.float32), rng.random((rows, length), np.float32)
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


def run(ctx, args) -> dict:
    from cnnsql.engines import get_engine
    from cnnsql.engines.base import tune_malloc
    from cnnsql.engines.velox_engine import VeloxEngine
    from cnnsql.engines.velox_layers import macs
    from cnnsql.models import model_spec as M
    from cnnsql.models.weights import random_weights, reference_forward

    ctx.say(f"malloc tuning: {tune_malloc()}")
    before = ceiling(args.ceiling_rows)
    ctx.say(f"ceiling before: {before:.3g} MAC/s (1 driver)")
    engines, calls, checks, executed, skipped = {}, {}, [], {}, []
    drivers = [int(d) for d in args.drivers.split(",")]
    for name in args.models.split(","):
        spec = M.resolve(name)
        if VeloxEngine.cannot_run(spec):
            skipped.append(VeloxEngine.cannot_run(spec))
            continue
        w = random_weights(7, spec)
        x = np.random.default_rng(8).integers(0, 256, (args.images, *spec.input_shape), dtype=np.uint8)
        ref = reference_forward(w, x)
        for d in drivers:
            e = get_engine("velox", w, threads=d)
            plan = e.describe()["plan"]
            diff = float(np.abs(e.predict(x) - ref).max())
            key = f"{spec.name} | {d}"
            checks.append(check(f"{key} driver(s) agrees with the reference", diff <= 1e-4, f"max |dp| {diff:.1e}"))
            engines[key] = (e, x, spec, d, plan)
            executed[key] = STUDY_PLAN_MACS if plan == "study" else macs(spec)
            calls[key] = (lambda e, x: lambda: e.predict(x))(e, x)
    timed = ctx.interleaved(calls, args.rounds, 1, args.images, label="velox")
    after = ceiling(args.ceiling_rows)
    ceil = max(before, after)
    rows = []
    for key, (e, x, spec, d, plan) in engines.items():
        t = timed[key]
        rows.append({"model": spec.name, "drivers": d, "plan": plan, "images": len(x),
                     "images_per_s": t["per_s"], "range": t["per_s_range"],
                     "executed_mmac_per_image": executed[key] / 1e6, "direct_mmac_per_image": macs(spec) / 1e6,
                     "executed_mac_per_s": t["per_s"] * executed[key],
                     "share_of_ceiling": t["per_s"] * executed[key] / (d * ceil), "noisy": t["noisy"]})
    profile = {}
    if args.profile:
        for key, (e, x, spec, d, plan) in engines.items():
            if plan == "study":
                prof = e.profile(x)
                profile[key] = {stage: ms / len(x) for stage, ms in prof.items()}
    for e, *_ in engines.values():
        e.close()
    return {"rows": rows, "checks": checks, "skipped": skipped, "profile_ms_per_image": profile,
            "ceiling_mac_per_s": {"before": before, "after": after, "used": ceil}}
