"""The ONNX Runtime engine: cnnsql's own ONNX export of every model description runs in ONNX Runtime and
agrees with the NumPy reference (every built-in, an odd chain, a graph with every layer kind), and the
engine runs in the placements like the others: the EvaDB function OnnxruntimeCNN and the function inside
PostgreSQL agree with the raw engine on the stored images."""
from __future__ import annotations

import numpy as np
import pytest

from cnnsql.engines import ENGINES, VARIANTS, get_engine
from cnnsql.models import model_spec as M
from cnnsql.models import weights as W
from cnnsql.placements import pgfunctions
from conftest import run_cli, server_subdir
from test_model_spec import EVERY, ODD

pytestmark = pytest.mark.integration

SPECS = [M.builtin(n) for n in sorted(M.BUILTINS)] + [M.builtin("resnet20", (1, 12, 10), 3), ODD, EVERY]


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_every_description_agrees_with_the_reference(spec):
    w = W.random_weights(7, spec)
    x = np.random.default_rng(8).integers(0, 256, (40, *spec.input_shape), dtype=np.uint8)
    ref = W.reference_forward(w, x)
    for label, opts in VARIANTS["onnxruntime"].items():
        probs = get_engine("onnxruntime", w, threads=2, **opts).predict(x, batch_size=16)
        assert probs.shape == ref.shape and probs.dtype == np.float32, label
        assert np.array_equal(probs.argmax(1), ref.argmax(1)), label
        assert np.abs(probs - ref).max() < 1e-4, label


def test_the_export_is_a_valid_onnx_model_of_uint8_images():
    import onnx

    from cnnsql.engines.onnx_export import to_onnx

    spec = M.builtin("mobilenet_small")
    model = to_onnx(spec, W.random_weights(1, spec).arrays)
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == list(spec.input_shape)
    assert out.name == "probs" and not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_settings_are_recorded_and_a_bad_one_is_one_line():
    from cnnsql.core.errors import CnnsqlError

    e = get_engine("onnxruntime", W.random_weights(0), threads=1)
    d = e.describe()
    assert d["engine"] == "onnxruntime" and d["optimization"] == "all" and d["intra_op_threads"] == 1
    with pytest.raises(CnnsqlError, match="unknown ONNX Runtime optimization 'max'"):
        get_engine("onnxruntime", W.random_weights(0), optimization="max")
    assert "onnxruntime" in ENGINES


@pytest.fixture(scope="module")
def weights_file(loaded, server_tmp):
    path = server_subdir(server_tmp, "ort") / "w.npz"
    W.save_weights(path, W.random_weights(11).arrays, {"trained_by": "random", "seed": 11})
    return path


def stored(n: int):
    from cnnsql import db
    from cnnsql.data import datasets

    with db.connection() as conn:
        ids, images, _ = datasets.fetch_split(conn, datasets.info(conn), "test", limit=n)
    return ids, images


def test_evadb_function_equals_raw(weights_file):
    from cnnsql.placements import evadb_session

    n = 30
    cursor = evadb_session.connect(weights=str(weights_file), threads=1)
    out = evadb_session.run(cursor, f"SELECT id, OnnxruntimeCNN(img) FROM pg.cifar_test WHERE id < {n};")
    out = out.sort_values(out.columns[0])
    ids, images = stored(n)
    ref = get_engine("onnxruntime", W.load_weights(weights_file), threads=1).predict(images)
    assert out.iloc[:, 0].tolist() == ids.tolist()
    labels = out[[c for c in out.columns if c.endswith("label")][0]].astype(int).to_numpy()
    assert np.array_equal(labels, ref.argmax(1))


@pytest.mark.usefixtures("need_plpython")
def test_function_inside_postgres_equals_raw(weights_file):
    from cnnsql import db

    out = run_cli("db", "functions", "install", "--weights", str(weights_file), "--engines", "onnxruntime")
    assert "cnnsql.OnnxruntimeCNN: works inside the server" in out.stdout, out.stdout
    n = 40
    c = db.connect()
    try:
        with c.cursor() as cur:
            cur.execute(f"SELECT id, (p).label, (p).probs FROM (SELECT id, cnnsql.{pgfunctions.sql_name('onnxruntime')}"
                        "(img) AS p FROM cifar_image_test WHERE id < %s) s ORDER BY id", (n,))
            rows = cur.fetchall()
    finally:
        c.close()
    ids, images = stored(n)
    ref = get_engine("onnxruntime", W.load_weights(weights_file), threads=1).predict(images)
    probs = np.array([r[2] for r in rows], dtype=np.float32)
    assert [r[0] for r in rows] == ids.tolist() and [r[1] for r in rows] == ref.argmax(1).tolist()
    assert np.abs(probs - ref).max() <= 1e-5
