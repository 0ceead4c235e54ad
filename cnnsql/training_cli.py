"""`cnnsql train`: read the train split from PostgreSQL, train, write weights, log the run."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from . import data, db, results
from .weights import save_weights


def train_command(args) -> None:
    with db.connection() as conn:
        train_and_save(conn, args.framework, args.out, epochs=args.epochs, batch_size=args.batch_size,
                       seed=args.seed, device=args.device, threads=args.threads, limit=args.limit,
                       progress=not args.quiet)


def train_and_save(conn, framework: str, out: Path, *, epochs=None, batch_size=None, seed: int = 0,
                   device: str = "cpu", threads=None, limit=None, progress: bool = True) -> dict:
    """Train on the train split, evaluate on the test split, write weights + manifest, log the run."""
    from .train import train

    db.ensure_schema(conn)
    info = results.dataset_info(conn)
    _, x_train, y_train = data.fetch_split(conn, "train", limit=limit)
    _, x_test, y_test = data.fetch_split(conn, "test")
    spec = dict(kind="train", scenario="train", engine=framework, split="train", n_rows=len(y_train),
                batch_size=batch_size, threads=threads, device=device,
                dataset_kind=info.get("train", {}).get("kind"), weights=str(out))
    with results.logged_run(conn, results.new_session_id(), **spec) as run:
        t0 = time.time()
        arrays, history = train(framework, x_train, y_train, x_test, y_test, epochs=epochs, batch_size=batch_size,
                                seed=seed, device=device, threads=threads, progress=progress)
        epochs_done = history["epochs"]
        manifest = {
            "trained_by": framework, "epochs": len(epochs_done), "batch_size": history.get("batch_size"),
            "seed": seed, "test_accuracy": history["test_accuracy"], "train_rows": len(y_train),
            "seconds_per_epoch": [e["seconds"] for e in epochs_done], "data": info,
            "class_names": data.class_names(conn), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "train_seconds": time.time() - t0,
        }
        save_weights(out, arrays, manifest)
        total = sum(e["seconds"] for e in epochs_done)
        run.finish({"wall_s": total, "images_per_s": len(y_train) * len(epochs_done) / total,
                    "accuracy": history["test_accuracy"], "detail": {"history": history}}, epochs=epochs_done)
    print(f"{framework}: test accuracy {history['test_accuracy']:.4f} after {len(epochs_done)} epochs "
          f"({total / len(epochs_done):.1f} s/epoch) -> {out}", file=sys.stderr)
    return history
