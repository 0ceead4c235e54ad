"""The Velox engine on every built-in model (cnnsql.model_spec.BUILTINS), against Velox's own
multiply-add ceiling, one run.

    python benchmarks/velox_models.py [--images 8] [--rounds 2]

- Ceiling: velox_ceiling.ceiling() (flat REAL `array_sum(zip_with(...))`, values source, 1 driver,
  best of 3), measured before and after; the best of the two is used, per driver (the 2-driver
  share is against twice it: an upper bound, not a measurement).
- Models: random weights (seed 7), random 3x32x32 images (seed 8); per round and model, one timed
  `predict` of --images images with 1 and with 2 drivers, after a warm-up call. The study's CNN
  runs its own plan (Winograd conv2: 15.2 M executed multiply-adds per image); the other models
  the generated direct form (velox_layers.macs()). Max |p - NumPy reference| printed per model.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from cnnsql.models import model_spec as M
from cnnsql.models import weights as W
from cnnsql.engines import get_engine
from cnnsql.engines import velox_layers
from cnnsql.engines.base import tune_malloc

from velox_ceiling import NEW_MACS, ceiling


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", default=",".join(M.BUILTINS))
    args = ap.parse_args()
    print("tune_malloc:", tune_malloc())
    before = ceiling()
    print(f"ceiling before: {before:.3g} MAC/s, load {os.getloadavg()[0]:.1f}", flush=True)
    engines, macs = {}, {}
    for name in args.models.split(","):
        spec = M.builtin(name)
        w = W.random_weights(7, spec)
        x = np.random.default_rng(8).integers(0, 256, (args.images, *spec.input_shape), dtype=np.uint8)
        ref = W.reference_forward(w, x)
        macs[name] = (NEW_MACS if name == "study" else velox_layers.macs(spec), velox_layers.macs(spec))
        for d in (1, 2):
            e = get_engine("velox", w, threads=d)
            diff = float(np.abs(e.predict(x) - ref).max())  # also the warm-up
            engines[(name, d)] = (e, x)
            print(f"{name}, {d} driver(s): plan {e.describe()['plan']}, max |p - reference| {diff:.2g}", flush=True)
    rates: dict = {k: [] for k in engines}
    for r in range(args.rounds):
        for key, (e, x) in engines.items():
            t0 = time.perf_counter()
            e.predict(x)
            rates[key].append(len(x) / (time.perf_counter() - t0))
            print(f"round {r + 1}: {key[0]}, {key[1]} driver(s): {rates[key][-1]:.2f} img/s, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    after = ceiling()
    ceil = max(before, after)
    print(f"ceiling after: {after:.3g} MAC/s, load {os.getloadavg()[0]:.1f}\n")
    print("| model | drivers | MAC/image executed (direct form) | images/s (median; range) | executed MAC/s "
          "| share of ceiling |")
    print("|---|---|---|---|---|---|")
    for (name, d), values in rates.items():
        med = statistics.median(values)
        executed, direct = macs[name]
        print(f"| {name} | {d} | {executed / 1e6:.2f} M ({direct / 1e6:.2f} M) | **{med:.2f}** "
              f"({min(values):.2f}-{max(values):.2f}) | {med * executed:.3g} | {med * executed / (d * ceil):.0%} |")
    print(f"\n(ceiling {ceil:.3g} MAC/s per driver, best of before/after)")
    for e, _ in engines.values():
        e.close()


if __name__ == "__main__":
    main()
