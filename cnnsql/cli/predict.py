"""`cnnsql predict`: classify a split from PostgreSQL with one engine, write a CSV."""
from __future__ import annotations

import csv
import sys

import numpy as np
from cnnsql.core.progress import progress_bar

from cnnsql.data import datasets
from cnnsql import db
from cnnsql.models import model_spec
from cnnsql.engines import get_engine
from cnnsql.models.weights import load_weights
from cnnsql.core.errors import CnnsqlError


def predict_images(engine, images: np.ndarray, batch_size: int | None = None, progress: bool = True) -> np.ndarray:
    """The engine's batched predict (Engine.predict splits the call), with a progress bar."""
    with progress_bar(total=len(images), unit="img", desc=f"predict {engine.name}", disable=not progress) as bar:
        return engine.predict(images, batch_size, on_batch=bar.update)


def write_csv(path, ids, labels, probs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "predicted", *[f"p{k}" for k in range(probs.shape[1])]])
        for i, lab, p in zip(ids, labels, probs):
            w.writerow([int(i), int(lab), int(p.argmax()), *[f"{v:.8g}" for v in p]])
    tmp.replace(path)


def predict_command(args) -> None:
    if args.into:
        return into_table(args)
    if args.placement != "client" or args.replace:
        raise CnnsqlError("--placement and --replace go with --into TABLE", "a CSV (--out) is written by this process")
    weights = load_weights(args.weights)
    engine = get_engine(args.engine, weights, device=args.device, threads=args.threads)
    with db.connection() as conn:
        ds = datasets.info(conn, args.dataset)
        model_spec.check_fits(weights.spec, ds.shape, ds.num_classes)
        ids, images, labels = datasets.fetch_split(conn, ds, args.split, limit=args.limit)
    probs = predict_images(engine, images, args.batch_size, progress=not args.quiet)
    write_csv(args.out, ids, labels, probs)
    acc = float((probs.argmax(1) == labels).mean())
    print(f"{len(ids)} predictions by {engine.name} -> {args.out} (accuracy {acc:.4f})", file=sys.stderr)


def into_table(args) -> None:
    from cnnsql.placements import writeback

    if args.device != "cpu" and args.placement != "client":
        raise CnnsqlError("--device applies to --placement client", "drop --device, or use --placement client")
    done = writeback.write_back(into=args.into, engine=args.engine, weights=args.weights, placement=args.placement,
                                dataset=args.dataset, split=args.split, limit=args.limit, replace=args.replace,
                                threads=args.threads, batch_size=args.batch_size, device=args.device,
                                progress=not args.quiet)
    bad = f", {done.bad} bad image(s) with NULL outputs" if done.bad else ""
    print(f"{done.rows} predictions by {done.engine} ({done.placement}) -> table {done.table} in "
          f"{done.wall_s:.1f} s ({done.images_per_s:,.0f} images/s; before that {done.warmup_s:.1f} s to load the "
          f"engine){bad}", file=sys.stderr)
