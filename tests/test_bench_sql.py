"""The SQL benchmark end to end: real PostgreSQL, real EvaDB, real engines; results in tables; report."""
from __future__ import annotations

import json
import re
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
    sizes = psql("-c", f"SELECT engine, n_rows FROM bench_run WHERE session_id = '{session}' AND kind = 'sql' "
                       "AND scenario = 'offline' ORDER BY 1, 2").splitlines()
    # every engine also runs the smallest sample (Velox's): one row compares all three on identical work
    assert sizes == ["tensorflow|4", "tensorflow|300", "torch|4", "torch|300", "velox|4"]
    rows = psql("-c", f"SELECT engine, n_rows, detail->>'sql_matches_raw', agreement FROM bench_run "
                      f"WHERE session_id = '{session}' AND kind = 'sql' AND scenario = 'offline' "
                      "AND agreement IS NOT NULL").splitlines()
    assert len(rows) == 3
    for r in rows:
        engine, n, matches, agreement = r.split("|", 3)
        assert float(matches) == 1.0  # the SQL path returns exactly the raw engine's predictions
        agreement = json.loads(agreement)
        assert set(agreement) == set(ENGINES.split(",")) - {engine}
        for other, a in agreement.items():
            assert a["fraction"] == 1.0, (engine, other, a)  # same weights: same top-1
    assert {r.split("|")[0]: int(r.split("|")[1]) for r in rows} == {"torch": 300, "tensorflow": 300, "velox": 4}


def test_every_run_carries_its_spread_cpu_and_noise(bench_session):
    session = bench_session.stdout.rsplit("(session ", 1)[1].split(";")[0]
    rows = psql("-c", f"SELECT run_id, wall_min_s <= wall_s AND wall_s <= wall_max_s, cpu_s >= 0, noisy IS NOT NULL, "
                      "detail ? 'others_cpu_share', detail ? 'load_at_start', repetitions, "
                      "(SELECT count(*) FROM bench_repetition p WHERE p.run_id = r.run_id AND p.cpu_s IS NOT NULL) "
                      f"FROM bench_run r WHERE session_id = '{session}'").splitlines()
    assert rows
    for r in rows:
        _, ordered, cpu, flagged, share, load, reps, logged = r.split("|")
        assert (ordered, cpu, flagged, share, load) == ("t", "t", "t", "t", "t") and reps == logged, r
    assert "noisy = other processes used more than 10%" in bench_session.stdout


def test_raw_sql_and_fetch_are_interleaved(bench_session):
    """The three sides of an offline phase run in turns: each started before any of them finished."""
    session = bench_session.stdout.rsplit("(session ", 1)[1].split(";")[0]
    out = psql("-c", f"SELECT engine, n_rows, max(started_at) < min(finished_at), count(*) FROM bench_run "
                     f"WHERE session_id = '{session}' AND scenario IN ('offline', 'fetch-only') AND kind <> 'indb' "
                     "GROUP BY 1, 2").splitlines()
    assert out and all(l.endswith("|t|3") for l in out), out


def test_session_results_file(bench_session):
    import os
    from pathlib import Path

    session = bench_session.stdout.rsplit("(session ", 1)[1].split(";")[0]
    files = list(Path(os.environ["CNNSQL_RESULTS_DIR"]).glob(f"*-{session}.json"))
    assert len(files) == 1 and f"results: {files[0]}" in bench_session.stdout
    doc = json.loads(files[0].read_text())
    assert doc["session"] == session and doc["versions"]["evadb"] and doc["machine"]["cpus"]
    assert doc["settings"]["repetitions"] == 2 and doc["settings"]["sample"] == 4
    assert all(len(r["repetition_values"]) == r["repetitions"] for r in doc["runs"])
    runs = psql("-c", f"SELECT count(*) FROM bench_run WHERE session_id = '{session}' AND status = 'complete'")
    assert len(doc["runs"]) == int(runs)


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
    assert "The answer" in page and "Fastest through SQL" in page and "<figcaption>" in page
    assert "Sessions" in page and "version: evadb" in page
    assert re.search(r"<td>\d+\.\d min</td>", page)  # how long the session measured


def test_report_in_a_headless_browser(bench_session, tmp_path):
    """Debian's chromium at 1200 px: every image loads, nothing overflows, no None / nan / raw dict."""
    import os
    import re

    import pytest
    from browser import chromium, probe

    if not chromium():
        if os.environ.get("CNNSQL_REQUIRE_CHROMIUM") == "1":
            raise AssertionError("chromium is required here (apt-get install chromium)")
        pytest.skip("no chromium (apt-get install chromium)")
    run_cli("report", "--out", str(tmp_path / "r"))
    seen = probe(tmp_path / "r" / "index.html")
    assert len(seen["imgs"]) >= 5 and all(i["ok"] for i in seen["imgs"]), seen["imgs"]
    assert seen["wide"] == [] and seen["scrollWidth"] <= 1200, (seen["wide"][:5], seen["scrollWidth"])
    for bad in (r"\bNone\b", r"\bnan\b", r"\{['\"]"):
        assert not re.search(bad, seen["text"]), (bad, re.search(bad, seen["text"]))


def test_unknown_engine_is_a_clear_error(loaded):
    proc = run_cli("bench", "--engines", "torch,mxnet", check=False)
    assert proc.returncode == 1 and "unknown engine 'mxnet'" in proc.stderr and "Traceback" not in proc.stderr
