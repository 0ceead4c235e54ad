"""Do the engines compute the same function? Top-1 agreement and probabilities on the loaded test images.

Reads the first --images test images of --dataset (default: the loaded CIFAR-10 or synthetic data) from
PostgreSQL, runs every --engines engine that can run the weights' model on them (an engine with a
`bench_sample`, Velox, on the first --slow-images only), each once, and compares every pair on the
images both ran: the share of equal top-1 classes and the largest absolute difference of any
probability (float32). Checks: every pair agrees (top-1 100%, probabilities within 1e-4). Also each
engine's accuracy on the labels and its wall time for the one call (not an interleaved figure).
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np

from cnnsql.bench.studies import check
from cnnsql.engines import ENGINES, engine_class, get_engine

NAME = "agreement"
NEEDS_DATABASE = True
SMOKE = ["--images", "24", "--slow-images", "4"]


def arguments(ap) -> None:
    ap.add_argument("--weights", type=Path, help="weights file (default: the benchmark's default weights)")
    ap.add_argument("--dataset", help="a loaded dataset (default: CIFAR-10 / synthetic)")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--slow-images", type=int, default=200, help="images for engines with a bench sample (Velox)")
    ap.add_argument("--threads", type=int, default=2)


def run(ctx, args) -> dict:
    from cnnsql import db
    from cnnsql.core import config
    from cnnsql.core.errors import CnnsqlError
    from cnnsql.data import datasets
    from cnnsql.models.weights import check_weights_model, load_weights

    path = args.weights or config.default_weights()
    if not Path(path).exists():
        raise CnnsqlError(f"no weights at {path}", "run `cnnsql bench` or `cnnsql train` first, or give --weights")
    with db.connection() as conn:
        ds = datasets.info(conn, args.dataset)
        check_weights_model(path, None, ds.shape, ds.num_classes)
        _, images, labels = datasets.fetch_split(conn, ds, "test", limit=args.images)
    weights = load_weights(path)
    probs, rows, skipped = {}, [], []
    for name in args.engines.split(","):
        cls = engine_class(name)
        if cls.cannot_run(weights.spec):
            skipped.append(f"{name}: {cls.cannot_run(weights.spec)}")
            continue
        n = min(len(images), args.slow_images) if cls.bench_sample else len(images)
        t0 = time.perf_counter()
        probs[name] = get_engine(name, weights, threads=args.threads).predict(images[:n])
        secs = time.perf_counter() - t0
        acc = float((probs[name].argmax(1) == labels[:n]).mean())
        ctx.say(f"{name}: {n} images in {secs:.1f} s, accuracy {acc:.4f}")
        rows.append({"pair": name, "images": n, "top1_agree": None, "max_abs_dp": None, "accuracy": acc,
                     "seconds": secs})
    checks = []
    for a, b in itertools.combinations(probs, 2):
        n = min(len(probs[a]), len(probs[b]))
        agree = float((probs[a][:n].argmax(1) == probs[b][:n].argmax(1)).mean())
        diff = float(np.abs(probs[a][:n] - probs[b][:n]).max())
        checks.append(check(f"{a} vs {b}", agree == 1.0 and diff <= 1e-4,
                            f"top-1 equal on {agree:.2%} of {n}, max |dp| {diff:.1e}"))
        rows.append({"pair": f"{a} vs {b}", "images": n, "top1_agree": agree, "max_abs_dp": diff, "accuracy": None,
                     "seconds": None})
    return {"rows": rows, "checks": checks, "skipped": skipped, "dataset": ds.name, "model": weights.spec.name,
            "weights": str(path)}
