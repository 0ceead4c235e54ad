"""The plan cache (cnnsql/placements/evadb_patch/plan_cache.py): repeated simple SELECTs skip EvaDB's
planning and give exactly EvaDB's answers; other statements are never run directly; a catalog change
or another statement empties it."""
from __future__ import annotations

import pytest

from cnnsql.placements.evadb_patch import plan_cache
from cnnsql.placements.evadb_patch.plan_cache import same_result, shape


def test_shape_replaces_integer_literals_outside_quotes_only():
    assert shape("SELECT id, TorchCNN(img) FROM pg.cifar_test WHERE id = 7;") == (
        "SELECT id, TorchCNN(img) FROM pg.cifar_test WHERE id = \0;", [7])
    key, values = shape("SELECT resnet20(img), 'x 12' FROM pg.t2 WHERE a < 10 AND b = 1.5 AND \"c 3\" = 4 LIMIT 5")
    assert values == [10, 4, 5]
    assert key == "SELECT resnet20(img), 'x 12' FROM pg.t2 WHERE a < \0 AND b = 1.5 AND \"c 3\" = \0 LIMIT \0"


def test_same_result_compares_values_names_and_types():
    import numpy as np
    import pandas as pd

    a = pd.DataFrame({"id": [1, 2], "probs": [np.array([0.1, 0.9], np.float32), np.array([0.5, 0.5], np.float32)]})
    assert same_result(a, a.copy())
    b = a.copy()
    b.loc[1, "probs"] = np.array([0.5, 0.50001], np.float32)
    assert not same_result(a, b)
    assert not same_result(a, a.rename(columns={"id": "ID"}))
    assert not same_result(a, a.astype({"id": "int32"}))


CACHED = [  # each runs with every value set; the shape must take the direct way from its third run
    ("SELECT id, TorchCNN(img) FROM pg.cifar_test WHERE id = {0};", [(3,), (7,), (0,), (11,)]),
    ("SELECT id, TorchCNN(img).label FROM pg.cifar_test WHERE id < {0} LIMIT {1};", [(5, 3), (9, 2), (40, 20), (1, 1)]),
    ("SELECT id, label, TorchCNN(img).probability FROM pg.cifar_test WHERE id >= {0} AND id < {1};",
     [(10, 14), (0, 2), (5, 5), (20, 90)]),
    ("SELECT TorchCNN(img).class_name, id FROM pg.cifar_test WHERE id = {0} OR id = {1};", [(1, 2), (4, 4), (8, 3), (6, 99999)]),
    ("SELECT id, label FROM pg.cifar_test WHERE id < {0};", [(4,), (0,), (30,), (2,)]),
    # a few rows, then more than the one-statement read's bound (read again by the stream), then few again
    ("SELECT id, TorchCNN(img).label FROM pg.cifar_test WHERE id < {0};", [(3,), (5,), (2,), (200,), (1,), (0,), (64,)]),
    ("SELECT id, TorchCNN(img) FROM pg.cifar_test WHERE id >= {0} LIMIT {1};",
     [(0, 2), (3, 1), (5, 100), (0, 65), (7, 66), (1, 3)]),
]
NOT_CACHED = [  # answered by EvaDB every time
    ("SELECT id, TorchCNN(img).label FROM pg.cifar_test WHERE id < {0} ORDER BY id DESC;", [(5,), (3,), (7,)]),
    ("SELECT COUNT(*) FROM pg.cifar_test WHERE id < {0};", [(5,), (3,), (7,)]),
    ("SELECT id, label FROM pg.cifar_test WHERE id < {0} AND TorchCNN(img).label = {1};", [(50, 3), (20, 5), (30, 1)]),
]


@pytest.fixture(scope="module")
def cursors(loaded, random_weights_file):
    from cnnsql.placements import evadb_session

    return (evadb_session.connect(weights=random_weights_file, threads=1),
            evadb_session.connect(weights=random_weights_file, threads=1, plan_cache=False))


@pytest.mark.parametrize("template, values", CACHED + NOT_CACHED, ids=lambda v: str(v)[:60])
def test_answers_equal_evadbs_and_simple_shapes_run_directly(cursors, template, values):
    from cnnsql.placements import evadb_session

    cached, plain = cursors
    hits, short, reread = (plan_cache.STATS[k] for k in ("hits", "short_reads", "reread"))
    for vals in values:
        q = template.format(*vals)
        got, want = evadb_session.run(cached, q), evadb_session.run(plain, q)
        assert same_result(got, want), (q, got, want)
    direct = plan_cache.STATS["hits"] - hits
    if (template, values) in CACHED:
        assert direct == len(values) - 2  # learnt on the first run, checked on the second
        if any(v[0] >= 100 for v in values):  # a result past the one-statement read's bound was read again
            assert plan_cache.STATS["reread"] > reread and plan_cache.STATS["short_reads"] > short
    else:
        assert direct == 0


def test_a_catalog_change_empties_the_cache(cursors, random_weights_file):
    """After DROP FUNCTION the cached shape fails as EvaDB fails, instead of answering from the cache."""
    from cnnsql.core.errors import CnnsqlError
    from cnnsql.placements import evadb_session

    cursor = evadb_session.connect(weights=random_weights_file, threads=1)
    q = "SELECT id, TorchCNN(img).label FROM pg.cifar_test WHERE id = {};"
    for k in range(3):
        evadb_session.run(cursor, q.format(k))
    assert isinstance(plan_cache.cache_of(cursor._evadb).get(shape(q.format(0))[0]), plan_cache.Plan)
    evadb_session.run(cursor, "DROP FUNCTION IF EXISTS TorchCNN;")
    assert plan_cache.cache_of(cursor._evadb).plans == {}
    with pytest.raises(CnnsqlError, match="EvaDB query failed"):
        evadb_session.run(cursor, q.format(4))


def test_the_direct_way_is_only_taken_when_it_gave_evadbs_answer(cursors, monkeypatch):
    """A shape whose direct result differs from EvaDB's on the checking run is dropped for good."""
    from cnnsql.placements import evadb_session

    cached, _ = cursors
    q = "SELECT id, TorchCNN(img).label FROM pg.cifar_test WHERE id = {} LIMIT 1;"
    real_run = plan_cache.Plan.run
    monkeypatch.setattr(plan_cache.Plan, "run", lambda self, evadb, values: real_run(self, evadb, values).iloc[:0])
    for k in range(4):
        assert len(evadb_session.run(cached, q.format(k))) == 1
    assert plan_cache.cache_of(cached._evadb).get(shape(q.format(0))[0]) is None


def test_a_null_image_under_a_learnt_shape_gets_evadbs_null_outputs(cursors, conn):
    """The one-statement read with a bad row among good ones: the answer is EvaDB's (NULL outputs)."""
    from cnnsql.placements import evadb_session

    with conn.cursor() as cur:
        cur.execute("CREATE OR REPLACE VIEW plan_cache_mixed AS SELECT id, "
                    "CASE WHEN id % 3 = 1 THEN NULL ELSE img END AS img FROM cifar_test WHERE id < 60")
    conn.commit()
    cached, plain = cursors
    q = "SELECT id, TorchCNN(img) FROM pg.plan_cache_mixed WHERE id >= {} AND id < {};"
    for lo, hi in [(0, 1), (3, 4), (6, 7), (9, 10), (1, 2), (3, 5), (12, 13), (0, 8)]:
        got, want = evadb_session.run(cached, q.format(lo, hi)), evadb_session.run(plain, q.format(lo, hi))
        assert same_result(got, want), (lo, hi, got, want)
        assert got["label"].isna().sum() == sum(1 for i in range(lo, hi) if i % 3 == 1)


def test_the_one_statement_read_is_checked_before_it_answers(cursors, monkeypatch):
    """The checking run also takes the few-rows way (one bounded SELECT): a shape whose answer that way
    differs from EvaDB's is dropped before it answers a query."""
    from cnnsql.placements import evadb_session

    cached, plain = cursors
    q = "SELECT TorchCNN(img).probability, id FROM pg.cifar_test WHERE id = {} AND id >= 0;"
    real = plan_cache.Plan._frame_of_rows
    monkeypatch.setattr(plan_cache.Plan, "_frame_of_rows", lambda self, rows, inst: real(self, rows, inst).iloc[:0])
    for k in range(4):
        assert same_result(evadb_session.run(cached, q.format(k)), evadb_session.run(plain, q.format(k)))
    assert plan_cache.cache_of(cached._evadb).get(shape(q.format(0))[0]) is None
