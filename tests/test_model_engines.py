"""Every built-in model (and an odd chain and a graph using every layer kind) in PyTorch and TensorFlow,
from one weights file's description: top-1 100% and probabilities within 1e-4 of the NumPy reference."""
from __future__ import annotations

import numpy as np
import pytest

from cnnsql.models import model_spec as M
from cnnsql.models import weights as W
from cnnsql.engines import get_engine
from cnnsql.core.errors import CnnsqlError

from test_model_spec import EVERY, ODD

pytestmark = pytest.mark.integration  # the frameworks build every model

SPECS = [M.builtin(n) for n in sorted(M.BUILTINS)] + [M.builtin("vgg", (1, 8, 8), 10), M.builtin("lenet5", (1, 28, 28), 4),
                                                    M.builtin("resnet20", (1, 12, 10), 3), ODD, EVERY]
IDS = [f"{s.name}-{'x'.join(map(str, s.input_shape))}-{s.num_classes}" for s in SPECS]


@pytest.fixture(scope="module", params=SPECS, ids=IDS)
def case(request, tmp_path_factory):
    spec = request.param
    path = tmp_path_factory.mktemp("w") / f"{spec.name}.npz"
    W.save_weights(path, W.random_weights(7, spec).arrays, {"trained_by": "random"}, spec)
    weights = W.load_weights(path)
    x = np.random.default_rng(8).integers(0, 256, (40, *spec.input_shape), dtype=np.uint8)
    return weights, x, W.reference_forward(weights, x)


@pytest.mark.parametrize("engine", ["torch", "tensorflow"])
def test_engine_agrees_with_the_reference(case, engine):
    weights, x, ref = case
    probs = get_engine(engine, weights, threads=2).predict(x, batch_size=16)
    assert probs.shape == ref.shape and probs.dtype == np.float32
    assert np.array_equal(probs.argmax(1), ref.argmax(1))
    assert np.abs(probs - ref).max() < 1e-4


@pytest.mark.parametrize("engine", ["torch", "tensorflow"])
def test_images_of_another_shape_are_refused(case, engine):
    weights, x, _ = case
    c, h, w = weights.spec.input_shape
    with pytest.raises(CnnsqlError, match=rf"images must have shape \(N, {c}, {h}, {w}\)"):
        get_engine(engine, weights).predict(np.zeros((2, c, h + 1, w), np.uint8))


def test_velox_runs_other_models_through_its_plan_generator():
    """Velox builds any description's plan (agreement per model: tests/test_velox_models.py)."""
    engine = get_engine("velox", W.random_weights(0, M.builtin("lenet5")))
    try:
        assert engine.describe()["plan"] == "layers"
    finally:
        engine.close()
