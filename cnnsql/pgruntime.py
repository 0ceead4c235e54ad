"""Runs INSIDE a PostgreSQL backend: the body of the `cnnsql.<Engine>CNN` PL/Python functions.

Installed by `cnnsql db functions install` (cnnsql/pgfunctions.py), which fixes the weights file,
the engine and the thread count in each function's body; a SQL caller passes only images.
Every backend (one per connection) loads an engine once, on its first call, and keeps it for the
connection's life (memory per backend: README "Inference inside PostgreSQL").

Shapes: `img` is the stored `bytea`, 3,072 bytes channel-major (cifar_image.img). One image ->
(label, class_name, probability, probs[10]); many -> the same per (id, img) pair, in input order.
A NULL or wrongly sized image gives NULL outputs and a WARNING, never an error and never a
made-up prediction. Only numpy and the engine's framework are imported here (no psycopg2, EvaDB).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGE_BYTES = 3072
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# One call of the batched form holds its images, their float copy and the activations in the
# backend (about 0.6 MB per image at batch 64); beyond this the caller is told to group the rows.
MAX_BATCH_IMAGES = 16384

_ENGINES: dict[tuple, object] = {}


class OtherEngineLoaded(Exception):
    """This backend already runs another engine (see `engine`)."""


def engine(name: str, weights: str, threads: int | None):
    """The backend's engine for (name, weights file as it is now, threads): loaded once.

    One engine per backend: with PyTorch loaded and running in a backend, importing TensorFlow
    into it crashed the server process (SIGSEGV inside TensorFlow's native import, measured here;
    the postmaster then restarts every connection). The same sequence works in a plain Python 3.11
    process. So a second engine is refused with an error naming the fix: another connection.
    """
    path = Path(weights)
    key = (name, str(path), path.stat().st_mtime_ns, threads)
    if key not in _ENGINES:
        from .engines import get_engine
        from .weights import load_weights

        others = sorted({k[0] for k in _ENGINES if k[0] != name})
        if others:
            raise OtherEngineLoaded(f"this connection's server process already runs the {others[0]} engine; "
                                    f"a second framework ({name}) in one backend can crash the server: use "
                                    f"another connection for {name}")
        _ENGINES.clear()  # the same engine with a changed weights file: drop the stale one
        _ENGINES[key] = get_engine(name, load_weights(path), threads=threads)
    return _ENGINES[key]


def _engine_or_error(plpy, function: str, name: str, weights: str, threads: int | None):
    try:
        return engine(name, weights, threads)
    except OtherEngineLoaded as exc:
        plpy.error(f"{function}: {exc}")


def class_names(eng) -> tuple[str, ...]:
    names = eng.weights.manifest.get("class_names")
    return tuple(names) if names and len(names) == 10 else CIFAR10_CLASSES


def _problem(img) -> str | None:
    if img is None:
        return "img is NULL"
    if len(img) != IMAGE_BYTES:
        return f"img has {len(img)} bytes, expected {IMAGE_BYTES}"
    return None


def classify_one(plpy, function: str, name: str, weights: str, threads: int | None, img):
    """One image -> (label, class_name, probability, probs) or None (with a WARNING) for a bad image."""
    problem = _problem(img)
    if problem:
        plpy.warning(f"{function}: {problem}: NULL prediction")
        return None
    eng = _engine_or_error(plpy, function, name, weights, threads)
    probs = eng.predict(np.frombuffer(img, dtype=np.uint8).reshape(1, 3, 32, 32), 1)[0]
    k = int(probs.argmax())
    return k, class_names(eng)[k], float(probs[k]), probs.tolist()


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
    problems = [_problem(img) for img in imgs]
    good = [i for i, p in enumerate(problems) if p is None]
    rows: list[tuple] = [(i, None, None, None, None) for i in ids]
    if good:
        eng = _engine_or_error(plpy, function, name, weights, threads)
        batch = np.frombuffer(b"".join(imgs[i] for i in good), dtype=np.uint8).reshape(-1, 3, 32, 32)
        probs = eng.predict(batch)
        top = probs.argmax(axis=1)
        names = class_names(eng)
        for j, i in enumerate(good):
            k = int(top[j])
            rows[i] = (ids[i], k, names[k], float(probs[j, k]), probs[j].tolist())
    bad = [(ids[i], p) for i, p in enumerate(problems) if p is not None]
    if bad:
        shown = "; ".join(f"id {i}: {p}" for i, p in bad[:5])
        plpy.warning(f"{function}: {len(bad)} bad image(s), NULL predictions ({shown}{'; ...' if len(bad) > 5 else ''})")
    return rows


def backend_status() -> dict:
    """This backend: pid, memory (VmRSS, VmHWM in MB from /proc), engines loaded."""
    mem = {}
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                mem[key.lower() + "_mb"] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return {"pid": os.getpid(), **mem, "engines": sorted({k[0] for k in _ENGINES})}
