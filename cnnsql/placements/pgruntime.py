"""Runs INSIDE a PostgreSQL backend: the body of the `cnnsql.<Engine>CNN` PL/Python functions, a thin
adapter over the one predictor (cnnsql/placements/predictor.py).

Installed by `cnnsql db functions install` (cnnsql/placements/pgfunctions.py), which fixes the weights file,
the engine and the thread count in each function's body; a SQL caller passes only images.
Every backend (one per connection) loads one engine once, on its first call, and keeps it for the
connection's life (memory per backend: docs on inference inside PostgreSQL).

Shapes: `img` is the stored `bytea`, C*H*W bytes channel-major of the weights' model (3,072 for
CIFAR-10). One image -> (label, class_name, probability, probs); many -> the same per (id, img)
pair, in input order. A NULL or wrongly sized image gives NULL outputs and a WARNING, never an
error and never a made-up prediction. Only numpy and the engine's framework are imported here.
"""
from __future__ import annotations

from cnnsql.placements.predictor import OtherEngineLoaded, Predictor, bad_rows_message, process_memory

# One call of the batched form holds its images, their float copy and the activations in the
# backend (about 0.6 MB per CIFAR-10 image at batch 64); beyond this the caller is told to group rows.
MAX_BATCH_IMAGES = 16384
MAX_BATCH_BYTES = 256 << 20  # and at most this many image bytes per call, whatever the images' size


def predictor(plpy, function: str, name: str, weights: str, threads: int | None) -> Predictor:
    """The backend's predictor. One framework per backend: with PyTorch loaded and running in a
    backend, importing TensorFlow into it crashed the server process (SIGSEGV inside TensorFlow's
    native import; the postmaster then restarts every connection), so a second one is refused."""
    try:
        return Predictor.cached(name, weights, threads=threads, one_framework=True)
    except OtherEngineLoaded as exc:
        plpy.error(f"{function}: {exc}")


def classify_one(plpy, function: str, name: str, weights: str, threads: int | None, img):
    """One image -> (label, class_name, probability, probs) or None (with a WARNING) for a bad image."""
    p = predictor(plpy, function, name, weights, threads)
    rows, bad = p.classify([img])
    if bad:
        plpy.warning(f"{function}: {bad[0][1]}: NULL prediction")
        return None
    return rows[0][1:]


def classify_many(plpy, function: str, name: str, weights: str, threads: int | None, ids, imgs):
    """(ids int[], imgs bytea[]) -> rows (id, label, class_name, probability, probs), one per input,
    predicted at the engine's batch size; bad images give NULL outputs and one WARNING."""
    if ids is None or imgs is None:
        plpy.warning(f"{function}: ids or imgs is NULL: no rows")
        return []
    if len(ids) != len(imgs):
        plpy.error(f"{function}: {len(ids)} ids but {len(imgs)} images (pass array_agg(id) and array_agg(img) "
                   "from the same rows, in the same order)")
    if len(imgs) > MAX_BATCH_IMAGES:
        plpy.error(f"{function}: {len(imgs)} images in one call, at most {MAX_BATCH_IMAGES} (group the rows, "
                   "e.g. GROUP BY id / 256, see sql/psql_examples.sql)")
    total = sum(len(img) for img in imgs if img is not None)
    if total > MAX_BATCH_BYTES:
        plpy.error(f"{function}: {total:,} bytes of images in one call, at most {MAX_BATCH_BYTES:,} (group the rows "
                   "into smaller calls, e.g. GROUP BY id / 256)")
    rows, bad = predictor(plpy, function, name, weights, threads).classify(imgs, ids)
    if bad:
        plpy.warning(f"{function}: {bad_rows_message(bad)}")
    return rows


def backend_status() -> dict:
    """This backend: pid, memory (VmRSS, VmHWM in MB from /proc), engines loaded."""
    return process_memory()
