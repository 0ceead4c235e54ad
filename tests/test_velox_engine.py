"""The Velox engine (real pyvelox plans) against independent NumPy, stage by stage and whole, with
asymmetric random weights (a transposed kernel, a wrong Winograd matrix or flatten order cannot pass)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from cnnsql.engines import get_engine
from cnnsql.engines import velox_plan as vp
from cnnsql.engines import velox_runtime
from cnnsql.core.errors import CnnsqlError
from cnnsql.models.weights import random_weights, reference_forward

pytestmark = pytest.mark.integration  # Velox plans and the frameworks in subprocesses


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


@pytest.fixture(scope="module")
def weights():
    return random_weights(21)


@pytest.fixture(scope="module")
def engines(weights):
    made = {d: get_engine("velox", weights, threads=d) for d in (1, 2)}
    yield made
    for engine in made.values():
        engine.close()


def numpy_stages(w, x: np.ndarray) -> dict[str, np.ndarray]:
    """Direct (non-Winograd) float64 NumPy: c1 (n, 900, 64) HWC, pooled (n, 14, 14, 64), f1 (n, 512)."""
    x = x.astype(np.float64) / 255.0
    k1, k2 = w["conv1.weight"].astype(np.float64), w["conv2.weight"].astype(np.float64)
    c1 = np.zeros((len(x), 30, 30, 64))
    for c in range(3):
        for dy in range(3):
            for dx in range(3):
                c1 += x[:, c, dy:dy + 30, dx:dx + 30, None] * k1[:, c, dy, dx]
    c1 = np.maximum(c1 + w["conv1.bias"], 0)
    c2 = np.zeros((len(x), 28, 28, 64))
    for dy in range(3):
        for dx in range(3):
            c2 += c1[:, dy:dy + 28, dx:dx + 28, :] @ k2[:, :, dy, dx].T
    c2 = np.maximum(c2 + w["conv2.bias"], 0)
    pooled = c2.reshape(len(x), 14, 2, 14, 2, 64).max(axis=(2, 4))
    flat_chw = pooled.transpose(0, 3, 1, 2).reshape(len(x), -1)  # the weights file's fc1 input order
    f1 = np.maximum(flat_chw @ w["fc1.weight"].T.astype(np.float64) + w["fc1.bias"], 0)
    return {"c1": c1.reshape(len(x), 900, 64), "pooled": pooled, "f1": f1}


def test_winograd_f43_matrices_compute_conv2_and_pool():
    # NumPy only: the F(4,3) matrices and U = G g G^T reproduce a direct 3x3 convolution of one tile.
    rng = np.random.default_rng(3)
    d = rng.standard_normal((6, 6, 64))
    g = rng.standard_normal((64, 64, 3, 3))
    u = vp.winograd_u(g).astype(np.float64).reshape(6, 6, 64, 64)
    v = np.einsum("ia,abc,jb->ijc", vp.BT, d, vp.BT)
    y = np.einsum("ia,abo,jb->ijo", vp.AT, np.einsum("ijoc,ijc->ijo", u, v), vp.AT)
    direct = np.array([[np.einsum("abc,ocab->o", d[r:r + 3, s:s + 3], g) for s in range(4)] for r in range(4)])
    assert np.abs(y - direct).max() < 1e-4


def test_h_order_is_the_pooled_map_permuted():
    order = vp.H_ORDER
    assert sorted(order) == list(range(12544))
    # h[i], i = ((2 pa + pb) * 49 + 7 ti + tj) * 64 + o, is pooled pixel (2 ti + pa, 2 tj + pb), channel o
    assert order[(1 * 49 + 0) * 64 + 5] == (0 * 14 + 1) * 64 + 5                 # pa=0, pb=1, tile (0, 0)
    assert order[(2 * 49 + 7 * 3 + 6) * 64 + 63] == (7 * 14 + 12) * 64 + 63      # pa=1, pb=0, tile (3, 6)


def test_stages_match_numpy(engines, weights):
    x = images(3, seed=5)
    ref = numpy_stages(weights, x)
    engine = engines[1]
    c1 = engine.run_stage(x, "conv1", 900 * 64).reshape(3, 900, 64)
    assert np.abs(c1 - ref["c1"]).max() < 1e-5
    h = engine.run_stage(x, "winograd_out", 12544)
    assert np.abs(h - ref["pooled"].reshape(3, -1)[:, vp.H_ORDER]).max() < 1e-4
    f1 = engine.run_stage(x, "fc1", 512)
    assert np.abs(f1 - ref["f1"]).max() < 1e-4
    lg = engine.run_stage(x, "fc2", 10)
    ref_lg = ref["f1"] @ weights["fc2.weight"].T.astype(np.float64) + weights["fc2.bias"]
    assert np.abs(lg - ref_lg).max() < 1e-4


@pytest.mark.parametrize("drivers", [1, 2])
@pytest.mark.parametrize("n", [1, 7, 33])  # 33: more than the 16 image tickets and than a 32-image batch
def test_velox_matches_reference(engines, weights, drivers, n):
    x = images(n, seed=n)
    ref = reference_forward(weights, x)
    probs = engines[drivers].predict(x)
    assert probs.shape == (n, 10) and probs.dtype == np.float32
    assert np.abs(probs - ref).max() < 1e-4
    assert np.array_equal(probs.argmax(1), ref.argmax(1))
    assert engines[drivers].describe()["drivers"] == drivers


def test_profile_names_every_stage(engines):
    cpu = engines[2].profile(images(2, seed=9))
    for stage in ("source", "conv1", "winograd_in", "winograd_dot", "winograd_out", "fc1", "fc2", "softmax"):
        assert cpu.get(stage, 0) > 0, (stage, cpu)


def test_scratch_files_are_private_never_rewritten_and_removed(weights):
    engine = get_engine("velox", weights, threads=2)
    folder = engine._scratch.path
    files = sorted(os.listdir(folder))
    assert len(files) == engine.TICKETS + engine.FC1_BLOCKS and oct(os.stat(folder).st_mode & 0o777) == "0o700"
    engine.predict(images(3, seed=1))
    assert sorted(os.listdir(folder)) == files  # nothing written per call
    path = os.path.join(folder, files[0])
    with pytest.raises(FileExistsError):
        velox_runtime.write_dwrf(vp.fc2_batch(velox_runtime.load().pa, engine._arrays), path)
    engine.close()
    assert not os.path.exists(folder)


def test_folders_of_dead_processes_are_removed_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(velox_runtime.tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"cnnsql-velox-{int(dead.stdout)}-abcd1234-x"
    live = tmp_path / f"cnnsql-velox-{os.getppid()}-abcd1234-y"
    other = tmp_path / "cnnsql-velox-old-z"
    for folder in (orphan, live, other):
        folder.mkdir()
    folder = velox_runtime.ScratchFolder()
    assert not orphan.exists() and live.exists() and other.exists() and os.path.isdir(folder.path)
    folder.remove()
    assert not os.path.exists(folder.path)


IMPORT_ORDER_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.WARNING)
import tensorflow  # noqa: F401  (exports its own RE2 into the global symbol scope)
if sys.argv[1] == "pyvelox-after-tf":
    import pyvelox.runner  # noqa: F401  (loaded by other code after TensorFlow, without cnnsql's loader)
import numpy as np
from cnnsql.engines import get_engine
from cnnsql.models.weights import random_weights, reference_forward
w = random_weights(23)
images = np.random.default_rng(23).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
engine = get_engine("velox", w, threads=2)
diff = np.abs(engine.predict(images) - reference_forward(w, images)).max()
d = engine.describe()
print(d["source"], d["drivers"], bool(d["fallback"]), diff < 1e-4)
"""


@pytest.mark.parametrize("mode, expected", [("tf-first", "table_scan 2 False True"),
                                            ("pyvelox-after-tf", "values 1 True True")])
def test_tensorflow_loaded_first(mode, expected):
    # A fresh process each: what was loaded before Velox is the point. cnnsql's loader opens libvelox
    # with RTLD_DEEPBIND, so TensorFlow first no longer breaks the DWRF writer; when pyvelox was loaded
    # by other code after TensorFlow, the engine falls back to one driver and says so.
    proc = subprocess.run([sys.executable, "-c", IMPORT_ORDER_SCRIPT, mode], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == expected, proc.stdout
    assert ("DWRF writer fails" in proc.stderr) == (mode == "pyvelox-after-tf")


def test_velox_is_cpu_only():
    with pytest.raises(CnnsqlError, match="cannot run on device 'cuda'"):
        get_engine("velox", random_weights(0), device="cuda")


def test_bench_sizes_come_from_the_engine_class():
    from cnnsql.bench.harness import BenchConfig

    assert BenchConfig().n_images("velox", 10_000) == 1000 and BenchConfig().n_images("torch", 10_000) == 10_000
    assert BenchConfig(sample=4, limit=300).n_images("velox", 10_000) == 4
    assert BenchConfig(sample=4, limit=300).n_images("torch", 10_000) == 300
    assert BenchConfig(full=True, limit=300).n_images("velox", 10_000) == 10_000
    assert BenchConfig().n_images("velox", 500) == 500


def test_bench_repetitions_default_per_engine():
    """Velox declares 2 timed passes per offline phase and 1 in PostgreSQL (the 15-minute budget);
    --repetitions overrides both."""
    from cnnsql.bench.harness import BenchConfig
    assert BenchConfig().reps("velox") == 2 and BenchConfig().reps("torch") == 3 and BenchConfig().reps() == 3
    assert BenchConfig().reps("velox", indb=True) == 1 and BenchConfig().reps("torch", indb=True) == 3
    assert BenchConfig(repetitions=5).reps("velox") == 5 and BenchConfig(repetitions=1).reps("torch") == 1
    assert BenchConfig(repetitions=4).reps("velox", indb=True) == 4
