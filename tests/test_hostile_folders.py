"""Hostile image folders: special files and links are refused by name before anything is read, and
memory stays bounded by one decoded image plus the output, whatever the images' size on disk."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from cnnsql.core.errors import CnnsqlError
from cnnsql.data import image_folder
from cnnsql.measure import peak
from conftest import REPO

PIL = pytest.importorskip("PIL.Image")


def two_classes(root, n=2, size=(6, 5)):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            PIL.fromarray(np.full(size[::-1], 40 * i, np.uint8)).save(root / c / f"{i}.png")
    return root


def test_a_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    root = two_classes(tmp_path / "d")
    os.mkfifo(root / "a" / "x.png")
    with pytest.raises(CnnsqlError, match=r"a/x.png \(not a regular file\)"):
        image_folder.read_folder(root)


def test_a_link_to_a_device_or_outside_the_folder_is_refused(tmp_path):
    root = two_classes(tmp_path / "d")
    (root / "a" / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(CnnsqlError, match=r"a/zero.png \(a symbolic link to /dev/zero\)"):
        image_folder.read_folder(root)
    (root / "a" / "zero.png").unlink()
    elsewhere = two_classes(tmp_path / "elsewhere")
    (root / "c").symlink_to(elsewhere / "a")  # a class folder linked to images outside DIR
    with pytest.raises(CnnsqlError, match=r"holds c \(a symbolic link to .*elsewhere/a\).*nothing was loaded"):
        image_folder.read_folder(root)
    (root / "c").unlink()
    (root / "a" / "sub").symlink_to(elsewhere / "b")  # a sub-folder, the same
    with pytest.raises(CnnsqlError, match=r"a/sub \(a symbolic link"):
        image_folder.read_folder(root)
    (root / "a" / "sub").unlink()
    assert image_folder.read_folder(root).images.shape == (4, 1, 5, 6)


def test_a_file_growing_past_its_limit_while_read_is_refused(tmp_path, monkeypatch):
    root = two_classes(tmp_path / "d")
    monkeypatch.setattr(image_folder, "MAX_FILE_BYTES", 40)
    with pytest.raises(CnnsqlError, match="bytes, more than 40"):
        image_folder.read_folder(root)




@pytest.mark.integration
def test_large_images_resized_on_load_keep_memory_bounded(tmp_path, loaded):
    """40 solid 4096x4096 PNGs (about 2 MB on disk, 640 MiB decoded) loaded with --size 32x32: the load
    holds one decoded image at a time (measured peak RSS of the command's process)."""
    root = tmp_path / "big"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(20):
            PIL.new("L", (4096, 4096), 10 * i).save(root / c / f"{i}.png")
    proc = subprocess.run([sys.executable, "-m", "cnnsql.measure.peak", "-m", "cnnsql", "load", "--images", str(root),
                           "--dataset", "bigimages", "--size", "32x32", "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    peak_mb = peak.read_reported(proc.stderr)  # the CLI's own peak RSS (VmHWM), not the forked pytest's
    assert peak_mb is not None, proc.stderr
    print(f"peak RSS of `cnnsql load --images` on 40 4096x4096 PNGs with --size 32x32: {peak_mb:.0f} MB")
    assert peak_mb < 400, peak_mb  # all 40 decoded would be 640 MiB on top of the command's ~150 MB
