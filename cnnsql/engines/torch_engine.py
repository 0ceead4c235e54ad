"""PyTorch engine. The neutral layout is PyTorch's own (OIHW kernels, (out, in) dense, NCHW flatten).
The network is built from the weights' model description (cnnsql.model_spec), one module per layer."""
from __future__ import annotations

import os

import numpy as np

from cnnsql.core.errors import CnnsqlError
from cnnsql.models.model_spec import STUDY, ModelSpec, conv_padding, pool_counts
from cnnsql.models.weights import Weights
from cnnsql.engines.base import Engine

# Measured on 2 Sapphire Rapids cores (cnnsql study raw_speed): channels_last is ~40% faster than
# eager NCHW; "compile" (torch.compile/inductor) is within ~5% of it but costs seconds of compiling
# per new batch shape (13 s for batch 1), so channels_last is the default. (TorchScript freezing was
# also within ~5%, and is deprecated in torch 2.13.)
MODES = ("eager", "channels_last", "compile")
DEFAULT_MODE = "channels_last"
# Batches run in chunks of 64: the activations then stay under glibc's 32 MiB mmap threshold and in
# cache; a single 256-image pass measured ~35% slower than four 64-image ones.
DEFAULT_CHUNK = 64


def import_torch():
    """Import torch with OpenMP threads that sleep rather than spin when idle (OMP_WAIT_POLICY=PASSIVE,
    unless the caller set it). Spinning threads measured 2-4x slower whenever another process (the
    database, a second engine) shares the cores. Read once, when libgomp loads: a no-op afterwards."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    return torch


def build_model(spec: ModelSpec = STUDY, inplace_relu: bool = False):
    """The model as an nn.Module on float NCHW input in [0, 1], returning logits (the final softmax is
    left to the caller). Parametrised layers are attributes named as in the description, so state_dict
    names and shapes are exactly the neutral ones (plus batch norm's num_batches_tracked counter).
    A chain runs its steps in turn; a graph keeps each output until its last reader.

    inplace_relu (inference only: autograd refuses some in-place steps): a chain's ReLUs after its first
    step overwrite their input, which no other step reads. Same outputs; one activation buffer less
    per ReLU. Measured on the 2-core development VM, study CNN, 2 threads, 64-image chunks, 7 calls of
    2,560 images each, interleaved: 1,891 [1,826-1,919] images/s against 1,814 [1,697-1,839]; inside
    PostgreSQL, a backend's anonymous memory after 10^5 images 255-270 MB against 276-288 MB."""
    torch = import_torch()
    from torch import nn

    F = nn.functional

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.steps = []   # callables in order; modules with parameters are also attributes
            for i, (layer, shape_in) in enumerate(zip(spec.layers, spec.input_shapes())):
                if layer.kind != "softmax":
                    self.steps.append(self._step(i, layer, shape_in))
            self.chain = spec.is_chain
            if self.chain and inplace_relu:
                self.steps[1:] = [torch.relu_ if s is torch.relu else s for s in self.steps[1:]]
            self.reads = [spec.node_inputs(i) for i in range(len(self.steps))]
            last = {}
            for j, ins in enumerate(self.reads):
                for i in ins:
                    last[i] = j
            # outputs no longer read after step j
            self.drop = [[i for i in ins if last[i] == j] for j, ins in enumerate(self.reads)]

        def _step(self, i, layer, shape_in):
            k = layer.kind
            if k in ("conv2d", "maxpool", "avgpool"):
                top, bottom, left, right = conv_padding(layer, shape_in[1], shape_in[2])
                symmetric = top == bottom and left == right
            if k == "conv2d":
                conv = nn.Conv2d(shape_in[0], layer.filters, layer.kernel, layer.stride,
                                 padding=(top, left) if symmetric else 0, groups=layer.groups or 1)
                setattr(self, layer.name, conv)
                if symmetric:
                    return conv
                pad = nn.ZeroPad2d((left, right, top, bottom))
                return lambda x: conv(pad(x))
            if k == "dense":
                setattr(self, layer.name, nn.Linear(shape_in[0], layer.units))
                return getattr(self, layer.name)
            if k == "batchnorm":
                bn = (nn.BatchNorm2d if len(shape_in) == 3 else nn.BatchNorm1d)(shape_in[0], eps=layer.eps)
                setattr(self, layer.name, bn)
                return bn
            if k == "dropout":
                drop = nn.Dropout(layer.rate)
                self.add_module(f"dropout{len(self.steps)}", drop)
                return drop
            pads = (left, right, top, bottom) if k in ("maxpool", "avgpool") and (top or bottom or left or right) else None
            if k == "maxpool" and pads:
                return lambda x: torch.max_pool2d(F.pad(x, pads, value=float("-inf")), layer.kernel, layer.stride)
            if k == "avgpool" and pads:   # the window's sum over the cells inside the map, / their count
                scale = layer.kernel ** 2 / pool_counts(layer, shape_in[1], shape_in[2])
                self.register_buffer(f"pool_scale{i}", torch.tensor(scale, dtype=torch.float32)[None, None],
                                     persistent=False)
                return lambda x: F.avg_pool2d(F.pad(x, pads), layer.kernel, layer.stride) * getattr(self, f"pool_scale{i}")
            return {
                "relu": torch.relu,
                "relu6": F.relu6,
                "identity": lambda x: x,
                "maxpool": lambda x: torch.max_pool2d(x, layer.kernel, layer.stride),
                "avgpool": lambda x: F.avg_pool2d(x, layer.kernel, layer.stride),
                "global_avgpool": lambda x: F.adaptive_avg_pool2d(x, 1),
                "flatten": lambda x: torch.flatten(x, 1),   # (c, h, w) order in any memory format
                "add": None,
                "concat": None,
            }[k]

        def forward(self, x):  # x: float (N, C, H, W) in [0, 1]; returns logits
            if self.chain:
                for step in self.steps:
                    x = step(x)
                return x
            values = {-1: x}
            for j, step in enumerate(self.steps):
                ins = [values[i] for i in self.reads[j]]
                kind = spec.layers[j].kind
                if kind == "add":
                    y = ins[0]
                    for v in ins[1:]:
                        y = y + v
                elif kind == "concat":
                    y = torch.cat(ins, 1)
                else:
                    y = step(ins[0])
                for i in self.drop[j]:
                    del values[i]
                values[j] = y
            return values[spec.node_inputs(len(spec.layers) - 1)[0]]

    return Net()


def load_arrays(model, arrays: dict[str, np.ndarray], spec: ModelSpec = STUDY) -> None:
    torch = import_torch()

    state = {k: torch.from_numpy(np.ascontiguousarray(arrays[k], dtype=np.float32)) for k in spec.param_shapes()}
    for key, value in model.state_dict().items():
        if key.endswith(".num_batches_tracked"):
            state[key] = value
    model.load_state_dict(state)


def export_arrays(model, spec: ModelSpec = STUDY) -> dict[str, np.ndarray]:
    sd = model.state_dict()
    return {k: sd[k].detach().cpu().numpy().astype(np.float32).copy() for k in spec.param_shapes()}


def torch_device(device: str):
    torch = import_torch()

    if device == "cuda" and not torch.cuda.is_available():
        raise CnnsqlError(
            "device 'cuda' requested but this PyTorch has no usable CUDA "
            f"(torch {torch.__version__}, cuda build {torch.version.cuda})",
            "use --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU",
        )
    return torch.device(device)


class TorchEngine(Engine):
    name = "torch"
    devices = ("cpu", "cuda")

    def __init__(self, weights: Weights, *, device: str = "cpu", threads: int | None = None,
                 mode: str = DEFAULT_MODE, chunk: int | None = DEFAULT_CHUNK):
        super().__init__(weights, device=device, threads=threads)
        torch = import_torch()

        if mode not in MODES:
            raise CnnsqlError(f"unknown torch mode {mode!r}", f"choose one of: {', '.join(MODES)}")
        self.mode = mode
        self.chunk = chunk
        self._dev = torch_device(device)
        if threads:
            torch.set_num_threads(threads)
        self.spec = weights.spec
        model = build_model(self.spec, inplace_relu=True)  # forward runs under inference_mode
        load_arrays(model, weights.arrays, self.spec)
        model = model.eval().to(self._dev)
        self._memory_format = torch.channels_last if mode != "eager" else torch.contiguous_format
        model = model.to(memory_format=self._memory_format)
        self._model = torch.compile(model, dynamic=False) if mode == "compile" else model

    def forward(self, images: np.ndarray) -> np.ndarray:
        import torch

        if not (images.flags.c_contiguous and images.flags.writeable):  # torch warns on read-only arrays
            images = np.array(images, order="C")
        with torch.inference_mode():
            x = torch.from_numpy(images).to(self._dev)
            x = x.to(torch.float32).div_(255.0).contiguous(memory_format=self._memory_format)
            return torch.softmax(self._model(x), dim=1).cpu().numpy()

    def describe(self) -> dict:
        import torch

        return {
            **super().describe(),
            "torch": torch.__version__,
            "model": self.spec.name,
            "mode": self.mode,
            "chunk": self.chunk,
            "intra_op_threads": torch.get_num_threads(),
            "mkldnn": torch.backends.mkldnn.is_available(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        }
