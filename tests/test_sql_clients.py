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
    from cnnsql import weights as W

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
