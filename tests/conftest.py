"""Shared fixtures: a real private PostgreSQL cluster per test session, loaded with data.

The cluster lives in a temporary CNNSQL_HOME; the real CIFAR-10 archive from ../shared/data is
used when present (CNNSQL_TEST_CIFAR overrides), synthetic data otherwise.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_ARCHIVE = Path(os.environ.get("CNNSQL_TEST_CIFAR", REPO.parent / "shared" / "data" / "cifar-10-python.tar.gz"))

for var in ("CNNSQL_DSN", "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE", "PGPASSWORD",
            "CIFAR10_PATH", "CNNSQL_DB"):
    os.environ.pop(var, None)


def run_cli(*args: str, env: dict | None = None, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m cnnsql ARGS` in a subprocess (the real CLI, exit codes and all)."""
    proc = subprocess.run([sys.executable, "-m", "cnnsql", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"cnnsql {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def traversable_tmpdir(prefix: str) -> Path:
    """A fresh folder in /tmp that the 'postgres' user can traverse (as root the cluster runs as it).
    Not under pytest's /tmp/pytest-of-<user>: any other pytest session of the same user chmods that
    back to 0700, which locked the server's user out of a running suite's cluster (measured)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o711)
    return path


@pytest.fixture(scope="session")
def cnnsql_home():
    base = traversable_tmpdir("cnnsql-test-")
    os.environ["CNNSQL_HOME"] = str(base / "state")
    os.environ["CNNSQL_RESULTS_DIR"] = str(base / "results")  # `cnnsql bench` JSON files, not in the repo
    yield Path(os.environ["CNNSQL_HOME"])
    from cnnsql import db

    db.private_cluster().stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def target(cnnsql_home):
    from cnnsql import db

    return db.resolve()


@pytest.fixture(scope="session")
def real_cifar() -> Path | None:
    return SHARED_ARCHIVE if SHARED_ARCHIVE.is_file() else None


@pytest.fixture(scope="session")
def loaded(target, real_cifar):
    """The database with a dataset loaded: real CIFAR-10 when available, else 20,000 synthetic (4,000 test)."""
    if real_cifar:
        run_cli("load", "--quiet", "--source", str(real_cifar))
        return "cifar-10"
    run_cli("load", "--quiet", "--synthetic", "20000")
    return "synthetic"


@pytest.fixture()
def conn(target):
    from cnnsql import db

    c = db.connect(target)
    yield c
    c.close()


ENGINES = "torch,tensorflow,velox"


@pytest.fixture(scope="session")
def server_tmp():
    """A folder the server's user can read (as root it is 'postgres'): weights files that the in-database
    functions load. Not under pytest's tmp folder, which another pytest session may make 0700."""
    base = traversable_tmpdir("cnnsql-srv-")
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def server_subdir(server_tmp: Path, name: str, mode: int = 0o755) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=server_tmp))
    os.chmod(path, mode)
    return path


@pytest.fixture(scope="session")
def random_weights_file(server_tmp):
    from cnnsql import weights as W

    path = server_subdir(server_tmp, "w") / "random.npz"
    W.save_weights(path, W.random_weights(3).arrays, {"trained_by": "random", "seed": 3})
    return path


@pytest.fixture(scope="session")
def bench_session(loaded, random_weights_file):
    """One small `cnnsql bench` over all engines (runs logged to the session database)."""
    return run_cli("bench", "--engines", ENGINES, "--weights", str(random_weights_file), "--limit", "300",
                   "--sample", "4", "--repetitions", "2", "--warmup", "1", "--batch-sizes", "16,64",
                   "--single-stream", "5", "--sql-single-stream", "1", "--quiet", timeout=1200)


@pytest.fixture(scope="session")
def plpython(target) -> bool:
    """Whether the server has PL/Python (cnnsql db functions). CI sets CNNSQL_REQUIRE_PLPYTHON=1
    after installing it, so there a missing package fails the tests instead of skipping them."""
    from cnnsql import db

    with db.connection(target) as c, c.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'plpython3u'")
        available = cur.fetchone() is not None
    if not available and os.environ.get("CNNSQL_REQUIRE_PLPYTHON") == "1":
        pytest.fail("CNNSQL_REQUIRE_PLPYTHON=1 but the server has no plpython3u (apt-get install postgresql-plpython3-15)")
    return available


@pytest.fixture()
def need_plpython(plpython):
    if not plpython:
        pytest.skip("PostgreSQL has no PL/Python (plpython3u): apt-get install postgresql-plpython3-15 "
                    "(as root; .ci/run does it)")
