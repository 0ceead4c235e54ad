"""Image-folder datasets: scikit-learn's handwritten digits (1,797 real 8x8 images) exported to PNG,
loaded with `cnnsql load --images`, trained on and queried; bad folders refused with nothing loaded."""
from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest

from cnnsql.data import datasets
from cnnsql.data import image_folder
from cnnsql.core.errors import CnnsqlError
from conftest import run_cli

PIL = pytest.importorskip("PIL.Image")


def export_digits(root, limit=None):
    """The digits (0..16 grey levels) as 8-bit greyscale PNGs in DIR/<digit>/<index>.png."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for i, (img, y) in enumerate(zip(d.images[:limit], d.target[:limit])):
        folder = root / str(y)
        folder.mkdir(parents=True, exist_ok=True)
        PIL.fromarray((img * 255 / 16).round().astype(np.uint8)).save(folder / f"{i:04d}.png")
    return d


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    export_digits(root)
    return root


@pytest.fixture(scope="module")
def digits(digits_dir, target):
    proc = run_cli("load", "--images", str(digits_dir), "--dataset", "digits", "--quiet")
    assert "1x8x8, 10 classes" in proc.stdout
    return digits_dir


def rows(conn, name):
    with conn.cursor() as cur:
        cur.execute("SELECT split, id, label, file, sha256, img FROM image_dataset_image WHERE dataset = %s "
                    "ORDER BY split, id", (name,))
        out = cur.fetchall()
    conn.rollback()
    return out


def test_digits_load_all_images_with_checksums_and_a_fixed_split(digits, conn):
    from sklearn.datasets import load_digits

    d = load_digits()
    got = rows(conn, "digits")
    assert len(got) == 1797
    info = datasets.info(conn, "digits")
    assert info.shape == (1, 8, 8) and info.class_names == [str(i) for i in range(10)]
    assert info.n_train + info.n_test == 1797 and 250 < info.n_test < 470   # about 20% test
    for split, _, label, file, sha, img in got[::97]:
        index = int(file.split("/")[1][:4])
        assert label == d.target[index] and file.startswith(f"{label}/")
        assert sha == hashlib.sha256((digits / file).read_bytes()).hexdigest()
        assert np.array_equal(np.frombuffer(bytes(img), np.uint8).reshape(8, 8),
                              (d.images[index] * 255 / 16).round().astype(np.uint8))
        assert (split == "test") == image_folder.test_split(file, 0.2)


def test_views_per_dataset(digits, conn):
    with conn.cursor() as cur:
        cur.execute("SELECT count(*), min(length(img)) FROM digits_test")
        n, chars = cur.fetchone()
        cur.execute("SELECT count(*) FROM cnnsql_bytes.digits_train_bytes")
        n_train = cur.fetchone()[0]
    conn.rollback()
    info = datasets.info(conn, "digits")
    assert (n, n_train, chars) == (info.n_test, info.n_train, 88)   # base64 of 64 bytes


def test_a_corrupt_image_is_named_and_nothing_is_loaded(digits, conn, tmp_path):
    before = rows(conn, "digits")
    bad = tmp_path / "digits"
    shutil.copytree(digits, bad)
    (bad / "3" / "0003.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    proc = run_cli("load", "--images", str(bad), "--dataset", "digits", "--quiet", check=False)
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert err.startswith("cnnsql: error: 1 unreadable image(s)") and "3/0003.png" in err and "\n" not in err
    assert rows(conn, "digits") == before


def test_a_reload_replaces_and_keeps_the_same_split(digits, conn):
    before = rows(conn, "digits")
    run_cli("load", "--images", str(digits), "--dataset", "digits", "--quiet")
    assert rows(conn, "digits") == before


def small_folder(root, sizes):
    for i, (w, h) in enumerate(sizes):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        PIL.new("RGB", (w, h), (i * 40, 20, 200)).save(folder / f"{i}.png")
    return root


def test_mixed_sizes_are_refused_unless_resized(tmp_path):
    root = small_folder(tmp_path / "mixed", [(10, 10), (10, 10), (12, 9), (10, 10)])
    with pytest.raises(CnnsqlError, match=r"images of different sizes: .* is 10x10, .* is 12x9 .*nothing was loaded"):
        image_folder.read_folder(root)
    data = image_folder.read_folder(root, size=(6, 7))
    assert data.images.shape == (4, 3, 6, 7) and data.resize == "bilinear to 6x7"


def test_size_limits_apply_before_decoding(tmp_path, monkeypatch):
    root = small_folder(tmp_path / "big", [(8, 8)] * 4)
    monkeypatch.setattr(image_folder, "MAX_FILE_BYTES", 50)
    with pytest.raises(CnnsqlError, match=r"0.png \(\d+ bytes, more than 50\)"):
        image_folder.read_folder(root)
    monkeypatch.setattr(image_folder, "MAX_FILE_BYTES", 1 << 20)
    monkeypatch.setattr(image_folder, "MAX_PIXELS", 63)
    decoded = []
    monkeypatch.setattr(PIL.Image, "load", lambda self: decoded.append(self))
    with pytest.raises(CnnsqlError, match=r"8x8 pixels, more than 63"):
        image_folder.read_folder(root)
    assert decoded == []


def test_a_gif_named_png_is_refused(tmp_path):
    root = small_folder(tmp_path / "gif", [(8, 8)] * 4)
    PIL.new("RGB", (8, 8)).save(root / "a" / "1.png", format="GIF")
    with pytest.raises(CnnsqlError, match=r"a/1.png \(a GIF image, not PNG or JPEG\)"):
        image_folder.read_folder(root)


@pytest.mark.parametrize("name,message", [("cifar10", "reserved"), ("Digits", "not allowed"),
                                          ("x; drop table", "not allowed")])
def test_bad_dataset_names(name, message):
    with pytest.raises(CnnsqlError, match=message):
        datasets.check_name(name)


def test_load_needs_both_images_and_dataset(target):
    proc = run_cli("load", "--dataset", "digits", check=False)
    assert proc.returncode == 1 and "needs both --images DIR and --dataset NAME" in proc.stderr


@pytest.fixture(scope="module")
def vgg_digits(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("weights") / "digits-vgg.npz"
    proc = run_cli("train", "--dataset", "digits", "--model", "vgg", "--epochs", "2", "--framework", "torch",
                   "--out", str(out), "--quiet")
    return out, proc


def test_train_on_digits_writes_a_described_model(vgg_digits):
    from cnnsql.models.weights import load_weights

    out, proc = vgg_digits
    w = load_weights(out)
    assert w.spec.input_shape == (1, 8, 8) and w.spec.name == "vgg" and w.manifest["dataset"] == "digits"
    assert w.manifest["test_accuracy"] > 0.8, proc.stderr     # 0.99 after 2 epochs when measured


def test_bench_on_digits_through_sql(vgg_digits, conn):
    out, _ = vgg_digits
    proc = run_cli("bench", "--dataset", "digits", "--model", "vgg", "--weights", str(out), "--engines",
                   "torch,tensorflow", "--repetitions", "1", "--batch-sizes", "16", "--single-stream", "2",
                   "--sql-single-stream", "1", "--quiet")
    assert proc.returncode == 0
    with conn.cursor() as cur:
        cur.execute("""SELECT engine, kind, n_rows, accuracy, detail->>'sql_matches_raw' FROM bench_run
                       WHERE dataset_kind = 'folder:digits' AND scenario = 'offline' AND status = 'complete'
                       ORDER BY engine, kind""")
        got = cur.fetchall()
    conn.rollback()
    n_test = datasets.info(conn, "digits").n_test
    assert [(e, k, n) for e, k, n, _, _ in got] == [("tensorflow", "raw", n_test), ("tensorflow", "sql", n_test),
                                                     ("torch", "raw", n_test), ("torch", "sql", n_test)]
    assert all(acc > 0.8 for *_, acc, _ in got)
    assert [float(m) for *_, m in got if m is not None] == [1.0, 1.0]


class _Able:
    @classmethod
    def cannot_run(cls, spec):
        return None


class _Unable:
    @classmethod
    def cannot_run(cls, spec):
        return f"no plan for model {spec.name!r}"


@pytest.mark.parametrize("named", [True, False])
def test_bench_drops_or_refuses_an_engine_that_cannot_run_the_model(monkeypatch, capsys, named):
    """Every engine runs every built-in model today (Velox generates plans), so the rule is checked
    with an engine class that declares it cannot: named in --engines it is refused in one line,
    otherwise left out with a NOTE."""
    from cnnsql.bench import harness as bench
    from cnnsql.models import model_spec
    from cnnsql.bench.bench_config import BenchConfig

    monkeypatch.setattr(bench, "engine_class", lambda name: _Unable if name == "velox" else _Able)
    b = bench.Bench.__new__(bench.Bench)
    b.cfg = BenchConfig(engines=["torch", "velox"], skip_unable=not named)
    b.spec = model_spec.resolve("vgg", (1, 8, 8), 10)
    if named:
        with pytest.raises(CnnsqlError, match="no plan for model 'vgg'"):
            b._select_engines()
    else:
        b._select_engines()
        assert b.cfg.engines == ["torch"] and "NOTE: velox left out: no plan" in capsys.readouterr().err


def test_predict_on_digits_writes_one_column_per_class(vgg_digits, tmp_path, conn, loaded):
    out, _ = vgg_digits
    run_cli("predict", "--engine", "tensorflow", "--weights", str(out), "--dataset", "digits", "--out",
            str(tmp_path / "p.csv"), "--quiet")
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "id,label,predicted," + ",".join(f"p{k}" for k in range(10))
    assert len(lines) - 1 == datasets.info(conn, "digits").n_test
    proc = run_cli("predict", "--engine", "torch", "--weights", str(out), "--out", str(tmp_path / "q.csv"), check=False)
    assert proc.returncode == 1 and "model 'vgg' takes 1x8x8 images, the data is 3x32x32" in proc.stderr
