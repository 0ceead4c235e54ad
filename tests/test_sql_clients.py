"""The ways users reach it: the EvaDB shell (scripted and interactive), psql, bad rows in SQL."""
from __future__ import annotations

import os
import subprocess
import sys

import pexpect
import pytest

from conftest import REPO, run_cli


@pytest.fixture(scope="module")
def weights_env(tmp_path_factory, loaded):
    from cnnsql.models import weights as W

    path = tmp_path_factory.mktemp("sw") / "w.npz"
    W.save_weights(path, W.random_weights(11).arrays, {"trained_by": "random"})
    return {"CNNSQL_WEIGHTS": str(path)}


def test_shell_command_mode(weights_env):
    out = run_cli("shell", "-c", "SELECT id, TorchCNN(img) FROM pg.cifar_test WHERE id < 5;", env=weights_env)
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:5] == ["id", "label", "class_name", "probability", "probs"]
    assert lines[-1] == "(5 rows)" and len(lines) == 7


def test_interactive_shell_with_pexpect(weights_env):
    child = pexpect.spawn(sys.executable, ["-m", "cnnsql", "shell"], cwd=str(REPO), env={**os.environ, **weights_env},
                          encoding="utf-8", timeout=180)
    child.expect_exact("evadb=# ")
    child.sendline("SELECT id, TensorflowCNN(img)")
    child.expect_exact("evadb-# ")
    child.sendline("FROM pg.cifar_test WHERE id < 3;")
    child.expect(r"\(3 rows\)")
    assert "class_name" in child.before
    child.expect_exact("evadb=# ")
    child.sendline("SELECT * FROM pg.no_such_view;")
    child.expect("ERROR: EvaDB query failed")
    child.expect_exact("evadb=# ")
    child.sendline("EXIT;")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_psql_example_queries_run(loaded):
    url = run_cli("db", "url").stdout.strip()
    proc = subprocess.run(["psql", url, "-X", "-v", "ON_ERROR_STOP=1", "-f", "sql/psql_examples.sql"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "bench_engine_summary" not in proc.stderr and "class_name" in proc.stdout


def test_bad_rows_give_null_predictions_not_made_up_ones(weights_env, conn):
    with conn.cursor() as cur:
        cur.execute("""CREATE OR REPLACE VIEW bad_images AS
            SELECT 0 AS id, NULL::text AS img
            UNION ALL SELECT 1, 'this is not base64!'
            UNION ALL SELECT 2, encode('\\x0102'::bytea, 'base64')
            UNION ALL SELECT 3, img FROM cifar_test WHERE id = 0""")
    conn.commit()
    out = run_cli("shell", "-c", "SELECT id, TorchCNN(img) FROM pg.bad_images;", env=weights_env)
    rows = {int(l.split()[0]): l.split() for l in out.stdout.strip().splitlines()[1:-1]}
    for bad in (0, 1, 2):
        assert rows[bad][1] in ("<NA>", "None", "NaN"), rows[bad]
    assert rows[3][1].isdigit()
    assert "NULL or malformed img" in out.stderr


SECRET = "s3cr@t%:pass/word"  # '@', '%' and ':' broke EvaDB's URL when the password went into it


@pytest.mark.parametrize("given", ["dsn", "PGPASSWORD"])
def test_dsn_password_never_reaches_evadb_or_its_catalog(loaded, conn, weights_env, tmp_path, given):
    """A server given by DSN with a password (in the DSN, or in PGPASSWORD as libpq users give it):
    queries work, and no file or message holds the password."""
    from cnnsql import db

    port = db.private_cluster().tcp_conninfo("cnnsql")["port"]
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = 'cnnsql_dsn_tester'")
        if cur.fetchone():  # made by the other parametrization: its grants go first
            cur.execute("DROP OWNED BY cnnsql_dsn_tester")
            cur.execute("DROP ROLE cnnsql_dsn_tester")
        cur.execute("CREATE ROLE cnnsql_dsn_tester LOGIN PASSWORD %s", (SECRET,))
        cur.execute("GRANT USAGE ON SCHEMA cnnsql_bytes TO cnnsql_dsn_tester")
        cur.execute("GRANT SELECT ON cifar_test, cnnsql_bytes.cifar_test_bytes TO cnnsql_dsn_tester")
    conn.commit()
    home = tmp_path / "dsn-home"
    script = ("import sys, pathlib\nfrom cnnsql.placements import evadb_session\ncursor = evadb_session.connect()\n"
              "print(len(evadb_session.run(cursor, 'SELECT id, TorchCNN(img).label FROM pg.cifar_test WHERE id < 3;')))\n"
              "files = [p for p in pathlib.Path(sys.argv[1]).rglob('*') if p.is_file() and p.name != 'pgpass']\n"
              "modes = {oct(p.stat().st_mode & 0o777) for p in pathlib.Path(sys.argv[1]).rglob('pgpass')}\n"
              "print('files', len(files), 'leaks', sum(sys.argv[2].encode() in p.read_bytes() for p in files), modes)\n")
    dsn = f"host=127.0.0.1 port={port} dbname=cnnsql user=cnnsql_dsn_tester password='{SECRET}'"
    env = {**os.environ, **weights_env, "CNNSQL_DSN": dsn, "CNNSQL_HOME": str(home)}
    if given == "PGPASSWORD":
        env["CNNSQL_DSN"], env["PGPASSWORD"] = dsn.replace(f" password='{SECRET}'", ""), SECRET
    env.pop("PGPASSFILE", None)
    proc = subprocess.run([sys.executable, "-c", script, str(home), SECRET], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-1500:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2] == "3"
    files, leaks = int(lines[-1].split()[1]), int(lines[-1].split()[3])
    assert files > 0 and leaks == 0  # the EvaDB catalog exists and does not hold the password
    assert lines[-1].endswith("{'0o600'}")  # only libpq's pgpass file, private to the process, has it
    assert not any(home.rglob("pgpass")), "the process's pgpass file outlived it"
    assert SECRET not in proc.stderr
    bad = run_cli("shell", "-c", "SELECT id FROM pg.cifar_test WHERE id < 1;", check=False,
                  env={**weights_env, "CNNSQL_DSN": dsn.replace(SECRET, SECRET + "x"), "CNNSQL_HOME": str(home)})
    assert bad.returncode != 0 and SECRET not in bad.stdout + bad.stderr
    assert "password authentication failed" in bad.stderr and bad.stderr.count("\n") <= 2


def test_two_shells_at_once(weights_env):
    query = "SELECT id, TorchCNN(img).label FROM pg.cifar_test WHERE id < 4;"
    procs = [subprocess.Popen([sys.executable, "-m", "cnnsql", "shell", "-c", query], cwd=REPO,
                              env={**os.environ, **weights_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-1500:]
        assert out.strip().splitlines()[-1] == "(4 rows)"
