"""TensorFlow/Keras engine, built from the weights' model description. Keras on CPU is NHWC: kernels
become (h, w, in, out), and the rows of the dense layer after flatten (and any batch norm between) are
permuted once at load time so Keras's NHWC flatten feeds them in the neutral (c, h, w) order."""
from __future__ import annotations

import contextlib
import logging
import os
import sys

import numpy as np

from cnnsql.core.errors import CnnsqlError
from cnnsql.models.model_spec import STUDY, ModelSpec
from cnnsql.models.weights import Weights
from cnnsql.engines.base import Engine
from cnnsql.engines.torch_engine import DEFAULT_CHUNK  # torch itself is imported lazily

# Measured on 2 Sapphire Rapids cores (benchmarks/raw_speed.py): without XLA, TF runs its oneDNN
# kernels (~3,500 images/s at batch 64); XLA's CPU convolutions reach only ~1,500.
DEFAULT_JIT_COMPILE = False

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_stderr():
    """Silence C++ writes to fd 2: TF 2.21 prints its oneDNN notice via absl, ignoring TF_CPP_MIN_LOG_LEVEL."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_tf():
    """Import TensorFlow quietly, with the Keras 3 TensorFlow backend."""
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        with quiet_stderr():
            import tensorflow  # noqa: F401
    import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)
    return tf


def set_threads(threads: int | None) -> None:
    """Cap TF's thread pools; they are fixed once TF's runtime starts, so later calls only warn."""
    if not threads:
        return
    tf = import_tf()
    cfg = tf.config.threading
    try:
        cfg.set_intra_op_parallelism_threads(threads)
        cfg.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        current = cfg.get_intra_op_parallelism_threads()
        if current != threads:
            log.warning("TensorFlow already initialised with %s intra-op threads; cannot change to %s", current or "default", threads)


def tf_device(device: str) -> str:
    tf = import_tf()
    if device == "cuda":
        if not tf.config.list_physical_devices("GPU"):
            raise CnnsqlError(
                f"device 'cuda' requested but TensorFlow {tf.__version__} sees no GPU",
                "use --device cpu (tensorflow-cpu has no GPU support), or install tensorflow[and-cuda] on a GPU machine",
            )
        return "/GPU:0"
    return "/CPU:0"


def build_model(spec: ModelSpec = STUDY):
    """The model as a Keras Sequential on NHWC float input in [0, 1]; outputs logits (the final softmax
    is left to the caller). A relu right after a conv or dense layer is fused into it (activation="relu",
    as the study's CNN was built before descriptions existed). Keras "same" padding is the description's."""
    tf = import_tf()
    layers = tf.keras.layers
    c, h, w = spec.input_shape
    out = [tf.keras.Input((h, w, c))]
    skip = False
    for i, layer in enumerate(spec.layers):
        if skip:
            skip = False
            continue
        nxt = spec.layers[i + 1].kind if i + 1 < len(spec.layers) else None
        k = layer.kind
        fuse = nxt == "relu" and k in ("conv2d", "dense")
        act = "relu" if fuse else None
        skip = fuse
        if k == "conv2d":
            out.append(layers.Conv2D(layer.filters, layer.kernel, layer.stride, padding=layer.padding,
                                     activation=act, name=layer.name))
        elif k == "dense":
            out.append(layers.Dense(layer.units, activation=act, name=layer.name))
        elif k == "relu":
            out.append(layers.ReLU())
        elif k == "maxpool":
            out.append(layers.MaxPooling2D(layer.kernel, layer.stride))
        elif k == "avgpool":
            out.append(layers.AveragePooling2D(layer.kernel, layer.stride))
        elif k == "batchnorm":
            out.append(layers.BatchNormalization(epsilon=layer.eps, momentum=0.9, name=layer.name))
        elif k == "flatten":
            out.append(layers.Flatten())   # (h, w, c) order: see flat_order
        elif k == "dropout":
            out.append(layers.Dropout(layer.rate))
    return tf.keras.Sequential(out)


def flat_order(spec: ModelSpec) -> dict[str, np.ndarray]:
    """Layer name -> permutation p of its input features such that Keras's (h, w, c) feature j is the
    neutral (c, h, w) feature p[j], for the layers between flatten and the first dense after it."""
    perms = {}
    perm = None
    for layer, shape_in in zip(spec.layers, spec.input_shapes()):
        if layer.kind == "flatten":
            c, h, w = shape_in
            perm = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)
        elif perm is not None and layer.kind in ("dense", "batchnorm"):
            perms[layer.name] = perm
            if layer.kind == "dense":
                perm = None
    return perms


def load_arrays(model, a: dict[str, np.ndarray], spec: ModelSpec = STUDY) -> None:
    perms = flat_order(spec)
    for layer in spec.layers:
        if not layer.params:
            continue
        p = lambda s: a[f"{layer.name}.{s}"]
        if layer.kind == "conv2d":
            ws = [p("weight").transpose(2, 3, 1, 0), p("bias")]   # (out, in, h, w) -> (h, w, in, out)
        elif layer.kind == "dense":
            kernel = p("weight").T
            ws = [kernel[perms[layer.name]] if layer.name in perms else kernel, p("bias")]
        else:
            ws = [p(s) for s in ("weight", "bias", "running_mean", "running_var")]
            ws = [v[perms[layer.name]] for v in ws] if layer.name in perms else ws
        model.get_layer(layer.name).set_weights([np.ascontiguousarray(v, dtype=np.float32) for v in ws])


def export_arrays(model, spec: ModelSpec = STUDY) -> dict[str, np.ndarray]:
    perms = flat_order(spec)
    out = {}
    for layer in spec.layers:
        if not layer.params:
            continue
        ws = model.get_layer(layer.name).get_weights()
        inv = np.argsort(perms[layer.name]) if layer.name in perms else None
        if layer.kind == "conv2d":
            values = [ws[0].transpose(3, 2, 0, 1), ws[1]]
        elif layer.kind == "dense":
            values = [(ws[0][inv] if inv is not None else ws[0]).T, ws[1]]
        else:
            values = [v[inv] if inv is not None else v for v in ws]
        names = ("weight", "bias", "running_mean", "running_var")
        out.update({f"{layer.name}.{n}": np.ascontiguousarray(v, dtype=np.float32) for n, v in zip(names, values)})
    return {k: out[k] for k in spec.param_shapes()}


def to_nhwc(tf, images):
    """uint8 (N, C, H, W) tensor -> float NHWC in [0, 1]."""
    return tf.transpose(tf.cast(images, tf.float32) / 255.0, [0, 2, 3, 1])


class TensorflowEngine(Engine):
    name = "tensorflow"
    devices = ("cpu", "cuda")

    def __init__(self, weights: Weights, *, device: str = "cpu", threads: int | None = None,
                 jit_compile: bool = DEFAULT_JIT_COMPILE, chunk: int | None = DEFAULT_CHUNK):
        super().__init__(weights, device=device, threads=threads)
        set_threads(threads)
        tf = import_tf()
        self.jit_compile = jit_compile
        self.chunk = chunk  # as in torch: 64-image chunks measured faster than one 256-image pass
        self._tf_device = tf_device(device)
        with tf.device(self._tf_device):
            self._model = build_model(self.spec)
            load_arrays(self._model, weights.arrays, self.spec)
        model = self._model

        @tf.function(jit_compile=jit_compile, reduce_retracing=True,
                     input_signature=[tf.TensorSpec([None, *self.spec.input_shape], tf.uint8)])
        def proba(images):
            return tf.nn.softmax(model(to_nhwc(tf, images), training=False))

        self._proba = proba

    def forward(self, images: np.ndarray) -> np.ndarray:
        with import_tf().device(self._tf_device):
            return self._proba(np.ascontiguousarray(images)).numpy()

    def describe(self) -> dict:
        tf = import_tf()
        return {
            **super().describe(),
            "tensorflow": tf.__version__,
            "keras": tf.keras.__version__,
            "model": self.spec.name,
            "jit_compile": self.jit_compile,
            "chunk": self.chunk,
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        }
