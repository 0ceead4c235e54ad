"""Docker files checked statically (no Docker engine runs on these machines)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not path:
        pytest.fail(f"{name} not installed: it is in the [test] extra")
    return str(path)


def test_dockerfile_lints_clean():
    proc = subprocess.run([tool("hadolint"), "docker/Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_file_matches_the_compose_spec():
    proc = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                           "docker/docker-compose.yml"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_passes_the_dsn_from_the_environment_and_never_a_literal_password():
    text = (REPO / "docker" / "docker-compose.yml").read_text()
    assert "CNNSQL_DSN:" in text and "${POSTGRES_PASSWORD:?" in text
    assert "5432:5432" not in text  # the database is not published on the host


# --- the build context (.dockerignore) ---------------------------------------------------------

def _docker_pattern(pattern: str) -> re.Pattern:
    """Docker's .dockerignore matching (Go filepath.Match plus `**`), relative to the context root."""
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def docker_excludes(path: str, rules: list[str]) -> bool:
    """True if the context path (or a folder above it) is excluded; the last matching rule wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for rule in rules:
        negate = rule.startswith("!")
        rx = _docker_pattern(rule[1:] if negate else rule)
        if any(rx.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def dockerignore_rules() -> list[str]:
    path = REPO / ".dockerignore"
    assert path.is_file(), ".dockerignore is missing: `COPY . /app` would copy .venv, .cnnsql and results/"
    return [l.strip() for l in path.read_text().splitlines() if l.strip() and not l.lstrip().startswith("#")]


# What a working tree holds that must never reach the image: the private cluster's data and password
# file, EvaDB catalogs, downloads, weights, the venv, results, git history, secrets.
PRIVATE = [".cnnsql/pg/pgpass", ".cnnsql/pg/data/global/pg_control", ".cnnsql/evadb/evadb.db",
           ".cnnsql/downloads/cifar-10-python.tar.gz", ".cnnsql/weights/default.npz", ".venv/bin/python",
           "results/report/index.html", "weights/mine.npz", "data/cifar-10-batches-py/data_batch_1",
           "docker/data/cifar-10-python.tar.gz", ".git/config", "cnnsql/__pycache__/cli.cpython-311.pyc",
           ".pytest_cache/v/cache/lastfailed", "cnnsql.egg-info/PKG-INFO", ".env", "docker/.env",
           "examples/my.npz", "tests/.cnnsql/pg/pgpass", "somewhere/.pgpass"]


def test_dockerignore_keeps_private_state_out_of_the_image():
    rules = dockerignore_rules()
    leaked = [p for p in PRIVATE if not docker_excludes(p, rules)]
    assert not leaked, f"would be copied into the image: {leaked}"


def test_dockerignore_covers_everything_git_ignores():
    """Whatever git keeps out of the repository (state, venvs, results) stays out of the image too."""
    rules = dockerignore_rules()
    for line in (REPO / ".gitignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        sample = line.strip("/").replace("*", "x") + "/inner"
        assert docker_excludes(sample, rules), f".gitignore entry {line!r} is not excluded from the build context"


def test_dockerignore_keeps_what_the_image_needs():
    rules = dockerignore_rules()
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    needed = [p for p in tracked if p.split("/")[0] in
              ("cnnsql", "sql", "evadb_udfs", "loaders", "pyproject.toml", "README.md", "Makefile", "examples")]
    assert "pyproject.toml" in needed and "cnnsql/cli/main.py" in needed
    dropped = [p for p in needed if docker_excludes(p, rules)]
    assert not dropped, f"the image build needs these, but .dockerignore drops them: {dropped}"


def test_the_matcher_follows_docker_semantics():
    assert docker_excludes(".venv/lib/x.py", [".venv"]) and not docker_excludes("a/.venv/x", [".venv"])
    assert docker_excludes("a/b/.venv/x", ["**/.venv"]) and docker_excludes("x.npz", ["**/*.npz"])
    assert not docker_excludes("cnnsql/data/cifar_table.py", ["data"]) and not docker_excludes("keep", ["*", "!keep"])
