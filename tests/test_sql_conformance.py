"""The SQL surface through EvaDB against psql on the same data, and the patches that make it so.

Each query runs through cnnsql's EvaDB session (real EvaDB, real PostgreSQL) and, with `pg.`
removed, through psql's server directly; the answers must be equal (values, row count, column
names; row order where the query orders). Queries that call a CNN function are checked against
the raw engine. What cannot be answered correctly must fail with one clear line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from conftest import REPO

# (EvaDB query, ordered?) — the psql query is the same text without "pg.".
PLAIN = [
    ("SELECT id, label FROM pg.cifar_test WHERE id < 10;", False),
    ("SELECT id, label FROM pg.cifar_test WHERE id = 7;", False),
    ("SELECT id, label FROM pg.cifar_test WHERE 5 > id;", False),
    ("SELECT id FROM pg.cifar_test WHERE id >= 100 AND id < 140 AND label = 3;", False),
    ("SELECT id FROM pg.cifar_test WHERE id < 3 OR id > 3997;", False),
    ("SELECT id FROM pg.cifar_test WHERE NOT id > 1;", False),
    ("SELECT id FROM pg.cifar_test WHERE NOT (id > 1 AND id < 3998);", False),
    ("SELECT id, label FROM pg.cifar_test WHERE label = 3 AND (id < 50 OR id > 3950);", False),
    ("SELECT id, label FROM pg.cifar_test WHERE id != 0 AND id < 4;", False),
    ("SELECT id FROM pg.cifar_test WHERE label >= 8 AND id <= 30 ORDER BY id;", True),
    ("SELECT id, label FROM pg.cifar_test ORDER BY label DESC, id LIMIT 5;", True),
    ("SELECT id FROM pg.cifar_test WHERE id < 100 ORDER BY id DESC LIMIT 3;", True),
    ("SELECT label, id FROM pg.cifar_test WHERE id < 20 ORDER BY label, id;", True),
    ("SELECT COUNT(*) FROM pg.cifar_test;", False),
    ("SELECT COUNT(*) FROM pg.cifar_test WHERE label = 3;", False),
    ("SELECT COUNT(*) FROM pg.cifar_test WHERE label = 3 OR label = 4;", False),
    ("SELECT label, COUNT(*) FROM pg.cifar_test GROUP BY label ORDER BY label;", True),
    ("SELECT MIN(id), MAX(id), SUM(label), AVG(label) FROM pg.cifar_test;", False),
    ("SELECT label, MIN(id), MAX(id) FROM pg.cifar_test WHERE id < 500 GROUP BY label ORDER BY label;", True),
    ("SELECT label, COUNT(id) FROM pg.cifar_test WHERE id < 1000 GROUP BY label ORDER BY COUNT(id) DESC, label "
     "LIMIT 3;", True),
    ("SELECT COUNT(*) FROM pg.cifar_test WHERE id < 0;", False),
    ("SELECT SUM(label) FROM pg.cifar_test WHERE id < 0;", False),
    ("SELECT label, COUNT(*) FROM pg.cifar_test WHERE id < 0 GROUP BY label;", False),
    ("SELECT name FROM pg.cifar_class WHERE label = 3;", False),
    ("SELECT label, name FROM pg.cifar_class WHERE name = 'cat' OR label = 0 ORDER BY label;", True),
    ("SELECT label, name FROM pg.cifar_class ORDER BY label DESC LIMIT 2;", True),
]
REFUSED = [
    ("SELECT label FROM pg.cifar_test GROUP BY label HAVING COUNT(*) > 1;", "HAVING is not supported"),
    ("SELECT id, COUNT(*) FROM pg.cifar_test GROUP BY label;", "must appear in GROUP BY"),
    ("SELECT TorchCNN(img), COUNT(*) FROM pg.cifar_test WHERE id < 3 GROUP BY TorchCNN(img);",
     "whole function output"),
]


@pytest.fixture(scope="module")
def session(loaded, random_weights_file):
    from cnnsql.placements import evadb_session

    return evadb_session.connect(weights=random_weights_file, threads=2)


@pytest.fixture(scope="module")
def pg(target):
    from cnnsql import db

    c = db.connect(target)
    c.autocommit = True
    yield c
    c.close()


def psql_frame(pg, query: str) -> pd.DataFrame:
    with pg.cursor() as cur:
        cur.execute(query.replace("pg.", ""))
        return pd.DataFrame(cur.fetchall(), columns=[d.name for d in cur.description])


def normalised(df: pd.DataFrame, ordered: bool) -> list[tuple]:
    rows = [tuple(None if pd.isna(v) else round(float(v), 9) if isinstance(v, (float, np.floating)) or
                  type(v).__name__ == "Decimal" else int(v) if isinstance(v, (int, np.integer)) else v for v in row)
            for row in df.itertuples(index=False)]
    return rows if ordered else sorted(rows, key=repr)


@pytest.mark.parametrize("query,ordered", PLAIN, ids=[q for q, _ in PLAIN])
def test_query_equals_psql(session, pg, query, ordered):
    from cnnsql.placements import evadb_session

    mine = evadb_session.run(session, query)
    theirs = psql_frame(pg, query)
    assert normalised(mine, ordered) == normalised(theirs, ordered)
    if len(theirs):
        assert list(mine.columns) == list(theirs.columns)


@pytest.mark.parametrize("query,message", REFUSED, ids=[q for q, _ in REFUSED])
def test_unsupported_query_fails_with_one_clear_line(session, query, message):
    from cnnsql.placements import evadb_session
    from cnnsql.core.errors import CnnsqlError

    with pytest.raises(CnnsqlError) as info:
        evadb_session.run(session, query)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.fixture(scope="module")
def raw_labels(pg, random_weights_file):
    """The raw engine's labels for the first 60 test images."""
    from cnnsql.data import cifar_table as data
    from cnnsql.placements import evadb_function

    ids, images, _ = data.fetch_split(pg, "test")
    engine = evadb_function.cached_engine("torch", str(random_weights_file), "cpu", 2)
    return engine.predict(images[:60], 16).argmax(1)


def test_predicates_and_aggregates_on_function_output(session, raw_labels):
    from cnnsql.placements import evadb_session

    common = int(np.bincount(raw_labels[:50]).argmax())
    out = evadb_session.run(session, "SELECT id, TorchCNN(img).label FROM pg.cifar_test WHERE id < 60;")
    assert out["label"].tolist() == raw_labels.tolist()
    out = evadb_session.run(session, f"SELECT id FROM pg.cifar_test WHERE TorchCNN(img).label = {common} AND id < 50;")
    assert sorted(out["id"]) == [i for i in range(50) if raw_labels[i] == common]
    out = evadb_session.run(session, f"SELECT COUNT(*) FROM pg.cifar_test WHERE id < 50 AND TorchCNN(img).label = "
                                     f"{common};")
    assert out["count"].tolist() == [int((raw_labels[:50] == common).sum())]
    out = evadb_session.run(session, "SELECT TorchCNN(img).label, COUNT(*) FROM pg.cifar_test WHERE id < 50 "
                                     "GROUP BY TorchCNN(img).label;")
    expected = np.bincount(raw_labels[:50], minlength=10)
    assert {int(k): int(v) for k, v in zip(out["label"], out["count"])} == \
        {k: int(v) for k, v in enumerate(expected) if v}
    out = evadb_session.run(session, "SELECT id, Classify(img).label FROM pg.cifar_test WHERE id < 10;")
    assert out["label"].tolist() == raw_labels[:10].tolist()


def test_one_image_query_reads_one_row_in_postgresql(session, pg):
    """Proof from PostgreSQL's own statistics: the query fetches one heap row, scans nothing."""
    from cnnsql.placements import evadb_session
    from cnnsql.placements.evadb_patch import handler

    def counters():
        with pg.cursor() as cur:
            cur.execute("SELECT pg_stat_clear_snapshot()")
            cur.execute("SELECT coalesce(seq_tup_read, 0), coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables "
                        "WHERE relname = 'cifar_image_test'")
            return cur.fetchone()

    for _ in range(3):  # warm: with the plan cache, its first runs learn and check the shape (two scans)
        evadb_session.run(session, "SELECT id, TorchCNN(img) FROM pg.cifar_test WHERE id = 7;")
    handler.close_idle()  # a backend flushes its statistics when it ends
    time.sleep(1.5)
    before = counters()
    out = evadb_session.run(session, "SELECT id, TorchCNN(img) FROM pg.cifar_test WHERE id = 7;")
    handler.close_idle()
    deadline, after = time.time() + 10, before
    while after == before and time.time() < deadline:
        time.sleep(0.5)
        after = counters()
    assert out["id"].tolist() == [7]
    assert after[0] - before[0] == 0, "a sequential scan read the split"
    assert after[1] - before[1] == 1, f"heap rows fetched: {after[1] - before[1]}"
    assert 'WHERE ("id" = 7)' in handler.STATS["queries"][-1]


def test_limit_reaches_postgresql_and_streaming_stops_after_the_first_chunk(session):
    from cnnsql.placements import evadb_session
    from cnnsql.placements.evadb_patch import handler

    before = dict(handler.STATS)
    out = evadb_session.run(session, "SELECT id, label FROM pg.cifar_test LIMIT 1;")
    assert len(out) == 1
    assert handler.STATS["chunks"] - before["chunks"] == 1 and handler.STATS["rows"] - before["rows"] == 1
    assert handler.STATS["queries"][-1].endswith("LIMIT 1")
    # A filter EvaDB must evaluate itself keeps the LIMIT in EvaDB; the stream still stops early.
    before = dict(handler.STATS)
    out = evadb_session.run(session, "SELECT id FROM pg.cifar_test WHERE TorchCNN(img).label >= 0 LIMIT 2;")
    assert len(out) == 2 and not handler.STATS["queries"][-1].endswith("LIMIT 2")
    assert handler.STATS["rows"] - before["rows"] <= 64


def test_columns_not_used_are_not_read(session):
    from cnnsql.placements import evadb_session
    from cnnsql.placements.evadb_patch import handler

    evadb_session.run(session, "SELECT COUNT(*) FROM pg.cifar_test WHERE label = 2;")
    assert handler.STATS["queries"][-1].startswith('SELECT "id", "label" FROM "cifar_test"')


STOCK_SCRIPT = """
import json, sys, warnings
warnings.filterwarnings("ignore")
from cnnsql import db
from cnnsql.placements import evadb_session, evadb_patch
evadb_patch.install = lambda: False            # stock EvaDB: nothing patched
cursor = evadb_session.connect(weights=sys.argv[1])
out = {}
for q in json.loads(sys.stdin.read()):
    try:
        out[q] = evadb_session.run(cursor, q).drop(columns=["probs"], errors="ignore").to_json(orient="values")
    except Exception as exc:
        out[q] = "error: " + str(exc)
print(json.dumps(out))
"""
SAME_AS_STOCK = ["SELECT id, label FROM pg.cifar_test WHERE id < 10;",
                 "SELECT id, TorchCNN(img) FROM pg.cifar_test WHERE id = 7;",
                 "SELECT id, label FROM pg.cifar_test ORDER BY label DESC, id LIMIT 5;",
                 "SELECT id, TorchCNN(img).label FROM pg.cifar_test LIMIT 3;",
                 "SELECT name FROM pg.cifar_class WHERE label = 3;"]


def test_results_identical_with_and_without_the_patches(session, random_weights_file):
    from cnnsql.placements import evadb_session

    proc = subprocess.run([sys.executable, "-c", STOCK_SCRIPT, str(random_weights_file)], cwd=REPO,
                          input=json.dumps(SAME_AS_STOCK), capture_output=True, text=True, timeout=600,
                          env=os.environ)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stock = json.loads(proc.stdout.strip().splitlines()[-1])
    for query in SAME_AS_STOCK:
        assert not stock[query].startswith("error"), stock[query]
        mine = evadb_session.run(session, query).drop(columns=["probs"], errors="ignore")
        assert json.loads(mine.to_json(orient="values")) == json.loads(stock[query]), query


def test_version_guard_installs_nothing_on_another_evadb(monkeypatch):
    import evadb

    from cnnsql.placements import evadb_patch

    monkeypatch.setattr(evadb_patch, "_state", {"installed": False, "checked": None})
    monkeypatch.setattr(evadb, "__version__", "0.3.10", raising=False)
    from evadb.third_party.databases.postgres import postgres_handler

    handler_before = postgres_handler.PostgresHandler
    with pytest.warns(UserWarning, match=r"EvaDB patches not installed \(EvaDB 0.3.10"):
        assert evadb_patch.install() is False
    assert postgres_handler.PostgresHandler is handler_before
    assert evadb_patch.mismatches() == ["EvaDB 0.3.10 (written for 0.3.9)"]


def test_version_guard_sees_a_changed_function(monkeypatch):
    from cnnsql.placements import evadb_patch

    monkeypatch.setitem(evadb_patch.STOCK_SOURCES, "evadb.server.command_handler:execute_statement", "0" * 16)
    assert "evadb.server.command_handler:execute_statement changed" in evadb_patch.mismatches()


def test_cnn_functions_read_bytes_and_selected_images_stay_base64(session, pg):
    from cnnsql.placements import evadb_session
    from cnnsql.placements.evadb_patch import handler

    evadb_session.run(session, "SELECT id, TorchCNN(img).label FROM pg.cifar_test WHERE id < 3;")
    assert '"cnnsql_bytes"."cifar_test_bytes"' in handler.STATS["queries"][-1]
    out = evadb_session.run(session, "SELECT id, img, TorchCNN(img).label FROM pg.cifar_test WHERE id < 3;")
    assert '"cnnsql_bytes"' not in handler.STATS["queries"][-1]  # img itself is selected: the text view
    assert out["img"].tolist() == psql_frame(pg, "SELECT img FROM cifar_test WHERE id < 3 ORDER BY id")["img"].tolist()


def test_a_reused_connection_the_server_ended_is_not_used(session, pg):
    from cnnsql.placements import evadb_session
    from cnnsql.placements.evadb_patch import handler

    evadb_session.run(session, "SELECT id FROM pg.cifar_test WHERE id < 2;")
    with pg.cursor() as cur:  # end every idle backend of this database but ours, as a restart would
        cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND state = 'idle' AND application_name NOT LIKE 'pg_%'")
        assert cur.fetchone()[0] >= 1
    time.sleep(0.5)
    out = evadb_session.run(session, "SELECT id FROM pg.cifar_test WHERE id < 2;")
    assert sorted(out["id"]) == [0, 1]
    assert handler.STATS["connects"] > 0


def test_read_ahead_yields_in_order_and_stops_its_thread_when_the_caller_stops():
    import threading

    from cnnsql.placements.evadb_patch.transport import read_ahead

    closed = []

    def items():
        try:
            yield from range(100)
        finally:
            closed.append(threading.current_thread().name)

    assert list(read_ahead(items())) == list(range(100)) and closed
    closed.clear()
    stream = read_ahead(items())
    assert [next(stream), next(stream)] == [0, 1]
    stream.close()  # as EvaDB does when a LIMIT is reached
    assert closed == ["cnnsql-read-ahead"]
    assert not any(t.name == "cnnsql-read-ahead" for t in threading.enumerate())


def test_read_ahead_raises_the_producer_error_in_the_caller():
    from cnnsql.placements.evadb_patch.transport import read_ahead

    def failing():
        yield 1
        raise ValueError("server went away")

    stream = read_ahead(failing())
    assert next(stream) == 1
    with pytest.raises(ValueError, match="server went away"):
        next(stream)


def test_a_multi_chunk_read_ends_its_transaction_and_returns_the_connection(session, pg):
    """A whole-split read (several chunks, fetched ahead by a thread) leaves no open transaction
    behind: the pooled connection is idle, not 'idle in transaction' holding a lock on the table."""
    from cnnsql.placements import evadb_session
    from cnnsql.placements.evadb_patch import handler

    before = dict(handler.STATS)
    out = evadb_session.run(session, "SELECT id, label FROM pg.cifar_test;")
    assert sorted(out["id"]) == psql_frame(pg, "SELECT id FROM cifar_test ORDER BY id")["id"].tolist()
    assert handler.STATS["chunks"] - before["chunks"] >= 3
    with pg.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state LIKE 'idle in transaction%'")
        assert cur.fetchone()[0] == 0


def test_binary_copy_parser_matches_psycopg2_on_real_copy_data_in_any_pieces(loaded, pg):
    """Real `COPY ... (FORMAT binary)` bytes from the server (ints, bigint, float8, bool, text, bytea,
    NULLs), fed to the parser in pieces of 1 to 97 bytes: the same tuples psycopg2 reads as text."""
    import io
    import random

    from cnnsql.placements.evadb_patch.transport import BinaryCopyParser

    query = ("SELECT id, label::int2, (id * 1000000000000)::int8, id / 7.0::float8, label > 4, "
             "CASE WHEN id % 3 = 0 THEN NULL ELSE 'row ' || id || ' é' END, img "
             "FROM cnnsql_bytes.cifar_test_bytes WHERE id < 40 ORDER BY id")
    data = io.BytesIO()
    with pg.cursor() as cur:
        cur.copy_expert(f"COPY ({query}) TO STDOUT (FORMAT binary)", data)
        cur.execute(query)
        expected = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in cur.fetchall()]
    raw, rng = data.getvalue(), random.Random(0)
    parser, rows, at = BinaryCopyParser(["int4", "int2", "int8", "float8", "bool", "text", "bytea"]), [], 0
    while at < len(raw):
        step = rng.randint(1, 97)
        rows += parser.feed(raw[at:at + step])
        at += step
    assert rows == expected and parser.finished


def test_whole_reads_go_by_binary_copy_and_a_stopped_copy_leaves_the_connection_usable(target, raw_labels,
                                                                                      random_weights_file):
    from cnnsql import db
    from cnnsql.placements import evadb_session
    from cnnsql.placements.evadb_patch import handler
    from cnnsql.placements.evadb_patch.transport import copy_rows
    from psycopg2 import sql as psql

    # EvaDB's own scan (the plan cache reads a small result by cursor once it has run the shape)
    plain = evadb_session.connect(weights=random_weights_file, threads=2, plan_cache=False)
    before = handler.STATS["copies"]
    out = evadb_session.run(plain, "SELECT id, TorchCNN(img).label FROM pg.cifar_test WHERE id < 60;")
    assert handler.STATS["copies"] == before + 1 and handler.STATS["queries"][-1].startswith("COPY ")
    assert dict(zip(out["id"], out["label"])) == dict(enumerate(raw_labels))

    conn = db.connect(target)
    conn.autocommit = True
    # 50,000 images (150 MB): the COPY is still running when the caller stops after the first chunk.
    query = psql.SQL("SELECT id, img FROM {}").format(psql.Identifier("cnnsql_bytes", "cifar_train_bytes"))
    rows = copy_rows(conn, query.as_string(conn), ["int4", "bytea"], iter([10] * 10_000))
    assert len(next(rows)) == 10
    rows.close()  # the caller stops: the COPY is cancelled on the server
    assert not conn.closed
    with conn.cursor() as cur:  # and the connection answers the next statement
        cur.execute("SELECT count(*) FROM cifar_test WHERE id < 60")
        assert cur.fetchone()[0] == 60
    conn.close()
