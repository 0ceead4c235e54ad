"""Raw inference speed of each engine (no SQL): images/s at several batch sizes, same thread count.

Random weights and random uint8 images. Each cell: warm-up calls, then REPEATS timed repetitions of
enough batches for ~IMAGES images; the median repetition is reported (the best in brackets).
Effective GFLOP/s = images/s x FLOP per image, set beside the machine's measured SGEMM GFLOP/s.

    python benchmarks/raw_speed.py --threads 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


from cnnsql.engines import get_engine  # noqa: E402
from cnnsql.models.weights import random_weights, reference_forward  # noqa: E402

# Multiply-adds x 2 per image (biases, ReLU, pooling and softmax left out).
FLOP_PER_IMAGE = 2 * (30 * 30 * 64 * 3 * 9 + 28 * 28 * 64 * 64 * 9 + 12544 * 512 + 512 * 10)

# (engine, label, constructor options). chunk=None: the whole batch in one framework call.
VARIANTS = [
    ("torch", "eager NCHW, inference_mode", {"mode": "eager", "chunk": None}),
    ("torch", "channels_last", {"mode": "channels_last", "chunk": None}),
    ("torch", "channels_last, 64-chunks (default)", {}),
    ("torch", "torch.compile, 64-chunks", {"mode": "compile"}),
    ("tensorflow", "tf.function", {"chunk": None}),
    ("tensorflow", "tf.function, 64-chunks (default)", {}),
    ("tensorflow", "tf.function + XLA, 64-chunks", {"jit_compile": True}),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for every engine (default 2)")
    p.add_argument("--batch-sizes", default="1,64,256")
    p.add_argument("--images", type=int, default=1024, help="images per timed repetition (at least one batch)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per cell")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (plus compilation)")
    p.add_argument("--velox-images", type=int, default=64, help="Velox runs once, at batch 64, on this many images")
    p.add_argument("--only", default="", help="comma-separated engines to run (default: all)")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def set_threads(threads: int) -> None:
    """Same cap everywhere; TensorFlow's must be set before its runtime starts."""
    from cnnsql.engines.tensorflow_engine import set_threads as tf_threads
    from cnnsql.engines.torch_engine import import_torch

    import_torch().set_num_threads(threads)
    tf_threads(threads)


def sgemm_gflops(threads: int, n: int = 2048, reps: int = 10) -> dict:
    """Best-of-3 float32 matmul throughput, torch (oneDNN/MKL) and numpy (OpenBLAS)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    an, bn = a.numpy(), b.numpy()
    out = {}
    for name, f in (("torch", lambda: a @ b), ("numpy", lambda: an @ bn)):
        f()
        best = min(timed(f, reps) for _ in range(3))
        out[name] = 2 * n**3 * reps / best / 1e9
    return out


def timed(f, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        f()
    return time.perf_counter() - t0


def measure(engine, batch: int, args, rng) -> dict:
    x = rng.integers(0, 256, (batch, 3, 32, 32), dtype=np.uint8)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        engine.predict_proba(x)
    warm_s = time.perf_counter() - t0
    calls = max(1, args.images // batch)
    rates = [calls * batch / timed(lambda: engine.predict_proba(x), calls) for _ in range(args.repeats)]
    return {"batch": batch, "images_per_s": statistics.median(rates), "best": max(rates),
            "calls": calls, "repeats": args.repeats, "warmup_s": warm_s}


def max_error(engine, weights, rng) -> float:
    x = rng.integers(0, 256, (16, 3, 32, 32), dtype=np.uint8)
    return float(np.abs(engine.predict_proba(x) - reference_forward(weights, x)).max())


def run_variant(name, label, opts, batches, args, weights, rng) -> list[dict]:
    try:
        engine = get_engine(name, weights, threads=args.threads, **opts)
        err = max_error(engine, weights, rng)
    except Exception as exc:  # a variant that cannot run is reported, not fatal
        print(f"  skipped {name} / {label}: {type(exc).__name__}: {exc}", flush=True)
        return []
    rows = []
    for batch in batches:
        row = {"engine": name, "variant": label, "max_abs_err": err, **measure(engine, batch, args, rng)}
        print_row(row, flush=True)
        rows.append(row)
    return rows


def run_velox(args, weights, rng) -> list[dict]:
    """Velox is ~1000x slower: one timed call at batch 64 on a few images, no warm-up."""
    try:
        engine = get_engine("velox", weights, threads=args.threads)
    except Exception as exc:
        print(f"  skipped velox: {type(exc).__name__}: {exc}", flush=True)
        return []
    x = rng.integers(0, 256, (args.velox_images, 3, 32, 32), dtype=np.uint8)
    t0 = time.perf_counter()
    p = engine.predict(x, batch_size=64)
    rate = len(x) / (time.perf_counter() - t0)
    err = float(np.abs(p - reference_forward(weights, x)).max())
    row = {"engine": "velox", "variant": "default", "max_abs_err": err, "batch": 64, "images_per_s": rate,
           "best": rate, "calls": -(-len(x) // 64), "repeats": 1, "warmup_s": 0.0}
    print_row(row, flush=True)
    return [row]


HEADER = f"{'engine':<11} {'variant':<36} {'batch':>5} {'images/s':>10} {'(best)':>9} {'GFLOP/s':>8} {'max|err|':>9}"


def print_row(r: dict, flush=False) -> None:
    gflops = r["images_per_s"] * FLOP_PER_IMAGE / 1e9
    print(f"{r['engine']:<11} {r['variant']:<36} {r['batch']:>5} {r['images_per_s']:>10,.0f} "
          f"{'(' + format(r['best'], ',.0f') + ')':>9} {gflops:>8.1f} {r['max_abs_err']:>9.1e}", flush=flush)


def main(argv=None) -> int:
    args = parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    only = set(filter(None, args.only.split(",")))
    set_threads(args.threads)
    gemm = sgemm_gflops(args.threads)
    print(f"threads: {args.threads}; FLOP per image: {FLOP_PER_IMAGE / 1e6:.1f} M")
    print("SGEMM 2048x2048 float32, best of 3: " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in gemm.items()))
    print(f"each cell: {args.warmup} warm-up calls, then {args.repeats} repetitions of ~{args.images} images; "
          "median images/s (best in brackets)\n")
    print(HEADER)
    weights, rng = random_weights(0), np.random.default_rng(0)
    rows = []
    for name, label, opts in VARIANTS:
        if not only or name in only:
            rows += run_variant(name, label, opts, batches, args, weights, rng)
    if not only or "velox" in only:
        rows += run_velox(args, weights, rng)
    peak = max(gemm.values())
    fastest = max(rows, key=lambda r: r["images_per_s"], default=None)
    if fastest:
        g = fastest["images_per_s"] * FLOP_PER_IMAGE / 1e9
        print(f"\nfastest: {fastest['engine']} / {fastest['variant']} at batch {fastest['batch']}: "
              f"{g:.0f} GFLOP/s = {100 * g / peak:.0f}% of the SGEMM figure")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "sgemm_gflops": gemm, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
