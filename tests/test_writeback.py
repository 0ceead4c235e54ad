"""`cnnsql predict --into TABLE`: predictions written back into PostgreSQL by each placement, equal to the
raw engine's, in one transaction (a refused, failed or killed run leaves no table and no half-written one)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cnnsql.core.errors import CnnsqlError
from cnnsql.placements import writeback
from tests.conftest import ENGINES, run_cli

N = 300  # images with id < N


def test_table_names_are_checked():
    assert writeback.parse_table("labels") == (None, "labels")
    assert writeback.parse_table("out.labels_2") == ("out", "labels_2")
    for bad in ("", "Labels", "a.b.c", "x; DROP TABLE y", "1abc", "a" * 64, "a-b"):
        with pytest.raises(CnnsqlError, match="not a table name"):
            writeback.parse_table(bad)


def test_copy_text_escapes_names_and_writes_nulls():
    rows = [(1, 2, "tab\there\\back\nline", np.float32(0.5), np.array([0.25, 0.5], np.float32)),
            (2, None, None, None, None)]
    assert writeback.copy_text(rows) == "1\t2\ttab\\there\\\\back\\nline\t0.5\t{0.25,0.5}\n2\t\\N\t\\N\t\\N\t\\N\n"


@pytest.fixture(scope="module")
def functions(loaded, plpython, random_weights_file):
    """The torch functions installed with the random weights (when the server has PL/Python)."""
    if plpython:
        run_cli("db", "functions", "install", "--weights", str(random_weights_file), "--engines", "torch")
    return plpython


def _table(conn, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    with conn.cursor() as cur:
        cur.execute(f"SELECT id, label, class_name, probability, probs FROM {name} ORDER BY id")
        rows = cur.fetchall()
    conn.rollback()
    return (np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), np.array([r[4] for r in rows], np.float32),
            [r[2] for r in rows])


def _leftovers(conn) -> list[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT relname FROM pg_class WHERE relname LIKE 'cnnsql\\_build\\_%'")
        names = [r[0] for r in cur.fetchall()]
    conn.rollback()
    return names


@pytest.fixture(scope="module")
def raw(loaded, random_weights_file):
    from cnnsql import db
    from cnnsql.data import datasets
    from cnnsql.placements.predictor import Predictor

    with db.connection() as c:
        ids, images, _ = datasets.fetch_split(c, datasets.info(c), "test", limit=N)
    p = Predictor.load("torch", random_weights_file)
    return ids, p.predict(images), p.class_names


@pytest.mark.parametrize("placement", ["client", "postgres", "evadb"])
def test_each_placement_writes_the_raw_engines_predictions(placement, functions, raw, conn, random_weights_file):
    if placement == "postgres" and not functions:
        pytest.skip("PostgreSQL has no PL/Python (apt-get install postgresql-plpython3-15)")
    name = f"wb_{placement}"
    done = writeback.write_back(into=name, engine="torch", weights=random_weights_file, placement=placement,
                                limit=N, replace=True, progress=False)
    assert done.rows == N and done.bad == 0
    ids, probs, class_names = raw
    got_ids, labels, got_probs, names = _table(conn, name)
    assert got_ids.tolist() == list(ids)
    assert labels.tolist() == probs.argmax(1).tolist()
    assert names == [class_names[k] for k in labels]
    np.testing.assert_allclose(got_probs, probs, atol=1e-5)
    with conn.cursor() as cur:
        cur.execute("SELECT obj_description(%s::regclass), "
                    "(SELECT count(*) FROM pg_index WHERE indrelid = %s::regclass AND indisprimary)", (name, name))
        comment, pk = cur.fetchone()
    conn.rollback()
    assert f'"placement": "{placement}"' in comment and pk == 1
    assert _leftovers(conn) == []


def test_an_existing_table_is_refused_and_replaced_only_when_asked(loaded, conn, random_weights_file):
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS wb_kept; CREATE TABLE wb_kept (x int); INSERT INTO wb_kept VALUES (7)")
    conn.commit()
    with pytest.raises(CnnsqlError, match="table wb_kept exists"):
        writeback.write_back(into="wb_kept", engine="torch", weights=random_weights_file, limit=10, progress=False)
    with conn.cursor() as cur:
        cur.execute("SELECT x FROM wb_kept")
        assert cur.fetchall() == [(7,)]
    conn.rollback()
    writeback.write_back(into="wb_kept", engine="torch", weights=random_weights_file, limit=10, replace=True,
                         progress=False)
    assert _table(conn, "wb_kept")[0].tolist() == list(range(10))
    with pytest.raises(CnnsqlError, match="schema nosuch does not exist"):
        writeback.write_back(into="nosuch.t", engine="torch", weights=random_weights_file, limit=10, progress=False)


def test_postgres_placement_needs_the_functions_with_the_same_weights(functions, conn, server_tmp):
    if not functions:
        pytest.skip("PostgreSQL has no PL/Python")
    from cnnsql.models import weights as W
    from tests.conftest import server_subdir

    other = server_subdir(server_tmp, "w2") / "other.npz"
    W.save_weights(other, W.random_weights(5).arrays, {"trained_by": "random", "seed": 5})
    with pytest.raises(CnnsqlError, match="runs the weights") as err:
        writeback.write_back(into="wb_other", engine="torch", weights=other, placement="postgres", limit=10,
                             progress=False)
    assert "cnnsql db functions install --engines torch" in err.value.hint
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('wb_other')")
        assert cur.fetchone()[0] is None
    conn.rollback()


def _logged_plans(logfile, offset: int) -> list[str]:
    """auto_explain's entries in the server log after `offset`: each 'plan:' line with its tab-indented lines."""
    with open(logfile, "rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    plans: list[list[str]] = []
    for line in lines:
        if line.startswith("\t") and plans:
            plans[-1].append(line)
        elif "plan:" in line:
            plans.append([line])
    return ["\n".join(p) for p in plans]


def test_postgres_placement_writes_without_jit(functions, conn, random_weights_file):
    """The write-back's statements run with JIT off even where the database compiles every statement (LLVM's
    code and heap would stay in the backend that runs the CNN): each statement's plan, logged by auto_explain
    with its JIT summary, has none, while another statement of the same settings does."""
    if not functions:
        pytest.skip("PostgreSQL has no PL/Python")
    from psycopg2 import sql

    from cnnsql import db

    with conn.cursor() as cur:
        cur.execute("SELECT pg_jit_available()")
        if not cur.fetchone()[0]:
            pytest.skip("this PostgreSQL has no JIT provider (llvmjit)")
    conn.rollback()
    forced = {"jit": "on", "jit_above_cost": "0", "session_preload_libraries": "auto_explain",
              "auto_explain.log_min_duration": "0"}
    database = sql.Identifier(conn.info.dbname)
    logfile = db.private_cluster().logfile
    offset = logfile.stat().st_size
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for name, value in forced.items():
                cur.execute(sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                    database, sql.Identifier(name), sql.Literal(value)))
        control = db.connect(db.resolve())
        try:
            with control.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_class WHERE relname <> 'cnnsql_jit_control'")
        finally:
            control.close()
        writeback.write_back(into="wb_nojit", engine="torch", weights=random_weights_file, placement="postgres",
                             limit=N, replace=True, progress=False)
    finally:
        with conn.cursor() as cur:
            for name in forced:
                cur.execute(sql.SQL("ALTER DATABASE {} RESET {}").format(database, sql.Identifier(name)))
        conn.autocommit = False
    plans = _logged_plans(logfile, offset)
    controls = [p for p in plans if "cnnsql_jit_control" in p]
    inserts = [p for p in plans if 'INSERT INTO "cnnsql_build_' in p]
    assert controls and all("JIT:" in p for p in controls), f"the control statement was not JIT-compiled: {controls}"
    assert inserts, f"no write-back statement in the server log: {plans[-3:]}"
    assert not [p for p in inserts if "JIT:" in p], "a write-back statement ran with JIT"
    assert _table(conn, "wb_nojit")[0].tolist() == list(range(N))


@pytest.mark.parametrize("placement", ["client", "postgres"])
def test_a_killed_run_leaves_the_old_table_and_no_half_written_one(placement, functions, conn, random_weights_file):
    """SIGKILL of `cnnsql predict --into T --replace` while it writes: T keeps its old rows, no build table is
    left, and the server ends the killed client's backend (in PostgreSQL: while its INSERT runs)."""
    if placement == "postgres" and not functions:
        pytest.skip("PostgreSQL has no PL/Python")
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS wb_killed; CREATE TABLE wb_killed (x int); INSERT INTO wb_killed VALUES (1)")
    conn.commit()
    proc = subprocess.Popen([sys.executable, "-m", "cnnsql", "predict", "--engine", "torch", "--weights",
                             str(random_weights_file), "--into", "wb_killed", "--replace", "--placement", placement,
                             "--threads", "1", "--batch-size", "16", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline, pid = time.monotonic() + 120, None
    try:
        while pid is None:  # its backend has written into the build table at least once
            assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read().decode()[-300:]}"
            assert time.monotonic() < deadline, "the run never started writing"
            with conn.cursor() as cur:
                cur.execute("SELECT pid FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
                            ("%INTO \"cnnsql\\_build\\_%" if placement == "postgres" else "COPY \"cnnsql\\_build\\_%",))
                row = cur.fetchone()
            conn.rollback()
            pid = row[0] if row else None
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = time.monotonic()
    while True:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            alive = cur.fetchone()[0]
        conn.rollback()
        if not alive:
            break
        assert time.monotonic() - killed < 15, "the killed client's backend still runs"
        time.sleep(0.2)
    with conn.cursor() as cur:
        cur.execute("SELECT x FROM wb_killed")
        assert cur.fetchall() == [(1,)]
    conn.rollback()
    assert _leftovers(conn) == []


def test_the_command_line(loaded, random_weights_file):
    proc = run_cli("predict", "--engine", "torch", "--weights", str(random_weights_file), "--into", "wb_cli",
                   "--replace", "--limit", "20", "--quiet")
    assert "20 predictions by torch (client) -> table wb_cli" in proc.stderr
    bad = run_cli("predict", "--engine", "torch", "--weights", str(random_weights_file), "--out", "x.csv",
                  "--placement", "evadb", check=False)
    assert bad.returncode != 0 and "--placement and --replace go with --into TABLE" in bad.stderr
