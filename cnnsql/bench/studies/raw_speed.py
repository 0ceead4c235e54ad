"""Raw inference speed of every engine variant and model (no SQL): images/s per batch size, against SGEMM.

Random weights (seed 0) of each --models entry on its input shape (speed does not depend on the values), random uint8 images (seed 0). The variants are the
per-framework settings in cnnsql.engines.VARIANTS (the placements run "default"). Every cell (engine,
variant, batch size) is timed in the harness's interleaved loop: --warmup untimed rounds, then --repeats
rounds of one call of each cell, a call being enough batches for ~--images images (an engine with a
smaller `bench_sweep_images`, Velox, runs that many). Figures: median images/s [min-max] over the
rounds; effective GFLOP/s = images/s x 2 x multiply-adds per image (conv and dense layers), set beside
the best of 3 float32 2048x2048 matmuls (torch and NumPy). Each variant's max |p - NumPy float64
reference| on 16 images is a check (<= 1e-4).
"""
from __future__ import annotations

import time

import numpy as np

from cnnsql.bench.studies import check
from cnnsql.engines import ENGINES, VARIANTS, engine_class, get_engine

NAME = "raw_speed"
NEEDS_DATABASE = False
SMOKE = ["--engines", "torch", "--batch-sizes", "1,8", "--images", "16", "--repeats", "2", "--warmup", "1",
         "--variants", "default"]


def arguments(ap) -> None:
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated (default: all)")
    ap.add_argument("--variants", default="", help="comma-separated variant labels (default: all of each engine)")
    ap.add_argument("--models", default="study", help="comma-separated built-ins or description .json files "
                    "(default: study; every built-in: study,lenet5,vgg,resnet20,mobilenet_small)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for every engine (default 2)")
    ap.add_argument("--batch-sizes", default="1,64,256")
    ap.add_argument("--images", type=int, default=1024, help="images per timed call (at least one batch)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing (plus compilation)")


def set_threads(threads: int, engines: list[str]) -> None:
    """Same cap everywhere; TensorFlow's must be set before its runtime starts."""
    if "tensorflow" in engines:
        from cnnsql.engines.tensorflow_engine import set_threads as tf_threads

        tf_threads(threads)
    if "torch" in engines:
        from cnnsql.engines.torch_engine import import_torch

        import_torch().set_num_threads(threads)


def sgemm_gflops(threads: int, n: int = 2048, reps: int = 10) -> dict:
    """Best-of-3 float32 n x n matmul throughput: NumPy's BLAS, and torch's when installed."""
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), np.float32), rng.random((n, n), np.float32)
    calls = {"numpy": lambda: a @ b}
    try:
        from cnnsql.engines.torch_engine import import_torch

        torch = import_torch()
        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        calls["torch"] = lambda: ta @ tb
    except Exception:  # noqa: BLE001 - torch is optional here
        pass
    out = {}
    for name, f in calls.items():
        f()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * n ** 3 * reps / best / 1e9
    return out


def run(ctx, args) -> dict:
    from cnnsql.models import model_spec as M
    from cnnsql.models.weights import random_weights, reference_forward

    engines = [e for e in args.engines.split(",") if e]
    for e in engines:
        engine_class(e)  # an unknown engine is one line
    batches = [int(b) for b in args.batch_sizes.split(",")]
    only = set(filter(None, args.variants.split(",")))
    if "velox" in engines:  # Velox's DWRF writer must start before TensorFlow's runtime (velox_engine)
        from cnnsql.engines import velox_runtime

        velox_runtime.load()
        velox_runtime.dwrf_writer_works()
    set_threads(args.threads, engines)
    gemm = sgemm_gflops(args.threads)
    ctx.say("SGEMM 2048x2048 float32, best of 3: " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in gemm.items()))
    calls, n_items, cells, checks, skipped = {}, {}, {}, [], []
    rng = np.random.default_rng(0)
    for model in args.models.split(","):
        spec = M.resolve(model)
        weights = random_weights(0, spec)
        probe = rng.integers(0, 256, (16, *spec.input_shape), dtype=np.uint8)
        add_cells(ctx, args, spec, weights, probe, reference_forward(weights, probe), engines, batches, only, rng,
                  calls, n_items, cells, checks, skipped)
    ctx.say(f"{len(calls)} cells, {args.warmup} warm-up and {args.repeats} timed rounds, interleaved")
    timed = ctx.interleaved(calls, args.repeats, args.warmup, n_items, label="cell")
    rows = []
    for key, cell in cells.items():
        t = timed[key]
        flop = cell.pop("flop")
        rows.append({**cell, "images": n_items[key], "images_per_s": t["per_s"], "range": t["per_s_range"],
                     "gflop_per_s": t["per_s"] * flop / 1e9, "noisy": t["noisy"]})
    peak = max(gemm.values())
    fastest = max(rows, key=lambda r: r["images_per_s"], default=None)
    return {"rows": rows, "checks": checks, "skipped": skipped, "sgemm_gflops": gemm,
            "fastest": fastest and {**{k: fastest[k] for k in ("model", "engine", "variant", "batch")},
                                    "share_of_sgemm": fastest["gflop_per_s"] / peak}}


def add_cells(ctx, args, spec, weights, probe, expected, engines, batches, only, rng, calls, n_items, cells, checks,
              skipped) -> None:
    """The cells of one model: every engine that can run it, every variant, every batch size."""
    from cnnsql.engines.velox_layers import macs

    flop = 2 * macs(spec)
    for name in engines:
        cls = engine_class(name)
        if cls.cannot_run(spec):
            skipped.append(f"{spec.name}: {name}: {cls.cannot_run(spec)}")
            continue
        for label, opts in VARIANTS[name].items():
            if only and label not in only:
                continue
            try:
                engine = get_engine(name, weights, threads=args.threads, **opts)
                err = float(np.abs(engine.predict_proba(probe) - expected).max())
            except Exception as exc:  # noqa: BLE001 - a variant that cannot run here is reported, not fatal
                skipped.append(f"{spec.name}: {name} / {label}: {type(exc).__name__}: {str(exc)[:200]}")
                ctx.say(f"  skipped {name} / {label}: {type(exc).__name__}: {exc}")
                continue
            checks.append(check(f"{spec.name}: {name} / {label} agrees with the reference", err <= 1e-4, f"max |dp| {err:.1e}"))
            images = min(args.images, cls.bench_sweep_images or args.images)
            for batch in batches:
                x = rng.integers(0, 256, (batch, *spec.input_shape), dtype=np.uint8)
                n_calls = max(1, images // batch)
                key = f"{spec.name} | {name} | {label} | {batch}"
                calls[key] = (lambda e, x, k: lambda: [e.predict_proba(x) for _ in range(k)])(engine, x, n_calls)
                n_items[key] = n_calls * batch
                cells[key] = {"model": spec.name, "engine": name, "variant": label, "batch": batch,
                              "max_abs_err": err, "flop": flop}
