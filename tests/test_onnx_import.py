"""`cnnsql import --onnx`: a real PyTorch graph model (residual add, concatenation, depthwise conv, ReLU6,
padded pools, global average pooling, a view-flatten, batch norm kept as nodes) exported with
torch.onnx.export, imported, and run by every engine: top-1 equal to PyTorch's own and probabilities
within 1e-4. Unsupported nodes, external data and bad files are one line naming the problem."""
from __future__ import annotations

import numpy as np
import pytest

from cnnsql.core.errors import CnnsqlError
from cnnsql.engines import get_engine
from cnnsql.engines.onnx_import import from_onnx
from cnnsql.models import reference
from cnnsql.models.weights import load_weights
from conftest import run_cli

pytestmark = pytest.mark.integration  # PyTorch exports, every engine runs the import

SHAPE = (3, 10, 12)


def net(act=None):
    """Every mapped operator: Conv (no bias), BatchNormalization, Relu, Clip(0, 6), Add, Concat over
    channels and over features, padded MaxPool and AveragePool, a view-flatten (Reshape of a Shape
    chain), GlobalAveragePool + Flatten, Gemm, MatMul + Add, Dropout, Softmax. `act`: one more module
    before the classifier (for the refusal test)."""
    import torch
    from torch import nn

    F = nn.functional

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.b1 = nn.BatchNorm2d(8)
            self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
            self.pw = nn.Conv2d(8, 8, 1)
            self.mp = nn.MaxPool2d(3, 2, 1)
            self.ap = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
            self.fc1 = nn.Linear(16 * 5 * 6, 12)
            self.w2 = nn.Parameter(torch.randn(28, 5) * 0.3)
            self.b2 = nn.Parameter(torch.randn(5) * 0.1)
            self.drop = nn.Dropout(0.2)
            self.act = act or nn.Identity()

        def forward(self, x):
            y = F.relu(self.b1(self.c1(x)))
            a = F.relu6(self.pw(self.dw(y)))
            b = self.mp(y)
            z = self.ap(torch.cat([a + b, b], 1))
            f = F.relu(self.fc1(self.drop(z.view(z.size(0), -1))))
            g = torch.flatten(F.adaptive_avg_pool2d(z, 1), 1)
            h = self.act(torch.cat([f, g], 1))
            return torch.softmax(h @ self.w2 + self.b2, 1)

    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.b1.running_mean.uniform_(-0.5, 0.5)
        model.b1.running_var.uniform_(0.5, 1.5)
        model.b1.weight.uniform_(0.5, 1.5)
        model.b1.bias.uniform_(-0.2, 0.2)
    return model.eval()


def export(model, path, fold: bool):
    import torch

    torch.onnx.export(model, (torch.rand(1, *SHAPE),), str(path), dynamo=False, do_constant_folding=fold,
                      input_names=["x"], output_names=["p"], dynamic_axes={"x": {0: "n"}, "p": {0: "n"}})
    return path


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *SHAPE), dtype=np.uint8)


def pytorch_answer(model, x):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x).float() / 255).numpy()


def test_a_pytorch_graph_through_onnx_runs_in_every_engine(tmp_path):
    model = net()
    path = export(model, tmp_path / "m.onnx", fold=False)
    proc = run_cli("import", "--onnx", str(path), "--out", str(tmp_path / "m.npz"), "--classes", "a,b,c,d,e")
    assert "5 classes" in proc.stdout
    w = load_weights(tmp_path / "m.npz")
    kinds = [layer.kind for layer in w.spec.layers]
    for kind in ("batchnorm", "relu6", "add", "concat", "maxpool", "avgpool", "global_avgpool", "flatten", "dense"):
        assert kind in kinds
    assert w.manifest["imported_from"] == {"onnx": str(path)} and w.spec.version == 2
    x = images(9)
    want = pytorch_answer(model, x)
    assert np.abs(reference.forward(w.spec, w.arrays, x) - want).max() < 1e-5
    for engine, options in (("torch", {}), ("tensorflow", {}), ("velox", {"threads": 1}), ("velox", {"threads": 2})):
        e = get_engine(engine, w, **options)
        try:
            got = e.predict(x)
        finally:
            getattr(e, "close", lambda: None)()
        assert np.array_equal(got.argmax(1), want.argmax(1)), engine
        assert np.abs(got - want).max() < 1e-4, engine


def test_a_constant_folded_export_imports_too(tmp_path):
    """do_constant_folding (the exporter's default): batch norm folded into the conv, Constant nodes."""
    model = net()
    spec, arrays = from_onnx(export(model, tmp_path / "f.onnx", fold=True), "f")
    x = images(5, seed=1)
    assert np.abs(reference.forward(spec, arrays, x) - pytorch_answer(model, x)).max() < 1e-5


def test_a_one_input_concat_and_a_mean_without_keepdims(tmp_path):
    """torch.cat of one tensor (densenet's blocks) passes it on; x.mean([2, 3]) (mnasnet's head, ReduceMean
    without keepdims) is global pooling then flatten."""
    import torch
    from torch import nn

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 6, 3, padding=1)
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            return torch.softmax(self.fc(torch.cat([self.c(x)], 1).mean([2, 3])), 1)

    torch.manual_seed(1)
    model = Head().eval()
    for fold in (False, True):
        spec, arrays = from_onnx(export(model, tmp_path / f"h{fold}.onnx", fold=fold), "h")
        assert [layer.kind for layer in spec.layers] == ["conv2d", "global_avgpool", "flatten", "dense", "softmax"]
        x = images(6, seed=2)
        want = pytorch_answer(model, x)
        assert np.abs(reference.forward(spec, arrays, x) - want).max() < 1e-5
        assert np.abs(get_engine("torch", _weights(spec, arrays, tmp_path)).predict(x) - want).max() < 1e-4


def _weights(spec, arrays, tmp_path):
    from cnnsql.models import weights as W

    path = tmp_path / "h.npz"
    W.save_weights(path, arrays, {"trained_by": "onnx"}, spec)
    return W.load_weights(path)


def test_the_first_unsupported_node_is_named_in_one_line(tmp_path):
    from torch import nn

    path = export(net(nn.LeakyReLU()), tmp_path / "l.onnx", fold=True)
    with pytest.raises(CnnsqlError, match=r"l.onnx: unsupported node '.*' \(LeakyRelu\)") as exc:
        from_onnx(path, "l")
    assert "\n" not in str(exc.value)
    proc = run_cli("import", "--onnx", str(path), "--out", str(tmp_path / "l.npz"), check=False)
    assert proc.returncode != 0 and "(LeakyRelu)" in proc.stderr and not (tmp_path / "l.npz").exists()


def test_external_data_and_bad_files_are_refused(tmp_path, monkeypatch):
    import onnx

    from cnnsql.engines import onnx_import

    path = export(net(), tmp_path / "m.onnx", fold=True)
    model = onnx.load(str(path))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=0)
    with pytest.raises(CnnsqlError, match="is stored outside the file"):
        from_onnx(tmp_path / "ext.onnx", "e")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07not a protobuf" * 10)
    with pytest.raises(CnnsqlError, match="not a readable ONNX model|has 0 inputs"):
        from_onnx(tmp_path / "junk.onnx", "j")
    monkeypatch.setattr(onnx_import, "MAX_WEIGHTS_BYTES", 1000)
    with pytest.raises(CnnsqlError, match=r"bytes, more than 1,000"):
        from_onnx(path, "m")


def test_a_keras_functional_model_through_tf2onnx(tmp_path):
    """Keras (NHWC) -> tf2onnx -> cnnsql: the input transpose, depthwise conv, residual add, batch norm,
    global average pooling and squeeze; every engine gives Keras's answers."""
    tf2onnx = pytest.importorskip("tf2onnx")
    from cnnsql.engines.tensorflow_engine import import_tf

    tf = import_tf()
    L = tf.keras.layers
    tf.keras.utils.set_random_seed(3)
    inp = tf.keras.Input((SHAPE[1], SHAPE[2], SHAPE[0]))
    y = L.Conv2D(6, 3, padding="same", activation="relu")(inp)
    z = L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same")(y))
    s = L.ReLU(max_value=6.0)(L.Add()([y, z]))
    g = L.GlobalAveragePooling2D()(L.MaxPooling2D(2)(s))
    model = tf.keras.Model(inp, L.Dense(4, activation="softmax")(L.Dropout(0.1)(g)))
    bn = model.layers[3]
    rng = np.random.default_rng(4)
    bn.set_weights([rng.uniform(0.5, 1.5, 6), rng.uniform(-0.2, 0.2, 6), rng.uniform(-0.5, 0.5, 6),
                    rng.uniform(0.5, 1.5, 6)])
    model.layers[-1].set_weights([model.layers[-1].get_weights()[0], rng.uniform(-0.5, 0.5, 4)])
    sig = (tf.TensorSpec((None, SHAPE[1], SHAPE[2], SHAPE[0]), tf.float32, name="x"),)
    tf2onnx.convert.from_keras(model, input_signature=sig, opset=13, output_path=str(tmp_path / "k.onnx"))
    spec, arrays = from_onnx(tmp_path / "k.onnx", "k")
    assert spec.input_shape == SHAPE and "relu6" in [layer.kind for layer in spec.layers]
    x = images(6, seed=2)
    want = model(np.transpose(x, (0, 2, 3, 1)).astype(np.float32) / 255, training=False).numpy()
    assert np.abs(reference.forward(spec, arrays, x) - want).max() < 1e-5
    from cnnsql.models.weights import Weights

    w = Weights(arrays={k: v.astype(np.float32) for k, v in arrays.items()}, manifest={"model": spec.to_dict()})
    for engine in ("torch", "tensorflow", "velox"):
        e = get_engine(engine, w, threads=2)
        got = e.predict(x)
        getattr(e, "close", lambda: None)()
        assert np.array_equal(got.argmax(1), want.argmax(1)) and np.abs(got - want).max() < 1e-4, engine
