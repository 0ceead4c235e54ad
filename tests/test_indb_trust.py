"""The in-database functions on servers shared with others: nothing another user can write is imported
or read by them, no schema another role owns is adopted, nobody may call them unless granted, and
`cnnsql bench` never installs code on a server given by CNNSQL_DSN."""
from __future__ import annotations

import os
import uuid
from types import SimpleNamespace

import pytest

from cnnsql import db
from cnnsql.bench.bench_indb import InDatabase
from cnnsql.models import weights as W
from conftest import run_cli, server_subdir

pytestmark = [pytest.mark.usefixtures("need_plpython"), pytest.mark.integration]


def weights_in(directory, seed: int = 11):
    path = directory / "w.npz"
    W.save_weights(path, W.random_weights(seed).arrays, {"trained_by": "random", "seed": seed})
    return path


def one_line(proc, *needles):
    err = [l for l in proc.stderr.splitlines() if l.startswith("cnnsql: error:")]
    assert proc.returncode != 0 and len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


@pytest.fixture(scope="module")
def installed(target, server_tmp, plpython):
    path = weights_in(server_subdir(server_tmp, "trust"))
    run_cli("db", "functions", "install", "--weights", str(path), "--engines", "torch")
    return path


def test_weights_others_can_replace_are_refused(installed, server_tmp):
    open_dir = server_subdir(server_tmp, "open", 0o777)  # anyone could swap the file before a backend loads it
    path = weights_in(open_dir)
    one_line(run_cli("db", "functions", "install", "--weights", str(path), "--engines", "torch", check=False),
             "another user can change", str(open_dir), "writable by group or others")
    with db.connection() as conn, conn.cursor() as cur:  # the installed functions are untouched
        cur.execute("SELECT obj_description('cnnsql.torchcnn(bytea)'::regprocedure, 'pg_proc')")
        assert str(installed) in cur.fetchone()[0]


def test_nobody_may_call_the_functions_unless_granted(installed):
    role = f"cnnsql_reader_{uuid.uuid4().hex[:6]}"
    with db.connection() as conn, conn.cursor() as cur:
        cur.execute("""SELECT count(*) FROM pg_proc p,
                         aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                       WHERE p.pronamespace = 'cnnsql'::regnamespace AND a.grantee = 0""")
        assert cur.fetchone()[0] == 0  # no EXECUTE for PUBLIC
        cur.execute(f'CREATE ROLE "{role}"')
        cur.execute(f'GRANT USAGE ON SCHEMA cnnsql TO "{role}"')
        cur.execute(f'SET ROLE "{role}"')
        cur.execute("SELECT has_function_privilege('cnnsql.torchcnn(bytea)', 'EXECUTE')")
        assert cur.fetchone()[0] is False
        conn.rollback()


def test_a_schema_another_role_made_first_is_refused(installed, server_tmp):
    name = f"squat_{uuid.uuid4().hex[:8]}"
    squatter = f"squatter_{uuid.uuid4().hex[:6]}"
    run_cli("load", "--quiet", "--synthetic", "10", env={"CNNSQL_DB": name})  # creates the database
    env = {"CNNSQL_DB": name}
    url = run_cli("db", "url", env=env).stdout.strip()
    import psycopg2

    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(f'CREATE ROLE "{squatter}"')
        cur.execute(f'CREATE SCHEMA cnnsql AUTHORIZATION "{squatter}"')
    path = weights_in(server_subdir(server_tmp, "squat"))
    one_line(run_cli("db", "functions", "install", "--weights", str(path), "--engines", "torch", env=env,
                     check=False), "schema 'cnnsql'", f"belongs to role {squatter!r}")
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_proc WHERE pronamespace = 'cnnsql'::regnamespace")
        assert cur.fetchone()[0] == 0  # nothing was created in it


def test_bench_never_installs_on_a_server_of_the_user(installed, server_tmp):
    url = run_cli("db", "url").stdout.strip()
    external = db.Target(url, private=False)
    cfg = SimpleNamespace(engines=["torch"], threads=1)
    other = weights_in(server_subdir(server_tmp, "other"), seed=12)
    reason = InDatabase._external_server(SimpleNamespace(target=external, cfg=cfg, weights=other))
    assert reason and "does not install functions" in reason and "cnnsql db functions install" in reason
    assert InDatabase._external_server(SimpleNamespace(target=external, cfg=cfg, weights=installed)) is None


def test_a_views_schema_another_role_made_first_is_refused(target):
    name = f"squatb_{uuid.uuid4().hex[:8]}"
    squatter = f"squatter_{uuid.uuid4().hex[:6]}"
    env = {"CNNSQL_DB": name}
    url = run_cli("db", "url", env=env).stdout.strip()  # makes the (empty) database
    import psycopg2

    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(f'CREATE ROLE "{squatter}"')
        cur.execute(f'CREATE SCHEMA cnnsql_bytes AUTHORIZATION "{squatter}"')
    one_line(run_cli("load", "--quiet", "--synthetic", "10", env=env, check=False),
             "schema 'cnnsql_bytes'", f"belongs to role {squatter!r}")
