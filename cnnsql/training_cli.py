"""`cnnsql train`: read the train split from PostgreSQL, train, write weights, log the run."""
from __future__ import annotations

import sys
import time

from . import data, db, results
from .weights import save_weights


def train_command(args) -> None:
    from .train import train

    with db.connection() as conn:
        db.ensure_schema(conn)
        info = results.dataset_info(conn)
        _, x_train, y_train = data.fetch_split(conn, "train", limit=args.limit)
        _, x_test, y_test = data.fetch_split(conn, "test")
        session = results.new_session_id()
        run_id = results.start_run(conn, session, kind="train", scenario="train", engine=args.framework,
                                   split="train", n_rows=len(y_train), batch_size=args.batch_size,
                                   threads=args.threads, device=args.device,
                                   dataset_kind=info.get("train", {}).get("kind"), weights=str(args.out))
        try:
            t0 = time.time()
            arrays, history = train(args.framework, x_train, y_train, x_test, y_test, epochs=args.epochs,
                                    batch_size=args.batch_size, seed=args.seed, device=args.device,
                                    threads=args.threads, progress=not args.quiet)
            manifest = {
                "trained_by": args.framework, "epochs": len(history["epochs"]), "batch_size": history.get("batch_size"),
                "seed": args.seed, "test_accuracy": history["test_accuracy"], "train_rows": len(y_train),
                "seconds_per_epoch": [e["seconds"] for e in history["epochs"]], "data": info,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "train_seconds": time.time() - t0,
            }
            save_weights(args.out, arrays, manifest)
            total = sum(e["seconds"] for e in history["epochs"])
            results.finish_run(conn, run_id, {"wall_s": total, "images_per_s": len(y_train) * len(history["epochs"]) / total,
                                              "accuracy": history["test_accuracy"], "detail": {"history": history}},
                               epochs=history["epochs"])
        except BaseException as exc:
            results.fail_run(conn, run_id, repr(exc))
            raise
    print(f"{args.framework}: test accuracy {history['test_accuracy']:.4f} after {len(history['epochs'])} epochs "
          f"({total / len(history['epochs']):.1f} s/epoch) -> {args.out}", file=sys.stderr)
