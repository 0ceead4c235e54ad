"""The one predictor behind every placement: the CNN of a weights file, run by one engine.

Every place inference runs (the EvaDB functions, the PL/Python functions inside PostgreSQL, the Ray
workers, `cnnsql predict`) is a thin adapter over `Predictor`, which owns:
- loading the weights file and caching the engine, per process (`Predictor.cached`);
- the model description: the image shape (C, H, W) and class count come from the weights' model,
  never from a constant, so every placement runs every model and dataset the engines run;
- decoding and validating stored images (bytes, or the views' base64 text) of that shape;
- the bad-row rule: a NULL or malformed image gets NULL outputs and a problem named by its row,
  never an error for the whole batch and never a made-up prediction;
- class names (the weights' own, else CIFAR-10's for a 10-class model, else the class index);
- the output rows: (label, class_name, probability, probs).

Only numpy and the engine's framework are imported here (no psycopg2, pandas or EvaDB): the module
also runs inside a PostgreSQL backend.
"""
from __future__ import annotations

import binascii
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnsql.core import heap

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class OtherEngineLoaded(Exception):
    """This process already runs another framework (only refused where `one_framework` is asked)."""


@dataclass
class Decoded:
    """Images of the valid rows (N_ok, C, H, W), which rows were valid, and each bad row's problem."""
    images: np.ndarray
    ok: np.ndarray
    problems: list[str | None]


def _problem(value, size: int) -> str | None:
    """Why one row's value is not an image of `size` bytes (stored bytes or unpadded base64), or None."""
    if value is None:
        return "img is NULL"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None if len(value) == size else f"img has {len(value)} bytes, expected {size}"
    if isinstance(value, str):
        chars = -(-size // 3) * 4
        if len(value) != chars:
            return f"img has {len(value)} base64 characters, expected {chars}"
        try:
            raw = binascii.a2b_base64(value, strict_mode=True)
        except (binascii.Error, ValueError):
            return "img is not base64"
        return None if len(raw) == size else f"img decodes to {len(raw)} bytes, expected {size}"
    return f"img is a {type(value).__name__}, not bytes"


def _as_bytes(value) -> bytes:
    return binascii.a2b_base64(value, strict_mode=True) if isinstance(value, str) else bytes(value)


def decode(values, shape: tuple[int, int, int]) -> Decoded:
    """Stored images (bytes of C*H*W, channel-major) or their base64 text -> the valid images as uint8
    (N_ok, C, H, W) in row order, the mask of valid rows and each row's problem (None when valid).

    Fast paths: every row bytes of the right size (one join), or every row base64 of the right length
    (one strict decode of their concatenation, which any non-alphabet character fails). Otherwise
    row by row.
    """
    values = list(values)
    size = int(np.prod(shape))
    n = len(values)
    if values and all(isinstance(v, (bytes, bytearray, memoryview)) and len(v) == size for v in values):
        raw = b"".join(values)
        return Decoded(np.frombuffer(raw, np.uint8).reshape(n, *shape), np.ones(n, bool), [None] * n)
    chars = -(-size // 3) * 4
    if values and size % 3 == 0 and all(isinstance(v, str) and len(v) == chars for v in values):
        try:
            raw = binascii.a2b_base64("".join(values), strict_mode=True)
            return Decoded(np.frombuffer(raw, np.uint8).reshape(n, *shape), np.ones(n, bool), [None] * n)
        except (binascii.Error, ValueError):
            pass  # some row is bad: found below
    problems = [_problem(v, size) for v in values]
    ok = np.array([p is None for p in problems], dtype=bool)
    good = b"".join(_as_bytes(v) for v, p in zip(values, problems) if p is None)
    return Decoded(np.frombuffer(good, np.uint8).reshape(-1, *shape), ok, problems)


def class_names_of(manifest: dict, num_classes: int) -> tuple[str, ...]:
    names = manifest.get("class_names")
    if names and len(names) == num_classes:
        return tuple(str(n) for n in names)
    if num_classes == len(CIFAR10_CLASSES):
        return CIFAR10_CLASSES
    return tuple(str(k) for k in range(num_classes))


class Predictor:
    """One engine over one weights file: shapes, decoding, the bad-row rule and output rows."""

    _cache: dict[tuple, "Predictor"] = {}

    def __init__(self, engine, batch_size: int | None = None):
        self.engine = engine
        self.spec = engine.spec
        self.shape: tuple[int, int, int] = tuple(self.spec.input_shape)
        self.input_size = int(np.prod(self.shape))
        self.num_classes = int(self.spec.num_classes)
        self.class_names = class_names_of(engine.weights.manifest, self.num_classes)
        self.batch_size = batch_size or engine.default_batch_size

    @classmethod
    def load(cls, engine: str, weights, *, device: str = "cpu", threads: int | None = None) -> "Predictor":
        """A new predictor; `weights` is a path or an already loaded `Weights`."""
        from cnnsql.engines import get_engine
        from cnnsql.models.weights import Weights, load_weights

        loaded = weights if isinstance(weights, Weights) else load_weights(Path(weights))
        return cls(get_engine(engine, loaded, device=device, threads=threads))

    @classmethod
    def cached(cls, engine: str, weights: str | Path, *, device: str = "cpu", threads: int | None = None,
               one_framework: bool = False) -> "Predictor":
        """This process's predictor for (engine, weights file as it is now, device, threads), loaded once.

        one_framework: refuse a second framework in this process (inside a PostgreSQL backend,
        importing TensorFlow next to a running PyTorch crashed the server process) and drop a
        predictor whose weights file changed."""
        path = Path(weights).resolve()
        key = (engine, str(path), path.stat().st_mtime_ns if path.exists() else None, device, threads)
        if key not in cls._cache:
            if one_framework:
                others = sorted({k[0] for k in cls._cache if k[0] != engine})
                if others:
                    raise OtherEngineLoaded(
                        f"this connection's server process already runs the {others[0]} engine; a second "
                        f"framework ({engine}) in one backend can crash the server: use another connection for "
                        f"{engine}")
                cls._cache.clear()
            cls._cache[key] = cls.load(engine, path, device=device, threads=threads)
        return cls._cache[key]

    @classmethod
    def engines_loaded(cls) -> list[str]:
        return sorted({k[0] for k in cls._cache})

    def decode(self, values) -> Decoded:
        return decode(values, self.shape)

    def predict(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """uint8 (N, C, H, W) -> probabilities (N, classes), at the engine's batch size by default.
        After each call the process's heap is kept from creeping (cnnsql/core/heap.py)."""
        probs = self.engine.predict(images, batch_size or self.batch_size)
        heap.after_batch()
        return probs

    def warmup(self, n: int = 2) -> None:
        self.predict(np.zeros((n, *self.shape), np.uint8))

    def outputs(self, probs: np.ndarray) -> list[tuple]:
        """Probabilities -> (label, class_name, probability, probs list) per image."""
        top = probs.argmax(axis=1) if len(probs) else np.zeros(0, int)
        return [(int(k), self.class_names[k], float(p[k]), p.tolist()) for k, p in zip(top, probs)]

    def classify(self, values, ids=None) -> tuple[list[tuple], list[tuple]]:
        """Stored images -> (rows, bad). Rows: (id, label, class_name, probability, probs) per input in
        input order (id = the position when `ids` is None); a bad row has None outputs. bad: (id, problem)."""
        dec = self.decode(values)
        return self.rows(self.predict(dec.images) if dec.ok.any() else None, dec, ids)

    def rows(self, probs, dec: Decoded, ids=None) -> tuple[list[tuple], list[tuple]]:
        """The probabilities of a decoded input's valid images -> (rows, bad) as classify() gives them."""
        ids = list(range(len(dec.ok))) if ids is None else list(ids)
        out = iter(self.outputs(probs) if probs is not None else [])
        rows = [(i, *next(out)) if good else (i, None, None, None, None) for i, good in zip(ids, dec.ok)]
        bad = [(i, p) for i, p in zip(ids, dec.problems) if p is not None]
        return rows, bad


def bad_rows_message(bad: list[tuple], shown: int = 5) -> str:
    """One line for the bad rows of a call: how many, and the first few with their problem."""
    listed = "; ".join(f"id {i}: {p}" for i, p in bad[:shown])
    return f"{len(bad)} bad image(s), NULL predictions ({listed}{'; ...' if len(bad) > shown else ''})"


def process_memory() -> dict:
    """This process: pid, memory (VmRSS, VmHWM in MB from /proc), engines loaded, heap trims."""
    mem = {}
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                mem[key.lower() + "_mb"] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return {"pid": os.getpid(), **mem, "engines": Predictor.engines_loaded(), **heap.KEEPER.stats()}
