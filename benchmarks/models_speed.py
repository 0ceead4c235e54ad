"""Raw images/s of every built-in model in PyTorch and TensorFlow, interleaved in one process.

Each round runs every (model, engine) once on the same images, so a busy machine slows all alike;
figures are medians over rounds, with the 1-minute load average before and after.
Usage: .venv/bin/python benchmarks/models_speed.py [--images 1024] [--rounds 5] [--threads 2]
       [--weights-dir DIR]   (DIR/cifar-<model>-torch.npz when present, else random weights: speed
                              does not depend on the values)
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from cnnsql.models import model_spec as M
from cnnsql.models import weights as W
from cnnsql.engines import get_engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights-dir", type=Path, default=None)
    args = ap.parse_args()
    x = np.random.default_rng(0).integers(0, 256, (args.images, 3, 32, 32), dtype=np.uint8)
    engines = {}
    for name in M.BUILTINS:
        path = args.weights_dir / f"cifar-{name}-torch.npz" if args.weights_dir else None
        w = W.load_weights(path) if path and path.exists() else W.random_weights(0, M.builtin(name))
        for eng in ("torch", "tensorflow"):
            e = get_engine(eng, w, threads=args.threads)
            e.predict(x[:256])  # warm-up
            engines[(name, eng)] = e
    load0 = os.getloadavg()[0]
    times = {k: [] for k in engines}
    for _ in range(args.rounds):
        for key, e in engines.items():
            t0 = time.perf_counter()
            e.predict(x)
            times[key].append(time.perf_counter() - t0)
    load1 = os.getloadavg()[0]
    print(f"{args.images} images 3x32x32, batch = engine default (256, 64-image chunks), {args.threads} threads, "
          f"median of {args.rounds} interleaved rounds; load average {load0:.1f} -> {load1:.1f}")
    print(f"{'model':<8}{'engine':<12}{'images/s':>10}{'spread':>18}")
    for (name, eng), ts in times.items():
        ips = [args.images / t for t in ts]
        print(f"{name:<8}{eng:<12}{statistics.median(ips):>10.0f}   {min(ips):>6.0f}..{max(ips):<6.0f}")


if __name__ == "__main__":
    main()
