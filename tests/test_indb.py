"""Inference inside PostgreSQL (`cnnsql db functions`): real server, real PL/Python, real psql."""
from __future__ import annotations

import os
import subprocess

import numpy as np
import psycopg2
import pytest

from cnnsql import db
from cnnsql.placements import pgfunctions
from cnnsql.models import weights as W
from cnnsql.core.errors import CnnsqlError
from conftest import REPO, run_cli, server_subdir

pytestmark = pytest.mark.usefixtures("need_plpython")  # each test: skip without PL/Python
ENGINES = ("torch", "tensorflow", "velox")


def weights_in(directory, seed: int):
    path = directory / "w.npz"
    W.save_weights(path, W.random_weights(seed).arrays, {"trained_by": "random", "seed": seed})
    return path


@pytest.fixture(scope="module")
def installed(loaded, plpython, server_tmp):
    if not plpython:
        pytest.skip("no PL/Python on the server")
    d = server_subdir(server_tmp, "indb")  # as root the server runs as 'postgres', which must read the weights
    path = weights_in(d, 5)
    out = run_cli("db", "functions", "install", "--weights", str(path), "--engines", ",".join(ENGINES))
    for e in ENGINES:
        assert f"cnnsql.{pgfunctions.sql_name(e)}: works inside the server" in out.stdout, out.stdout
    return path


def fresh():
    c = db.connect()
    c.autocommit = True
    return c


def stored_images(n: int) -> np.ndarray:
    with fresh() as c, c.cursor() as cur:
        cur.execute("SELECT img FROM cifar_image_test WHERE id < %s ORDER BY id", (n,))
        return np.frombuffer(b"".join(bytes(r[0]) for r in cur.fetchall()), np.uint8).reshape(-1, 3, 32, 32)


def raw_probs(engine: str, weights, images: np.ndarray) -> np.ndarray:
    from cnnsql.engines import get_engine

    return get_engine(engine, W.load_weights(weights), threads=1).predict(images)


def test_status_names_functions_weights_and_server_user(installed):
    out = run_cli("db", "functions", "status")
    assert "cnnsql.TorchCNN(img), cnnsql.TorchCNN_batch(ids, imgs): engine torch" in out.stdout
    assert f"weights {installed}" in out.stdout
    assert "venv and weights readable" in out.stdout


def test_schema_named_like_the_role_does_not_capture_new_tables(installed):
    """The private cluster's role is 'cnnsql': without the pinned search_path, "$user" would put
    the tables created from here on into schema cnnsql, hiding the loaded data in public."""
    c = fresh()
    try:
        db.ensure_schema(c)
        with c.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_class k JOIN pg_namespace n ON n.oid = k.relnamespace "
                        "WHERE n.nspname = 'cnnsql' AND k.relkind IN ('r', 'v', 'p')")
            assert cur.fetchone()[0] == 0
            cur.execute("SELECT count(*) FROM cifar_image_test")
            assert cur.fetchone()[0] > 0
    finally:
        c.close()


@pytest.mark.parametrize("engine, n", [("torch", 40), ("tensorflow", 40), ("velox", 2)])
def test_one_image_function_equals_raw_engine(installed, engine, n):
    with fresh() as c, c.cursor() as cur:  # a fresh backend per engine (one engine per backend)
        cur.execute(f"SELECT id, (p).label, (p).class_name, (p).probability, (p).probs FROM "
                    f"(SELECT id, cnnsql.{pgfunctions.sql_name(engine)}(img) AS p FROM cifar_image_test "
                    "WHERE id < %s) s ORDER BY id", (n,))
        rows = cur.fetchall()
    ref = raw_probs(engine, installed, stored_images(n))
    assert [r[0] for r in rows] == list(range(n))
    probs = np.array([r[4] for r in rows], dtype=np.float32)
    assert np.array_equal(probs.argmax(1), ref.argmax(1))
    assert [r[1] for r in rows] == ref.argmax(1).tolist()
    assert np.abs(probs - ref).max() <= 1e-5
    assert np.allclose([r[3] for r in rows], ref.max(1), atol=1e-5)
    assert all(isinstance(r[2], str) and r[2] for r in rows)


def test_batched_function_equals_raw_and_bad_rows_are_null_with_a_warning(installed):
    n = 300
    c = fresh()
    try:
        with c.cursor() as cur:
            cur.execute("""SELECT p.* FROM (
                SELECT id / 128 AS b, array_agg(id ORDER BY id) AS ids, array_agg(img ORDER BY id) AS imgs
                FROM cifar_image_test WHERE id < %s GROUP BY 1
                UNION ALL SELECT 99, ARRAY[-1, -2], ARRAY[NULL, '\\x0102'::bytea]) g,
              cnnsql.TorchCNN_batch(g.ids, g.imgs) p ORDER BY p.id""", (n,))
            rows = cur.fetchall()
        warnings = [m for m in c.notices if "WARNING" in m]
    finally:
        c.close()
    assert [r[0] for r in rows] == [-2, -1] + list(range(n))
    assert rows[0][1:] == (None,) * 4 and rows[1][1:] == (None,) * 4  # no made-up prediction
    assert any("2 bad image(s)" in w and "id -1: img is NULL" in w and "id -2: img has 2 bytes" in w
               for w in warnings), warnings
    ref = raw_probs("torch", installed, stored_images(n))
    probs = np.array([r[4] for r in rows[2:]], dtype=np.float32)
    assert [r[1] for r in rows[2:]] == ref.argmax(1).tolist()
    assert np.abs(probs - ref).max() <= 1e-5


def test_bad_images_from_psql_give_null_and_warning_not_an_error(installed):
    url = run_cli("db", "url").stdout.strip()
    q = ("SELECT id, (cnnsql.TorchCNN(img)).label FROM (VALUES (1, NULL::bytea), (2, '\\x0102'::bytea), "
         "(3, (SELECT img FROM cifar_image_test WHERE id = 0))) v(id, img) ORDER BY id")
    proc = subprocess.run(["psql", url, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", q], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["1|", "2|"] and lines[2].split("|")[1].isdigit()
    assert "WARNING:  cnnsql.TorchCNN: img is NULL: NULL prediction" in proc.stderr
    assert "WARNING:  cnnsql.TorchCNN: img has 2 bytes, expected 3072: NULL prediction" in proc.stderr


def test_a_second_engine_in_one_backend_is_refused_and_the_server_survives(installed):
    c = fresh()
    try:
        with c.cursor() as cur:
            cur.execute("SELECT (cnnsql.TorchCNN(img)).label FROM cifar_image_test WHERE id = 0")
            with pytest.raises(psycopg2.Error, match="already runs the torch engine.*use another connection"):
                cur.execute("SELECT (cnnsql.TensorflowCNN(img)).label FROM cifar_image_test WHERE id = 0")
            cur.execute("SELECT (cnnsql.TorchCNN(img)).label FROM cifar_image_test WHERE id = 1")  # still usable
            assert cur.fetchone()[0] is not None
    finally:
        c.close()


@pytest.mark.parametrize("ids, imgs, message", [
    ("ARRAY(SELECT generate_series(1, 16385))", "array_fill(NULL::bytea, ARRAY[16385])",
     "16385 images in one call, at most 16384"),
    ("ARRAY[1, 2]", "ARRAY[NULL::bytea]", "2 ids but 1 images"),
])
def test_batched_form_refuses_oversized_or_mismatched_calls(installed, ids, imgs, message):
    """Caller mistakes (not bad images) stop the query with the fix, before any image is read."""
    with fresh() as c, c.cursor() as cur:
        with pytest.raises(psycopg2.Error, match=message):
            cur.execute(f"SELECT count(*) FROM cnnsql.TorchCNN_batch({ids}, {imgs})")


def test_callers_cannot_choose_the_weights_file(installed):
    with fresh() as c, c.cursor() as cur:
        cur.execute("SELECT p.proname, pg_get_function_identity_arguments(p.oid), p.prosrc FROM pg_proc p "
                    "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'cnnsql'")
        funcs = cur.fetchall()
        assert {f[1] for f in funcs} == {"img bytea", "ids integer[], imgs bytea[]", ""}
        assert all(str(installed) in f[2] for f in funcs if f[0] != "runtime_info")
        with pytest.raises(psycopg2.errors.UndefinedFunction):
            cur.execute("SELECT cnnsql.TorchCNN(img, '/etc/passwd') FROM cifar_image_test WHERE id = 0")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the server must run as another user than the venv's owner")
def test_install_refuses_weights_the_server_user_cannot_read_and_changes_nothing(installed, server_tmp):
    d = server_subdir(server_tmp, "private", 0o700)
    path = weights_in(d, 6)
    proc = run_cli("db", "functions", "install", "--weights", str(path), "--engines", "torch", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("cnnsql: error: server user postgres cannot traverse ") and str(d) in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert f"weights {installed}" in run_cli("db", "functions", "status").stdout  # the installation is untouched


def test_install_needs_a_superuser_and_says_so(installed):
    with fresh() as c, c.cursor() as cur:
        cur.execute("DROP ROLE IF EXISTS cnnsql_reader")
        cur.execute("CREATE ROLE cnnsql_reader LOGIN PASSWORD 'reader-only-pw'")  # the socket asks for it
    cluster = db.private_cluster()
    dsn = f"host={cluster.socket_dir} port={cluster.port} dbname=cnnsql user=cnnsql_reader password=reader-only-pw"
    proc = run_cli("db", "functions", "install", "--weights", str(installed), "--engines", "torch",
                   env={"CNNSQL_DSN": dsn}, check=False)
    assert proc.returncode == 1
    assert "role 'cnnsql_reader' is not a superuser" in proc.stderr and "superuser DSN" in proc.stderr


def test_messages_for_a_missing_package_and_another_python():
    facts = {"plpython_available": False, "major": 15, "superuser": True, "user": "x"}
    with pytest.raises(CnnsqlError, match="apt-get install postgresql-plpython3-15"):
        pgfunctions.check_can_install(facts)
    with pytest.raises(CnnsqlError, match=r"embeds Python 3\.12\.1 but this venv is Python 3\.11"):
        pgfunctions.check_probe({"python": "3.12.1", "user": "postgres", "problems": []})


def test_psql_examples_classify(installed):
    url = run_cli("db", "url").stdout.strip()
    proc = subprocess.run(["psql", url, "-X", "-v", "ON_ERROR_STOP=1", "-f", "sql/psql_examples.sql"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "true_label" in out and "accuracy" in out and "confusions" in out
    agreement = out.split("torch vs tensorflow |")[1].split("\n")[0].split("|")
    assert agreement[0].strip() == "1000" and agreement[1].strip() == "1.0000"  # same weights: same top-1
    assert float(agreement[2]) <= 1e-5


def test_bench_measures_inside_postgres(bench_session, plpython):
    table = bench_session.stdout
    assert "PG img/s" in table and "PG 1-img ms" in table
    session = table.rsplit("(session ", 1)[1].split(";")[0]
    with fresh() as c, c.cursor() as cur:
        cur.execute("SELECT engine, scenario, status, n_rows, images_per_s, p50_ms, detail FROM bench_run "
                    "WHERE session_id = %s AND kind = 'indb' ORDER BY engine, scenario", (session,))
        rows = cur.fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [(e, s, "complete") for e in sorted(ENGINES)
                                                  for s in ("offline", "single-stream")]
    for engine, scenario, _, n, ips, p50, detail in rows:
        if scenario == "offline":
            assert detail["matches_raw"] == 1.0 and detail["max_prob_diff_vs_raw"] <= 1e-5
            assert detail["backend_vmhwm_mb"] > 100  # the engine lives in the server backend
            assert n == 4 and ips > 0  # the sample every engine runs (Velox's --sample), not torch's 300
        else:
            assert p50 > 0


def test_remove_leaves_the_data_and_can_be_redone(installed):
    out = run_cli("db", "functions", "remove")
    assert "removed schema cnnsql" in out.stdout
    status = run_cli("db", "functions", "status", check=False)
    assert status.returncode == 3 and "not installed" in status.stdout
    with fresh() as c, c.cursor() as cur:
        cur.execute("SELECT count(*) FROM cifar_image_test")
        assert cur.fetchone()[0] > 0
        cur.execute("SELECT count(*) FROM pg_db_role_setting")
        assert cur.fetchone()[0] == 0  # the pinned search_path went with the schema
    run_cli("db", "functions", "install", "--weights", str(installed), "--engines", "torch")
    assert run_cli("db", "functions", "status").returncode == 0


@pytest.mark.parametrize("args, message", [
    (("db", "functions"), "`cnnsql db functions` needs an action (use install, remove or status)"),
    (("db", "stop", "install"), "did you mean `cnnsql db functions install`?"),
    (("db", "functions", "install", "--engines", "nosuch"), "unknown engine 'nosuch'"),
])
def test_command_mistakes_give_one_clear_line(loaded, args, message):
    proc = run_cli(*args, check=False)
    assert proc.returncode == 1 and message in proc.stderr
    assert proc.stderr.startswith("cnnsql: error: ") and len(proc.stderr.strip().splitlines()) == 1
