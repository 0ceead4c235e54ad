"""The Velox engine (real pyvelox plans) against the NumPy reference, with asymmetric random weights."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cnnsql.engines import get_engine
from cnnsql.errors import CnnsqlError
from cnnsql.weights import random_weights, reference_forward


def test_velox_matches_reference():
    w = random_weights(21)
    images = np.random.default_rng(21).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    probs = get_engine("velox", w).predict(images)
    ref = reference_forward(w, images)
    assert probs.shape == (3, 10) and probs.dtype == np.float32
    assert np.abs(probs - ref).max() < 1e-4
    assert np.array_equal(probs.argmax(1), ref.argmax(1))


def test_velox_two_drivers_give_the_same_answer():
    w = random_weights(22)
    images = np.random.default_rng(22).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    assert np.abs(get_engine("velox", w, threads=2).predict(images) - reference_forward(w, images)).max() < 1e-4


DRIVERS_SCRIPT = """
import sys
if sys.argv[1] == "primed-then-tf":
    from cnnsql.engines.velox_engine import prime_dwrf_writer
    prime_dwrf_writer()
if sys.argv[1] != "velox-only":
    import tensorflow  # noqa: F401  (breaks an unused DWRF writer's config parser in this process)
import numpy as np
from cnnsql.engines import get_engine
from cnnsql.weights import random_weights, reference_forward
w = random_weights(23)
images = np.random.default_rng(23).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
engine = get_engine("velox", w, threads=2)
diff = np.abs(engine.predict(images) - reference_forward(w, images)).max()
print(engine.source, diff < 1e-4)
"""


@pytest.mark.parametrize("mode, source", [("velox-only", "table_scan"), ("tf-first", "values"),
                                          ("primed-then-tf", "table_scan")])
def test_velox_parallel_scan_and_its_fallback(mode, source):
    # A fresh process each: which source works depends on what was loaded before Velox.
    proc = subprocess.run([sys.executable, "-c", DRIVERS_SCRIPT, mode], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == [source, "True"], proc.stdout


def test_velox_is_cpu_only():
    with pytest.raises(CnnsqlError, match="cannot run on device 'cuda'"):
        get_engine("velox", random_weights(0), device="cuda")
