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
SYNTHETIC_IMAGES = 20000  # the `loaded` fixture's synthetic dataset when no real archive is found (4,000 test)


def _find_real_archive() -> Path | None:
    """The real CIFAR-10 archive, found where the README says a user keeps it: $CNNSQL_TEST_CIFAR (set
    to an empty string to force the synthetic path), ../shared/data, then the product's own search
    ($CIFAR10_PATH, the Keras and torchvision caches, an earlier download). Only a regular file counts:
    the tests cut and copy its bytes. The suite passes on either path; `.ci/run` tests both."""
    if "CNNSQL_TEST_CIFAR" in os.environ:
        given = os.environ["CNNSQL_TEST_CIFAR"]
        return Path(given) if given and Path(given).is_file() else None
    shared = REPO.parent / "shared" / "data" / "cifar-10-python.tar.gz"
    if shared.is_file():
        return shared
    from cnnsql.data import cifar

    return next((p.absolute() for _, p in cifar.candidate_sources() if p.is_file()), None)


SHARED_ARCHIVE = _find_real_archive()

# Hermetic: nothing of the user's environment reaches a test (their server, their data, their state folder)
for var in ("CNNSQL_DSN", "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE", "PGPASSWORD",
            "PGPASSFILE", "PGSERVICEFILE", "PGSSLMODE", "CIFAR10_PATH", "KERAS_HOME", "TORCH_HOME", "CNNSQL_DB",
            "CNNSQL_HOME", "CNNSQL_RESULTS_DIR", "CNNSQL_PG_PORT", "CNNSQL_POOLER_PORT", "CNNSQL_WEIGHTS", "CNNSQL_ENGINE",
            "CNNSQL_TEST_CIFAR"):
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


# Every test, with or without the fixture below, gets a state folder and a results folder of its own
# session: never the checkout's .cnnsql (the user's cluster, weights, downloads) or results/sessions.
SESSION_BASE = traversable_tmpdir("cnnsql-test-")
os.environ["CNNSQL_HOME"] = str(SESSION_BASE / "state")
os.environ["CNNSQL_RESULTS_DIR"] = str(SESSION_BASE / "results")


# Two kinds of tests: unit tests (no database, no server, no subprocess of the CLI) and integration tests
# against the real PostgreSQL, EvaDB, Velox and Ray. Any test that uses the private cluster (every
# database fixture depends on `cnnsql_home`) is integration; a module that starts servers or the CLI
# by itself says so with `pytestmark = pytest.mark.integration`. `make test-fast` runs the others.
def pytest_configure(config):
    config.addinivalue_line("markers", "integration: needs the real PostgreSQL, EvaDB, Velox or Ray (make test)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cnnsql_home" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


def pytest_sessionfinish(session, exitstatus):
    if (SESSION_BASE / "state" / "pg").exists():  # a cluster a test started without the fixture
        from cnnsql import db

        db.private_cluster().stop()
    shutil.rmtree(SESSION_BASE, ignore_errors=True)


@pytest.fixture(scope="session")
def cnnsql_home():
    yield SESSION_BASE / "state"
    from cnnsql import db

    db.private_cluster().stop()


@pytest.fixture(scope="session")
def target(cnnsql_home):
    from cnnsql import db

    return db.resolve()


@pytest.fixture(scope="session")
def real_cifar() -> Path | None:
    return SHARED_ARCHIVE


@pytest.fixture(scope="session")
def loaded(target, real_cifar):
    """The database with a dataset loaded: real CIFAR-10 when available, else 20,000 synthetic (4,000 test)."""
    if real_cifar:
        run_cli("load", "--quiet", "--source", str(real_cifar))
        return "cifar-10"
    run_cli("load", "--quiet", "--synthetic", str(SYNTHETIC_IMAGES))
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
    from cnnsql.models import weights as W

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
