"""Every study runs through the one runner (`cnnsql study NAME`) on a tiny input: its JSON result has
the method, settings, machine, rows, checks and a verdict; every check passes (the verdict may still be
INVALID on a busy machine: noise is reported, not a failure here). The database studies run against
the session's cluster (tests/test_studies_db.py has the rest of them)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, run_cli

pytestmark = pytest.mark.integration


def run_study(name: str, tmp_path, *extra: str, env: dict | None = None) -> dict:
    from cnnsql.bench import studies

    out = tmp_path / f"{name}.json"
    proc = run_cli("study", name, *studies.load(name).SMOKE, *extra, "--out", str(out), "--quiet", check=False,
                   env=env)
    assert proc.returncode in (0, 3), proc.stdout[-2000:] + proc.stderr[-3000:]  # 3: INVALID (noise or a check)
    doc = json.loads(out.read_text())
    assert f"{name}: {doc['verdict']}" in proc.stdout
    return doc


def assert_sound(doc: dict, name: str) -> None:
    assert doc["study"] == name and doc["verdict"] in ("VALID", "INVALID")
    assert doc["method"] and doc["machine"]["cpus"] and doc["settings"]
    assert doc["rows"], "a study without figures"
    assert doc["checks"] and all(c["ok"] for c in doc["checks"]), doc["checks"]
    assert (doc["verdict"] == "VALID") == (not doc["invalid_because"])


def test_the_list_names_every_study():
    from cnnsql.bench import studies

    proc = run_cli("study", "--list")
    for name in studies.STUDIES:
        module = studies.load(name)
        assert name in proc.stdout and module.NAME == name and module.SMOKE is not None
        assert module.__doc__.strip(), f"{name} has no method"
    assert not list((REPO / "benchmarks").glob("*.py")) or set(p.stem for p in (REPO / "benchmarks").glob("*.py")) \
        .isdisjoint(studies.STUDIES), "a study and an old script of the same name"


def test_unknown_study_is_one_line():
    proc = run_cli("study", "nope", check=False)
    assert proc.returncode == 1 and "unknown study 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_raw_speed(tmp_path):
    doc = run_study("raw_speed", tmp_path)
    assert_sound(doc, "raw_speed")
    assert {(r["engine"], r["batch"]) for r in doc["rows"]} == {("torch", 1), ("torch", 8)}
    assert all(r["images_per_s"] > 0 and r["range"][0] <= r["images_per_s"] <= r["range"][1] for r in doc["rows"])
    assert doc["sgemm_gflops"]["numpy"] > 0


def test_velox_ceiling(tmp_path):
    doc = run_study("velox_ceiling", tmp_path)
    assert_sound(doc, "velox_ceiling")
    assert {r["model"] for r in doc["rows"]} == {"study", "lenet5"}
    assert all(0 < r["share_of_ceiling"] for r in doc["rows"])


def test_a_failed_check_makes_the_run_invalid(tmp_path):
    """The verdict is INVALID (exit 3) when a check fails: weights of a model the data does not fit
    are refused in one line; engines that disagree would fail the agreement check."""
    from cnnsql.bench import studies

    doc = {"checks": [studies.check("x", False, "why")], "noise": []}
    assert "failed: x (why)" in studies.verdict_line(doc["checks"], doc["noise"])


def test_agreement(tmp_path, loaded, random_weights_file):
    doc = run_study("agreement", tmp_path, "--weights", str(random_weights_file))
    assert_sound(doc, "agreement")
    from cnnsql.engines import ENGINES

    pairs = [r for r in doc["rows"] if " vs " in r["pair"]]
    n = len(ENGINES)  # every pair of engines
    assert len(pairs) == n * (n - 1) // 2 and all(r["top1_agree"] == 1.0 for r in pairs)


def test_load_speed_in_its_own_database(tmp_path, target):
    """`cnnsql load` replaces the loaded data: the study runs on a database of its own in the cluster."""
    doc = run_study("load_speed", tmp_path, env={"CNNSQL_DB": "study_load_speed"})
    assert_sound(doc, "load_speed")
    assert doc["rows"][0]["images"] == 240 and doc["rows"][0]["images_per_s"] > 0


def test_clients_best_rate_is_judged_on_the_rounds_medians():
    from cnnsql.bench.studies.clients import best_rates

    def cell(clients, rate, p99, kept=None, rnd=1):
        return {"via": "pooler", "jobs_setting": 1, "jobs": 1, "clients": clients, "rate": rate, "round": rnd,
                "p99_ms": p99, "queries_per_s": kept if kept is not None else rate, "server_anon_sum_mb": 400.0,
                "warm_s": 0.01}

    rows = [cell(4, 500, 10, rnd=1), cell(4, 500, 12, rnd=2), cell(4, 500, 90, rnd=3),   # median 12: within 50
            cell(4, 600, 40, rnd=1), cell(4, 600, 70, rnd=2), cell(4, 600, 80, rnd=3),   # median 70: not
            cell(16, 500, 20, rnd=1), cell(16, 500, 30, 400, rnd=2), cell(16, 500, 25, 410, rnd=3)]  # kept 410 < 95%
    best = {b["clients"]: b for b in best_rates(rows, ["pooler"], [1], [500, 600], 50.0)}
    assert best[4]["best_rate"] == 500 and best[4]["p99_ms"] == 12 and best[4]["p99_range_ms"] == [10, 90]
    assert best[4]["share_of_best"] == 1.0 and not best[4]["top_rate_asked"]
    assert best[16]["best_rate"] is None and best[16]["share_of_best"] is None
