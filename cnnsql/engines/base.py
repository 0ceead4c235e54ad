"""The engine interface: load weights, predict a batch. Everything else is generic over it."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from cnnsql.core.errors import CnnsqlError
from cnnsql.models.weights import Weights


@functools.cache
def tune_malloc() -> bool:
    """Keep glibc from mmap-ing and unmapping every large activation buffer. Its default threshold
    (dynamic, 128 KiB to 32 MiB) left the raw PyTorch path paying page faults for each batch: in one
    `cnnsql bench` run 2,485 vs 3,649 images/s, sys time 13.3 s vs 2.5 s. Applies to the whole
    process, so raw and SQL paths are measured under the same allocator. No-op off glibc."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        mallopt = ctypes.CDLL(libc_name).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 256 << 20)) and bool(mallopt(m_trim_threshold, 512 << 20))


class Engine(ABC):
    """A CNN inference engine.

    Subclasses convert the framework-neutral `Weights` to their own layout in `__init__` and
    implement one call, `forward`; this class validates the images once and splits every call into
    batches (`predict`) and the framework's chunks (`chunk`). `threads` caps intra-op threads (None:
    framework default).
    """

    name: ClassVar[str]
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    default_batch_size: ClassVar[int] = 256
    # `cnnsql bench` defaults for slow engines (None: the benchmark's own): test images of the offline
    # phases (a prefix of the test split, so shared with the other engines), images of the raw warm-up
    # call (the SQL warm-up is then the one-image query), images per batch-size point, one-image calls
    # of the single-stream phase, timed repetitions of the offline phases.
    bench_sample: ClassVar[int | None] = None
    bench_warmup_images: ClassVar[int | None] = None
    bench_sweep_images: ClassVar[int | None] = None
    bench_single_stream: ClassVar[int | None] = None
    bench_repetitions: ClassVar[int | None] = None  # timed calls per offline phase unless --repetitions
    bench_indb_repetitions: ClassVar[int | None] = None  # in PostgreSQL's offline phase (default: the above)
    chunk: int | None = None  # most images per `forward` call (None: a whole batch); set per instance

    @classmethod
    def cannot_run(cls, spec) -> str | None:
        """Why this engine cannot run the model description `spec` (one line), or None when it can."""
        return None

    def __init__(self, weights: Weights, *, device: str = "cpu", threads: int | None = None):
        self.spec = weights.spec   # the model description (cnnsql.model_spec); the study's CNN by default
        if device not in self.devices:
            raise CnnsqlError(
                f"engine {self.name!r} cannot run on device {device!r}",
                f"it supports: {', '.join(self.devices)}",
            )
        self.weights = weights
        self.device = device
        self.threads = threads
        tune_malloc()

    @abstractmethod
    def forward(self, images: np.ndarray) -> np.ndarray:
        """The engine's one call: validated uint8 images (n, C, H, W), 1 <= n <= `chunk` when it is
        set, channel-major, the model's input shape -> float32 class probabilities (n, classes)."""

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N, C, H, W) or (N, C*H*W), the model's input shape ((3, 32, 32) for the study's
        CNN) -> float32 class probabilities (N, classes): one call of any size."""
        images = check_images(images, self.spec.input_shape)
        return self._batched(images, len(images))

    def predict(self, images: np.ndarray, batch_size: int | None = None, on_batch=None) -> np.ndarray:
        """Probabilities for any number of images in calls of `batch_size` (the one place a call is
        split; `on_batch(n)` is told each executed batch's size, e.g. for a progress bar)."""
        images = check_images(images, self.spec.input_shape)
        return self._batched(images, batch_size or self.default_batch_size, on_batch)

    def _batched(self, images: np.ndarray, batch_size: int, on_batch=None) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.spec.num_classes), dtype=np.float32)
        step = self.executed_batch(batch_size)
        parts = []
        for i in range(0, len(images), step):
            parts.append(self.forward(images[i:i + step]))
            if on_batch is not None:
                on_batch(len(parts[-1]))
        return np.concatenate(parts).astype(np.float32, copy=False)

    def executed_batch(self, batch_size: int | None = None) -> int:
        """Images per `forward` call for a `predict(..., batch_size)`: the smaller of the batch and the
        engine's `chunk` (torch, TensorFlow). Logged with every benchmark run, so a batch sweep says
        what the framework ran."""
        bs = batch_size or self.default_batch_size
        if bs < 1:
            raise CnnsqlError(f"batch size must be at least 1, got {bs}")
        from cnnsql.models.model_spec import MAX_BATCH_ACTIVATION

        fits = self.__dict__.get("_fits")
        if fits is None:  # memory in flight stays bounded (computed once: a graph's walk costs ~0.05 ms)
            fits = self.__dict__["_fits"] = max(1, MAX_BATCH_ACTIVATION // self.spec.peak_activation())
        return min(bs, self.chunk or bs, fits)

    def describe(self) -> dict:
        """Versions and settings, logged with every benchmark run (bench_run.detail->'engine')."""
        return {"engine": self.name, "device": self.device, "threads": self.threads}


def check_images(images: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 (N, C, H, W) or (N, C*H*W) for the model's input `shape` -> (N, C, H, W)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise CnnsqlError(f"images must be uint8, got {images.dtype}")
    shape = tuple(shape)
    size = int(np.prod(shape))
    if images.ndim == 2 and images.shape[1] == size:
        images = images.reshape(-1, *shape)
    if images.ndim != 4 or images.shape[1:] != shape:
        dims = ", ".join(map(str, shape))
        raise CnnsqlError(f"images must have shape (N, {dims}) or (N, {size}), got {images.shape}")
    return images
