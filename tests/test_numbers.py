"""Numbers a skeptic can trust, without a database: spreads and intervals, the noise rule, component
shares that are never negative, the README tables against the committed results files, and one
conformance check of what every registered engine declares."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cnnsql.bench import bench_config
from cnnsql.placements import pgfunctions
from cnnsql.results import results_doc
from cnnsql.measure import stats
from cnnsql.bench.harness import format_table, split_other
from cnnsql.engines import ENGINES, engine_class
from cnnsql.core.errors import CnnsqlError

REPO = Path(__file__).resolve().parent.parent


def test_summary_spread_and_paired_ratio():
    assert stats.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert stats.spread([1.0, 1.0]) == 0.0 and stats.spread([0.9, 1.0, 1.2]) == pytest.approx(0.3)
    # per-pair ratios, not a ratio of medians: a slow first pair shows up in the range
    r = stats.paired_ratio([2.0, 1.1, 1.2], [1.0, 1.0, 1.0])
    assert r["median"] == pytest.approx(1.2) and r["min"] == pytest.approx(1.1) and r["max"] == 2.0


def test_wilson_interval():
    lo, hi = stats.wilson(700, 1000)
    assert 0.67 < lo < 0.70 < hi < 0.73
    assert stats.wilson(0, 10)[0] == 0.0 and stats.wilson(10, 10)[1] == 1.0
    assert stats.wilson(0, 0) == (0.0, 1.0)
    # fewer images, wider interval: 48 Velox images say far less than 10,000
    assert (lambda a, b: a[1] - a[0] > b[1] - b[0])(stats.wilson(36, 48), stats.wilson(7500, 10000))


def test_component_times_are_never_negative():
    # the figures of the issue: parts measured apart summed past the total
    out = split_other(sql_s=2.00, fetch_s=0.30, decode_s=0.10, predict_s=2.29)
    assert out == {"evadb_other_s": 0.0, "components_exceed_s": pytest.approx(0.69)}
    out = split_other(2.69, 0.28, 0.09, 2.28)
    assert out["evadb_other_s"] == pytest.approx(0.04) and out["components_exceed_s"] == 0.0


def busy(seconds: float) -> None:
    """Spin for `seconds` of this process's CPU (not wall: on a loaded machine the two differ)."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_clock_counts_its_own_cpu_and_flags_a_competing_process():
    """A process spinning outside the benchmark's tree (reparented, as a user's other work is) makes
    the phase noisy; the benchmark's own busy loop is counted as its CPU, not as others'."""
    spin = subprocess.Popen(["setsid", "sh", "-c", f"{sys.executable} -c 'while 1: pass' & echo $!"],
                            stdout=subprocess.PIPE, text=True)
    pid = int(spin.stdout.readline())
    try:
        time.sleep(0.3)
        with stats.Clock() as clock:
            for _ in range(3):
                clock.time("busy", lambda: busy(0.4))  # 1.2 s in all: long enough to judge
        verdict = clock.verdict("busy")
    finally:
        subprocess.run(["kill", str(pid)])
        spin.wait()
    walls, cpus = clock.walls["busy"], clock.cpus["busy"]
    assert len(walls) == len(cpus) == 3
    # a single-threaded loop: its CPU time is ours, at most its wall time (one core)
    assert all(0 < c <= w + 0.02 for c, w in zip(cpus, walls)), (cpus, walls)
    assert verdict["noisy"] and verdict["others_cpu_share"] > stats.NOISY_OTHERS_CPU
    assert any("other processes" in r for r in verdict["noise_reasons"])


def test_the_harness_work_between_calls_is_ours():
    """Work of this process between the timed calls (a sampler, the readings) is the benchmark's,
    not "other processes'": 30 one-image-sized calls with 4x their time of harness work between them.
    Asserted on what the Clock attributes to us (the machine may have background load)."""
    with stats.Clock() as clock:
        for _ in range(30):
            clock.time("one", lambda: busy(0.01))
            busy(0.04)
    assert 0.25 <= sum(clock.cpus["one"]) <= 0.6  # the calls alone: 30 x 10 ms
    assert clock._ours >= 0.9 * 1.5, clock._ours  # the window: calls and harness work, 30 x 50 ms


def test_the_private_servers_work_is_the_benchmarks_not_others(conn):
    """A query's CPU in the PostgreSQL backend counts as the benchmark's when the Clock is given the
    private cluster's postmaster (as `cnnsql bench` does), and as other processes' when it is not.
    The backend keeps about one core busy: 1/cores of the machine, whatever its size."""
    from cnnsql import db

    server = db.private_server_pid(conn)
    assert server and server != os.getpid()
    rows = 2_000_000
    with conn.cursor() as cur:  # size each query to >= 0.5 s on this machine (3 of them: past MIN_JUDGE_S)
        while True:
            t0 = time.perf_counter()
            cur.execute("SELECT count(*) FROM generate_series(1, %s)", (rows,))
            cur.fetchone()
            if time.perf_counter() - t0 >= 0.5:
                break
            rows *= 2

    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        backend = psutil.Process(cur.fetchone()[0])

    def backend_cpu() -> float:
        t = backend.cpu_times()
        return t.user + t.system

    backend_used = []

    def query():
        before = backend_cpu()
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM generate_series(1, %s)", (rows,))
            out = cur.fetchone()
        backend_used.append(backend_cpu() - before)
        return out

    verdicts = {}
    for roots in ((server,), ()):
        backend_used.clear()
        with stats.Clock(roots) as clock:
            for _ in range(3):
                clock.time("q", query)
        verdicts[roots] = (clock.verdict("q", judge_spread=False), clock.cpus["q"], list(backend_used),
                           clock._window)
    cores = psutil.cpu_count() or 1
    ours, cpus, used, _ = verdicts[(server,)]
    # the backend's CPU is ours (compared with its own reading: on a loaded machine it gets less than a core)
    assert all(c >= 0.9 * u - 0.02 for c, u in zip(cpus, used)) and min(used) > 0.1, (cpus, used)
    assert "noise_not_judged" not in ours, ours
    theirs, cpus, used, (_, wall) = verdicts[()]
    assert max(cpus) < 0.2, cpus
    # the backend's CPU moves from ours to others (whatever background load the machine has besides)
    moved = sum(used) / (wall * cores)
    assert theirs["others_cpu_share"] - ours["others_cpu_share"] > 0.5 * moved, (ours, theirs, moved)
    assert theirs["noisy"] == (theirs["others_cpu_share"] > stats.NOISY_OTHERS_CPU)


def test_spread_threshold_flags_and_single_stream_is_exempt():
    clock = stats.Clock()
    clock.walls["a"], clock.cpus["a"] = [1.0, 1.0, 1.5], [1.0, 1.0, 1.0]
    clock._window, clock._ours = (3.5, 3.5), 3.0  # no one else ran (busy 3.5 s = ours + 0.5 on 2+ cores)
    v = clock.verdict("a")
    assert v["spread"] == 0.5 and any("spread" in r for r in v["noise_reasons"])
    assert not any("spread" in r for r in clock.verdict("a", judge_spread=False)["noise_reasons"])
    # a short run's spread (a 30 ms fetch) and a short phase's CPU shares are not judged, and it says so
    clock.walls["b"] = [0.03, 0.03, 0.05]
    assert clock.verdict("b")["noise_reasons"] == []
    clock._window = (0.2, 0.3)
    v = clock.verdict("a")
    assert not any("other processes" in r for r in v["noise_reasons"]) and "too short" in v["noise_not_judged"]


def row(engine="torch", noisy=False):
    return {"engine": engine, "n": 1000, "raw_ips": [900.0, 1000.0, 1100.0], "sql_ips": [800.0, 850.0, 900.0],
            "overhead": {"median": 1.1, "min": 1.05, "max": 1.2}, "accuracy": 0.7, "accuracy_ci95": [0.67, 0.73],
            "agreement": {"velox": {"fraction": 1.0, "n": 1000}}, "p50_ms": 1.0, "p99_ms": 2.0,
            "sql_p50_ms": 30.0, "raw_cpu_s": 2.0, "sql_cpu_s": 2.5, "indb_ips": None, "noisy": noisy}


def test_table_prints_ranges_and_the_noisy_flag():
    text = format_table([row(), row("velox", noisy=True)])
    assert "1000.0 [900.0-1100.0]" in text and "1.100 [1.050-1.200]" in text and "0.7000 [0.670-0.730]" in text
    lines = text.splitlines()
    assert lines[2].rstrip().endswith("no") and lines[3].rstrip().endswith("NOISY")
    assert "None" not in text and "nan" not in text
    wide = {**row(), "n": 10000, "raw_ips": [1210.4, 1228.7, 1234.5], "sql_ips": [1016.9, 1089.0, 1092.1]}
    cells = format_table([wide]).splitlines()[2].split()
    assert cells[:3] == ["torch", "10000", "1228.7"], cells  # cells that fill their width stay apart


def test_cli_defaults_are_the_bench_config_defaults():
    from cnnsql.cli.main import build_parser

    args = build_parser().parse_args(["bench"])
    d = bench_config.BenchConfig()
    for name in ("repetitions", "warmup", "threads", "batch_sizes", "single_stream", "sql_single_stream",
                 "train_epochs", "limit", "sample", "results_dir", "dataset", "model"):
        assert getattr(args, name) == getattr(d, name), name
    assert args.engines is None  # no --engines: BenchConfig's engines, less those that cannot run the model


# --- results files and the README --------------------------------------------------------------

def test_readme_tables_match_the_committed_results_files():
    assert results_doc.readme(check=True)  # `cnnsql results readme` regenerates the block


def test_docs_study_tables_match_the_committed_study_files():
    assert results_doc.studies(check=True)  # `cnnsql results readme` regenerates them


def test_a_study_table_is_generated_from_its_json():
    path = sorted((REPO / "results" / "studies" / "clients").glob("*.json"))[0]
    rel = path.relative_to(REPO)
    doc = json.loads(path.read_text())
    stale = f"<!-- study-table: {rel} columns=clients,via -->\n| typed | by hand |\n<!-- study-table:end -->\n"
    out = results_doc.study_blocks("before\n" + stale + "after\n")
    assert out.startswith("before\n<!-- study-table: ") and out.endswith("<!-- study-table:end -->\nafter\n")
    assert "| clients | via |" in out and "typed by hand" not in out
    assert out.count("\n| ") == 1 + len(doc["rows"])  # header and one line per row (the |---| line aside)
    assert f"`{rel}`: {doc['verdict']}" in out
    with pytest.raises(CnnsqlError, match="does not exist"):
        results_doc.study_blocks("<!-- study-table: results/studies/none/x.json -->\n<!-- study-table:end -->")
    best = results_doc.study_blocks(f"<!-- study-table: {rel} table=best columns=clients -->\n<!-- study-table:end -->")
    assert best.count("\n| ") == 1 + len(doc["best"])  # another list of the result, by name
    with pytest.raises(CnnsqlError, match="does not have"):
        results_doc.study_blocks(f"<!-- study-table: {rel} table=nope -->\n<!-- study-table:end -->")


def test_readme_check_fails_when_they_disagree(tmp_path):
    files = results_doc.session_files(REPO / "results" / "sessions")[0]
    assert files, "no committed results file"
    folder = tmp_path / "sessions"
    folder.mkdir()
    doc = json.loads(files[-1].read_text())
    sql = next(r for r in doc["runs"] if r["kind"] == "sql" and r["scenario"] == "offline")
    sql["images_per_s"] *= 2  # a figure typed by hand would disagree like this
    (folder / files[-1].name).write_text(json.dumps(doc))
    for f in files[:-1]:
        (folder / f.name).write_text(f.read_text())
    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text())
    with pytest.raises(CnnsqlError, match="disagree"):
        results_doc.readme(folder, readme, check=True)
    assert results_doc.readme(folder, readme) is False  # rewritten...
    assert results_doc.readme(folder, readme, check=True)  # ...and now current


def test_a_document_without_the_results_block_is_named(tmp_path):
    doc = tmp_path / "notes.md"
    doc.write_text("# no generated block here\n")
    with pytest.raises(CnnsqlError, match="notes.md has no generated results block"):
        results_doc.readme(REPO / "results" / "sessions", doc, check=True)


def test_results_files_hold_every_repetition():
    for path in results_doc.session_files(REPO / "results" / "sessions")[0]:
        doc = json.loads(path.read_text())
        assert {"machine", "versions", "git_commit", "settings", "runs"} <= set(doc)
        for r in doc["runs"]:
            assert len(r["repetition_values"]) == r["repetitions"], (path.name, r["run_id"])
            assert r["wall_min_s"] <= r["wall_s"] <= r["wall_max_s"]


# --- engine capabilities: one conformance check over every registered engine --------------------

@pytest.mark.parametrize("name", list(ENGINES))
def test_engine_declares_its_capabilities(name):
    cls = engine_class(name)
    assert cls.name == name
    assert cls.devices and "cpu" in cls.devices
    assert isinstance(cls.default_batch_size, int) and cls.default_batch_size > 0
    for attr in ("bench_sample", "bench_warmup_images", "bench_sweep_images", "bench_single_stream",
                 "bench_repetitions", "bench_indb_repetitions"):
        value = getattr(cls, attr)
        assert value is None or (isinstance(value, int) and value > 0), attr
    # its SQL function exists for EvaDB (evadb_udfs/<name>_cnn.py, registered in sql/evadb_setup.sql)
    function = pgfunctions.sql_name(name)
    assert (REPO / "evadb_udfs" / f"{name}_cnn.py").exists()
    assert re.search(rf"CREATE OR REPLACE FUNCTION {function} IMPL", (REPO / "sql" / "evadb_setup.sql").read_text())


# --- the one run lifecycle (bench, Ray and training use it) --------------------------------------

def test_run_lifecycle_marks_failed_unfinished_and_complete_runs(conn):
    from cnnsql import db
    from cnnsql import results

    db.ensure_schema(conn)
    session = results.new_session_id()
    spec = {"kind": "raw", "scenario": "offline", "engine": "torch", "n_rows": 1}
    with pytest.raises(ValueError):
        with results.logged_run(conn, session, **spec):
            raise ValueError("boom")
    with results.logged_run(conn, session, **spec):
        pass  # left without results
    with results.logged_run(conn, session, **spec) as run:
        run.finish({"wall_s": 2.0, "wall_min_s": 1.5, "wall_max_s": 2.5, "images_per_s": 0.5, "cpu_s": 1.0,
                    "noisy": False}, repetitions=[1.5, 2.0, 2.5], cpus=[0.9, 1.0, 1.1])
    with conn.cursor() as cur:
        cur.execute("SELECT status, detail->>'error' FROM bench_run WHERE session_id = %s ORDER BY run_id", (session,))
        rows = cur.fetchall()
        cur.execute("SELECT array_agg(cpu_s ORDER BY rep) FROM bench_repetition WHERE run_id = %s", (run.id,))
        cpus = cur.fetchone()[0]
    conn.rollback()
    assert rows[0][0] == "failed" and "boom" in rows[0][1]
    assert rows[1] == ("failed", "the run ended without results")
    assert rows[2] == ("complete", None) and cpus == [0.9, 1.0, 1.1]


def test_report_on_a_session_without_an_sql_offline_run_is_one_clear_line(conn, tmp_path):
    """A session whose only SQL run is fetch-only once crashed the report with a traceback."""
    from conftest import run_cli

    from cnnsql import db
    from cnnsql import results

    db.ensure_schema(conn)
    session = results.new_session_id()
    with results.logged_run(conn, session, kind="sql", scenario="fetch-only", engine="none", n_rows=10) as run:
        run.finish({"wall_s": 0.1, "wall_min_s": 0.1, "wall_max_s": 0.1, "images_per_s": 100.0},
                   repetitions=[0.1], cpus=[0.05])
    proc = run_cli("report", "--out", str(tmp_path / "r"), "--session", session, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("cnnsql: error:") and "no complete SQL offline run" in proc.stderr


def test_a_local_run_stays_out_of_the_record_until_committed(tmp_path):
    """A benchmark run in a checkout writes its session file beside the committed ones; the README's
    tables (and their check) read only the files git tracks, so running the main job never breaks
    `make test`, and a result joins the record only when committed on purpose."""
    env = {"GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_SYSTEM": "/dev/null", "HOME": str(tmp_path)}
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True, env=env)
    git("init", "-q")
    folder = tmp_path / "results" / "sessions"
    folder.mkdir(parents=True)
    committed = results_doc.session_files(REPO / "results" / "sessions")[0]
    for f in committed:
        (folder / f.name).write_text(f.read_text())
    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text())
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "record")
    doc = json.loads(committed[-1].read_text())
    doc["started_at"] = "2999-01-01T00:00:00+00:00"  # the newest session: it would lead the tables
    for run in doc["runs"]:
        run["images_per_s"] = run["images_per_s"] * 3
    (folder / "zz-local-run.json").write_text(json.dumps(doc))
    assert results_doc.session_files(folder) == (sorted(folder.glob("*.json"))[:-1], [folder / "zz-local-run.json"])
    assert results_doc.readme(folder, readme, check=True)  # the local run is not part of the record
    git("add", "results/sessions/zz-local-run.json")
    with pytest.raises(CnnsqlError, match="disagree"):  # committed: now it is, and the README must follow
        results_doc.readme(folder, readme, check=True)
