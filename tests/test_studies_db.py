"""The studies that read the loaded dataset or start a server, each run once through the runner
(cnnsql.bench.studies.run) on a tiny input (the study's SMOKE) against the session's cluster: the JSON
result has a verdict, rows and checks, and every check passed (the verdict itself may be INVALID on a
busy machine: noise is reported, not a failure here)."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def smoke(name: str, tmp_path, *extra: str) -> dict:
    from cnnsql.bench import studies

    out = tmp_path / f"{name}.json"
    doc = studies.run(name, [*studies.load(name).SMOKE, *extra, "--out", str(out), "--quiet"])
    written = json.loads(out.read_text())
    assert written["verdict"] in ("VALID", "INVALID") and written["study"] == name
    assert (written["verdict"] == "VALID") == (not written["invalid_because"])
    assert written["rows"], "a study without figures"
    assert written["checks"] and all(c["ok"] for c in written["checks"]), written["checks"]
    assert all("noisy" in n and "measurement" in n for n in written["noise"])
    return doc


@pytest.fixture(scope="module")
def weights(loaded, random_weights_file):
    return str(random_weights_file)


def test_sql_path(weights, tmp_path):
    doc = smoke("sql_path", tmp_path, "--weights", weights)
    (row,) = doc["rows"]
    assert row["engine"] == "torch" and row["images"] == 64 and row["sql_img_per_s"] > 0
    assert doc["detail"]["torch"]["offline"]["sql"]["repetitions"] == 2  # interleaved through the harness's loop


def test_sql_memory(weights, tmp_path):
    doc = smoke("sql_memory", tmp_path, "--weights", weights)
    (row,) = doc["rows"]
    assert row["rows"] == 32 and row["peak_rss_mb"] >= row["rss_before_mb"] > 0
    assert [n["measurement"] for n in doc["noise"]] == ["patched 32 rows (child process)"]


def test_indb_speed(weights, tmp_path, need_plpython):
    doc = smoke("indb_speed", tmp_path, "--weights", weights)
    (row,) = doc["rows"]
    assert row["images"] == 32 and row["indb_img_per_s"] > 0 and row["psql_one_p50_ms"] > 0


def test_pg_readers(weights, tmp_path):
    doc = smoke("pg_readers", tmp_path, "--weights", weights)
    assert [r["what"] for r in doc["rows"]] == ["1 reader(s)", "2 reader(s)", "worker torch x1 thread(s)"]
    assert all(x["rows"] == 256 for v in doc["readers"].values() for x in v)


def test_growth_in_a_database_of_its_own(weights, tmp_path, monkeypatch):
    """growth replaces the loaded data: here in another database of the session's cluster."""
    monkeypatch.setenv("CNNSQL_DB", "study_growth")
    doc = smoke("growth", tmp_path, "--weights", weights)
    assert [(r["phase"], r["rows"]) for r in doc["rows"]] == [("load", 240), ("raw", 40), ("sql", 40)]
    # each child's own peak (measure/peak.py), read back: an interpreter with numpy imported is over 20 MB
    assert all(r["client_peak_mb"] is not None and r["client_peak_mb"] > 20 for r in doc["rows"]), doc["rows"]


def test_growth_writes_back_from_every_placement(weights, plpython, tmp_path, monkeypatch):
    """The write-back phases over the train split: each placement's table checked (each id once) and dropped."""
    monkeypatch.setenv("CNNSQL_DB", "study_growth_write")
    phases = ["raw", "client", "evadb"] + (["postgres"] if plpython else [])
    doc = smoke("growth", tmp_path, "--weights", weights, "--split", "train", "--max-pass", "150",
                "--phases", ",".join(phases))
    assert [(r["phase"], r["rows"]) for r in doc["rows"]] == [("load", 240)] + [(k, 150) for k in phases]
    assert all(r["of_raw"] > 0 for r in doc["rows"][1:])
    from cnnsql import db

    with db.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'growth\\_%%' AND relkind = 'r' "
                    "AND relname <> 'growth_point'")
        assert cur.fetchone()[0] == 0


def test_listeners_beyond_loopback_none(tmp_path, cnnsql_home):
    doc = smoke("listeners", tmp_path)
    assert [r["command"] for r in doc["rows"]] == ["db start", "load --synthetic 2000", "db stop"]
    assert all(r["beyond_loopback"] == 0 and r["sockets"] >= 1 for r in doc["rows"][:2])


@pytest.mark.slow  # EvaDB starts Ray, and its Ray mode takes seconds per query: about a minute on 2 cores
def test_evadb_ray_mode_on_a_small_split(weights, tmp_path, monkeypatch):
    """On the whole test split (Ray mode drops a WHERE filter): 20 synthetic images in a database of its own."""
    from conftest import run_cli

    monkeypatch.setenv("CNNSQL_DB", "study_ray")
    run_cli("load", "--quiet", "--synthetic", "100")
    doc = smoke("evadb_ray_mode", tmp_path, "--weights", weights)
    assert {r["mode"]: (r["plan_root"], r["rows_returned"]) for r in doc["rows"]} == {
        "plain": ("ProjectPlan", 20), "ray": ("ExchangePlan", 20)}
