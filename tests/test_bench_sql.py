"""The SQL benchmark end to end: real PostgreSQL, real EvaDB, real engines; results in tables; report."""
from __future__ import annotations

import json
import subprocess

from conftest import ENGINES, run_cli


def psql(*args):
    url = run_cli("db", "url").stdout.strip()
    return subprocess.run(["psql", url, "-X", "-At", "-F", "|", *args], capture_output=True, text=True, check=True).stdout


def test_bench_prints_table_and_logs_runs(bench_session):
    table = bench_session.stdout
    for engine in ENGINES.split(","):
        assert f"\n{engine} " in table
    session = table.rsplit("(session ", 1)[1].split(";")[0]
    rows = psql("-c", f"SELECT engine, kind, scenario, n_rows, status, repetitions, images_per_s > 0, host IS NOT NULL, "
                      f"versions ? 'evadb' FROM bench_run WHERE session_id = '{session}' ORDER BY run_id").splitlines()
    kinds = {tuple(r.split("|")[:3]) for r in rows}
    for engine in ENGINES.split(","):
        for kind, scenario in [("raw", "offline"), ("sql", "offline"), ("raw", "batch-sweep"),
                               ("raw", "single-stream"), ("sql", "single-stream")]:
            assert (engine, kind, scenario) in kinds
    assert all(r.split("|")[4:] == ["complete", r.split("|")[5], "t", "t", "t"] for r in rows), rows


def test_sql_output_equals_raw_engine_and_engines_agree(bench_session):
    session = bench_session.stdout.rsplit("(session ", 1)[1].split(";")[0]
    rows = psql("-c", f"SELECT engine, n_rows, detail->>'sql_matches_raw', agreement FROM bench_run "
                      f"WHERE session_id = '{session}' AND kind = 'sql' AND scenario = 'offline'").splitlines()
    assert len(rows) == 3
    for r in rows:
        engine, n, matches, agreement = r.split("|", 3)
        assert float(matches) == 1.0  # the SQL path returns exactly the raw engine's predictions
        agreement = json.loads(agreement)
        assert set(agreement) == set(ENGINES.split(",")) - {engine}
        for other, a in agreement.items():
            assert a["fraction"] == 1.0, (engine, other, a)  # same weights: same top-1
    assert {r.split("|")[0]: int(r.split("|")[1]) for r in rows} == {"torch": 300, "tensorflow": 300, "velox": 4}


def test_summary_views(bench_session):
    out = psql("-c", "SELECT engine, images, sql_over_raw > 0 FROM bench_engine_summary ORDER BY engine")
    assert {l.split("|")[0] for l in out.splitlines()} == set(ENGINES.split(","))
    assert psql("-c", "SELECT count(*) > 0 FROM bench_batch_sweep").strip() == "t"


def test_report_writes_plots_and_html(bench_session, tmp_path):
    out = run_cli("report", "--out", str(tmp_path / "r"))
    assert "report written" in out.stdout
    names = {p.name for p in (tmp_path / "r").iterdir()}
    for fig in ("fig1_time_per_engine.png", "fig2_utilization.png", "throughput_vs_batch.png", "sql_overhead.png",
                "accuracy_agreement.png", "index.html"):
        assert fig in names
    page = (tmp_path / "r" / "index.html").read_text()
    assert "The study's claims" in page and "repetitions" in page
    png = (tmp_path / "r" / "fig1_time_per_engine.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_unknown_engine_is_a_clear_error(loaded):
    proc = run_cli("bench", "--engines", "torch,mxnet", check=False)
    assert proc.returncode == 1 and "unknown engine 'mxnet'" in proc.stderr and "Traceback" not in proc.stderr
