"""The framework-neutral weights file: an `.npz` of eight arrays plus a JSON manifest beside it.

Convention (other tools read these files, keep it exact):
  conv kernels (out, in, height, width); dense weights (out, in);
  fc1's input is the pooled 64x14x14 map flattened in (channel, row, column) order.
Input images are uint8 (N, 3, 32, 32), channel-major as in the CIFAR-10 archive, scaled by 1/255.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CnnsqlError

SHAPES: dict[str, tuple[int, ...]] = {
    "conv1.weight": (64, 3, 3, 3),
    "conv1.bias": (64,),
    "conv2.weight": (64, 64, 3, 3),
    "conv2.bias": (64,),
    "fc1.weight": (512, 64 * 14 * 14),
    "fc1.bias": (512,),
    "fc2.weight": (10, 512),
    "fc2.bias": (10,),
}
ARCHITECTURE = "conv64k3-relu-conv64k3-relu-maxpool2-flatten_chw-dense512-relu-dense10-softmax"
PREPROCESSING = "uint8/255"
NUM_CLASSES = 10


@dataclass
class Weights:
    arrays: dict[str, np.ndarray]
    manifest: dict = field(default_factory=dict)
    path: Path | None = None

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    @property
    def label(self) -> str:
        return str(self.path) if self.path else "<in-memory weights>"


def manifest_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def validate_arrays(arrays: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Check names and shapes; return float32 copies. Raises CnnsqlError naming the mismatch."""
    missing = [k for k in SHAPES if k not in arrays]
    if missing:
        raise CnnsqlError(
            f"weights {source}: missing arrays {', '.join(missing)}",
            "a cnnsql weights file holds " + ", ".join(SHAPES),
        )
    out = {}
    for name, shape in SHAPES.items():
        arr = np.asarray(arrays[name])
        if arr.shape != shape:
            raise CnnsqlError(
                f"weights {source}: {name} has shape {arr.shape}, expected {shape}",
                "kernels are (out, in, h, w) and dense weights (out, in); see README 'Weights file'",
            )
        if not np.issubdtype(arr.dtype, np.floating):
            raise CnnsqlError(f"weights {source}: {name} has dtype {arr.dtype}, expected float")
        arr = arr.astype(np.float32)
        if not np.all(np.isfinite(arr)):
            raise CnnsqlError(f"weights {source}: {name} contains NaN or infinity")
        out[name] = arr
    return out


def validate_manifest(manifest: dict, source: str) -> None:
    arch = manifest.get("architecture")
    if arch is not None and arch != ARCHITECTURE:
        raise CnnsqlError(
            f"weights {source}: manifest architecture {arch!r} does not match {ARCHITECTURE!r}",
            "these weights belong to another model",
        )
    pre = manifest.get("preprocessing")
    if pre is not None and pre != PREPROCESSING:
        raise CnnsqlError(
            f"weights {source}: manifest preprocessing {pre!r} does not match {PREPROCESSING!r}",
            "every engine scales uint8 pixels by 1/255",
        )


def load_weights(path: str | Path) -> Weights:
    path = Path(path)
    if not path.is_file():
        raise CnnsqlError(
            f"weights file {path} not found",
            "train one with `cnnsql train --out PATH` or pass --weights",
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CnnsqlError(f"weights file {path} is corrupt or not an .npz: {exc}", "re-train or re-copy it") from None
    arrays = validate_arrays(raw, str(path))
    manifest: dict = {}
    mpath = manifest_path(path)
    if mpath.is_file():
        try:
            manifest = json.loads(mpath.read_text())
        except (ValueError, OSError) as exc:
            raise CnnsqlError(f"weights manifest {mpath} is not valid JSON: {exc}", "fix or delete it") from None
        if not isinstance(manifest, dict):
            raise CnnsqlError(f"weights manifest {mpath} must be a JSON object")
        validate_manifest(manifest, str(mpath))
    return Weights(arrays, manifest, path)


def save_weights(path: str | Path, arrays: dict[str, np.ndarray], manifest: dict) -> Weights:
    """Write the .npz and its manifest atomically (temp file + rename)."""
    path = Path(path)
    arrays = validate_arrays(arrays, str(path))
    manifest = {"architecture": ARCHITECTURE, "preprocessing": PREPROCESSING, **manifest}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    mtmp = path.with_name(path.name + ".tmp.json")
    mtmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
    mtmp.replace(manifest_path(path))
    return Weights(arrays, manifest, path)


def random_weights(seed: int = 0) -> Weights:
    """Asymmetric random weights (He-scaled) so a transposed kernel or wrong flatten order shows."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in SHAPES.items():
        if name.endswith(".weight"):
            fan_in = int(np.prod(shape[1:]))
            arrays[name] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        else:
            arrays[name] = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    return Weights(arrays, {"architecture": ARCHITECTURE, "preprocessing": PREPROCESSING, "trained_by": "random", "seed": seed})


def reference_forward(weights: Weights, images: np.ndarray) -> np.ndarray:
    """Plain NumPy float64 forward pass: the ground truth the engines are tested against."""
    x = np.asarray(images, dtype=np.float64).reshape(-1, 3, 32, 32) / 255.0

    def conv_relu(x, w, b):
        n, c, h, wd = x.shape
        oh, ow = h - 2, wd - 2
        cols = np.stack([x[:, :, i:i + oh, j:j + ow] for i in range(3) for j in range(3)], axis=2)
        # cols: (n, c, 9, oh, ow); w: (o, c, 3, 3) -> (o, c, 9)
        y = np.einsum("nckhw,ock->nohw", cols, w.reshape(w.shape[0], c, 9).astype(np.float64))
        return np.maximum(y + b.astype(np.float64)[None, :, None, None], 0.0)

    x = conv_relu(x, weights["conv1.weight"], weights["conv1.bias"])
    x = conv_relu(x, weights["conv2.weight"], weights["conv2.bias"])
    n = x.shape[0]
    x = x.reshape(n, 64, 14, 2, 14, 2).max(axis=(3, 5)).reshape(n, -1)
    x = np.maximum(x @ weights["fc1.weight"].T.astype(np.float64) + weights["fc1.bias"], 0.0)
    logits = x @ weights["fc2.weight"].T.astype(np.float64) + weights["fc2.bias"]
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)
