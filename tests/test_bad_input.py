"""Bad input and faults end with one clear error, a non-zero exit, and the database as it was."""
from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from cnnsql.data import cifar
from cnnsql import db
from cnnsql.core.errors import CnnsqlError
from conftest import REPO, run_cli


def load_until_copy_runs(source, timeout: float, text: bool = False):
    """Start `cnnsql load --source SOURCE` in a child and return (process, True) as soon as
    PostgreSQL shows its COPY running, or (process, False) when it ended or `timeout` passed first."""
    proc = subprocess.Popen([sys.executable, "-m", "cnnsql", "load", "--quiet", "--source", str(source)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text)
    watcher = db.connect()
    watcher.autocommit = True
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            with watcher.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY%%' AND state = 'active'")
                if cur.fetchone()[0]:
                    return proc, True
            time.sleep(0.01)
        return proc, False
    finally:
        watcher.close()


def snapshot(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT split, count(*), sum(label), md5(string_agg(md5(img), '' ORDER BY id)) "
                    "FROM cifar_image GROUP BY split ORDER BY split")
        rows = cur.fetchall()
        cur.execute("SELECT split, kind, md5 FROM cifar_dataset ORDER BY split")
        rows += cur.fetchall()
    conn.rollback()
    return rows


def assert_clean_failure(proc, *needles):
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert err and err[-1].startswith("cnnsql: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


def make_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture()
def synthetic_dir(tmp_path):
    md5 = cifar.write_synthetic(tmp_path, 100, 20)
    return tmp_path, md5


def test_truncated_archive(loaded, conn, real_cifar, tmp_path):
    before = snapshot(conn)
    # without the real archive: members of the official sizes (random bytes, so gzip cannot shrink them),
    # which pass the size check and are cut inside a member's data, as a broken download is
    rng = np.random.default_rng(0)
    src = real_cifar.read_bytes() if real_cifar else make_tar(
        tmp_path / "s.tar.gz", {f"{cifar.TOP}/{name}": rng.bytes(size) for name, size in
                                (("batches.meta", cifar.MEMBER_SIZE["batches.meta"]),
                                 ("data_batch_1", cifar.MEMBER_SIZE["data_batch_1"]))}
    ).read_bytes()
    bad = tmp_path / "truncated.tar.gz"
    bad.write_bytes(src[: len(src) // 3])
    assert_clean_failure(run_cli("load", "--quiet", "--source", str(bad), check=False), "truncated or corrupt")
    assert snapshot(conn) == before


def test_wrong_checksum(loaded, conn, synthetic_dir):
    before = snapshot(conn)
    # synthetic files are well-formed batches but not the official ones: refused by size, before reading
    assert_clean_failure(run_cli("load", "--quiet", "--source", str(synthetic_dir[0]), check=False),
                         "bytes, expected", "not the official CIFAR-10")
    assert snapshot(conn) == before
    directory, md5 = synthetic_dir  # the right sizes but other contents: refused by checksum
    with pytest.raises(CnnsqlError, match="checksum mismatch for data_batch_1"):
        cifar.read_dataset(directory, expected_md5={**md5, "data_batch_1": "0" * 32})


def test_unexpected_member_name(loaded, conn, tmp_path):
    before = snapshot(conn)
    for name in ("cifar-10-batches-py/evil.sh", "../etc/passwd", "cifar-10-batches-py/sub/data_batch_1"):
        bad = make_tar(tmp_path / "m.tar.gz", {name: b"#!/bin/sh\n"})
        assert_clean_failure(run_cli("load", "--quiet", "--source", str(bad), check=False), "unexpected")
    assert snapshot(conn) == before


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewrite_member(directory, name, obj, md5):
    payload = pickle.dumps(obj, protocol=4)
    (directory / cifar.TOP / name).write_bytes(payload)
    md5[name] = cifar._md5(payload)


def test_pickle_cannot_execute_code(synthetic_dir, tmp_path):
    directory, md5 = synthetic_dir
    marker = tmp_path / "pwned"
    _rewrite_member(directory, "data_batch_2", {b"data": _Exploit(marker), b"labels": []}, md5)
    with pytest.raises(CnnsqlError, match="refused to load"):
        cifar.read_dataset(directory, expected_md5=md5)
    assert not marker.exists()


@pytest.mark.parametrize("batch, message", [
    ({b"data": np.zeros((10, 3071), np.uint8), b"labels": [0] * 10}, "expected (N, 3072)"),
    ({b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 9}, "labels for 10 images"),
    ({b"data": np.zeros((10, 3072), np.uint8), b"labels": [10] * 10}, "label out of range"),
    ({b"data": np.zeros((10, 3072), np.float32), b"labels": [0] * 10}, "expected (N, 3072) uint8"),
    ({b"labels": [0]}, "lacks 'data'"),
])
def test_malformed_batches(synthetic_dir, batch, message):
    directory, md5 = synthetic_dir
    _rewrite_member(directory, "test_batch", batch, md5)
    with pytest.raises(CnnsqlError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cifar.read_dataset(directory, expected_md5=md5)


def test_unreachable_dsn():
    proc = run_cli("db", "status", env={"CNNSQL_DSN": "postgresql://nobody@127.0.0.1:1/nothing"}, check=False)
    assert_clean_failure(proc, "cannot connect to PostgreSQL", "CNNSQL_DSN")
    proc = run_cli("load", "--quiet", "--synthetic", "10", env={"CNNSQL_DSN": "host=127.0.0.1 port=1 dbname=x"},
                   check=False)
    assert_clean_failure(proc, "cannot connect to PostgreSQL")


def test_wrong_password_is_refused_and_not_printed(target):
    port = db.private_cluster().port
    secret = "s3cret-Do-Not-Print"
    dsn = f"postgresql://cnnsql:{secret}@127.0.0.1:{port}/cnnsql"
    proc = run_cli("db", "status", env={"CNNSQL_DSN": dsn, "PGPASSFILE": "/dev/null"}, check=False)
    assert_clean_failure(proc, "password authentication failed")
    assert secret not in proc.stderr + proc.stdout
    url = run_cli("db", "url", env={"CNNSQL_DSN": dsn}).stdout
    assert secret not in url and "cnnsql@127.0.0.1" in url


def test_sigkill_during_copy_leaves_previous_state(loaded, conn, real_cifar):
    if not real_cifar:
        pytest.skip("needs the real archive (a large enough COPY to interrupt)")
    before = snapshot(conn)
    proc, killed = load_until_copy_runs(real_cifar, 60)
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, "the load finished before it could be interrupted"
    time.sleep(0.5)  # the server notices the dead client and rolls back
    assert snapshot(conn) == before
    run_cli("load", "--quiet", "--source", str(real_cifar))
    assert snapshot(conn) == before
