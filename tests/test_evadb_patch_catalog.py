"""The patch's catalog cache never outlives the catalog it caches: EvaDB opened, its folder removed and
EvaDB opened again at the same path in one process (what EvaDB's own tests do for every test) writes
to the new catalog, as stock EvaDB does; and a function's outputs are read by its row id only."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration

SCRIPT = r"""
import shutil, sys, warnings
warnings.filterwarnings("ignore")
import evadb
from cnnsql.placements import evadb_patch
assert evadb_patch.install()
folder = sys.argv[1]
for attempt in range(3):
    shutil.rmtree(folder, ignore_errors=True)          # as EvaDB's tests do between tests
    cursor = evadb.connect(folder).cursor()             # bootstrap writes the configuration catalog
    cursor.query("DROP FUNCTION IF EXISTS NoSuchFunction;").df()
    cursor.query("CREATE TABLE IF NOT EXISTS t (id INTEGER);").df()  # a catalog write
    cursor.query("DROP TABLE IF EXISTS t;").df()
    print("attempt", attempt, "ok", flush=True)
"""


def test_a_catalog_removed_and_made_again_in_one_process(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "evadb_data")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "readonly database" not in proc.stderr, proc.stderr[-3000:]
    assert [l for l in proc.stdout.splitlines() if l.endswith(" ok")] == [f"attempt {i} ok" for i in range(3)]


def test_function_outputs_are_read_by_row_id_only():
    from types import SimpleNamespace

    from cnnsql.placements.evadb_patch import catalog

    calls = []
    stock = catalog._STOCK["get_function_io_catalog_output_entries"]
    catalog._STOCK["get_function_io_catalog_output_entries"] = lambda self, f: calls.append(f.row_id) or ["out"]
    try:
        manager = SimpleNamespace()
        entry = SimpleNamespace(row_id=4)  # no name: stock reads only the row id
        assert catalog._get_function_outputs(manager, entry) == ["out"]
        assert catalog._get_function_outputs(manager, entry) == ["out"] and calls == [4]  # memoized
    finally:
        catalog._STOCK["get_function_io_catalog_output_entries"] = stock
