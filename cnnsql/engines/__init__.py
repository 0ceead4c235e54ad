"""Engine registry. Engines import their framework lazily: `torch` does not load TensorFlow."""
from __future__ import annotations

import importlib

from cnnsql.core.errors import CnnsqlError
from cnnsql.models.weights import Weights
from cnnsql.engines.base import Engine

ENGINES = {
    "torch": "cnnsql.engines.torch_engine:TorchEngine",
    "tensorflow": "cnnsql.engines.tensorflow_engine:TensorflowEngine",
    "velox": "cnnsql.engines.velox_engine:VeloxEngine",
    "onnxruntime": "cnnsql.engines.onnxruntime_engine:OnnxruntimeEngine",
}
# How reports name each engine, and which engines are not among the frameworks the study compares
# but a dedicated inference runtime a user could pick instead (the report says whether to).
LABELS = {"torch": "PyTorch", "tensorflow": "TensorFlow", "velox": "Velox", "onnxruntime": "ONNX Runtime"}
ALTERNATIVES = frozenset({"onnxruntime"})

# Per-framework settings the studies compare (`cnnsql study raw_speed`): label -> constructor options.
# "default" is what every placement runs. chunk=None: a whole batch in one framework call.
VARIANTS = {
    "torch": {"eager NCHW, inference_mode": {"mode": "eager", "chunk": None},
              "channels_last": {"mode": "channels_last", "chunk": None},
              "default": {},
              "torch.compile, 64-chunks": {"mode": "compile"}},
    "tensorflow": {"tf.function": {"chunk": None},
                   "default": {},
                   "tf.function + XLA, 64-chunks": {"jit_compile": True}},
    "velox": {"default": {}},
    "onnxruntime": {"default": {},
                    "whole batch per run": {"chunk": None},
                    "basic graph optimisation": {"optimization": "basic"}},
}


def engine_class(name: str) -> type[Engine]:
    try:
        target = ENGINES[name]
    except KeyError:
        raise CnnsqlError(f"unknown engine {name!r}", f"choose one of: {', '.join(ENGINES)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def get_engine(name: str, weights: Weights, **kwargs) -> Engine:
    return engine_class(name)(weights, **kwargs)


__all__ = ["ENGINES", "VARIANTS", "Engine", "engine_class", "get_engine"]
