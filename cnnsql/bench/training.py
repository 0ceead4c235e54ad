"""Training as a logged run: a model trained on a dataset's train split in PostgreSQL, evaluated on its
test split, written as a weights file with its manifest (`cnnsql train`, and `cnnsql bench` when no
weights exist yet)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from cnnsql import db, results
from cnnsql.data import datasets
from cnnsql.models import model_spec
from cnnsql.models.weights import save_weights


def train_and_save(conn, framework: str, out: Path, *, epochs=None, batch_size=None, seed: int = 0,
                   device: str = "cpu", threads=None, limit=None, progress: bool = True,
                   model: str | None = None, dataset: str | None = None) -> dict:
    """Train `model` (a built-in name sized to the dataset, or a description .json; default the study's
    CNN) on the dataset's train split, evaluate on its test split, write weights + manifest, log the run."""
    from cnnsql.engines.train import train

    db.ensure_schema(conn)
    ds = datasets.info(conn, dataset)
    spec = model_spec.resolve(model, ds.shape, ds.num_classes)
    info = ds.provenance(conn)
    _, x_train, y_train = datasets.fetch_split(conn, ds, "train", limit=limit)
    _, x_test, y_test = datasets.fetch_split(conn, ds, "test")
    run_spec = dict(kind="train", scenario="train", engine=framework, split="train", n_rows=len(y_train),
                    batch_size=batch_size, threads=threads, device=device,
                    dataset_kind=info.get("train", {}).get("kind", ds.kind), weights=str(out))
    with results.logged_run(conn, results.new_session_id(), **run_spec) as run:
        t0 = time.time()
        arrays, history = train(framework, x_train, y_train, x_test, y_test, epochs=epochs, batch_size=batch_size,
                                seed=seed, device=device, threads=threads, progress=progress, spec=spec)
        epochs_done = history["epochs"]
        manifest = {
            "trained_by": framework, "epochs": len(epochs_done), "batch_size": history.get("batch_size"),
            "seed": seed, "test_accuracy": history["test_accuracy"], "train_rows": len(y_train),
            "seconds_per_epoch": [e["seconds"] for e in epochs_done], "data": info,
            "dataset": ds.name, "class_names": ds.class_names, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "train_seconds": time.time() - t0,
        }
        datasets.check_version(conn, ds, ds.version, f"training run {run.id}")  # one dataset, start to end
        save_weights(out, arrays, manifest, spec)
        total = sum(e["seconds"] for e in epochs_done)
        run.finish({"wall_s": total, "images_per_s": len(y_train) * len(epochs_done) / total,
                    "accuracy": history["test_accuracy"], "detail": {"history": history}}, epochs=epochs_done)
    print(f"{framework} {spec.name} on {ds.name}: test accuracy {history['test_accuracy']:.4f} after {len(epochs_done)} epochs "
          f"({total / len(epochs_done):.1f} s/epoch) -> {out}", file=sys.stderr)
    return history
