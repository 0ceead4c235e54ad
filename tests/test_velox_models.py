"""The Velox plan generator (cnnsql/engines/velox_layers.py) on every built-in model, an odd chain and a
graph using every layer kind (branches, residual add, concatenations, groups, padded pools): top-1 100% and probabilities within 1e-4 of the independent NumPy reference
(cnnsql/models/reference.py), random weights, 1 and 2 drivers, batch edges (1 image, 7 images, more
images than the 16 tickets)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cnnsql.models import model_spec as M
from cnnsql.models import weights as W
from cnnsql.engines import get_engine
from cnnsql.engines import velox_layers
from cnnsql.engines.velox_engine import check_model
from cnnsql.core.errors import CnnsqlError

from test_model_spec import EVERY, ODD

pytestmark = pytest.mark.integration  # generated Velox plans

# (spec, images per check): the 3x32x32 VGG costs ~25 M multiply-adds per image in the direct form
CASES = [(M.builtin("lenet5"), 33), (M.builtin("vgg"), 7), (M.builtin("vgg", (1, 8, 8), 10), 33),
         (M.builtin("lenet5", (1, 28, 28), 4), 7), (ODD, 33), (EVERY, 33), (M.builtin("resnet20", (3, 8, 8), 3), 7),
         (M.builtin("mobilenet_small", (2, 8, 6), 4), 7)]
IDS = [f"{s.name}-{'x'.join(map(str, s.input_shape))}-{s.num_classes}" for s, _ in CASES]


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request):
    spec, n = request.param
    weights = W.random_weights(7, spec)
    x = np.random.default_rng(8).integers(0, 256, (n, *spec.input_shape), dtype=np.uint8)
    return weights, x, W.reference_forward(weights, x)


@pytest.mark.parametrize("drivers", [1, 2])
def test_generated_plan_agrees_with_the_reference(case, drivers):
    weights, x, ref = case
    engine = get_engine("velox", weights, threads=drivers)
    try:
        assert engine.describe()["plan"] == "layers" and engine.drivers == drivers
        for n in sorted({1, 7, len(x)}):
            probs = engine.predict(x[:n])
            assert probs.shape == ref[:n].shape and probs.dtype == np.float32
            assert np.array_equal(probs.argmax(1), ref[:n].argmax(1))
            assert np.abs(probs - ref[:n]).max() < 1e-4
    finally:
        engine.close()


def test_study_cnn_keeps_its_own_plan():
    engine = get_engine("velox", W.random_weights(0))
    try:
        assert engine.describe()["plan"] == "study"
    finally:
        engine.close()


def test_batchnorm_and_relu_fold_into_the_layer_before():
    """VGG: conv-bn-relu becomes one conv step with folded weights and a fused ReLU; with Winograd
    on, conv-bn-relu-maxpool becomes one Winograd step."""
    arrays = W.random_weights(1, M.builtin("vgg")).arrays
    ops = velox_layers.build_ops(M.builtin("vgg"), arrays, winograd=False)
    kinds = [op.kind for op in ops]
    assert kinds == ["input", "conv2d", "conv2d", "maxpool", "conv2d", "conv2d", "maxpool", "dense", "dense", "softmax"]
    assert "greatest" in ops[1].projections[-1][0]
    kinds = [op.kind for op in velox_layers.build_ops(M.builtin("vgg"), arrays, winograd=True)]
    assert kinds == ["input", "conv2d", "winograd", "conv2d", "winograd", "dense", "dense", "softmax"]


@pytest.mark.parametrize("drivers", [1, 2])
def test_winograd_form_agrees_with_the_reference(drivers):
    """The generated Winograd F(4,3) conv + max-pool (off by default: slower than the direct form
    on these channel counts) on VGG with 'same' padding and folded batch-norm."""
    from cnnsql.engines.velox_engine import VeloxEngine

    spec = M.builtin("vgg", (2, 16, 8), 5)
    weights = W.random_weights(3, spec)
    x = np.random.default_rng(4).integers(0, 256, (7, *spec.input_shape), dtype=np.uint8)
    ref = W.reference_forward(weights, x)
    engine = type("WinogradVelox", (VeloxEngine,), {"WINOGRAD": True})(weights, threads=drivers)
    try:
        assert any(op.kind == "winograd" for op in engine._ops)
        probs = engine.predict(x)
        assert np.array_equal(probs.argmax(1), ref.argmax(1)) and np.abs(probs - ref).max() < 1e-4
    finally:
        engine.close()


def test_profile_of_a_generated_plan():
    engine = get_engine("velox", W.random_weights(0, M.builtin("lenet5", (1, 28, 28), 4)), threads=1)
    try:
        prof = engine.profile(np.zeros((2, 1, 28, 28), np.uint8))
        assert sum(prof.values()) > 0
    finally:
        engine.close()


def test_long_index_arrays_are_built_from_chunks():
    assert velox_layers.seq(10_000) == "sequence(0, 9999)"
    assert "8192" in velox_layers.seq(10_001)


def test_macs_of_the_direct_form():
    assert velox_layers.macs(M.STUDY) == 900 * 64 * 27 + 784 * 64 * 576 + 512 * 12544 + 10 * 512


def test_a_layer_without_generator_is_refused_in_one_line():
    spec = SimpleNamespace(name="rnn", layers=[M.Layer("lstm")])
    with pytest.raises(CnnsqlError, match="no plan generator for layer kind.*lstm.*model 'rnn'") as exc:
        check_model(spec)
    assert "\n" not in str(exc.value)


def test_images_of_another_shape_are_refused():
    weights = W.random_weights(0, M.builtin("lenet5", (1, 28, 28), 4))
    engine = get_engine("velox", weights)
    try:
        with pytest.raises(CnnsqlError, match=r"images must have shape \(N, 1, 28, 28\)"):
            engine.predict(np.zeros((2, 3, 32, 32), np.uint8))
    finally:
        engine.close()


def test_a_graph_is_one_plan_carrying_its_skip_connections():
    """resnet20: every conv-bn-relu is one step; a block's input column is carried through the
    projections of its branch until the add reads it; the plan has one source join and no other."""
    spec = M.builtin("resnet20", (3, 8, 8), 3)
    ops = velox_layers.build_ops(spec, W.random_weights(1, spec).arrays, winograd=False)
    kinds = [op.kind for op in ops]
    assert kinds.count("conv2d") == 21 and kinds.count("add") == 9 and "batchnorm" not in kinds
    assert kinds.count("relu") == 9 and kinds[-4:] == ["relu", "global_avgpool", "dense", "softmax"]
    add = ops[kinds.index("add")]
    assert len(add.reads) == 2 and add.reads[1] == ops[1].out   # the stem's output, carried past the branch
