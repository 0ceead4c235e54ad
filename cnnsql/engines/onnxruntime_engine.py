"""ONNX Runtime engine: the model description and weights exported to an ONNX graph by cnnsql itself
(cnnsql/engines/onnx_export.py, the `onnx` package), run by an `onnxruntime.InferenceSession` on the
CPU. The dedicated inference runtime a user would pick instead of a training framework.

Settings (recorded by `describe()` with every run): all graph optimisations (ORT_ENABLE_ALL: constant
folding, Conv+BN/Relu fusion, layout transformation), sequential execution, intra-op threads =
`threads` (default: one per core), inter-op threads 1, no spinning of idle threads (as torch's
OMP_WAIT_POLICY=PASSIVE: spinning measured 2-4x slower when the database shares the cores).
"""
from __future__ import annotations

import os

import numpy as np

from cnnsql.core.errors import CnnsqlError
from cnnsql.engines.base import Engine
from cnnsql.models.weights import Weights

DEFAULT_CHUNK = 64  # images per session.run: activations stay in cache (as torch's and TensorFlow's chunks)


def import_ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise CnnsqlError(f"ONNX Runtime is not installed ({exc})",
                          "pip install the onnxruntime version pyproject.toml pins (make setup does)") from None
    return onnxruntime


class OnnxruntimeEngine(Engine):
    name = "onnxruntime"
    devices = ("cpu",)

    def __init__(self, weights: Weights, *, device: str = "cpu", threads: int | None = None,
                 optimization: str = "all", chunk: int | None = DEFAULT_CHUNK):
        super().__init__(weights, device=device, threads=threads)
        ort = import_ort()
        from cnnsql.engines.onnx_export import INPUT, to_onnx

        levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if optimization not in levels:
            raise CnnsqlError(f"unknown ONNX Runtime optimization {optimization!r}", f"choose one of: {', '.join(levels)}")
        self.optimization, self.chunk = optimization, chunk
        opts = ort.SessionOptions()
        opts.graph_optimization_level = levels[optimization]
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        model = to_onnx(self.spec, weights.arrays)
        self._session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self._input = INPUT
        self._threads = opts.intra_op_num_threads

    def forward(self, images: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: np.ascontiguousarray(images)})[0]

    def describe(self) -> dict:
        ort = import_ort()
        return {**super().describe(), "onnxruntime": ort.__version__, "model": self.spec.name,
                "optimization": self.optimization, "chunk": self.chunk, "intra_op_threads": self._threads,
                "inter_op_threads": 1, "spinning": False, "provider": "CPUExecutionProvider"}
