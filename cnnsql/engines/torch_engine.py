"""PyTorch engine. The neutral layout is PyTorch's own (OIHW kernels, (out, in) dense, NCHW flatten)."""
from __future__ import annotations

import os

import numpy as np

from ..errors import CnnsqlError
from ..weights import SHAPES, Weights
from .base import Engine, check_images

# Measured on 2 Sapphire Rapids cores (benchmarks/raw_speed.py): channels_last is ~40% faster than
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


def run_chunked(fn, images: np.ndarray, chunk: int | None) -> np.ndarray:
    """fn over consecutive chunks of `images`, concatenated (float32 (N, 10)). Shared with TensorFlow."""
    if len(images) == 0:
        return np.zeros((0, 10), dtype=np.float32)
    step = chunk or len(images)
    parts = [fn(images[i:i + step]) for i in range(0, len(images), step)]
    return np.concatenate(parts).astype(np.float32, copy=False)


def build_model():
    """The CNN as an nn.Module whose state_dict names and shapes are exactly the neutral ones."""
    torch = import_torch()
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 3)
            self.conv2 = nn.Conv2d(64, 64, 3)
            self.fc1 = nn.Linear(64 * 14 * 14, 512)
            self.fc2 = nn.Linear(512, 10)

        def forward(self, x):  # x: float (N, 3, 32, 32) in [0, 1]; returns logits
            x = torch.relu(self.conv1(x))
            x = torch.relu(self.conv2(x))
            x = torch.flatten(torch.max_pool2d(x, 2), 1)  # (c, h, w) order in any memory format
            return self.fc2(torch.relu(self.fc1(x)))

    return Net()


def load_arrays(model, arrays: dict[str, np.ndarray]) -> None:
    torch = import_torch()

    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(arrays[k], dtype=np.float32)) for k in SHAPES})


def export_arrays(model) -> dict[str, np.ndarray]:
    sd = model.state_dict()
    return {k: sd[k].detach().cpu().numpy().astype(np.float32).copy() for k in SHAPES}


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
        model = build_model()
        load_arrays(model, weights.arrays)
        model = model.eval().to(self._dev)
        self._memory_format = torch.channels_last if mode != "eager" else torch.contiguous_format
        model = model.to(memory_format=self._memory_format)
        self._model = torch.compile(model, dynamic=False) if mode == "compile" else model

    def _proba(self, images: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(images).to(self._dev)
        x = x.to(torch.float32).div_(255.0).contiguous(memory_format=self._memory_format)
        return torch.softmax(self._model(x), dim=1).cpu().numpy()

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        import torch

        images = check_images(images)
        if not (images.flags.c_contiguous and images.flags.writeable):  # torch warns on read-only arrays
            images = np.array(images, order="C")
        with torch.inference_mode():
            return run_chunked(self._proba, images, self.chunk)

    def describe(self) -> dict:
        import torch

        return {
            **super().describe(),
            "torch": torch.__version__,
            "mode": self.mode,
            "chunk": self.chunk,
            "intra_op_threads": torch.get_num_threads(),
            "mkldnn": torch.backends.mkldnn.is_available(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        }
