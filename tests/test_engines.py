"""Torch and TensorFlow engines against the NumPy reference, weight round trips, and a training smoke test.

Both frameworks load in this one process on purpose: the CLI may use both in one run.
"""
from __future__ import annotations

import numpy as np
import pytest

from cnnsql.engines import engine_class, get_engine
from cnnsql.core.errors import CnnsqlError
from cnnsql.models.weights import Weights, load_weights, random_weights, reference_forward, save_weights

pytestmark = pytest.mark.integration  # the three frameworks, trained and run

ENGINES = ("torch", "tensorflow")


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


@pytest.fixture(scope="module")
def weights() -> Weights:
    return random_weights(7)


@pytest.fixture(scope="module")
def engines(weights):
    return {name: get_engine(name, weights, threads=2) for name in ENGINES}


@pytest.mark.parametrize("name", ENGINES)
@pytest.mark.parametrize("n", [1, 5, 70])  # 70: more than one 64-image chunk
def test_matches_reference(engines, weights, name, n):
    x = images(n, seed=n)
    ref = reference_forward(weights, x)
    p = engines[name].predict_proba(x)
    assert p.dtype == np.float32 and p.shape == (n, 10)
    np.testing.assert_allclose(p, ref, atol=1e-4, rtol=0)
    assert (p.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("name", ENGINES)
def test_predict_batches_and_flat_rows(engines, weights, name):
    x = images(37, seed=3)
    e = engines[name]
    full = e.predict_proba(x)
    np.testing.assert_allclose(e.predict(x.reshape(37, 3072), batch_size=10), full, atol=1e-6)
    assert e.predict(x[:0]).shape == (0, 10)


def test_engines_agree_in_one_process(engines):
    x = images(40, seed=11)
    p_torch, p_tf = (engines[n].predict_proba(x) for n in ENGINES)
    np.testing.assert_allclose(p_torch, p_tf, atol=1e-4)
    assert engines["torch"].describe()["torch"] and engines["tensorflow"].describe()["tensorflow"]


@pytest.mark.parametrize("opts", [{"mode": "eager", "chunk": None}, {"mode": "channels_last", "chunk": 4}])
def test_torch_modes(weights, opts):
    x = images(9, seed=5)
    p = get_engine("torch", weights, threads=2, **opts).predict_proba(x)
    np.testing.assert_allclose(p, reference_forward(weights, x), atol=1e-4, rtol=0)


def test_torch_relus_run_in_place_with_the_same_outputs(engines, weights):
    """The engine's chain overwrites each ReLU's input (one buffer less per ReLU), and gives exactly what
    the model built without it gives; the model for training keeps its ReLUs out of place."""
    import torch

    from cnnsql.engines.torch_engine import build_model, load_arrays

    engine = engines["torch"]
    assert engine._model.steps.count(torch.relu_) == 3 and torch.relu not in engine._model.steps
    plain = build_model(weights.spec)
    assert torch.relu_ not in plain.steps
    load_arrays(plain, weights.arrays, weights.spec)
    plain = plain.eval().to(memory_format=torch.channels_last)
    for x in (images(64, seed=3), images(6, seed=4)):  # the same calls (a batch's size picks the kernels)
        with torch.inference_mode():
            t = torch.from_numpy(x).to(torch.float32).div_(255.0).contiguous(memory_format=torch.channels_last)
            want = torch.softmax(plain(t), dim=1).numpy()
        np.testing.assert_array_equal(engine.forward(x), want)


def test_weights_round_trip(tmp_path, engines, weights):
    path = tmp_path / "w.npz"
    save_weights(path, weights.arrays, {"trained_by": "test"})
    loaded = load_weights(path)
    x = images(8, seed=2)
    for name in ENGINES:
        again = get_engine(name, loaded, threads=2).predict_proba(x)
        np.testing.assert_array_equal(again, engines[name].predict_proba(x))


def test_unknown_engine(weights):
    with pytest.raises(CnnsqlError, match="unknown engine"):
        get_engine("caffe", weights)


@pytest.mark.parametrize("name", ENGINES)
def test_cuda_without_gpu(weights, name):
    cls = engine_class(name)
    try:
        cls(weights, device="cuda")
    except CnnsqlError as exc:
        assert "cuda" in str(exc)
    # on a machine with a GPU, constructing it succeeds: nothing to check


@pytest.mark.parametrize("name", ENGINES)
def test_export_layout_round_trip(name, weights):
    """neutral -> framework model -> neutral is exact (kernel transposes and fc1 permutation)."""
    import importlib

    mod = importlib.import_module(f"cnnsql.engines.{name}_engine")
    model = mod.build_model()
    mod.load_arrays(model, weights.arrays)
    out = mod.export_arrays(model)
    for k, v in weights.arrays.items():
        np.testing.assert_array_equal(out[k], v, err_msg=k)


@pytest.mark.parametrize("name", ENGINES)
def test_train_smoke(name):
    from cnnsql.engines.train import train

    rng = np.random.default_rng(0)
    x, y = images(192, seed=1), rng.integers(0, 10, 192)
    xt, yt = images(64, seed=2), rng.integers(0, 10, 64)
    arrays, h = train(name, x, y, xt, yt, epochs=1, batch_size=64, seed=0, threads=2, progress=False)
    assert set(arrays) == set(random_weights(0).arrays)
    assert h["framework"] == name and len(h["epochs"]) == 1
    e = h["epochs"][0]
    assert e["epoch"] == 1 and e["seconds"] > 0 and np.isfinite(e["loss"]) and 0 <= e["accuracy"] <= 1
    assert 0 <= h["test_accuracy"] <= 1
    # the engine on the exported weights reproduces the trained model exactly
    assert h["export_max_abs_diff"] < 1e-5 and h["export_argmax_agreement"] == 1.0
    p = get_engine(name, Weights(arrays), threads=2).predict(xt)
    assert h["test_accuracy"] == pytest.approx(float((p.argmax(1) == yt).mean()))
    # and the other framework agrees with it
    other = get_engine(ENGINES[1 - ENGINES.index(name)], Weights(arrays), threads=2).predict(xt)
    np.testing.assert_allclose(other, p, atol=1e-4)


def test_train_is_seeded():
    from cnnsql.engines.train import train

    rng = np.random.default_rng(1)
    x, y = images(128, seed=4), rng.integers(0, 10, 128)
    a1, _ = train("torch", x, y, x[:32], y[:32], epochs=1, batch_size=64, seed=3, threads=2, progress=False)
    a2, _ = train("torch", x, y, x[:32], y[:32], epochs=1, batch_size=64, seed=3, threads=2, progress=False)
    for k in a1:
        np.testing.assert_array_equal(a1[k], a2[k], err_msg=k)


def test_train_rejects_bad_input():
    from cnnsql.engines.train import train

    x = images(4)
    with pytest.raises(CnnsqlError, match="cannot train"):
        train("velox", x, np.zeros(4), x, np.zeros(4), epochs=1, batch_size=2, seed=0)
    with pytest.raises(CnnsqlError, match="labels"):
        train("torch", x, np.full(4, 12), x, np.zeros(4), epochs=1, batch_size=2, seed=0)


@pytest.mark.parametrize("name", ENGINES)
def test_the_base_class_validates_once_and_forward_sees_chunks(engines, weights, name, monkeypatch):
    """One validation per call (base.check_images), then `forward` gets (n, 3, 32, 32) uint8 pieces
    of at most the engine's chunk and the batch: 150 images in batches of 100 with chunk 64 run as
    64, 64, 22 (the executed batch the benchmark logs is 64)."""
    from cnnsql.engines import base

    engine = engines[name]
    checks, seen = [], []
    real_check, real_forward = base.check_images, engine.forward
    monkeypatch.setattr(base, "check_images", lambda *a, **k: checks.append(1) or real_check(*a, **k))
    monkeypatch.setattr(engine, "forward", lambda x: seen.append(x.shape) or real_forward(x))
    x = images(150, seed=4)
    p = engine.predict(x.reshape(150, -1), batch_size=100)
    assert len(checks) == 1
    assert [s[0] for s in seen] == [64, 64, 22] and all(s[1:] == (3, 32, 32) for s in seen)
    assert engine.executed_batch(100) == 64 and engine.executed_batch(16) == 16
    np.testing.assert_allclose(p, reference_forward(weights, x), atol=1e-4)
    with pytest.raises(CnnsqlError, match="uint8"):
        engine.predict_proba(x.astype(np.float32))
    empty = engine.predict_proba(x[:0])
    assert empty.shape == (0, 10) and empty.dtype == np.float32
    with pytest.raises(CnnsqlError, match="batch size must be at least 1"):
        engine.predict(x, batch_size=-4)


def test_engines_cap_images_in_flight_by_the_largest_activation():
    from cnnsql.engines import get_engine
    from cnnsql.models import model_spec as M
    from cnnsql.models import weights as W

    spec = M.resolve("study", (3, 32, 32), 10)
    engine = get_engine("torch", W.random_weights(0, spec), threads=1)
    assert engine.executed_batch(10_000) == min(engine.chunk or 10_000, M.MAX_BATCH_ACTIVATION // 57_600)
