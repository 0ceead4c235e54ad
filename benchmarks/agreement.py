"""Do the three engines compute the same function? Top-1 and probabilities on real test images.

    python benchmarks/agreement.py --weights W.npz [--images 1000] [--velox-images 200]

Reads the first N test images from PostgreSQL, runs torch and tensorflow on N and velox on the
first --velox-images, and compares every pair on the images they share: top-1 agreement and the
largest absolute difference of any probability (float32).
"""
from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from cnnsql.data import cifar_table as data
from cnnsql import db
from cnnsql.engines import get_engine
from cnnsql.models.weights import load_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--velox-images", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    weights = load_weights(args.weights)
    with db.connection() as conn:
        _, images, labels = data.fetch_split(conn, "test", limit=args.images)
    probs = {}
    for name, n in (("torch", args.images), ("tensorflow", args.images), ("velox", args.velox_images)):
        t0 = time.perf_counter()
        probs[name] = get_engine(name, weights, threads=args.threads).predict(images[:n])
        secs = time.perf_counter() - t0
        acc = (probs[name].argmax(1) == labels[:n]).mean()
        print(f"{name:<11} {n:>5} images in {secs:7.1f} s  accuracy {acc:.4f}")
    print(f"{'pair':<24}{'images':>7}{'top-1 agree':>13}{'max |dp|':>12}")
    ok = True
    for a, b in itertools.combinations(probs, 2):
        n = min(len(probs[a]), len(probs[b]))
        agree = (probs[a][:n].argmax(1) == probs[b][:n].argmax(1)).mean()
        diff = np.abs(probs[a][:n] - probs[b][:n]).max()
        ok &= agree == 1.0 and diff <= 1e-4
        print(f"{a + ' vs ' + b:<24}{n:>7}{agree:>13.4f}{diff:>12.2e}")
    print("all pairs agree (top-1 equal, probabilities within 1e-4)" if ok else "DISAGREEMENT: see above")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
