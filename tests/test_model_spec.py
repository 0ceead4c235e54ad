"""The model description: shapes, parameters, JSON, the study CNN's mapping, the NumPy reference pass."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cnnsql.models import model_spec as M
from cnnsql.models import reference
from cnnsql.models import weights as W
from cnnsql.core.errors import CnnsqlError

OLD_SHAPES = {
    "conv1.weight": (64, 3, 3, 3), "conv1.bias": (64,), "conv2.weight": (64, 64, 3, 3), "conv2.bias": (64,),
    "fc1.weight": (512, 64 * 14 * 14), "fc1.bias": (512,), "fc2.weight": (10, 512), "fc2.bias": (10,),
}


def images(n, shape=(3, 32, 32), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def test_study_cnn_is_the_old_eight_array_layout():
    assert M.STUDY.param_shapes() == OLD_SHAPES
    assert list(M.STUDY.param_shapes()) == list(OLD_SHAPES)
    assert M.STUDY.architecture() == "conv64k3-relu-conv64k3-relu-maxpool2-flatten_chw-dense512-relu-dense10-softmax"
    assert M.STUDY.shapes[4] == (64, 14, 14) and M.STUDY.num_classes == 10


@pytest.mark.parametrize("name", sorted(M.BUILTINS))
def test_builtins_round_trip_through_json(name):
    spec = M.builtin(name)
    again = M.from_json(spec.to_json())
    assert again == spec and again.shapes == spec.shapes and again.param_shapes() == spec.param_shapes()
    assert spec.num_classes == 10


def test_shape_inference_of_lenet_and_vgg():
    lenet = M.builtin("lenet5")
    assert lenet.shapes[0] == (6, 32, 32) and lenet.shapes[2] == (6, 16, 16) and lenet.shapes[5] == (16, 6, 6)
    assert lenet.param_shapes()["fc1.weight"] == (120, 16 * 6 * 6)
    vgg = M.builtin("vgg", (1, 8, 8), 7)
    assert vgg.param_shapes()["fc1.weight"] == (256, 64 * 2 * 2) and vgg.num_classes == 7
    assert vgg.param_shapes()["bn3.running_var"] == (64,)


def test_same_padding_follows_tensorflow():
    assert M.same_padding(32, 3, 1) == (1, 1)
    assert M.same_padding(32, 3, 2) == (0, 1)     # output 16: (15*2 + 3 - 32) = 1, extra after
    assert M.same_padding(7, 4, 1) == (1, 2)
    spec = M.ModelSpec("s", (1, 7, 7), (M.conv2d("c", 2, 3, 2, "same"), M.FLATTEN, M.dense("d", 3), M.SOFTMAX))
    assert spec.shapes[0] == (2, 4, 4)


@pytest.mark.parametrize("layers,message", [
    ((M.conv2d("c", 4, 3), M.dense("d", 3), M.SOFTMAX), "put a flatten layer"),
    ((M.conv2d("c", 4, 3, stride=3), M.FLATTEN, M.dense("d", 3), M.SOFTMAX), "stride must be 1 or 2"),
    ((M.conv2d("c", 4, 9), M.FLATTEN, M.dense("d", 3), M.SOFTMAX), "kernel 9 is larger than its 8x8 input"),
    ((M.FLATTEN, M.dense("d", 3)), "last layer must be softmax"),
    ((M.FLATTEN, M.SOFTMAX, M.dense("d", 3), M.SOFTMAX), "only as the last layer"),
    ((M.FLATTEN, M.dense("d", 3), M.dense("d", 3), M.SOFTMAX), "unique identifier name"),
    ((M.conv2d("c", 4, 3), M.SOFTMAX), "not class scores"),
    ((M.conv2d("c", 4, 3, padding="full"), M.FLATTEN, M.dense("d", 3), M.SOFTMAX), "padding must be"),
])
def test_bad_descriptions_are_named(layers, message):
    with pytest.raises(CnnsqlError, match=message):
        M.ModelSpec("bad", (1, 8, 8), layers)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(version=3), "version 3 is not supported"),
    (lambda d: d.update(format="keras"), "not a cnnsql model description"),
    (lambda d: d["layers"].insert(0, {"kind": "lstm"}), "unsupported kind 'lstm'"),
    (lambda d: d["layers"][0].update(dilation=2), "unknown fields"),
    (lambda d: d["layers"][0].update(kernel="3"), "'kernel' must be an integer"),
    (lambda d: d.update(input=[3, 32]), r"\[channels, height, width\]"),
])
def test_bad_json_is_named(mutate, message):
    d = M.STUDY.to_dict()
    mutate(d)
    with pytest.raises(CnnsqlError, match=message):
        M.from_json(json.dumps(d), "test.json")


def test_json_defaults_are_filled():
    spec = M.from_dict({"format": M.FORMAT, "version": 1, "input": [1, 8, 8], "layers": [
        {"kind": "conv2d", "name": "c", "filters": 2, "kernel": 3}, {"kind": "maxpool", "kernel": 2},
        {"kind": "batchnorm", "name": "b"}, {"kind": "dropout"}, {"kind": "flatten"},
        {"kind": "dense", "name": "d", "units": 3}, {"kind": "softmax"}]})
    c, p, b, d = spec.layers[:4]
    assert (c.stride, c.padding, p.stride, b.eps, d.rate) == (1, "valid", 2, 1e-5, 0.5)


def old_reference(arrays, x):
    """The study CNN's forward pass as cnnsql computed it before model descriptions (kept verbatim)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, 3, 32, 32) / 255.0

    def conv_relu(x, w, b):
        n, c, h, wd = x.shape
        oh, ow = h - 2, wd - 2
        cols = np.stack([x[:, :, i:i + oh, j:j + ow] for i in range(3) for j in range(3)], axis=2)
        y = np.einsum("nckhw,ock->nohw", cols, w.reshape(w.shape[0], c, 9).astype(np.float64))
        return np.maximum(y + b.astype(np.float64)[None, :, None, None], 0.0)

    x = conv_relu(x, arrays["conv1.weight"], arrays["conv1.bias"])
    x = conv_relu(x, arrays["conv2.weight"], arrays["conv2.bias"])
    n = x.shape[0]
    x = x.reshape(n, 64, 14, 2, 14, 2).max(axis=(3, 5)).reshape(n, -1)
    x = np.maximum(x @ arrays["fc1.weight"].T.astype(np.float64) + arrays["fc1.bias"], 0.0)
    logits = x @ arrays["fc2.weight"].T.astype(np.float64) + arrays["fc2.bias"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_reference_of_the_study_cnn_matches_the_old_one():
    w = W.random_weights(3)
    x = images(6)
    assert np.allclose(W.reference_forward(w, x), old_reference(w.arrays, x), rtol=0, atol=1e-12)


def torch_functional(spec, arrays, x):
    """A second, framework-built forward pass (torch.nn.functional, float64) of any graph, to check the
    reference's padding, strides, groups, pooling, batch-norm and merges against."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    a = {k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in arrays.items()}
    values = {-1: torch.from_numpy(np.asarray(x, np.float64) / 255.0)}
    for j, layer in enumerate(spec.layers):
        ins = [values[i] for i in spec.node_inputs(j)]
        t, k = ins[0], layer.kind
        if k in ("conv2d", "maxpool", "avgpool"):
            top, bottom, left, right = M.conv_padding(layer, t.shape[2], t.shape[3])
        if k == "conv2d":
            t = F.conv2d(F.pad(t, (left, right, top, bottom)), a[f"{layer.name}.weight"], a[f"{layer.name}.bias"],
                         stride=layer.stride, groups=layer.groups or 1)
        elif k == "relu":
            t = F.relu(t)
        elif k == "relu6":
            t = F.relu6(t)
        elif k == "maxpool":
            t = F.max_pool2d(F.pad(t, (left, right, top, bottom), value=-float("inf")), layer.kernel, layer.stride)
        elif k == "avgpool":
            pool = lambda v: F.avg_pool2d(F.pad(v, (left, right, top, bottom)), layer.kernel, layer.stride,  # noqa: E731
                                          divisor_override=1)
            t = pool(t) / pool(torch.ones_like(t))
        elif k == "global_avgpool":
            t = F.adaptive_avg_pool2d(t, 1)
        elif k == "batchnorm":
            p = lambda s: a[f"{layer.name}.{s}"]
            t = F.batch_norm(t, p("running_mean"), p("running_var"), p("weight"), p("bias"), False, 0.0, layer.eps)
        elif k == "add":
            t = sum(ins[1:], ins[0])
        elif k == "concat":
            t = torch.cat(ins, 1)
        elif k == "flatten":
            t = torch.flatten(t, 1)
        elif k == "dense":
            t = F.linear(t, a[f"{layer.name}.weight"], a[f"{layer.name}.bias"])
        elif k == "softmax":
            t = torch.softmax(t, 1)
        values[j] = t
    return values[len(spec.layers) - 1].numpy()


ODD = M.ModelSpec("odd", (2, 15, 13), (
    M.conv2d("c1", 5, 4, 2, "same"), M.batchnorm("b1", 1e-3), M.RELU, M.avgpool(3, 1),
    M.conv2d("c2", 3, 2, 1, "same"), M.maxpool(2, 1), M.conv2d("c3", 4, 3, 2, "valid"), M.RELU,
    M.FLATTEN, M.dense("d1", 6), M.batchnorm("b2"), M.dropout(0.3), M.dense("d2", 4), M.SOFTMAX))


# A graph using every layer kind and option: asymmetric and "same" padding, groups (depthwise and
# grouped), padded max/avg pools, three branches concatenated over channels, a residual add, two
# flattened branches concatenated over features with a batch norm between flatten and dense.
EVERY = M.ModelSpec("every", (3, 9, 11), (
    M.conv2d("c1", 8, 3, 1, (1, 2, 0, 1)), M.batchnorm("b1"), M.node("relu6", "r1"),
    M.conv2d("dw", 8, 3, 2, "same", groups=8), M.conv2d("g2", 4, 1, groups=2),
    M.node("maxpool", "mp", "r1", kernel=3, stride=2, padding=(1, 1, 1, 1)),
    M.conv2d("p2", 4, 1),
    M.node("avgpool", "ap", "r1", kernel=3, stride=2, padding=(0, 1, 1, 0)),
    M.node("concat", "cat", ["g2", "p2", "ap"]), M.node("identity", "id"),
    M.conv2d("sc", 16, 1, inputs="dw"), M.node("add", "sum", ["id", "sc"]), M.RELU,
    M.conv2d("c3", 6, 2), M.node("global_avgpool", "gap"), M.node("flatten", "f1"),
    M.node("flatten", "f2", "c3"), M.node("concat", "feat", ["f1", "f2"]), M.batchnorm("bf"),
    M.dense("d1", 5), M.dropout(0.1), M.dense("d2", 4), M.SOFTMAX))


def test_every_kind_is_in_the_test_graph():
    assert {layer.kind for layer in EVERY.layers} == set(M.KINDS) and EVERY.version == 2
    assert EVERY.shapes[8] == (16, 5, 5) and EVERY.shapes[14] == (6, 1, 1) and EVERY.shapes[17] == (102,)


@pytest.mark.parametrize("spec", [M.builtin(n) for n in sorted(M.BUILTINS)] + [ODD, EVERY], ids=lambda s: s.name)
def test_reference_matches_torch_functional(spec):
    w = W.random_weights(5, spec)
    x = images(4, spec.input_shape, seed=1)
    ref = reference.forward(spec, w.arrays, x)
    assert ref.shape == (4, spec.num_classes)
    assert np.allclose(ref, torch_functional(spec, w.arrays, x), rtol=0, atol=1e-10)


def test_old_weights_files_load_as_the_study_cnn(tmp_path):
    path = tmp_path / "old.npz"
    np.savez(path, **W.random_weights(4).arrays)
    (tmp_path / "old.json").write_text(json.dumps({"architecture": W.ARCHITECTURE, "preprocessing": "uint8/255"}))
    w = W.load_weights(path)
    assert w.spec == M.STUDY and "model" not in w.manifest


def test_a_described_model_round_trips_through_a_weights_file(tmp_path):
    spec = M.builtin("vgg", (1, 8, 8), 10)
    w = W.random_weights(6, spec)
    W.save_weights(tmp_path / "vgg.npz", w.arrays, {"trained_by": "random"}, spec)
    back = W.load_weights(tmp_path / "vgg.npz")
    assert back.spec == spec and back.manifest["architecture"] == spec.architecture()
    x = images(3, (1, 8, 8))
    assert np.array_equal(W.reference_forward(back, x), reference.forward(spec, w.arrays, x))


def test_weights_of_another_model_are_refused_with_the_missing_arrays(tmp_path):
    spec = M.builtin("lenet5")
    np.savez(tmp_path / "w.npz", **W.random_weights(1).arrays)   # study arrays, lenet manifest
    (tmp_path / "w.json").write_text(json.dumps({"model": spec.to_dict()}))
    with pytest.raises(CnnsqlError, match="missing arrays conv1.weight|conv1.weight has shape"):
        W.load_weights(tmp_path / "w.npz")


def test_a_bad_model_in_a_manifest_is_one_clear_error(tmp_path):
    np.savez(tmp_path / "w.npz", **W.random_weights(1).arrays)
    d = M.STUDY.to_dict()
    d["layers"][0]["kind"] = "conv3d"
    (tmp_path / "w.json").write_text(json.dumps({"model": d}))
    with pytest.raises(CnnsqlError, match="unsupported kind 'conv3d'"):
        W.load_weights(tmp_path / "w.npz")


def test_resolve_names_and_files(tmp_path):
    assert M.resolve(None) == M.STUDY
    assert M.resolve("lenet5", (1, 28, 28), 3).num_classes == 3
    path = tmp_path / "m.json"
    path.write_text(M.builtin("lenet5").to_json())
    assert M.resolve(str(path)) == M.builtin("lenet5")
    with pytest.raises(CnnsqlError, match="takes 3x32x32 images, the data is 1x8x8"):
        M.resolve(str(path), (1, 8, 8))
    with pytest.raises(CnnsqlError, match="unknown model 'resnet'"):
        M.resolve("resnet")
    with pytest.raises(CnnsqlError, match="kernel 5 is larger than its 4x4 input"):
        M.builtin("lenet5", (1, 8, 8))


def test_activations_are_bounded_at_validation_not_only_parameters():
    """1x1024x1024 input and a 4,096-filter 1x1 'same' convolution: 8,192 parameters, but 4 G values
    (16 GiB) per image; refused naming the layer before any engine allocates it."""
    from cnnsql.models import model_spec as M

    doc = {"format": "cnnsql-model", "version": 1, "name": "wide", "input": [1, 1024, 1024], "layers": [
        {"kind": "conv2d", "name": "c", "filters": 4096, "kernel": 1, "padding": "same"}, {"kind": "relu"},
        {"kind": "flatten"},
        {"kind": "dense", "name": "d", "units": 2}, {"kind": "softmax"}]}
    with pytest.raises(CnnsqlError, match=r"layer 0 \(conv2d\) outputs 4096x1024x1024 = 4,294,967,296 values"):
        M.from_dict(doc)



def test_a_graph_round_trips_through_json_and_a_weights_file(tmp_path):
    for spec in (EVERY, M.builtin("resnet20", (3, 8, 8), 4), M.builtin("mobilenet_small")):
        d = json.loads(spec.to_json())
        assert d["version"] == 2 and M.from_dict(d) == spec and M.from_dict(d).architecture() == spec.architecture()
    w = W.random_weights(2, EVERY)
    W.save_weights(tmp_path / "e.npz", w.arrays, w.manifest)
    back = W.load_weights(tmp_path / "e.npz")
    assert back.spec == EVERY and back.manifest["model"]["version"] == 2
    assert back.arrays["dw.weight"].shape == (8, 1, 3, 3) and back.arrays["g2.weight"].shape == (4, 4, 1, 1)


def test_version_one_files_read_as_a_chain():
    d = M.builtin("vgg").to_dict()
    assert d["version"] == 1 and all("inputs" not in layer for layer in d["layers"])
    spec = M.from_dict({**d, "version": 2})
    assert spec.is_chain and spec.layers == M.builtin("vgg").layers and spec.shapes == M.builtin("vgg").shapes


def test_builtin_resnet20_and_mobilenet():
    r = M.builtin("resnet20")
    assert r.param_count() == 274_826 and not r.is_chain
    assert sum(layer.kind == "add" for layer in r.layers) == 9
    assert [r.shapes[i] for i, layer in enumerate(r.layers) if layer.kind == "add"][::3] == [
        (16, 32, 32), (32, 16, 16), (64, 8, 8)]
    m = M.builtin("mobilenet_small", (1, 28, 28), 4)
    assert m.num_classes == 4 and any((layer.groups or 1) > 1 for layer in m.layers)


def graph(*layers, shape=(2, 6, 6)):
    return M.ModelSpec("g", shape, layers)


@pytest.mark.parametrize("layers,message", [
    ((M.conv2d("a", 4, 3), M.conv2d("b", 4, 1, inputs="input"), M.node("add", "s", ["a", "b"]), M.FLATTEN,
      M.dense("d", 2), M.SOFTMAX), r"layer 2 \(add s\) adds 'a' \(4x4x4\) and 'b' \(4x6x6\): shapes differ"),
    ((M.conv2d("a", 4, 3), M.node("concat", "c", ["a", "input"]), M.FLATTEN, M.dense("d", 2), M.SOFTMAX),
     r"layer 1 \(concat c\) concatenates 'a' \(4x4x4\) and 'input' \(2x6x6\): only the channels"),
    ((M.conv2d("a", 4, 3), M.node("relu", "r", "nope"), M.FLATTEN, M.dense("d", 2), M.SOFTMAX),
     r"layer 1 \(relu r\) reads 'nope', which is not an earlier layer's name"),
    ((M.conv2d("a", 4, 3), M.conv2d("b", 4, 3, inputs="input"), M.FLATTEN, M.dense("d", 2), M.SOFTMAX),
     r"layer 0 \(conv2d a\): its output is never used"),
    ((M.conv2d("a", 4, 3), M.node("add", "s"), M.FLATTEN, M.dense("d", 2), M.SOFTMAX), r"needs 'inputs'"),
    ((M.conv2d("a", 4, 3, groups=3), M.FLATTEN, M.dense("d", 2), M.SOFTMAX), r"groups 3 must divide its 2 input"),
    ((M.conv2d("a", 4, 3, 1, (1, 1, 1)), M.FLATTEN, M.dense("d", 2), M.SOFTMAX), r"padding must be \[top, bottom"),
    ((M.maxpool(2, 2, (2, 0, 0, 0)), M.FLATTEN, M.dense("d", 2), M.SOFTMAX), r"integers 0..1, got \[2, 0, 0, 0\]"),
    ((M.node("relu", "input"), M.FLATTEN, M.dense("d", 2), M.SOFTMAX), "unique identifier name"),
    ((M.node("relu", "r", ["input", "input"]), M.FLATTEN, M.dense("d", 2), M.SOFTMAX), "reads one input, got 2"),
])
def test_bad_graphs_are_named(layers, message):
    with pytest.raises(CnnsqlError, match=message) as exc:
        graph(*layers)
    assert "\n" not in str(exc.value)


def test_version_one_refuses_graph_features():
    d = M.builtin("resnet20").to_dict()
    d["version"] = 1
    with pytest.raises(CnnsqlError, match=r"layer 0 \(conv2d conv1\) needs description version 2"):
        M.from_dict(d)


def test_live_activations_of_a_graph_are_bounded():
    """Every output within the per-layer bound, but five branches held for one add exceed the live one."""
    big = M.MAX_ACTIVATION // (512 * 512)   # channels of one full-size output
    layers = [M.conv2d(f"c{i}", big, 1, inputs="input") for i in range(5)]
    layers += [M.node("add", "sum", [f"c{i}" for i in range(5)]), M.node("global_avgpool", "g"), M.FLATTEN,
               M.dense("d", 2), M.SOFTMAX]
    with pytest.raises(CnnsqlError, match=r"alive at once .* more than 67,108,864"):
        M.ModelSpec("wide", (1, 512, 512), tuple(layers))
