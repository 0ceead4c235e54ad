"""Each example in examples/ runs against the real database, EvaDB and engines."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO


def run_example(name, *args, env=None):
    proc = subprocess.run([sys.executable, f"examples/{name}", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_query_evadb(random_weights_file, loaded):
    out = run_example("query_evadb.py", "--limit", "5", env={"CNNSQL_WEIGHTS": str(random_weights_file)})
    assert "class_name" in out and "5 rows in" in out


def test_results_plot(bench_session, tmp_path):
    out = run_example("results_plot.py", "--out", str(tmp_path / "e.png"))
    assert "plot written" in out and (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    assert "torch" in out


def test_classify_png(random_weights_file, loaded, tmp_path):
    picture = tmp_path / "frog.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(picture)
    out = run_example("classify_png.py", str(picture), "--engine", "TensorflowCNN",
                      env={"CNNSQL_WEIGHTS": str(random_weights_file)})
    assert out.startswith("frog.png: ") and "(p=" in out


@pytest.mark.integration   # runs the CLI and every engine
@pytest.mark.parametrize("source", ["torch", "keras"])
def test_import_onnx(source, tmp_path):
    if source == "keras":
        pytest.importorskip("tf2onnx")
    out = run_example("import_onnx.py", "--from", source, "--dir", str(tmp_path))
    assert "(cnnsql model v2)" in out and f"every engine gives {source}'s answers" in out
    for engine in ("torch", "tensorflow", "velox", "onnxruntime"):
        assert f"{engine}: top-1 8/8 as {source}" in out
    assert (tmp_path / "model.npz").is_file() and (tmp_path / "model.json").is_file()
