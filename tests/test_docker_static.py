"""Docker files checked statically: lint, compose schema, the build context, and that the compose file
and the podman steps of scripts/docker-bench.sh (which builds and runs the stack: `make docker-test`,
run by CI) say the same thing."""
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


def compose() -> dict:
    import yaml  # PyYAML comes with the [test] extra (check-jsonschema)

    return yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())


def test_compose_passes_the_password_as_a_secret_and_never_a_literal():
    c = compose()
    assert c["secrets"]["pg_password"] == {"environment": "POSTGRES_PASSWORD"}
    pg, app = c["services"]["postgres"], c["services"]["app"]
    assert pg["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/pg_password" and "POSTGRES_PASSWORD" not in pg["environment"]
    assert "pg_password" in pg["secrets"] and "pg_password" in app["secrets"]
    assert app["environment"]["CNNSQL_DSN"] == "postgresql://cnnsql@postgres:5432/cnnsql"  # no password in the DSN
    for name in ("docker/Dockerfile", "docker/docker-compose.yml"):
        code = "\n".join(l for l in (REPO / name).read_text().splitlines() if not l.lstrip().startswith("#"))
        assert not re.search(r"PASSWORD\s*[:=]\s*\S", code.replace("POSTGRES_PASSWORD_FILE:", "")), name


def test_compose_gates_the_app_on_a_healthy_database_on_a_private_network():
    c = compose()
    pg, app = c["services"]["postgres"], c["services"]["app"]
    assert app["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert pg["healthcheck"]["test"][:3] == ["CMD", "pg_isready", "-h"]  # TCP: not ready while initdb runs
    assert "ports" not in pg and "ports" not in app  # nothing published on the host
    assert c["networks"]["db"]["internal"] is True and pg["networks"] == app["networks"] == ["db"]
    assert "pgdata:/var/lib/postgresql/data" in pg["volumes"] and "pgdata" in c["volumes"]
    assert any(v.endswith(":/data/cifar:ro") for v in app["volumes"])  # the data read-only
    assert pg["image"] == "${CNNSQL_POSTGRES_IMAGE:-postgres:15}"
    assert app["build"]["args"]["BASE"] == "${CNNSQL_PYTHON_BASE:-python:3.11-slim-bookworm}"


def test_the_podman_steps_match_the_compose_file():
    c = compose()
    script = (REPO / "scripts" / "docker-bench.sh").read_text()
    pg, app = c["services"]["postgres"], c["services"]["app"]
    assert "--health-cmd '" + " ".join(pg["healthcheck"]["test"][1:]) + "'" in script
    assert "CNNSQL_DSN=" + app["environment"]["CNNSQL_DSN"] in script
    assert "network create --internal" in script and "--network-alias postgres" in script
    assert "POSTGRES_PASSWORD_FILE=" + pg["environment"]["POSTGRES_PASSWORD_FILE"] in script
    assert app["environment"]["BENCH_ARGS"] == "${BENCH_ARGS:-" + re.search(
        r'BENCH_ARGS="\$\{BENCH_ARGS:-(.*?)\}"', script).group(1) + "}"


def test_the_image_runs_as_a_user_and_installs_the_pins_of_pyproject():
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert "ARG BASE=python:3.11-slim-bookworm" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("0", "root")
    assert "['project']['dependencies']" in text and "--no-deps -e ." in text


def test_ci_builds_and_runs_the_stack():
    """The real check is `make docker-test` (images built, the benchmark run in the app container); CI
    runs it, and the app container's password reaches libpq as a pgpass file (EvaDB's empty password
    makes libpq ignore PGPASSWORD)."""
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^timeout \d+ make docker-test$", ci, re.M)
    assert re.search(r"^docker-test:", (REPO / "Makefile").read_text(), re.M)
    bench = (REPO / "docker" / "bench.sh").read_text()
    assert "PGPASSFILE=/dev/shm/" in bench and "umask 077" in bench


@pytest.mark.parametrize("script", ["scripts/docker-base.sh", "scripts/docker-bench.sh", "docker/bench.sh",
                                    "docker/postgres/entrypoint.sh"])
def test_the_container_scripts_parse(script):
    shell = "bash" if script.startswith("scripts/") else "sh"
    proc = subprocess.run([shell, "-n", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


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
PRIVATE = ["docker/results/20261205T120000-abc.json", ".cnnsql/pg/pgpass", ".cnnsql/pg/data/global/pg_control", ".cnnsql/evadb/evadb.db",
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
