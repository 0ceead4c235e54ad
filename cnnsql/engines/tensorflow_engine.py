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
from cnnsql.models.model_spec import STUDY, ModelSpec, conv_padding, pool_counts
from cnnsql.models.weights import Weights
from cnnsql.engines.base import Engine
from cnnsql.engines.torch_engine import DEFAULT_CHUNK  # torch itself is imported lazily

# Measured on 2 Sapphire Rapids cores (cnnsql study raw_speed): without XLA, TF runs its oneDNN
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
    """The model as a Keras functional Model on NHWC float input in [0, 1]; outputs logits (the final
    softmax is left to the caller). A relu read only by the conv2d or dense layer before it is fused into
    it (activation="relu", as the study's CNN was built before descriptions existed). Keras "same"
    padding is the description's; explicit padding is a ZeroPadding2D (-inf for max-pooling) before
    the layer; a depthwise conv2d (one input channel per group) is a DepthwiseConv2D."""
    tf = import_tf()
    layers = tf.keras.layers
    c, h, w = spec.input_shape
    inp = tf.keras.Input((h, w, c))
    values = {-1: inp}
    consumers = spec.consumers()
    _, direct = flat_plan(spec)
    fused: set[int] = set()
    for i, (layer, shape_in) in enumerate(zip(spec.layers, spec.input_shapes())):
        if i in fused or layer.kind == "softmax":
            continue
        ins = [values[j] for j in spec.node_inputs(i)]
        x = ins[0]
        k = layer.kind
        nxt = consumers[i][0] if len(consumers[i]) == 1 else None
        fuse = (k in ("conv2d", "dense") and nxt == i + 1 and spec.layers[nxt].kind == "relu"
                and (layer.groups or 1) == 1)
        act = "relu" if fuse else None
        if fuse:
            fused.add(nxt)
        if k in ("conv2d", "maxpool", "avgpool"):
            top, bottom, left, right = conv_padding(layer, shape_in[1], shape_in[2])
            explicit = isinstance(layer.padding, tuple) and any((top, bottom, left, right))
        if k == "conv2d":
            padding = "same" if layer.padding == "same" else "valid"
            if explicit:
                x = layers.ZeroPadding2D(((top, bottom), (left, right)))(x)
            g = layer.groups or 1
            if g > 1 and shape_in[0] == g:
                y = layers.DepthwiseConv2D(layer.kernel, layer.stride, padding=padding,
                                           depth_multiplier=layer.filters // g, name=layer.name)(x)
            else:
                y = layers.Conv2D(layer.filters, layer.kernel, layer.stride, padding=padding, groups=g,
                                  activation=act, name=layer.name)(x)
        elif k == "dense":
            y = layers.Dense(layer.units, activation=act, name=layer.name)(x)
        elif k == "relu":
            y = layers.ReLU()(x)
        elif k == "relu6":
            y = layers.ReLU(max_value=6.0)(x)
        elif k in ("identity", "dropout"):
            y = x if k == "identity" else layers.Dropout(layer.rate)(x)
        elif k == "maxpool":
            if explicit:
                x = _Pad(((top, bottom), (left, right)), float("-inf"))(x)
            y = layers.MaxPooling2D(layer.kernel, layer.stride)(x)
        elif k == "avgpool":
            if explicit:   # the window's sum over cells inside the map, / their count
                x = layers.ZeroPadding2D(((top, bottom), (left, right)))(x)
                scale = layer.kernel ** 2 / pool_counts(layer, shape_in[1], shape_in[2])
                y = _Scale(scale[:, :, None])(layers.AveragePooling2D(layer.kernel, layer.stride)(x))
            else:
                y = layers.AveragePooling2D(layer.kernel, layer.stride)(x)
        elif k == "global_avgpool":
            y = layers.GlobalAveragePooling2D(keepdims=True)(x)
        elif k == "batchnorm":
            y = layers.BatchNormalization(epsilon=layer.eps, momentum=0.9, name=layer.name)(x)
        elif k == "flatten":
            if i not in direct and len(shape_in) == 3 and shape_in[1] * shape_in[2] > 1:
                x = layers.Permute((3, 1, 2))(x)   # NHWC -> (c, h, w) order
            y = layers.Flatten()(x)                # a direct flatten's reader is permuted: see flat_plan
        elif k == "add":
            y = layers.Add()(ins)
        elif k == "concat":
            y = layers.Concatenate(axis=-1)(ins)
        else:
            raise ValueError(f"no Keras layer for {k!r}")
        values[i] = y
        if fuse:
            values[nxt] = y
    return tf.keras.Model(inp, values[spec.node_inputs(len(spec.layers) - 1)[0]])


def _keras_helpers():
    """Two small Keras layers (defined once TensorFlow is imported): constant padding and a constant scale."""
    tf = import_tf()

    class Pad(tf.keras.layers.Layer):
        def __init__(self, pads, value, **kw):
            super().__init__(**kw)
            self.pads, self.value = pads, value

        def call(self, x):
            return tf.pad(x, [[0, 0], list(self.pads[0]), list(self.pads[1]), [0, 0]], constant_values=self.value)

    class Scale(tf.keras.layers.Layer):
        def __init__(self, scale, **kw):
            super().__init__(**kw)
            self.scale = tf.constant(np.asarray(scale, np.float32))

        def call(self, x):
            return x * self.scale

    return Pad, Scale


def _Pad(pads, value):
    return _keras_helpers_cached()[0](pads, value)


def _Scale(scale):
    return _keras_helpers_cached()[1](scale)


_HELPERS = []


def _keras_helpers_cached():
    if not _HELPERS:
        _HELPERS.extend(_keras_helpers())
    return _HELPERS


PASS_THROUGH = ("dropout", "identity", "relu", "relu6", "batchnorm")


def flat_plan(spec: ModelSpec) -> tuple[dict[str, np.ndarray], set[int]]:
    """The flatten layers that feed a dense layer directly (through pass-through layers each read only
    by the next) use Keras's own (h, w, c) order, and their readers' weights are permuted at load time;
    every other flatten transposes to (c, h, w) first. Returns (layer name -> permutation p of its
    input features such that Keras's feature j is the neutral feature p[j], the direct flattens)."""
    consumers = spec.consumers()
    perms, direct = {}, set()
    for i, (layer, shape_in) in enumerate(zip(spec.layers, spec.input_shapes())):
        if layer.kind != "flatten" or len(shape_in) != 3:
            continue
        path, j = [], i
        while len(consumers[j]) == 1 and spec.layers[consumers[j][0]].kind in PASS_THROUGH:
            j = consumers[j][0]
            path.append(j)
        if len(consumers[j]) != 1 or spec.layers[consumers[j][0]].kind != "dense":
            continue
        c, h, w = shape_in
        perm = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)
        direct.add(i)
        for j in path + [consumers[j][0]]:
            if spec.layers[j].kind in ("dense", "batchnorm"):
                perms[spec.layers[j].name] = perm
    return perms, direct


def flat_order(spec: ModelSpec) -> dict[str, np.ndarray]:
    """Layer name -> permutation p of its input features such that Keras's (h, w, c) feature j is the
    neutral (c, h, w) feature p[j] (the readers of a direct flatten: see flat_plan)."""
    return flat_plan(spec)[0]


def _depthwise(spec: ModelSpec, layer, shape_in) -> bool:
    return layer.kind == "conv2d" and (layer.groups or 1) > 1 and shape_in[0] == layer.groups


def load_arrays(model, a: dict[str, np.ndarray], spec: ModelSpec = STUDY) -> None:
    perms = flat_order(spec)
    for layer, shape_in in zip(spec.layers, spec.input_shapes()):
        if not layer.params:
            continue
        p = lambda s: a[f"{layer.name}.{s}"]
        if _depthwise(spec, layer, shape_in):     # (in * mult, 1, k, k) -> (k, k, in, mult)
            kk = layer.kernel
            ws = [p("weight").reshape(shape_in[0], -1, kk, kk).transpose(2, 3, 0, 1), p("bias")]
        elif layer.kind == "conv2d":
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
    for layer, shape_in in zip(spec.layers, spec.input_shapes()):
        if not layer.params:
            continue
        ws = model.get_layer(layer.name).get_weights()
        inv = np.argsort(perms[layer.name]) if layer.name in perms else None
        if _depthwise(spec, layer, shape_in):
            values = [ws[0].transpose(2, 3, 0, 1).reshape(layer.filters, 1, layer.kernel, layer.kernel), ws[1]]
        elif layer.kind == "conv2d":
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
