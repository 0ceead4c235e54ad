"""Unit tests of the EvaDB functions' image decoding: good rows exact, bad rows flagged, never shifted."""
from __future__ import annotations

import base64

import numpy as np
import pandas as pd

from cnnsql.placements.evadb_function import decode_images


def b64(arr: np.ndarray) -> str:
    return base64.b64encode(arr.tobytes()).decode()


def test_fast_path_is_exact():
    imgs = np.random.default_rng(0).integers(0, 256, (50, 3072), dtype=np.uint8)
    out, ok = decode_images(pd.Series([b64(i) for i in imgs]))
    assert ok.all() and np.array_equal(out, imgs)


def test_bad_rows_are_flagged_and_good_rows_not_shifted():
    imgs = np.random.default_rng(1).integers(0, 256, (4, 3072), dtype=np.uint8)
    good = [b64(i) for i in imgs]
    broken = good[1][:-4] + "!!!!"          # right length, invalid characters
    column = pd.Series([good[0], None, broken, "QUJD", good[2][:100] + "\n" + good[2][100:], good[3]])
    out, ok = decode_images(column)
    assert ok.tolist() == [True, False, False, False, False, True]
    assert np.array_equal(out, imgs[[0, 3]])


def test_other_image_sizes_with_base64_padding():
    """A 1x8x8 model's 64-byte images: 88 characters with '==' padding, so no concatenated fast path."""
    imgs = np.random.default_rng(2).integers(0, 256, (5, 64), dtype=np.uint8)
    column = pd.Series([b64(imgs[0]), b64(imgs[1]), b64(imgs[2])[:-2] + "AA", None, bytes(imgs[4])])
    out, ok = decode_images(column, 64)
    assert ok.tolist() == [True, True, False, False, True]
    assert np.array_equal(out, imgs[[0, 1, 4]])
    out, ok = decode_images(pd.Series([bytes(i) for i in imgs]), 64)
    assert ok.all() and np.array_equal(out, imgs)
