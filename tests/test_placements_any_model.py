"""Every placement runs every model and dataset the engines run: the functions inside PostgreSQL and
the Ray workers take image-folder datasets of other shapes (grey 1x12x10, RGB 3x28x24: real digits
exported to PNG) with non-study models, and agree with the raw engine. One predictor serves them all."""
from __future__ import annotations

import numpy as np
import pytest

from cnnsql.data import datasets
from cnnsql import db
from cnnsql.models import model_spec
from cnnsql.models import weights as W
from cnnsql.placements.predictor import Predictor
from conftest import run_cli, server_subdir
from test_datasets import export_digits

PROB_TOLERANCE = 1e-5
# (dataset, load options, its image shape, the model on it)
DATASETS = {
    "digits_grey": (["--size", "12x10"], (1, 12, 10), "vgg"),
    "digits_rgb": (["--size", "28x24", "--channels", "3"], (3, 28, 24), "lenet5"),
}


@pytest.fixture(scope="module")
def folders(loaded, tmp_path_factory):
    root = tmp_path_factory.mktemp("digits-any")
    export_digits(root, limit=400)
    for name, (options, _, _) in DATASETS.items():
        run_cli("load", "--images", str(root), "--dataset", name, *options, "--quiet")
    return root


@pytest.fixture(scope="module")
def weights_files(folders, server_tmp):
    """Random weights of each dataset's model, in a folder the server's user can read."""
    d = server_subdir(server_tmp, "any-model")
    out = {}
    with db.connection() as conn:
        for name, (_, shape, model) in DATASETS.items():
            ds = datasets.info(conn, name)
            assert ds.shape == shape
            spec = model_spec.resolve(model, shape, ds.num_classes)
            path = d / f"{name}.npz"
            W.save_weights(path, W.random_weights(7, spec).arrays,
                           {"trained_by": "random", "seed": 7, "class_names": ds.class_names}, spec)
            out[name] = path
    return out


def stored(name: str):
    with db.connection() as conn:
        ids, images, _ = datasets.fetch_split(conn, datasets.info(conn, name), "test")
    return ids, images


@pytest.mark.usefixtures("need_plpython")
@pytest.mark.parametrize("name", DATASETS)
def test_functions_inside_postgres_run_another_shape_and_model(name, weights_files):
    engines = ["torch", "tensorflow", "velox"] if name == "digits_rgb" else ["torch"]
    check_functions(name, weights_files[name], engines)


@pytest.mark.usefixtures("need_plpython")
def test_functions_inside_postgres_run_a_graph_model(weights_files, server_tmp):
    """A version-2 graph (resnet20: residual adds, option-B shortcuts, global pooling) on the grey
    digits, every engine inside PostgreSQL against the raw engine."""
    name = "digits_grey"
    with db.connection() as conn:
        ds = datasets.info(conn, name)
    spec = model_spec.resolve("resnet20", ds.shape, ds.num_classes)
    path = server_subdir(server_tmp, "any-model-graph") / "resnet20.npz"
    W.save_weights(path, W.random_weights(7, spec).arrays, {"trained_by": "random", "seed": 7}, spec)
    check_functions(name, path, ["torch", "tensorflow", "velox"])


def check_functions(name, weights_path, engines):
    out = run_cli("db", "functions", "install", "--weights", str(weights_path), "--engines", ",".join(engines))
    ids, images = stored(name)
    for engine in engines:
        assert f"cnnsql.{engine.capitalize()}CNN: works inside the server" in out.stdout, out.stdout
        raw = Predictor.load(engine, weights_path, threads=1)
        want = raw.predict(images)
        with db.connection() as c, c.cursor() as cur:
            cur.execute(f"""SELECT p.id, p.label, p.class_name, p.probs FROM (
                              SELECT array_agg(id ORDER BY id) AS ids, array_agg(img ORDER BY id) AS imgs
                              FROM cnnsql_bytes.{name}_test_bytes) b, cnnsql.{engine}cnn_batch(b.ids, b.imgs) p""")
            rows = cur.fetchall()
            cur.execute(f"SELECT (cnnsql.{engine}cnn(img)).label FROM cnnsql_bytes.{name}_test_bytes WHERE id = 3")
            one = cur.fetchone()[0]
        assert [r[0] for r in rows] == ids.tolist()
        got = np.array([r[3] for r in rows], dtype=np.float32)
        assert got.shape == want.shape and np.abs(got - want).max() <= PROB_TOLERANCE
        assert [r[1] for r in rows] == want.argmax(1).tolist() and one == int(want[3].argmax())
        assert [r[2] for r in rows] == [raw.class_names[k] for k in want.argmax(1)]


def test_ray_workers_run_another_shape_and_model(weights_files, conn):
    name = "digits_rgb"
    out = run_cli("bench", "--cluster", "ray", "--dataset", name, "--model", "lenet5", "--weights",
                  str(weights_files[name]), "--engines", "torch", "--workers", "2", "--repetitions", "1",
                  "--table", "ray_any_model", "--quiet")
    run_id = int(out.stdout.split(", run ")[1].split()[0])
    ids, images = stored(name)
    want = Predictor.load("torch", weights_files[name], threads=1).predict(images)
    with conn.cursor() as cur:
        cur.execute("SELECT id, label, probs FROM ray_any_model WHERE run_id = %s ORDER BY id", (run_id,))
        rows = cur.fetchall()
        cur.execute("SELECT status, dataset_kind FROM bench_run WHERE run_id = %s", (run_id,))
        status, kind = cur.fetchone()
    conn.rollback()
    assert (status, kind) == ("complete", f"folder:{name}")
    assert [r[0] for r in rows] == ids.tolist() and [r[1] for r in rows] == want.argmax(1).tolist()
    assert np.abs(np.array([r[2] for r in rows], dtype=np.float32) - want).max() <= PROB_TOLERANCE


def test_a_model_of_another_shape_is_one_clear_line_on_ray(weights_files):
    proc = run_cli("bench", "--cluster", "ray", "--dataset", "digits_grey", "--weights",
                   str(weights_files["digits_rgb"]), "--engines", "torch", "--quiet", check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and err[-1].startswith("cnnsql: error:") and "Traceback" not in proc.stderr
    assert "3x28x24" in err[-1] and "1x12x10" in err[-1], proc.stderr
