"""`cnnsql import`: a PyTorch nn.Sequential (state dict + module list) and a Keras Sequential file become
weights files whose engines give the source framework's answers; unsupported layers are named."""
from __future__ import annotations

import numpy as np
import pytest

from cnnsql.engines import importer
from cnnsql.models import reference
from cnnsql.engines import get_engine
from cnnsql.core.errors import CnnsqlError
from cnnsql.models.weights import load_weights
from conftest import run_cli

pytestmark = pytest.mark.integration  # PyTorch and Keras models converted


def images(n, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def torch_model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, kernel_size=3, stride=2, bias=False), nn.ReLU(), nn.AvgPool2d(2, stride=1),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(8 * 2 * 1, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 5))
    with torch.no_grad():
        for m in model:
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def test_a_torch_sequential_imports_and_gives_its_answers(tmp_path):
    import torch

    model = torch_model()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    (tmp_path / "modules.txt").write_text(str(model))
    proc = run_cli("import", "--torch", str(tmp_path / "sd.pt"), "--modules", str(tmp_path / "modules.txt"),
                   "--input", "3x16x12", "--out", str(tmp_path / "mine.npz"))
    assert "5 classes" in proc.stdout
    w = load_weights(tmp_path / "mine.npz")
    x = images(20, (3, 16, 12))
    with torch.no_grad():
        want = torch.softmax(model(torch.from_numpy(x).float() / 255), 1).numpy()
    assert np.abs(reference.forward(w.spec, w.arrays, x) - want).max() < 1e-5
    for engine in ("torch", "tensorflow"):
        got = get_engine(engine, w, threads=2).predict(x)
        assert np.array_equal(got.argmax(1), want.argmax(1)) and np.abs(got - want).max() < 1e-4


def keras_model():
    from cnnsql.engines.tensorflow_engine import import_tf

    tf = import_tf()
    L = tf.keras.layers
    tf.keras.utils.set_random_seed(1)
    model = tf.keras.Sequential([
        tf.keras.Input((12, 10, 3)), L.Conv2D(4, 3, padding="same", activation="relu"), L.BatchNormalization(),
        L.MaxPooling2D(2), L.Conv2D(5, 3, strides=2), L.ReLU(), L.AveragePooling2D(2, strides=1), L.Flatten(),
        L.Dense(6, activation="relu"), L.Dropout(0.2), L.Dense(4, activation="softmax")])
    bn = model.layers[1]
    rng = np.random.default_rng(2)
    bn.set_weights([rng.uniform(0.5, 1.5, 4), rng.uniform(-0.2, 0.2, 4), rng.uniform(-0.5, 0.5, 4),
                    rng.uniform(0.5, 1.5, 4)])
    return model


def test_a_keras_sequential_imports_and_gives_its_answers(tmp_path):
    model = keras_model()
    model.save(tmp_path / "m.keras")
    spec, arrays = importer.from_keras(tmp_path / "m.keras", "k")
    assert spec.architecture().startswith("conv4k3same-relu-batchnorm-maxpool2-conv5k3s2-relu-avgpool2s1")
    run_cli("import", "--keras", str(tmp_path / "m.keras"), "--out", str(tmp_path / "k.npz"), "--classes", "a,b,c,d")
    w = load_weights(tmp_path / "k.npz")
    x = images(20, (3, 12, 10), seed=3)
    want = model(x.transpose(0, 2, 3, 1).astype(np.float32) / 255, training=False).numpy()
    assert np.abs(reference.forward(w.spec, w.arrays, x) - want).max() < 1e-5
    for engine in ("torch", "tensorflow"):
        got = get_engine(engine, w, threads=2).predict(x)
        assert np.array_equal(got.argmax(1), want.argmax(1)) and np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("line,message", [
    ("(2): LSTM(4, 8)", r"unsupported layer \(2\) LSTM"),
    ("(2): Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1), dilation=(2, 2))", "with dilation or groups"),
    ("(2): Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1), padding=(2, 2))", "padding 2 with kernel 3"),
    ("(2): MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=True)", "ceil_mode"),
])
def test_unsupported_torch_modules_are_named(line, message, tmp_path):
    text = f"Sequential(\n  (0): Conv2d(3, 3, kernel_size=(1, 1), stride=(1, 1))\n  (1): ReLU()\n  {line}\n)"
    (tmp_path / "m.txt").write_text(text)
    (tmp_path / "sd.pt").write_bytes(b"unused")
    with pytest.raises(CnnsqlError, match=message):
        importer.from_torch(tmp_path / "sd.pt", tmp_path / "m.txt", (3, 8, 8), "m")


def test_unsupported_keras_layer_is_named_in_one_line(tmp_path):
    from cnnsql.engines.tensorflow_engine import import_tf

    tf = import_tf()
    L = tf.keras.layers
    tf.keras.Sequential([tf.keras.Input((8, 8, 1)), L.Conv2D(2, 3), L.LeakyReLU(), L.Flatten(), L.Dense(3)]).save(
        tmp_path / "m.keras")
    proc = run_cli("import", "--keras", str(tmp_path / "m.keras"), "--out", str(tmp_path / "x.npz"), check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "unsupported layer 'leaky_re_lu' (LeakyReLU)" in proc.stderr
    assert not (tmp_path / "x.npz").exists()


def test_a_pickle_with_code_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    (tmp_path / "sd.pt").write_bytes(pickle.dumps(Evil()))
    (tmp_path / "m.txt").write_text("(0): Flatten(start_dim=1, end_dim=-1)\n(1): Linear(in_features=3, out_features=2)")
    with pytest.raises(CnnsqlError, match="is not a readable state dict"):
        importer.from_torch(tmp_path / "sd.pt", tmp_path / "m.txt", (3, 1, 1), "m")
