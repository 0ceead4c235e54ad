"""The foundation against a real PostgreSQL server: cluster, loader, counts, checksums."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from cnnsql.data import cifar
from cnnsql.core import config
from cnnsql import db
from conftest import REPO, SYNTHETIC_IMAGES, run_cli


def test_cluster_start_twice_status_and_url(target):
    run_cli("db", "start")  # already running: no error
    assert "running" in run_cli("db", "status").stdout
    url = run_cli("db", "url").stdout.strip()
    assert "password" not in url
    out = subprocess.run(["psql", url, "-Atc", "SELECT current_database()"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == config.database_name()


def test_cluster_is_private(target, conn):
    cluster = db.private_cluster()
    for path in (cluster.data, cluster.socket_dir):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cluster.pgpass).st_mode) == 0o600
    with conn.cursor() as cur:
        cur.execute("SHOW listen_addresses")
        assert cur.fetchone()[0] == "127.0.0.1"
        cur.execute("SELECT type, address FROM pg_hba_file_rules")
        rules = cur.fetchall()
    assert all(t == "local" or addr == "127.0.0.1" for t, addr in rules), rules


def test_stop_and_restart(target):
    assert run_cli("db", "stop").stdout.strip() == "stopped"
    assert run_cli("db", "status", check=False).returncode == 3
    run_cli("db", "start")
    assert "running" in run_cli("db", "status").stdout


def test_real_cifar_counts_and_checksums(loaded, conn, real_cifar):
    if loaded != "cifar-10":
        pytest.skip("real CIFAR-10 archive not available")
    with conn.cursor() as cur:
        cur.execute("SELECT split, count(*) FROM cifar_image GROUP BY split ORDER BY split")
        assert cur.fetchall() == [("test", 10000), ("train", 50000)]
        cur.execute("SELECT label, count(*) FROM cifar_image WHERE split = 'test' GROUP BY label ORDER BY label")
        assert cur.fetchall() == [(i, 1000) for i in range(10)]
        cur.execute("SELECT split, kind, md5 FROM cifar_dataset ORDER BY split")
        rows = cur.fetchall()
        cur.execute("SELECT name FROM cifar_class ORDER BY label")
        names = [r[0] for r in cur.fetchall()]
    assert names[:3] == ["airplane", "automobile", "bird"]
    for split, kind, md5 in rows:
        assert kind == "cifar-10"
        assert md5 == {m: cifar.MEMBER_MD5[m] for m in cifar.SPLITS[split]}


def test_stored_bytes_match_archive(loaded, conn, real_cifar):
    """Image 7 of the test split is stored byte for byte, channel-major, with its label."""
    source = real_cifar if loaded == "cifar-10" else None
    if source is None:
        pytest.skip("real CIFAR-10 archive not available")
    data = cifar.read_dataset(source)
    with conn.cursor() as cur:
        cur.execute("SELECT label, img FROM cifar_image WHERE split = 'test' AND id = 7")
        label, img = cur.fetchone()
    assert label == data.splits["test"].labels[7]
    assert np.array_equal(np.frombuffer(img, np.uint8), data.splits["test"].images[7])


def test_reload_is_idempotent(loaded, conn, real_cifar):
    source = ["--source", str(real_cifar)] if loaded == "cifar-10" else ["--synthetic", str(SYNTHETIC_IMAGES)]
    before = _counts(conn)
    out = run_cli("load", "--quiet", *source)
    assert "loaded" in out.stdout
    assert _counts(conn) == before


def test_synthetic_is_labelled_and_deterministic(target, tmp_path):
    env = {"CNNSQL_DB": "synthetic_check"}
    first = run_cli("load", "--quiet", "--synthetic", "500", env=env)
    assert "SYNTHETIC" in first.stderr
    url = run_cli("db", "url", env=env).stdout.strip()

    def digest():
        q = "SELECT md5(string_agg(img, ''::bytea ORDER BY split, id)) || ' ' || min(kind) FROM cifar_image JOIN cifar_dataset USING (split)"
        return subprocess.run(["psql", url, "-Atc", q], capture_output=True, text=True, check=True).stdout.strip()

    d1 = digest()
    run_cli("load", "--quiet", "--synthetic", "500", env=env)
    assert digest() == d1 and d1.endswith("synthetic")
    assert "500|100" in subprocess.run(["psql", url, "-Atc", "SELECT (SELECT count(*) FROM cifar_image_train) || '|' || (SELECT count(*) FROM cifar_image_test)"],
                                        capture_output=True, text=True, check=True).stdout


def test_loaders_entry_point_loads_through_the_same_code(target):
    env = {**os.environ, "CNNSQL_DB": "loaders_check"}
    proc = subprocess.run([sys.executable, "-m", "loaders.cifar10", "--quiet", "--synthetic", "40"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    url = run_cli("db", "url", env={"CNNSQL_DB": "loaders_check"}).stdout.strip()
    counts = subprocess.run(["psql", url, "-Atc", "SELECT split || '=' || count(*) FROM cifar_image GROUP BY split ORDER BY split"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert counts == ["test=8", "train=40"]
    bad = subprocess.run([sys.executable, "-m", "loaders.cifar10", "--source", "/nonexistent.tar.gz"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("cnnsql: error:")


def test_source_resolution_order(monkeypatch, tmp_path):
    a = tmp_path / "a.tar.gz"
    a.write_bytes(b"x")
    monkeypatch.setenv("CIFAR10_PATH", str(a))
    assert cifar.resolve_source(None, download=False) == a
    explicit = tmp_path / "b"
    explicit.mkdir()
    assert cifar.resolve_source(str(explicit), download=False) == explicit
    monkeypatch.delenv("CIFAR10_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CNNSQL_HOME", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    keras = tmp_path / ".keras" / "datasets" / "cifar-10-batches-py"
    keras.mkdir(parents=True)
    assert cifar.resolve_source(None, download=False) == keras


def test_nothing_found_says_where_to_put_it(tmp_path):
    env = {"HOME": str(tmp_path), "CNNSQL_HOME": str(tmp_path / "s"), "TORCH_HOME": str(tmp_path / "t")}
    proc = subprocess.run([os.sys.executable, "-m", "cnnsql", "load", "--no-download"], capture_output=True,
                          text=True, env={**os.environ, **env}, cwd=tmp_path)
    assert proc.returncode == 1
    assert "CIFAR-10 not found" in proc.stderr and "CIFAR10_PATH" in proc.stderr and "--source" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_on_every_command():
    for cmd in ([], ["db"], ["load"], ["train"], ["predict"]):
        assert run_cli(*cmd, "--help").returncode == 0


def _counts(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT split, count(*), sum(label) FROM cifar_image GROUP BY split ORDER BY split")
        rows = cur.fetchall()
    conn.rollback()
    return rows
