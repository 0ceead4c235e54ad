"""TensorFlow/Keras engine. Keras on CPU is NHWC: kernels become (h, w, in, out), and fc1's rows are
permuted once at load time so Keras's NHWC flatten feeds them in the neutral (c, h, w) order."""
from __future__ import annotations

import contextlib
import logging
import os
import sys

import numpy as np

from ..errors import CnnsqlError
from ..weights import SHAPES, Weights
from .base import Engine, check_images
from .torch_engine import DEFAULT_CHUNK, run_chunked  # framework-free helpers; torch is imported lazily

# Measured on 2 Sapphire Rapids cores (benchmarks/raw_speed.py): without XLA, TF runs its oneDNN
# kernels (~3,500 images/s at batch 64); XLA's CPU convolutions reach only ~1,500.
DEFAULT_JIT_COMPILE = False
POOLED = (14, 14, 64)  # (h, w, c) after max-pooling

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


def build_model():
    """The CNN as a Keras model on NHWC float input in [0, 1]; outputs logits."""
    tf = import_tf()
    layers = tf.keras.layers
    return tf.keras.Sequential([
        tf.keras.Input((32, 32, 3)),
        layers.Conv2D(64, 3, activation="relu", name="conv1"),
        layers.Conv2D(64, 3, activation="relu", name="conv2"),
        layers.MaxPooling2D(2),
        layers.Flatten(),  # (h, w, c) order
        layers.Dense(512, activation="relu", name="fc1"),
        layers.Dense(10, name="fc2"),
    ])


def fc1_to_keras(w: np.ndarray) -> np.ndarray:
    """Neutral (512, c*h*w) -> Keras kernel (h*w*c, 512)."""
    h, wd, c = POOLED
    return w.reshape(512, c, h, wd).transpose(2, 3, 1, 0).reshape(h * wd * c, 512)


def fc1_from_keras(k: np.ndarray) -> np.ndarray:
    h, wd, c = POOLED
    return k.reshape(h, wd, c, 512).transpose(3, 2, 0, 1).reshape(512, c * h * wd)


def load_arrays(model, a: dict[str, np.ndarray]) -> None:
    conv = lambda w: w.transpose(2, 3, 1, 0)  # (out, in, h, w) -> (h, w, in, out)
    model.get_layer("conv1").set_weights([conv(a["conv1.weight"]), a["conv1.bias"]])
    model.get_layer("conv2").set_weights([conv(a["conv2.weight"]), a["conv2.bias"]])
    model.get_layer("fc1").set_weights([fc1_to_keras(a["fc1.weight"]), a["fc1.bias"]])
    model.get_layer("fc2").set_weights([a["fc2.weight"].T, a["fc2.bias"]])


def export_arrays(model) -> dict[str, np.ndarray]:
    w = {n: model.get_layer(n).get_weights() for n in ("conv1", "conv2", "fc1", "fc2")}
    out = {
        "conv1.weight": w["conv1"][0].transpose(3, 2, 0, 1), "conv1.bias": w["conv1"][1],
        "conv2.weight": w["conv2"][0].transpose(3, 2, 0, 1), "conv2.bias": w["conv2"][1],
        "fc1.weight": fc1_from_keras(w["fc1"][0]), "fc1.bias": w["fc1"][1],
        "fc2.weight": w["fc2"][0].T, "fc2.bias": w["fc2"][1],
    }
    return {k: np.ascontiguousarray(out[k], dtype=np.float32) for k in SHAPES}


def to_nhwc(tf, images):
    """uint8 (N, 3, 32, 32) tensor -> float NHWC in [0, 1]."""
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
            self._model = build_model()
            load_arrays(self._model, weights.arrays)
        model = self._model

        @tf.function(jit_compile=jit_compile, reduce_retracing=True,
                     input_signature=[tf.TensorSpec([None, 3, 32, 32], tf.uint8)])
        def proba(images):
            return tf.nn.softmax(model(to_nhwc(tf, images), training=False))

        self._proba = proba

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        tf = import_tf()
        images = np.ascontiguousarray(check_images(images))
        with tf.device(self._tf_device):
            return run_chunked(lambda x: self._proba(x).numpy(), images, self.chunk)

    def describe(self) -> dict:
        tf = import_tf()
        return {
            **super().describe(),
            "tensorflow": tf.__version__,
            "keras": tf.keras.__version__,
            "jit_compile": self.jit_compile,
            "chunk": self.chunk,
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        }
