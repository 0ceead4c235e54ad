"""A small, versioned description of a CNN: what every engine builds and every weights file records.

Format, stored as JSON under the weights manifest's "model" key:

    {"format": "cnnsql-model", "version": 1, "name": "study",
     "input": [channels, height, width],          # uint8 images, channel-major, scaled by 1/255
     "layers": [{"kind": "conv2d", "name": "conv1", "filters": 64, "kernel": 3, "stride": 1, "padding": "valid"},
                {"kind": "relu"}, ...]}

Version 1 is a chain: each layer reads the one before it. Version 2 is a graph: a layer may name its
inputs ("inputs": ["name", ...], "input" being the image), any layer may have a name, and the kinds
and fields marked (v2) below are allowed. A layer without "inputs" still reads the layer before it,
so a version-1 description is a version-2 one. Layers are listed in execution order (inputs name
earlier layers), every layer's output is used, and the last layer is the softmax of class scores.

Layer kinds and their fields (defaults in brackets):
    conv2d     name, filters, kernel (square), stride [1] (1 or 2), padding ["valid"] ("valid", "same", or
               (v2) [top, bottom, left, right] zeros), groups [1] (v2; in and filters divisible by it:
               groups = in channels is a depthwise convolution)
    relu
    relu6      (v2) min(max(x, 0), 6)
    identity   (v2) its input
    maxpool    kernel, stride [= kernel], padding [none] ((v2) [top, bottom, left, right], each < kernel;
               padded cells never win); floor division (PyTorch and Keras "valid" agree)
    avgpool    kernel, stride [= kernel], padding as maxpool; the mean over the window's cells inside the
               map (padded cells are not counted: ONNX's and Keras' rule)
    global_avgpool (v2) the mean of each channel: C x H x W -> C x 1 x 1
    batchnorm  name, eps [1e-5]; inference form y = (x - mean) / sqrt(var + eps) * gamma + beta,
               over channels (after conv) or features (after dense)
    add        (v2) inputs (2 or more, equal shapes): their element-wise sum (a residual connection)
    concat     (v2) inputs (2 or more): over channels (equal height and width), or features when flat
    flatten    (channel, row, column) order, as PyTorch's flatten of NCHW
    dense      name, units
    dropout    rate [0.5]; the identity at inference
    softmax    must be the last layer, and the last layer must be softmax

"same" padding follows TensorFlow: output = ceil(input / stride); total padding
max((output - 1) * stride + kernel - input, 0), the smaller half before (top/left), the rest after.

Parameters, named "<layer name>.<param>" in PyTorch layouts:
    conv2d     weight (out, in / groups, k, k), bias (out,)
    dense      weight (out, in), bias (out,); after flatten, `in` is ordered (c, h, w)
    batchnorm  weight (C,) = gamma, bias (C,) = beta, running_mean (C,), running_var (C,)

The study's CNN (`STUDY`) has the layer names conv1, conv2, fc1, fc2, so the eight arrays of every
weights file written before this description existed are exactly its parameters.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from cnnsql.core.errors import CnnsqlError
from cnnsql.core.config import CIFAR10_SHAPE

FORMAT = "cnnsql-model"
VERSION = 2                  # the newest description this cnnsql reads (and writes for graphs)
VERSIONS = (1, 2)
KINDS_V1 = ("conv2d", "relu", "maxpool", "avgpool", "batchnorm", "flatten", "dense", "dropout", "softmax")
KINDS = KINDS_V1 + ("relu6", "identity", "global_avgpool", "add", "concat")
MERGES = ("add", "concat")   # the kinds with two or more inputs
PADDINGS = ("valid", "same")
INPUT = "input"              # the name by which layers read the image
MAX_LAYERS = 512
MAX_PARAMS = 64 << 20        # 64 M floats (256 MB float32), the weights file's own limit
MAX_DIM = 4096               # input height/width and any layer width
MAX_CHANNELS = 16            # input channels
# The largest activation of one image (one layer's output, float32): what a backend or worker holds per
# image in flight. 16 M floats = 64 MiB; the study CNN's largest is 57,600 floats, a 224x224 VGG's 3.2 M.
MAX_ACTIVATION = 16 << 20
# The layer outputs alive at once (a graph holds its skip connections while a branch runs), per image
MAX_LIVE_ACTIVATION = 4 * MAX_ACTIVATION
# What the engines keep in flight per forward call: the images of a batch times the live activations
MAX_BATCH_ACTIVATION = 256 << 20  # floats, 1 GiB float32


@dataclass(frozen=True)
class Layer:
    """One layer. Fields a kind does not use stay None (and are left out of its JSON)."""

    kind: str
    name: str | None = None
    filters: int | None = None      # conv2d
    kernel: int | None = None       # conv2d, maxpool, avgpool
    stride: int | None = None       # conv2d [1], maxpool/avgpool [= kernel]
    padding: str | tuple | None = None  # conv2d ["valid"]; (top, bottom, left, right) for conv2d and pools (v2)
    units: int | None = None        # dense
    eps: float | None = None        # batchnorm [1e-5]
    rate: float | None = None       # dropout [0.5]
    groups: int | None = None       # conv2d [1] (v2)
    inputs: tuple | None = None     # names of the layers read (v2); None: the layer before

    def __post_init__(self):
        for f in ("padding", "inputs"):
            v = getattr(self, f)
            if isinstance(v, list):
                object.__setattr__(self, f, tuple(v))

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None}

    @property
    def v2(self) -> bool:
        """Uses something version 1 does not have."""
        return (self.kind not in KINDS_V1 or self.inputs is not None or isinstance(self.padding, tuple)
                or (self.groups or 1) != 1 or (self.name is not None and not self.params))

    @property
    def params(self) -> bool:
        return self.kind in ("conv2d", "dense", "batchnorm")


def conv2d(name: str, filters: int, kernel: int, stride: int = 1, padding="valid", groups: int | None = None,
           inputs=None) -> Layer:
    return Layer("conv2d", name=name, filters=filters, kernel=kernel, stride=stride,
                 padding=tuple(padding) if isinstance(padding, (list, tuple)) else padding,
                 groups=None if groups in (None, 1) else groups, inputs=_names(inputs))


def _names(inputs) -> tuple | None:
    if inputs is None:
        return None
    return (inputs,) if isinstance(inputs, str) else tuple(inputs)


def node(kind: str, name: str | None = None, inputs=None, **fields) -> Layer:
    """Any layer of a graph, e.g. node("add", "b1", ["b1_bn2", "stem"])."""
    return Layer(kind, name=name, inputs=_names(inputs), **fields)


def dense(name: str, units: int) -> Layer:
    return Layer("dense", name=name, units=units)


def maxpool(kernel: int, stride: int | None = None, padding=None) -> Layer:
    return Layer("maxpool", kernel=kernel, stride=stride or kernel, padding=_pads(padding))


def avgpool(kernel: int, stride: int | None = None, padding=None) -> Layer:
    return Layer("avgpool", kernel=kernel, stride=stride or kernel, padding=_pads(padding))


def _pads(padding) -> tuple | None:
    if padding is None or padding == "valid" or (isinstance(padding, (list, tuple)) and not any(padding)):
        return None
    return tuple(padding)


def batchnorm(name: str, eps: float = 1e-5) -> Layer:
    return Layer("batchnorm", name=name, eps=eps)


def dropout(rate: float = 0.5) -> Layer:
    return Layer("dropout", rate=rate)


RELU, FLATTEN, SOFTMAX = Layer("relu"), Layer("flatten"), Layer("softmax")
RELU6, IDENTITY, GLOBAL_AVGPOOL = Layer("relu6"), Layer("identity"), Layer("global_avgpool")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) zero padding of one spatial axis for "same" (TensorFlow's rule)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv_padding(layer: Layer, h: int, w: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding of a conv2d or pooling layer on an h x w input."""
    if isinstance(layer.padding, tuple):
        return tuple(int(v) for v in layer.padding)
    if layer.padding != "same":
        return 0, 0, 0, 0
    return (*same_padding(h, layer.kernel, layer.stride), *same_padding(w, layer.kernel, layer.stride))


def pool_counts(layer: Layer, h: int, w: int) -> np.ndarray:
    """Cells of each window of a padded avgpool inside the h x w map: (out_h, out_w) float64."""
    top, bottom, left, right = conv_padding(layer, h, w)
    inside = np.pad(np.ones((h, w)), ((top, bottom), (left, right)))
    k, s = layer.kernel, layer.stride
    oh, ow = (h + top + bottom - k) // s + 1, (w + left + right - k) // s + 1
    return sum(inside[i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s] for i in range(k) for j in range(k))


Shape = tuple[int, ...]  # (c, h, w) before flatten, (features,) after


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_shape: tuple[int, int, int]     # (channels, height, width)
    layers: tuple[Layer, ...]
    version: int | None = None            # None: 1 for a chain of version-1 layers, else 2
    _shapes: tuple = field(default=(), compare=False, repr=False)
    _inputs: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(v) for v in self.input_shape))
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.version is None:
            graph = any(getattr(layer, "v2", True) for layer in self.layers)
            object.__setattr__(self, "version", 2 if graph else 1)
        inputs, shapes = _infer(self)
        object.__setattr__(self, "_inputs", tuple(inputs))
        object.__setattr__(self, "_shapes", tuple(shapes))

    # --- graph --------------------------------------------------------------------------------
    @property
    def is_chain(self) -> bool:
        """Each layer reads the one before it (every version-1 description)."""
        return all(ins == (i - 1,) for i, ins in enumerate(self._inputs))

    def node_inputs(self, index: int) -> tuple[int, ...]:
        """Indices of the layers that layer `index` reads (-1: the image)."""
        return self._inputs[index]

    def consumers(self) -> list[list[int]]:
        """For each layer, the layers that read it, in order."""
        out: list[list[int]] = [[] for _ in self.layers]
        for j, ins in enumerate(self._inputs):
            for i in ins:
                if i >= 0:
                    out[i].append(j)
        return out

    def node_id(self, index: int) -> str:
        """The layer's name, else '#index' (unique: names are identifiers)."""
        return self.layers[index].name or f"#{index}"

    # --- shapes -------------------------------------------------------------------------------
    @property
    def shapes(self) -> tuple[Shape, ...]:
        """Output shape of each layer (without the batch axis), in layer order."""
        return self._shapes

    @property
    def num_classes(self) -> int:
        return self._shapes[-1][0]

    @property
    def input_size(self) -> int:
        """Bytes of one uint8 image."""
        c, h, w = self.input_shape
        return c * h * w

    def shape_of(self, index: int) -> Shape:
        """Output shape of layer `index`; -1: the image."""
        return self.input_shape if index < 0 else self._shapes[index]

    def input_shapes(self) -> tuple[Shape, ...]:
        """Input shape of each layer (its first input's, for add and concat)."""
        return tuple(self.shape_of(ins[0]) for ins in self._inputs)

    # --- parameters ---------------------------------------------------------------------------
    def layer_params(self, index: int) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape of layer `index` (PyTorch layouts; empty for layers without)."""
        layer, shape_in = self.layers[index], self.input_shapes()[index]
        return {f"{layer.name}.{p}": shape for p, shape in _params_of(layer, shape_in).items()}

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter name -> shape, in layer order."""
        out: dict[str, tuple[int, ...]] = {}
        for i in range(len(self.layers)):
            out.update(self.layer_params(i))
        return out

    def largest_activation(self) -> int:
        """Values in the largest layer output of one image (bounded by MAX_ACTIVATION at validation)."""
        return max([math.prod(self.input_shape)] + [math.prod(s) for s in self._shapes])

    def peak_activation(self) -> int:
        """Values alive at once for one image, running the layers in order: each layer's inputs and
        output, and every earlier output a later layer still reads (bounded by MAX_LIVE_ACTIVATION)."""
        return _peak_live(self.input_shape, self._shapes, self._inputs)

    def param_count(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes().values())

    # --- names --------------------------------------------------------------------------------
    def architecture(self) -> str:
        """A one-line summary; for the study's CNN exactly the string older manifests carry. A graph's
        layers say their name and inputs, e.g. b1_add=add(b1_bn2,stem)."""
        if self.version == 1:
            return "-".join(_summary(layer) for layer in self.layers)
        parts = []
        for i, layer in enumerate(self.layers):
            ins = ",".join(self.node_id(j) if j >= 0 else INPUT for j in self._inputs[i])
            parts.append(f"{self.node_id(i)}={_summary(layer)}({ins})")
        return "-".join(parts)

    def describe(self) -> list[str]:
        """One line per layer: kind, fields, (for graphs: name and inputs,) output shape, parameter count."""
        lines = [f"{self.name} (cnnsql model v{self.version}): input {'x'.join(map(str, self.input_shape))}"]
        for i, (layer, shape) in enumerate(zip(self.layers, self.shapes)):
            n = sum(math.prod(s) for s in self.layer_params(i).values())
            what = _summary(layer)
            if not self.is_chain:
                ins = ",".join(self.node_id(j) if j >= 0 else INPUT for j in self._inputs[i])
                what = f"{self.node_id(i)} = {what}({ins})"
            lines.append(f"  {what:<16} -> {'x'.join(map(str, shape)):<12} {n:>10,} params")
        lines.append(f"  total {self.param_count():,} parameters, {self.num_classes} classes")
        return lines

    # --- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": self.version, "name": self.name, "input": list(self.input_shape),
                "layers": [layer.to_dict() for layer in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def with_input(self, input_shape: tuple[int, int, int] | None = None, num_classes: int | None = None) -> "ModelSpec":
        """The same layers for another image shape and/or class count (the last dense layer's units)."""
        layers = list(self.layers)
        if num_classes is not None:
            last = max(i for i, layer in enumerate(layers) if layer.kind == "dense")
            layers[last] = dataclasses.replace(layers[last], units=num_classes)
        return ModelSpec(self.name, tuple(input_shape or self.input_shape), tuple(layers), self.version)


def _peak_live(input_shape, shapes, inputs) -> int:
    sizes = [math.prod(s) for s in shapes]
    last_use = {-1: 0}
    for j, ins in enumerate(inputs):
        for i in ins:
            last_use[i] = j
    peak = 0
    for j in range(len(shapes)):
        alive = sizes[j] + sum(math.prod(input_shape) if i < 0 else sizes[i]
                               for i, last in last_use.items() if i < j and last >= j)
        peak = max(peak, alive)
    return peak


def _summary(layer: Layer) -> str:
    if layer.kind == "conv2d":
        pad = layer.padding
        pad = ("same" if pad == "same" else "") if not isinstance(pad, tuple) else "p" + "_".join(map(str, pad))
        return (f"conv{layer.filters}k{layer.kernel}" + (f"s{layer.stride}" if layer.stride != 1 else "")
                + pad + (f"g{layer.groups}" if (layer.groups or 1) != 1 else ""))
    if layer.kind in ("maxpool", "avgpool"):
        return (f"{layer.kind}{layer.kernel}" + (f"s{layer.stride}" if layer.stride != layer.kernel else "")
                + ("p" + "_".join(map(str, layer.padding)) if isinstance(layer.padding, tuple) else ""))
    if layer.kind == "dense":
        return f"dense{layer.units}"
    if layer.kind == "flatten":
        return "flatten_chw"
    if layer.kind == "batchnorm":
        return "batchnorm"
    if layer.kind == "dropout":
        return f"dropout{layer.rate:g}"
    return layer.kind


def _bad(spec_name: str, problem: str, hint: str = "see docs/models-and-data.md, 'Model description'") -> CnnsqlError:
    return CnnsqlError(f"model {spec_name!r}: {problem}", hint)


def _where(i: int, layer: Layer) -> str:
    return f"layer {i} ({layer.kind}{' ' + layer.name if isinstance(layer.name, str) else ''})"


def _positive(spec: ModelSpec, i: int, layer: Layer, field_name: str, limit: int = MAX_DIM) -> int:
    v = getattr(layer, field_name)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= limit:
        raise _bad(spec.name, f"layer {i} ({layer.kind}) field {field_name!r} must be an integer 1..{limit}, got {v!r}")
    return v


def partial_shapes(name: str, input_shape, layers) -> list[Shape]:
    """Output shape of each layer of an unfinished graph (an importer's so far): the layer checks of a
    description without those of its end (softmax last, every output used)."""
    from types import SimpleNamespace

    return _infer(SimpleNamespace(name=name, version=2, input_shape=tuple(input_shape), layers=tuple(layers)),
                  partial=True)[1]


def _infer(spec: ModelSpec, partial: bool = False) -> tuple[list[tuple[int, ...]], list[Shape]]:
    """Validate the description; return each layer's inputs (indices, -1 the image) and output shape.
    Raises CnnsqlError naming the layer."""
    if not isinstance(spec.name, str) or not 0 < len(spec.name) <= 100:
        raise _bad(str(spec.name)[:100], "name must be a string of 1..100 characters")
    if spec.version not in VERSIONS:
        raise _bad(spec.name, f"description version {spec.version!r} is not supported (this cnnsql reads "
                   f"{', '.join(map(str, VERSIONS))})", "upgrade cnnsql or re-export the model")
    if len(spec.input_shape) != 3:
        raise _bad(spec.name, f"input must be [channels, height, width], got {list(spec.input_shape)}")
    c, h, w = spec.input_shape
    if not (1 <= c <= MAX_CHANNELS and 1 <= h <= MAX_DIM and 1 <= w <= MAX_DIM):
        raise _bad(spec.name, f"input {c}x{h}x{w} is out of range (1..{MAX_CHANNELS} channels, 1..{MAX_DIM} pixels)")
    if not 1 <= len(spec.layers) <= MAX_LAYERS:
        raise _bad(spec.name, f"has {len(spec.layers)} layers (1..{MAX_LAYERS})")
    if spec.layers[-1].kind != "softmax" and not partial:
        raise _bad(spec.name, "the last layer must be softmax", "append {\"kind\": \"softmax\"}")
    names: dict[str, int] = {}
    out: list[Shape] = []
    inputs: list[tuple[int, ...]] = []
    used: set[int] = set()
    params = 0
    for i, layer in enumerate(spec.layers):
        if not isinstance(layer, Layer) or layer.kind not in KINDS:
            kind = getattr(layer, "kind", layer)
            raise _bad(spec.name, f"layer {i} has unsupported kind {kind!r}", f"supported: {', '.join(KINDS)}")
        if spec.version == 1 and layer.v2:
            raise _bad(spec.name, f"{_where(i, layer)} needs description version 2 (graph inputs, names of "
                       "layers without parameters, groups, explicit padding or a version-2 kind)",
                       "set \"version\": 2")
        if layer.params or layer.name is not None:
            if not isinstance(layer.name, str) or not layer.name.isidentifier() or layer.name in names \
                    or layer.name == INPUT:
                raise _bad(spec.name, f"layer {i} ({layer.kind}) needs a unique identifier name, got {layer.name!r}")
        ins = _resolve_inputs(spec, i, layer, names)
        used.update(ins)
        shapes_in = [spec.input_shape if j < 0 else out[j] for j in ins]
        if layer.kind in MERGES:
            shape = _merge_shape(spec, i, layer, shapes_in, ins)
        else:
            shape = _layer_shape(spec, i, layer, shapes_in[0])
        if math.prod(shape) > MAX_ACTIVATION:
            raise _bad(spec.name, f"layer {i} ({layer.kind}) outputs {'x'.join(map(str, shape))} = "
                       f"{math.prod(shape):,} values per image, more than {MAX_ACTIVATION:,} (64 MiB)",
                       "use smaller images (cnnsql load --size), fewer filters or a stride")
        out.append(shape)
        inputs.append(ins)
        if layer.name is not None:
            names[layer.name] = i
        params += sum(math.prod(s) for s in _params_of(layer, shapes_in[0]).values())
        if params > MAX_PARAMS:
            raise _bad(spec.name, f"has more than {MAX_PARAMS:,} parameters", "cnnsql runs small CNNs")
    if partial:
        return inputs, out
    unused = [j for j in range(len(out) - 1) if j not in used]
    if unused:
        raise _bad(spec.name, f"{_where(unused[0], spec.layers[unused[0]])}: its output is never used",
                   "remove it, or name it in a later layer's inputs")
    shape = out[-1]
    if len(shape) != 1:
        raise _bad(spec.name, f"ends with a {'x'.join(map(str, shape))} map, not class scores",
                   "add flatten and a dense layer before softmax")
    if shape[0] < 2:
        raise _bad(spec.name, "must have at least 2 classes")
    live = _peak_live(spec.input_shape, out, inputs)
    if live > MAX_LIVE_ACTIVATION:
        raise _bad(spec.name, f"holds {live:,} values per image alive at once (layer outputs still read by later "
                   f"layers), more than {MAX_LIVE_ACTIVATION:,} (256 MiB)", "use smaller images or fewer branches")
    return inputs, out


def _resolve_inputs(spec: ModelSpec, i: int, layer: Layer, names: dict[str, int]) -> tuple[int, ...]:
    if layer.inputs is None:
        if layer.kind in MERGES:
            raise _bad(spec.name, f"{_where(i, layer)} needs 'inputs': the names of the layers it merges")
        return (i - 1,)
    if not isinstance(layer.inputs, tuple) or not layer.inputs or len(layer.inputs) > 64 \
            or not all(isinstance(n, str) for n in layer.inputs):
        raise _bad(spec.name, f"{_where(i, layer)} 'inputs' must be a list of 1..64 layer names")
    if layer.kind in MERGES and len(layer.inputs) < 2:
        raise _bad(spec.name, f"{_where(i, layer)} merges 2 or more inputs, got {len(layer.inputs)}")
    if layer.kind not in MERGES and len(layer.inputs) != 1:
        raise _bad(spec.name, f"{_where(i, layer)} reads one input, got {len(layer.inputs)}",
                   "use add or concat to merge branches")
    out = []
    for n in layer.inputs:
        if n == INPUT:
            out.append(-1)
        elif n in names:
            out.append(names[n])
        else:
            raise _bad(spec.name, f"{_where(i, layer)} reads {n[:60]!r}, which is not an earlier layer's name",
                       "list layers in execution order; 'input' is the image")
    return tuple(out)


def _merge_shape(spec: ModelSpec, i: int, layer: Layer, shapes: list[Shape], ins) -> Shape:
    label = lambda j: INPUT if ins[j] < 0 else spec.layers[ins[j]].name or f"layer {ins[j]}"  # noqa: E731
    dims = lambda s: "x".join(map(str, s))  # noqa: E731
    first = shapes[0]
    for j, s in enumerate(shapes[1:], 1):
        if layer.kind == "add" and s != first:
            raise _bad(spec.name, f"{_where(i, layer)} adds {label(0)!r} ({dims(first)}) and {label(j)!r} ({dims(s)}): "
                       "shapes differ", "a residual needs a projection (1x1 conv2d with stride) where shapes change")
        if layer.kind == "concat" and (len(s) != len(first) or s[1:] != first[1:]):
            raise _bad(spec.name, f"{_where(i, layer)} concatenates {label(0)!r} ({dims(first)}) and "
                       f"{label(j)!r} ({dims(s)}): only the channels may differ")
    if layer.kind == "add":
        return first
    return (sum(s[0] for s in shapes), *first[1:])


def _params_of(layer: Layer, shape_in: Shape) -> dict[str, tuple[int, ...]]:
    if layer.kind == "conv2d":
        k = layer.kernel
        return {"weight": (layer.filters, shape_in[0] // (layer.groups or 1), k, k), "bias": (layer.filters,)}
    if layer.kind == "dense":
        return {"weight": (layer.units, shape_in[0]), "bias": (layer.units,)}
    if layer.kind == "batchnorm":
        c = (shape_in[0],)
        return {p: c for p in ("weight", "bias", "running_mean", "running_var")}
    return {}


def _check_pads(spec: ModelSpec, i: int, layer: Layer, limit: int) -> tuple[int, int, int, int]:
    p = layer.padding
    if not (isinstance(p, tuple) and len(p) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= limit for v in p)):
        raise _bad(spec.name, f"{_where(i, layer)} padding must be [top, bottom, left, right] of integers "
                   f"0..{limit}, got {list(p) if isinstance(p, tuple) else p!r}")
    return p


def _layer_shape(spec: ModelSpec, i: int, layer: Layer, shape: Shape) -> Shape:
    kind = layer.kind
    if kind in ("relu", "dropout", "batchnorm", "relu6", "identity"):
        if kind == "dropout" and not (isinstance(layer.rate, (int, float)) and 0 <= layer.rate < 1):
            raise _bad(spec.name, f"layer {i} (dropout) rate must be in [0, 1), got {layer.rate!r}")
        if kind == "batchnorm" and not (isinstance(layer.eps, (int, float)) and 0 < layer.eps < 1):
            raise _bad(spec.name, f"layer {i} (batchnorm) eps must be in (0, 1), got {layer.eps!r}")
        return shape
    if kind == "softmax":
        if i != len(spec.layers) - 1:
            raise _bad(spec.name, f"layer {i}: softmax is allowed only as the last layer")
        if len(shape) != 1:
            raise _bad(spec.name, f"ends with a {'x'.join(map(str, shape))} map, not class scores",
                       "add flatten and a dense layer before softmax")
        return shape
    if kind == "flatten":
        return (math.prod(shape),)
    if kind == "dense":
        if len(shape) != 1:
            raise _bad(spec.name, f"layer {i} (dense {layer.name}) gets a {'x'.join(map(str, shape))} map",
                       "put a flatten layer before the first dense layer")
        _positive(spec, i, layer, "units", 1 << 16)
        return (layer.units,)
    if len(shape) != 3:
        raise _bad(spec.name, f"layer {i} ({kind}) needs a channels x height x width input, got {shape}",
                   "spatial layers come before flatten")
    c, h, w = shape
    if kind == "global_avgpool":
        return (c, 1, 1)
    k = _positive(spec, i, layer, "kernel", 64)
    s = _positive(spec, i, layer, "stride", 64)
    if kind == "conv2d":
        _positive(spec, i, layer, "filters", 4096)
        if s not in (1, 2):
            raise _bad(spec.name, f"layer {i} (conv2d {layer.name}) stride must be 1 or 2, got {s}")
        g = layer.groups if layer.groups is not None else 1
        if not isinstance(g, int) or isinstance(g, bool) or g < 1 or c % g or layer.filters % g:
            raise _bad(spec.name, f"{_where(i, layer)} groups {g!r} must divide its {c} input channels and "
                       f"{layer.filters} filters", "groups = input channels is a depthwise convolution")
        if layer.padding == "same":
            return (layer.filters, -(-h // s), -(-w // s))
        if isinstance(layer.padding, tuple):
            top, bottom, left, right = _check_pads(spec, i, layer, 64)
            h, w = h + top + bottom, w + left + right
        elif layer.padding != "valid":
            raise _bad(spec.name, f"layer {i} (conv2d {layer.name}) padding must be 'valid' or 'same', got {layer.padding!r}")
        oh, ow = (h - k) // s + 1, (w - k) // s + 1
        if h < k or w < k:
            raise _bad(spec.name, f"layer {i} (conv2d {layer.name}) kernel {k} is larger than its {h}x{w} input",
                       "use padding 'same', a smaller kernel, or larger images (cnnsql load --size)")
        return (layer.filters, oh, ow)
    if layer.padding is not None:
        top, bottom, left, right = _check_pads(spec, i, layer, k - 1)
        h, w = h + top + bottom, w + left + right
    if h < k or w < k:
        raise _bad(spec.name, f"layer {i} ({kind}) window {k} is larger than its {h}x{w} input",
                   "use fewer pooling layers or larger images (cnnsql load --size)")
    return (c, (h - k) // s + 1, (w - k) // s + 1)


# --- (de)serialisation ------------------------------------------------------------------------------

def from_dict(d: dict, source: str = "model description") -> ModelSpec:
    """Parse a JSON object (as `to_dict` writes it). Raises CnnsqlError naming the first problem."""
    if not isinstance(d, dict):
        raise CnnsqlError(f"{source}: a model description must be a JSON object", "see docs/models-and-data.md, 'Model description'")
    if d.get("format") != FORMAT:
        raise CnnsqlError(f"{source}: not a cnnsql model description (format {d.get('format')!r}, expected {FORMAT!r})",
                          "see docs/models-and-data.md, 'Model description'")
    version = d.get("version")
    if version not in VERSIONS or isinstance(version, bool):
        raise CnnsqlError(f"{source}: model description version {version if isinstance(version, int) else repr(str(version)[:20])} is not supported "
                          f"(this cnnsql reads {', '.join(map(str, VERSIONS))})", "upgrade cnnsql or re-export the model")
    raw_layers = d.get("layers")
    inp = d.get("input")
    if not isinstance(raw_layers, list) or not isinstance(inp, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in inp):
        raise CnnsqlError(f"{source}: needs 'input' [channels, height, width] and a 'layers' list",
                          "see docs/models-and-data.md, 'Model description'")
    if len(raw_layers) > MAX_LAYERS:
        raise CnnsqlError(f"{source}: {len(raw_layers)} layers, at most {MAX_LAYERS}")
    allowed = {f.name for f in fields(Layer)}
    layers = []
    for i, raw in enumerate(raw_layers):
        if not isinstance(raw, dict) or raw.get("kind") not in KINDS:
            kind = raw.get("kind") if isinstance(raw, dict) else raw
            raise CnnsqlError(f"{source}: layer {i} has unsupported kind {str(kind)[:60]!r}",
                              f"supported: {', '.join(KINDS)}")
        unknown = set(raw) - allowed
        if unknown:
            raise CnnsqlError(f"{source}: layer {i} ({raw['kind']}) has unknown fields {sorted(unknown)}",
                              "see docs/models-and-data.md, 'Model description'")
        for key in ("padding", "inputs"):
            if isinstance(raw.get(key), list) and len(raw[key]) > 64:
                raise CnnsqlError(f"{source}: layer {i} ({raw['kind']}) field {key!r} has {len(raw[key])} entries")
        layers.append(_with_defaults(Layer(**raw)))
    try:
        return ModelSpec(str(d.get("name", "model")), tuple(inp), tuple(layers), version)
    except CnnsqlError as exc:
        raise CnnsqlError(f"{source}: {exc.problem}", exc.hint) from None


def _with_defaults(layer: Layer) -> Layer:
    if layer.kind == "conv2d":
        return Layer(**{**layer.to_dict(), "stride": layer.stride or 1, "padding": layer.padding or "valid"})
    if layer.kind in ("maxpool", "avgpool"):
        return Layer(**{**layer.to_dict(), "stride": layer.stride or layer.kernel})
    if layer.kind == "batchnorm" and layer.eps is None:
        return Layer(**{**layer.to_dict(), "eps": 1e-5})
    if layer.kind == "dropout" and layer.rate is None:
        return Layer(**{**layer.to_dict(), "rate": 0.5})
    return layer


def from_json(text: str, source: str = "model description") -> ModelSpec:
    try:
        d = json.loads(text)
    except ValueError as exc:
        raise CnnsqlError(f"{source} is not valid JSON: {str(exc)[:200]}", "see docs/models-and-data.md, 'Model description'") from None
    return from_dict(d, source)


MAX_SPEC_BYTES = 1 << 20


def read_spec_file(path: str | Path) -> ModelSpec:
    path = Path(path)
    if path.stat().st_size > MAX_SPEC_BYTES:
        raise CnnsqlError(f"model description {path} is larger than {MAX_SPEC_BYTES:,} bytes")
    return from_json(path.read_text(), str(path))


# --- built-in models --------------------------------------------------------------------------------

def study_cnn(input_shape=CIFAR10_SHAPE, num_classes: int = 10) -> ModelSpec:
    """The study's CNN: two 3x3 convolutions of 64, a 2x2 max-pool, dense 512, dense classes."""
    return ModelSpec("study", tuple(input_shape), (
        conv2d("conv1", 64, 3), RELU, conv2d("conv2", 64, 3), RELU, maxpool(2), FLATTEN,
        dense("fc1", 512), RELU, dense("fc2", num_classes), SOFTMAX))


def lenet5(input_shape=CIFAR10_SHAPE, num_classes: int = 10) -> ModelSpec:
    """LeNet-5 (LeCun et al. 1998) with ReLU and average pooling: 6 5x5, pool, 16 5x5, pool, 120, 84, classes.
    Needs inputs of at least 12x12 (the first convolution pads "same" so 28x28 images work, as in the paper)."""
    return ModelSpec("lenet5", tuple(input_shape), (
        conv2d("conv1", 6, 5, padding="same"), RELU, avgpool(2), conv2d("conv2", 16, 5), RELU, avgpool(2), FLATTEN,
        dense("fc1", 120), RELU, dense("fc2", 84), RELU, dense("fc3", num_classes), SOFTMAX))


def vgg_small(input_shape=CIFAR10_SHAPE, num_classes: int = 10) -> ModelSpec:
    """VGG-style: two blocks of conv-bn-relu, conv-bn-relu, max-pool (32 then 64 3x3 filters, "same"),
    then dense 256, dropout 0.5, dense classes."""
    return ModelSpec("vgg", tuple(input_shape), (
        conv2d("conv1", 32, 3, padding="same"), batchnorm("bn1"), RELU,
        conv2d("conv2", 32, 3, padding="same"), batchnorm("bn2"), RELU, maxpool(2),
        conv2d("conv3", 64, 3, padding="same"), batchnorm("bn3"), RELU,
        conv2d("conv4", 64, 3, padding="same"), batchnorm("bn4"), RELU, maxpool(2), FLATTEN,
        dense("fc1", 256), RELU, dropout(0.5), dense("fc2", num_classes), SOFTMAX))


def resnet20(input_shape=CIFAR10_SHAPE, num_classes: int = 10) -> ModelSpec:
    """The CIFAR ResNet-20 of He et al. (2016, section 4.2): a 3x3 conv of 16, then 3 stages of 3 basic
    blocks (two 3x3 conv-bn, the block's input added before the second relu) of 16, 32 and 64
    filters, the first block of stages 2 and 3 at stride 2; global average pooling, dense classes.
    Shortcuts where the shape changes are option B (a 1x1 conv of stride 2 and batch norm, as in
    torchvision's ResNets), elsewhere the identity. Convolutions pad 1 on every side, as PyTorch's.
    0.27 M parameters at 10 classes (convolution biases included: the weights file's conv2d has one)."""
    pad = (1, 1, 1, 1)
    layers = [conv2d("conv1", 16, 3, 1, pad), batchnorm("bn1"), node("relu", "stem")]
    prev, channels = "stem", 16
    for stage, filters in enumerate((16, 32, 64), 1):
        for block in range(3):
            b = f"s{stage}b{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            layers += [conv2d(f"{b}_conv1", filters, 3, stride, pad, inputs=prev), batchnorm(f"{b}_bn1"), RELU,
                       conv2d(f"{b}_conv2", filters, 3, 1, pad), batchnorm(f"{b}_bn2")]
            short = prev
            if stride != 1 or filters != channels:
                layers += [conv2d(f"{b}_down", filters, 1, stride, inputs=prev), batchnorm(f"{b}_down_bn")]
                short = f"{b}_down_bn"
            layers += [node("add", f"{b}_add", [f"{b}_bn2", short]), node("relu", b)]
            prev, channels = b, filters
    layers += [GLOBAL_AVGPOOL, FLATTEN, dense("fc", num_classes), SOFTMAX]
    return ModelSpec("resnet20", tuple(input_shape), tuple(layers))


def mobilenet_small(input_shape=CIFAR10_SHAPE, num_classes: int = 10) -> ModelSpec:
    """A small MobileNet (Howard et al. 2017) for 32x32 images: a 3x3 conv of 32, then five
    depthwise-separable blocks (3x3 depthwise conv-bn-relu6, 1x1 conv-bn-relu6) to 64, 128 (stride
    2), 128, 256 (stride 2), 256 channels; global average pooling, dropout 0.2, dense classes."""
    pad = (1, 1, 1, 1)
    layers = [conv2d("conv1", 32, 3, 1, pad), batchnorm("bn1"), RELU6]
    channels = 32
    for i, (filters, stride) in enumerate(((64, 1), (128, 2), (128, 1), (256, 2), (256, 1)), 1):
        layers += [conv2d(f"dw{i}", channels, 3, stride, pad, groups=channels), batchnorm(f"dw{i}_bn"), RELU6,
                   conv2d(f"pw{i}", filters, 1), batchnorm(f"pw{i}_bn"), RELU6]
        channels = filters
    layers += [GLOBAL_AVGPOOL, FLATTEN, dropout(0.2), dense("fc", num_classes), SOFTMAX]
    return ModelSpec("mobilenet_small", tuple(input_shape), tuple(layers))


BUILTINS = {"study": study_cnn, "lenet5": lenet5, "vgg": vgg_small, "resnet20": resnet20,
            "mobilenet_small": mobilenet_small}
DEFAULT_MODEL = "study"
STUDY = study_cnn()


def builtin(name: str, input_shape=CIFAR10_SHAPE, num_classes: int = 10) -> ModelSpec:
    try:
        make = BUILTINS[name]
    except KeyError:
        raise CnnsqlError(f"unknown model {name!r}",
                          f"choose a built-in ({', '.join(BUILTINS)}) or a model description .json file") from None
    return make(tuple(input_shape), num_classes)


def resolve(model: str | None, input_shape=None, num_classes: int | None = None) -> ModelSpec:
    """A model given on the command line: a built-in name (sized to `input_shape`/`num_classes`
    when given) or a path to a description .json (which must then match them)."""
    model = model or DEFAULT_MODEL
    if model in BUILTINS:
        return builtin(model, input_shape or CIFAR10_SHAPE, num_classes or 10)
    path = Path(model)
    if not path.is_file():
        raise CnnsqlError(f"unknown model {model!r} (not a built-in, no such file)",
                          f"choose a built-in ({', '.join(BUILTINS)}) or a model description .json file")
    spec = read_spec_file(path)
    check_fits(spec, input_shape, num_classes)
    return spec


def check_fits(spec: ModelSpec, input_shape=None, num_classes: int | None = None) -> None:
    """Clear error when a model does not take these images or produce these classes."""
    if input_shape is not None and tuple(input_shape) != spec.input_shape:
        raise CnnsqlError(f"model {spec.name!r} takes {'x'.join(map(str, spec.input_shape))} images, "
                          f"the data is {'x'.join(map(str, input_shape))}",
                          "load the images with a matching --size or use a model for this shape")
    if num_classes is not None and num_classes != spec.num_classes:
        raise CnnsqlError(f"model {spec.name!r} has {spec.num_classes} classes, the data has {num_classes}",
                          "use a model made for this dataset")
