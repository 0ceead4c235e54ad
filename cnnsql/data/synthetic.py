"""`cnnsql load --synthetic N` at any size: the synthetic dataset generated chunk by chunk as COPY reads it.

The pixels are exactly those of `cifar.write_synthetic(dest, N, seed=S)` (the archive form, kept for the
tests that need files): one NumPy Generator, class centres first, then the normal noise of train batches
1..5 and of the test batch in that order. NumPy's Generator draws the same values in pieces as in one
call, so generating 2,000 rows at a time reproduces the archive byte for byte while the loader's memory
stays independent of N (10^6 images = 3 GB: the archive route held all of it, and its 256 MB member cap
refused N > ~400,000). The rows must be read in order, train before test, which is how the loader reads.

Each split's `md5` is filled as the rows stream: the md5 of its pixel bytes (the archive's member md5s
would need the pickles), inserted by the loader after the split's COPY.
"""
from __future__ import annotations

import hashlib

import numpy as np

from cnnsql.data.cifar import IMAGE_BYTES, SYNTHETIC_CLASSES, Dataset, Split


class _Noise:
    """The shared generator, handing out image rows strictly in the archive's order."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.centers = self.rng.integers(40, 216, size=(10, 3))

    def rows(self, labels: np.ndarray) -> np.ndarray:
        noise = self.rng.normal(0, 30, size=(len(labels), 3, 1024))
        return np.clip(self.centers[labels][:, :, None] + noise, 0, 255).astype(np.uint8).reshape(-1, IMAGE_BYTES)


class StreamedImages:
    """(N, 3072) uint8 rows of one split, produced on demand; only consecutive slices, in order."""

    def __init__(self, noise: _Noise, batch_sizes: list[int], md5: dict, previous: "StreamedImages | None" = None):
        self.noise, self.md5, self.previous = noise, md5, previous
        self.labels = np.concatenate([np.arange(n) % 10 for n in batch_sizes]).astype(np.int16)
        self.pos, self.digest = 0, hashlib.md5()
        self.shape = (len(self.labels), IMAGE_BYTES)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def done(self) -> bool:
        return self.pos == len(self)

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(len(self))
        if step != 1 or start != self.pos or (self.previous is not None and not self.previous.done):
            raise RuntimeError(f"synthetic rows are generated in order: asked for {start}:{stop} at row {self.pos}")
        out = self.noise.rows(self.labels[start:stop])
        self.pos = stop
        self.digest.update(out.tobytes())
        if self.done:
            self.md5["pixels"] = self.digest.hexdigest()
        return out


def dataset(n_train: int, seed: int = 0, n_test: int | None = None) -> Dataset:
    """The synthetic Dataset (train N, test N/5 as `write_synthetic`), images streamed."""
    n_test = n_test if n_test is not None else max(1, n_train // 5)
    noise = _Noise(seed)
    per = [n_train // 5 + (1 if i < n_train % 5 else 0) for i in range(5)]
    generator = f"cnnsql synthetic, seed {seed}, {n_train} train + {n_test} test"
    train_md5, test_md5 = {"generator": generator}, {"generator": generator}
    train = StreamedImages(noise, per, train_md5)
    test = StreamedImages(noise, [n_test], test_md5, previous=train)
    splits = {"train": Split("train", train, train.labels, train_md5),
              "test": Split("test", test, test.labels, test_md5)}
    return Dataset(f"synthetic:{n_train}:seed={seed}", "synthetic", splits, list(SYNTHETIC_CLASSES))
