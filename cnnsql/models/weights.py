"""The framework-neutral weights file: an `.npz` of the model's arrays plus a JSON manifest beside it.

Convention (other tools read these files, keep it exact):
  conv kernels (out, in, height, width); dense weights (out, in); a dense layer after flatten takes
  its input in (channel, row, column) order; batch-norm weight, bias, running_mean, running_var.
The manifest's "model" key holds the model description (cnnsql.model_spec); a manifest without it
(every file written before descriptions existed) is the study's CNN: eight arrays conv1/conv2/fc1/fc2,
fc1's input the pooled 64x14x14 map. Input images are uint8 (N, C, H, W), channel-major, scaled by 1/255.
"""
from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnsql.models import model_spec
from cnnsql.models import reference
from cnnsql.core.errors import CnnsqlError
from cnnsql.models.model_spec import STUDY, ModelSpec

# The study's CNN (the default model): its parameters and summary, as every older file has them.
SHAPES: dict[str, tuple[int, ...]] = STUDY.param_shapes()
ARCHITECTURE = STUDY.architecture()
assert ARCHITECTURE == "conv64k3-relu-conv64k3-relu-maxpool2-flatten_chw-dense512-relu-dense10-softmax"
PREPROCESSING = "uint8/255"
NUM_CLASSES = 10


@dataclass
class Weights:
    arrays: dict[str, np.ndarray]
    manifest: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def spec(self) -> ModelSpec:
        """The model these weights belong to: the manifest's description, else the study's CNN."""
        return spec_of(self.manifest, self.label)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    @property
    def label(self) -> str:
        return str(self.path) if self.path else "<in-memory weights>"


def manifest_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def spec_of(manifest: dict, source: str = "weights") -> ModelSpec:
    """The model description a manifest carries (under "model"); the study's CNN when it has none."""
    d = manifest.get("model") if isinstance(manifest, dict) else None
    if d is None:
        return STUDY
    return model_spec.from_dict(d, f"weights {source}: manifest 'model'")


def validate_arrays(arrays: dict[str, np.ndarray], source: str, spec: ModelSpec = STUDY) -> dict[str, np.ndarray]:
    """Check names and shapes against `spec`; return float32 copies. Raises CnnsqlError naming the mismatch."""
    shapes = spec.param_shapes()
    missing = [k for k in shapes if k not in arrays]
    if missing:
        raise CnnsqlError(
            f"weights {source}: missing arrays {', '.join(missing)}",
            f"a weights file of model {spec.name!r} holds " + ", ".join(shapes),
        )
    out = {}
    for name, shape in shapes.items():
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


MAX_WEIGHTS_BYTES = 256 << 20   # the float64 file is 52 MB; float32 26 MB
MAX_MANIFEST_BYTES = 1 << 20
MAX_MANIFEST_DEPTH = 16
NPY_HEADER_BYTES = 1 << 16       # an .npy header is 128 bytes or so


def validate_manifest(manifest: dict, source: str) -> None:
    """Types of the fields cnnsql uses, so a wrong one is a clear error and never a wrong class name."""
    spec = spec_of(manifest, source)
    num_classes = spec.num_classes
    for key in ("architecture", "preprocessing", "framework"):
        if key in manifest and not isinstance(manifest[key], str):
            raise CnnsqlError(f"weights {source}: manifest field {key!r} is a {type(manifest[key]).__name__}, "
                              "expected a string", "fix or delete the manifest")
    names = manifest.get("class_names")
    if names is not None and not (isinstance(names, list) and len(names) == num_classes
                                  and all(isinstance(n, str) and 0 < len(n) <= 200 for n in names)):
        raise CnnsqlError(f"weights {source}: manifest class_names must be a list of {num_classes} short strings",
                          "fix or delete the manifest")
    arch = manifest.get("architecture")
    if arch is not None and arch != spec.architecture():
        raise CnnsqlError(
            f"weights {source}: manifest architecture {arch!r} does not match {spec.architecture()!r}",
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
    mpath = manifest_path(path)
    manifest = _read_manifest(mpath) if mpath.is_file() else {}
    validate_manifest(manifest, str(mpath))
    spec = spec_of(manifest, str(mpath))
    arrays = validate_arrays(_read_npz(path, spec.param_shapes()), str(path), spec)
    return Weights(arrays, manifest, path)


def _read_npz(path: Path, shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict[str, np.ndarray]:
    """Only the known arrays, each after its header shows the expected shape and a float dtype:
    a hostile file cannot make cnnsql allocate more than the model's size."""
    if path.stat().st_size > MAX_WEIGHTS_BYTES:
        raise CnnsqlError(f"weights file {path} is {path.stat().st_size:,} bytes, more than a cnnsql model "
                          f"({MAX_WEIGHTS_BYTES:,} at most)", "re-train or re-copy it")
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            members = {i.filename: i for i in z.infolist()}
            for name, shape in shapes.items():
                info = members.get(name + ".npy")
                if info is None:
                    continue  # validate_arrays names what is missing
                limit = int(np.prod(shape)) * 8 + NPY_HEADER_BYTES
                if info.file_size > limit:
                    raise CnnsqlError(f"weights {path}: {name} is {info.file_size:,} bytes, expected at most "
                                      f"{limit:,} for shape {shape}", "re-train or re-copy it")
                with z.open(info) as f:
                    out[name] = _read_npy(f, name, shape, str(path))
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as exc:
        raise CnnsqlError(f"weights file {path} is corrupt or not an .npz: {exc}", "re-train or re-copy it") from None
    return out


def _read_npy(f, name: str, shape: tuple[int, ...], source: str) -> np.ndarray:
    version = np.lib.format.read_magic(f)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
        raise CnnsqlError(f"weights {source}: {name} has .npy format {version}", "re-train or re-copy it")
    got, fortran, dtype = read_header[version](f, max_header_size=NPY_HEADER_BYTES)
    if tuple(got) != shape:
        raise CnnsqlError(f"weights {source}: {name} has shape {tuple(got)}, expected {shape}",
                          "kernels are (out, in, h, w) and dense weights (out, in); see README 'Weights file'")
    if dtype.kind != "f" or dtype.itemsize > 8:
        raise CnnsqlError(f"weights {source}: {name} has dtype {dtype}, expected float")
    data = f.read(int(np.prod(shape)) * dtype.itemsize)
    arr = np.frombuffer(data, dtype=dtype)
    if arr.size != int(np.prod(shape)):
        raise CnnsqlError(f"weights {source}: {name} is truncated", "re-train or re-copy it")
    return arr.reshape(shape, order="F" if fortran else "C")


def _read_manifest(mpath: Path) -> dict:
    """A JSON object of bounded size and depth; anything else is one clear line."""
    try:
        size = mpath.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise CnnsqlError(f"weights manifest {mpath} is {size:,} bytes (at most {MAX_MANIFEST_BYTES:,})",
                              "fix or delete it")
        text = mpath.read_text()
        if _depth(text) > MAX_MANIFEST_DEPTH:
            raise CnnsqlError(f"weights manifest {mpath} is nested deeper than {MAX_MANIFEST_DEPTH} levels",
                              "fix or delete it")
        manifest = json.loads(text)
    except (ValueError, OSError, RecursionError) as exc:
        raise CnnsqlError(f"weights manifest {mpath} is not valid JSON: {str(exc)[:200]}", "fix or delete it") from None
    if not isinstance(manifest, dict):
        raise CnnsqlError(f"weights manifest {mpath} must be a JSON object, not a {type(manifest).__name__}",
                          "fix or delete it")
    return manifest


def _depth(text: str) -> int:
    """Deepest bracket nesting outside strings (checked before json.loads, which recurses)."""
    depth = deepest = 0
    in_str = escape = False
    for ch in text:
        if in_str:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def save_weights(path: str | Path, arrays: dict[str, np.ndarray], manifest: dict,
                 spec: ModelSpec | None = None) -> Weights:
    """Write the .npz and its manifest atomically (temp file + rename). The model is `spec`, else the
    manifest's "model", else the study's CNN; the manifest written always carries its description."""
    path = Path(path)
    spec = spec or spec_of(manifest, str(path))
    arrays = validate_arrays(arrays, str(path), spec)
    manifest = {**manifest, "architecture": spec.architecture(), "preprocessing": PREPROCESSING,
                "model": spec.to_dict()}
    validate_manifest(manifest, str(manifest_path(path)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    mtmp = path.with_name(path.name + ".tmp.json")
    mtmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
    mtmp.replace(manifest_path(path))
    return Weights(arrays, manifest, path)


def random_weights(seed: int = 0, spec: ModelSpec = STUDY) -> Weights:
    """Asymmetric random weights (He-scaled) so a transposed kernel or wrong flatten order shows.
    Batch-norm statistics are random too (variance in [0.5, 1.5]) so a skipped or misplaced one shows."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in spec.param_shapes().items():
        if name.endswith(".running_var"):
            arr = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(".weight") and len(shape) == 1:   # batch-norm gamma
            arr = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith(".weight"):
            arr = rng.standard_normal(shape) * np.sqrt(2.0 / int(np.prod(shape[1:])))
        else:
            arr = rng.standard_normal(shape) * 0.1
        arrays[name] = arr.astype(np.float32)
    manifest = {"architecture": spec.architecture(), "preprocessing": PREPROCESSING, "trained_by": "random",
                "seed": seed}
    if spec != STUDY:
        manifest["model"] = spec.to_dict()
    return Weights(arrays, manifest)


def reference_forward(weights: Weights, images: np.ndarray) -> np.ndarray:
    """Plain NumPy float64 forward pass of the weights' model (cnnsql.reference): the engines' ground truth."""
    return reference.forward(weights.spec, weights.arrays, images)


def check_weights_model(weights_path, model: str | None, input_shape=None, num_classes: int | None = None) -> ModelSpec:
    """The model of a weights file, checked against the data and against `model` when that names a
    built-in or a description (a weights file of another model is one clear error)."""
    spec = load_weights(weights_path).spec
    model_spec.check_fits(spec, input_shape, num_classes)
    if model and not str(model).endswith(".npz"):
        wanted = model_spec.resolve(model, input_shape, num_classes)
        if (wanted.input_shape, wanted.layers) != (spec.input_shape, spec.layers):
            raise CnnsqlError(f"weights {weights_path} hold model {spec.name!r} ({spec.architecture()}), "
                              f"not {wanted.name!r} ({wanted.architecture()})",
                              "pass the weights of that model, or leave --weights out to train one")
    return spec
