"""The one EvaDB function implementation, generic over engines; `evadb_udfs/*.py` subclass it. A thin
adapter over the one predictor (cnnsql/placements/predictor.py), which owns weights, shapes, decoding, the
bad-row rule and class names.

Input: the `img` column of the cifar_* or dataset views (base64 text of the stored bytes: C*H*W of
the weights' model, 3,072 for CIFAR-10), or the bytes themselves when cnnsql's EvaDB reads a view's
binary twin (cnnsql/placements/evadb_patch). Output per row: label (class index), class_name, probability (of
that class), probs (one per class). A bad row (NULL, not base64, wrong length) yields NULL outputs
and a warning naming its position. Predictors are cached per process, so repeated queries do not
pay for loading weights again.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
from evadb.catalog.catalog_type import NdArrayType
from evadb.functions.abstract.abstract_function import AbstractFunction
from evadb.functions.decorators.decorators import forward, setup
from evadb.functions.decorators.io_descriptors.data_types import PandasDataframe

from cnnsql.core import config
from cnnsql.data.cifar import IMAGE_BYTES
from cnnsql.engines import ENGINES
from cnnsql.core.errors import CnnsqlError
from cnnsql.placements.predictor import Predictor, decode

log = logging.getLogger("cnnsql.evadb")
OUTPUTS = ["label", "class_name", "probability", "probs"]

# Time spent inside functions of this process, by engine: decode vs predict (for the overhead report).
STATS: dict[str, dict[str, float]] = {}


default_weights = config.default_weights


def cached_engine(engine: str, weights: str, device: str, threads: int | None):
    """The engine of this process's cached predictor (the benchmark's raw path shares it with EvaDB)."""
    return Predictor.cached(engine, weights, device=device, threads=threads).engine


def decode_images(column: pd.Series, size: int = IMAGE_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Stored bytes or base64 text -> (uint8 (N_ok, size) of the valid rows, boolean mask of valid rows)."""
    dec = decode(column.tolist(), (size,))
    return dec.images, dec.ok


class CNNFunction(AbstractFunction):
    engine_name = ""  # set by subclasses

    @setup(cacheable=False, function_type="Classification", batchable=True)
    def setup(self, weights: str | None = None, device: str = "cpu", threads=None, batch_size=None,
              engine: str | None = None):
        # Options come from CREATE FUNCTION metadata (sql/evadb_setup.sql); threads 0 = framework default.
        # EvaDB instantiates functions at CREATE FUNCTION time and per query: the engine loads on first use.
        self.engine_name = engine or type(self).engine_name  # Classify: empty until registered with metadata
        if self.engine_name and self.engine_name not in ENGINES:
            raise CnnsqlError(f"unknown engine {self.engine_name!r} for {type(self).__name__}",
                              f"choose from: {', '.join(ENGINES)} (CNNSQL_ENGINE)")
        self.options = (str(weights or default_weights()), device, int(threads) if threads and int(threads) else None)
        self.batch_size = int(batch_size) if batch_size else None
        self.engine = None

    def _load(self) -> None:
        if self.engine is None:
            if not self.engine_name:
                raise CnnsqlError(f"{type(self).__name__} was registered without an engine",
                                  "register it through cnnsql (cnnsql shell, evadb_session.connect)")
            weights, device, threads = self.options
            self.predictor = Predictor.cached(self.engine_name, weights, device=device, threads=threads)
            self.engine = self.predictor.engine
            self.batch_size = self.batch_size or self.predictor.batch_size
            self.class_names = self.predictor.class_names

    @property
    def name(self) -> str:
        return type(self).__name__

    @forward(
        input_signatures=[PandasDataframe(columns=["img"], column_types=[NdArrayType.STR], column_shapes=[(None,)])],
        output_signatures=[PandasDataframe(
            columns=OUTPUTS,
            column_types=[NdArrayType.INT32, NdArrayType.STR, NdArrayType.FLOAT32, NdArrayType.FLOAT32],
            column_shapes=[(None,), (None,), (None,), (10,)])],
    )
    def forward(self, frames: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame(self.output_columns(frames.iloc[:, 0].tolist()))

    def output_columns(self, values: list) -> dict[str, object]:
        """forward() without DataFrames: the images `values` (stored bytes or base64 text) -> the output
        columns by name (what forward's frame is built from; the plan cache's direct run builds one frame
        for the whole result from them)."""
        self._load()
        stats = STATS.setdefault(self.engine_name, {"decode_s": 0.0, "predict_s": 0.0, "rows": 0, "bad_rows": 0})
        t0 = time.perf_counter()
        dec = self.predictor.decode(values)
        images, ok = dec.images, dec.ok
        t1 = time.perf_counter()
        probs = self.predictor.predict(images, self.batch_size)
        t2 = time.perf_counter()
        stats["decode_s"] += t1 - t0
        stats["predict_s"] += t2 - t1
        stats["rows"] += len(values)
        return self._columns(probs, ok, stats)

    def _columns(self, probs: np.ndarray, ok: np.ndarray, stats: dict) -> dict[str, object]:
        n = len(ok)
        if ok.all():
            top = probs.argmax(axis=1)
            return {"label": top.astype(np.int32), "class_name": [self.class_names[k] for k in top],
                    "probability": probs[np.arange(n), top], "probs": list(probs)}
        bad = np.flatnonzero(~ok)
        stats["bad_rows"] += len(bad)
        log.warning("%s: %d row(s) with NULL or malformed img (positions %s in this batch): NULL predictions",
                    self.name, len(bad), bad[:10].tolist())
        label = pd.array([None] * n, dtype="Int32")
        name, prob, vecs = [None] * n, np.full(n, np.nan, dtype=np.float32), [None] * n
        top = probs.argmax(axis=1)
        for j, i in enumerate(np.flatnonzero(ok)):
            label[i], name[i], prob[i], vecs[i] = top[j], self.class_names[top[j]], probs[j, top[j]], probs[j]
        return {"label": label, "class_name": name, "probability": prob, "probs": vecs}
