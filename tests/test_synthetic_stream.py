"""The streamed synthetic generator (`cnnsql load --synthetic N` at any N): the archive's exact pixels,
generated in order, with memory that does not grow with N."""
from __future__ import annotations

import numpy as np
import pytest

from cnnsql.data import cifar
from cnnsql.data import synthetic
from cnnsql.measure import peak


def test_streamed_rows_equal_the_archive(tmp_path):
    md5 = cifar.write_synthetic(tmp_path, 103, seed=5)
    sizes = {n: (tmp_path / cifar.TOP / n).stat().st_size for n in md5}
    archive = cifar.read_dataset(tmp_path, expected_md5=md5, kind="synthetic", expected_size=sizes)
    streamed = synthetic.dataset(103, seed=5)
    assert streamed.class_names == archive.class_names
    for name in ("train", "test"):
        split, want = streamed.splits[name], archive.splits[name]
        assert np.array_equal(split.labels, want.labels)
        edges = [0, 1, 7, 40, len(split.labels)]  # uneven chunks, across the batch boundaries
        got = np.concatenate([split.images[a:b] for a, b in zip(edges[:-1], edges[1:])])
        assert np.array_equal(got, want.images)
        assert len(split.md5["pixels"]) == 32 and "seed 5" in split.md5["generator"]


def test_rows_only_in_order():
    data = synthetic.dataset(50)
    with pytest.raises(RuntimeError, match="in order"):
        data.splits["test"].images[0:5]  # before the train split is done
    data.splits["train"].images[0:10]
    with pytest.raises(RuntimeError, match="in order"):
        data.splits["train"].images[20:30]


def test_memory_does_not_grow_with_n():
    """5 million images would be 15 GB if materialised; the first chunks cost a few MB."""
    before = peak.own_peak_kb()  # this process image's own high-water mark (not ru_maxrss: see measure/peak.py)
    data = synthetic.dataset(5_000_000)
    for start in range(0, 6000, 2000):
        data.splits["train"].images[start:start + 2000]
    grown_mb = (peak.own_peak_kb() - before) / 1024
    assert grown_mb < 300, grown_mb
