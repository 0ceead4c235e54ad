"""Docker files checked statically (no Docker engine runs on these machines)."""
from __future__ import annotations

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
