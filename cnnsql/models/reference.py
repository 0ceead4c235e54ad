"""An independent NumPy float64 forward pass of any `ModelSpec`: the ground truth engines are tested against.

Written from the description's definitions (model_spec docstring), with no framework code: explicit
zero padding, im2col convolution by einsum, window pooling by slicing, flatten in (c, h, w) order.
"""
from __future__ import annotations

import numpy as np

from cnnsql.models.model_spec import Layer, ModelSpec, conv_padding


def forward(spec: ModelSpec, arrays: dict[str, np.ndarray], images: np.ndarray, *, logits: bool = False) -> np.ndarray:
    """uint8 images (N, C, H, W) (or (N, C*H*W)) -> float64 class probabilities (N, classes).
    `logits`: stop before the final softmax."""
    x = np.asarray(images, dtype=np.float64).reshape(-1, *spec.input_shape) / 255.0
    for layer in spec.layers:
        if layer.kind == "softmax" and logits:
            break
        x = LAYERS[layer.kind](layer, x, arrays)
    return x


def _p(arrays, layer: Layer, name: str) -> np.ndarray:
    return np.asarray(arrays[f"{layer.name}.{name}"], dtype=np.float64)


def conv2d(layer: Layer, x: np.ndarray, arrays) -> np.ndarray:
    w, b = _p(arrays, layer, "weight"), _p(arrays, layer, "bias")
    top, bottom, left, right = conv_padding(layer, x.shape[2], x.shape[3])
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    k, s = layer.kernel, layer.stride
    n, c, h, wd = x.shape
    oh, ow = (h - k) // s + 1, (wd - k) // s + 1
    cols = np.stack([x[:, :, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s]
                     for i in range(k) for j in range(k)], axis=2)          # (n, c, k*k, oh, ow)
    y = np.einsum("nckhw,ock->nohw", cols, w.reshape(w.shape[0], c, k * k), optimize=True)
    return y + b[None, :, None, None]


def _pool(layer: Layer, x: np.ndarray, reduce) -> np.ndarray:
    k, s = layer.kernel, layer.stride
    n, c, h, w = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    windows = np.stack([x[:, :, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s]
                        for i in range(k) for j in range(k)], axis=0)       # (k*k, n, c, oh, ow)
    return reduce(windows, axis=0)


def batchnorm(layer: Layer, x: np.ndarray, arrays) -> np.ndarray:
    gamma, beta = _p(arrays, layer, "weight"), _p(arrays, layer, "bias")
    mean, var = _p(arrays, layer, "running_mean"), _p(arrays, layer, "running_var")
    axes = (None, slice(None)) + (None,) * (x.ndim - 2)
    return (x - mean[axes]) / np.sqrt(var[axes] + layer.eps) * gamma[axes] + beta[axes]


def dense(layer: Layer, x: np.ndarray, arrays) -> np.ndarray:
    return x @ _p(arrays, layer, "weight").T + _p(arrays, layer, "bias")


def softmax(layer: Layer, x: np.ndarray, arrays) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


LAYERS = {
    "conv2d": conv2d,
    "relu": lambda layer, x, a: np.maximum(x, 0.0),
    "maxpool": lambda layer, x, a: _pool(layer, x, np.max),
    "avgpool": lambda layer, x, a: _pool(layer, x, np.mean),
    "batchnorm": batchnorm,
    "flatten": lambda layer, x, a: x.reshape(len(x), -1),
    "dense": dense,
    "dropout": lambda layer, x, a: x,
    "softmax": softmax,
}
