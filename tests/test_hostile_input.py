"""Hostile archives, weights and manifests: refused in one line, with memory bounded.

Each archive is built small and fast (a few MB on disk) but claims gigabytes; `cnnsql load` runs as
a child process whose own peak RSS (VmHWM) must stay far below what the claimed sizes would cost.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest

from cnnsql.data import cifar
from cnnsql.models import weights as W
from cnnsql.core.errors import CnnsqlError
from cnnsql.measure import peak
from conftest import REPO

pytestmark = pytest.mark.integration  # the CLI in subprocesses against hostile archives and weights

GIB = 1 << 30
RSS_LIMIT_MB = 400  # the CLI alone (numpy, psycopg2, tqdm imported) peaks at about 43 MB


def run_measured(source) -> tuple[int, str, float]:
    """(exit code, stderr, peak RSS MB) of `cnnsql load --source SOURCE` in a fresh interpreter that reports
    its own VmHWM (cnnsql.measure.peak); not os.wait4's ru_maxrss, which keeps the forked pytest's
    high-water mark across exec."""
    proc = subprocess.run([sys.executable, "-m", "cnnsql.measure.peak", "-m", "cnnsql", "load", "--quiet",
                           "--no-download", "--source", str(source)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    mb = peak.read_reported(proc.stderr)
    assert mb is not None, proc.stderr
    return proc.returncode, proc.stderr, mb


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code != 0 and "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("cnnsql: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


def tar_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.GNU_FORMAT)


def zeros_gzip(total: int) -> bytes:
    """`total` zero bytes as concatenated gzip members (one 64 MiB block compressed once, repeated)."""
    block = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
    return block * (total // (64 << 20))


def test_gzip_bomb_member_is_refused_from_its_header(tmp_path):
    """3 MB on disk, a member of 3 GiB: the size in its header is refused before a byte is read."""
    bomb = tmp_path / "bomb.tar.gz"
    head = tar_header(f"{cifar.TOP}/", 0, tarfile.DIRTYPE) + tar_header(f"{cifar.TOP}/data_batch_1", 3 * GIB)
    bomb.write_bytes(gzip.compress(head) + zeros_gzip(3 * GIB))
    assert bomb.stat().st_size < 8 << 20
    code, err, peak_mb = run_measured(bomb)
    assert_one_line(code, err, "data_batch_1", "3,221,225,472 bytes", "expected 31,035,704")
    assert peak_mb < RSS_LIMIT_MB, f"peak RSS {peak_mb:.0f} MB"
    print(f"gzip bomb ({bomb.stat().st_size:,} bytes, member 3 GiB): peak RSS {peak_mb:.0f} MB")


def test_huge_tar_header_is_refused_by_the_stream_cap(tmp_path):
    """A pax header of 3 GiB (tarfile would read it into memory whole): the capped stream stops it."""
    bomb = tmp_path / "pax.tar.gz"
    head = tar_header(f"{cifar.TOP}/", 0, tarfile.DIRTYPE) + tar_header("PaxHeader", 3 * GIB, tarfile.XHDTYPE)
    bomb.write_bytes(gzip.compress(head) + zeros_gzip(3 * GIB))
    code, err, peak_mb = run_measured(bomb)
    assert_one_line(code, err, "expands beyond")
    assert peak_mb < RSS_LIMIT_MB, f"peak RSS {peak_mb:.0f} MB"
    print(f"pax-header bomb ({bomb.stat().st_size:,} bytes, header 3 GiB): peak RSS {peak_mb:.0f} MB")


@pytest.mark.skipif(not shutil.which("tar"), reason="GNU tar makes the sparse archive")
def test_sparse_tar_is_refused(tmp_path):
    """A few hundred bytes that expand to 6 GiB (GNU sparse member)."""
    top = tmp_path / "src" / cifar.TOP
    top.mkdir(parents=True)
    with open(top / "data_batch_1", "wb") as f:
        f.truncate(6 * GIB)
    sparse = tmp_path / "sparse.tar.gz"
    subprocess.run(["tar", "--sparse", "-czf", str(sparse), "-C", str(tmp_path / "src"), cifar.TOP], check=True)
    assert sparse.stat().st_size < 4096
    code, err, peak_mb = run_measured(sparse)
    assert_one_line(code, err, "data_batch_1")
    assert peak_mb < RSS_LIMIT_MB, f"peak RSS {peak_mb:.0f} MB"
    print(f"sparse tar ({sparse.stat().st_size:,} bytes, member 6 GiB): peak RSS {peak_mb:.0f} MB")
    # the same file as an extracted folder: its size is checked before it is opened for reading
    code, err, peak_mb = run_measured(tmp_path / "src")
    assert_one_line(code, err, "data_batch_1", "6,442,450,944 bytes")
    assert peak_mb < RSS_LIMIT_MB


def test_too_many_entries_and_duplicates(tmp_path):
    many = tmp_path / "many.tar.gz"
    many.write_bytes(gzip.compress(tar_header(f"{cifar.TOP}/", 0, tarfile.DIRTYPE) * 40))
    with pytest.raises(CnnsqlError, match="more than 32 entries"):
        cifar.read_dataset(many)
    dup = tmp_path / "dup.tar.gz"
    meta = tar_header(f"{cifar.TOP}/batches.meta", 158) + b"\0" * 512
    dup.write_bytes(gzip.compress(meta * 2))
    with pytest.raises(CnnsqlError, match="batches.meta twice"):
        cifar.read_dataset(dup)


def test_fifo_source_fails_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, err, _ = run_measured(fifo)  # hung forever before: tarfile waited for a writer
    assert_one_line(code, err, "not a regular file or folder")


# --- weights files and manifests ----------------------------------------------------------------

@pytest.fixture()
def good(tmp_path):
    path = tmp_path / "w.npz"
    W.save_weights(path, W.random_weights(2).arrays, {"trained_by": "test"})
    return path


def npz_with(path, **override) -> None:
    arrays = {**W.random_weights(2).arrays, **override}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
            z.writestr(name + ".npy", buf.getvalue())


def test_weights_bomb_is_refused_before_reading(tmp_path):
    """fc1.weight of 256 MiB of zeros (256 KB compressed), five times the model: refused from the zip's size field."""
    path = tmp_path / "bomb.npz"
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (1 << 28,)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("fc1.weight.npy", "w", force_zip64=True) as f:
            f.write(buf.getvalue())
            block = b"\0" * (64 << 20)
            for _ in range(4):
                f.write(block)
    with pytest.raises(CnnsqlError, match=r"fc1.weight is 268,435,\d+ bytes, expected at most 51,445,760"):
        W.load_weights(path)


def test_weights_only_known_arrays_with_their_shapes(tmp_path):
    path = tmp_path / "w.npz"
    npz_with(path, **{"fc2.weight": np.zeros((10, 513), np.float32)})
    with pytest.raises(CnnsqlError, match=r"fc2.weight has shape \(10, 513\), expected \(10, 512\)"):
        W.load_weights(path)
    npz_with(path, **{"fc2.bias": np.zeros(10, np.int64)})
    with pytest.raises(CnnsqlError, match="fc2.bias has dtype int64, expected float"):
        W.load_weights(path)
    npz_with(path, extra=np.zeros(1 << 22, np.float64))  # an unknown array is never read
    assert set(W.load_weights(path).arrays) == set(W.SHAPES)


@pytest.mark.parametrize("text, message", [
    ("[" * 100000 + "]" * 100000, "nested deeper than 16"),
    ('{"a": "' + "x" * (2 << 20) + '"}', "at most 1,048,576"),
    ('["not", "an", "object"]', "must be a JSON object, not a list"),
    ('{"class_names": "airplane"}', "class_names must be a list of 10"),
    ('{"class_names": ["a", "b"]}', "class_names must be a list of 10"),
    ('{"architecture": ["x"]}', "'architecture' is a list, expected a string"),
    ("{nope", "not valid JSON"),
])
def test_bad_manifests_are_one_line(good, text, message):
    W.manifest_path(good).write_text(text)
    with pytest.raises(CnnsqlError, match=message.replace("(", r"\(").replace("[", r"\[")):
        W.load_weights(good)


def test_bad_manifest_through_the_cli_is_one_line(loaded, good, tmp_path):
    W.manifest_path(good).write_text("[" * 100000 + "]" * 100000)
    proc = subprocess.run([sys.executable, "-m", "cnnsql", "predict", "--engine", "torch", "--weights", str(good),
                           "--limit", "5", "--out", str(tmp_path / "p.csv")], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert_one_line(proc.returncode, proc.stderr, "nested deeper")
    assert not (tmp_path / "p.csv").exists()
