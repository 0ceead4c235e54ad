"""An independent NumPy float64 forward pass of any `ModelSpec`: the ground truth engines are tested against.

Written from the description's definitions (model_spec docstring), with no framework code: explicit
zero padding, im2col convolution by einsum (per group), window pooling by slicing (padded cells
-inf for max, left out of the mean for avg), flatten in (c, h, w) order. A graph runs its layers
in order, each on the outputs it names; an output is dropped after its last reader.
"""
from __future__ import annotations

import numpy as np

from cnnsql.models.model_spec import Layer, ModelSpec, conv_padding, pool_counts


def forward(spec: ModelSpec, arrays: dict[str, np.ndarray], images: np.ndarray, *, logits: bool = False) -> np.ndarray:
    """uint8 images (N, C, H, W) (or (N, C*H*W)) -> float64 class probabilities (N, classes).
    `logits`: stop before the final softmax."""
    x = np.asarray(images, dtype=np.float64).reshape(-1, *spec.input_shape) / 255.0
    values = {-1: x}
    last_read = {}
    for j in range(len(spec.layers)):
        for i in spec.node_inputs(j):
            last_read[i] = j
    for j, layer in enumerate(spec.layers):
        ins = [values[i] for i in spec.node_inputs(j)]
        if layer.kind == "softmax" and logits:
            return ins[0]
        values[j] = LAYERS[layer.kind](layer, ins, arrays)
        for i in spec.node_inputs(j):
            if last_read[i] == j:
                del values[i]
    return values[len(spec.layers) - 1]


def _p(arrays, layer: Layer, name: str) -> np.ndarray:
    return np.asarray(arrays[f"{layer.name}.{name}"], dtype=np.float64)


def _windows(x: np.ndarray, k: int, s: int) -> np.ndarray:
    """(n, c, h, w) -> (k*k, n, c, oh, ow): every window position's cells."""
    n, c, h, w = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    return np.stack([x[:, :, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s]
                     for i in range(k) for j in range(k)], axis=0)


def conv2d(layer: Layer, ins, arrays) -> np.ndarray:
    x = ins[0]
    w, b = _p(arrays, layer, "weight"), _p(arrays, layer, "bias")
    top, bottom, left, right = conv_padding(layer, x.shape[2], x.shape[3])
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    k, g = layer.kernel, layer.groups or 1
    cols = np.moveaxis(_windows(x, k, layer.stride), 0, 2)                 # (n, c, k*k, oh, ow)
    cg, fg = x.shape[1] // g, w.shape[0] // g
    parts = [np.einsum("nckhw,ock->nohw", cols[:, gi * cg:(gi + 1) * cg],
                       w[gi * fg:(gi + 1) * fg].reshape(fg, cg, k * k), optimize=True) for gi in range(g)]
    return np.concatenate(parts, axis=1) + b[None, :, None, None]


def maxpool(layer: Layer, ins, arrays) -> np.ndarray:
    x = ins[0]
    top, bottom, left, right = conv_padding(layer, x.shape[2], x.shape[3])
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=-np.inf)
    return _windows(x, layer.kernel, layer.stride).max(axis=0)


def avgpool(layer: Layer, ins, arrays) -> np.ndarray:
    x = ins[0]
    h, w = x.shape[2:]
    top, bottom, left, right = conv_padding(layer, h, w)
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    return _windows(x, layer.kernel, layer.stride).sum(axis=0) / pool_counts(layer, h, w)


def batchnorm(layer: Layer, ins, arrays) -> np.ndarray:
    x = ins[0]
    gamma, beta = _p(arrays, layer, "weight"), _p(arrays, layer, "bias")
    mean, var = _p(arrays, layer, "running_mean"), _p(arrays, layer, "running_var")
    axes = (None, slice(None)) + (None,) * (x.ndim - 2)
    return (x - mean[axes]) / np.sqrt(var[axes] + layer.eps) * gamma[axes] + beta[axes]


def dense(layer: Layer, ins, arrays) -> np.ndarray:
    return ins[0] @ _p(arrays, layer, "weight").T + _p(arrays, layer, "bias")


def softmax(layer: Layer, ins, arrays) -> np.ndarray:
    x = ins[0]
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


LAYERS = {
    "conv2d": conv2d,
    "relu": lambda layer, ins, a: np.maximum(ins[0], 0.0),
    "relu6": lambda layer, ins, a: np.minimum(np.maximum(ins[0], 0.0), 6.0),
    "identity": lambda layer, ins, a: ins[0],
    "maxpool": maxpool,
    "avgpool": avgpool,
    "global_avgpool": lambda layer, ins, a: ins[0].mean(axis=(2, 3), keepdims=True),
    "batchnorm": batchnorm,
    "add": lambda layer, ins, a: sum(ins[1:], ins[0]),
    "concat": lambda layer, ins, a: np.concatenate(ins, axis=1),
    "flatten": lambda layer, ins, a: ins[0].reshape(len(ins[0]), -1),
    "dense": dense,
    "dropout": lambda layer, ins, a: ins[0],
    "softmax": softmax,
}
