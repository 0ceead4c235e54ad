"""EvaDB's own Ray mode against its plain path, on the same query, interleaved in one process.

EvaDB 0.3.9 parallelises function evaluation with Ray when its catalog setting `ray` is true. `SET ray =
True;` is accepted but leaves the setting false (recorded as `after_set`), so the study sets it through
EvaDB's catalog API, before each call of its side: the query is the benchmark's offline query
(sql/queries/offline.sql, --engine's function) on the loaded dataset's test view (its first --rows images
with --rows: EvaDB 0.3.9's Ray mode was measured returning every row of the view for `WHERE id < 16`, so
the default is the whole split, the only setting where both modes do the same work).
After one warm-up of each side (Ray mode's starts Ray), --repetitions rounds of (plain, Ray mode) through
the harness's loop (measure.stats.interleave, its noise verdict). EXPLAIN's plan root is recorded per mode.
Checks: each mode returns each of the query's rows once; both give the same label to every id; the Ray
mode's plan differs from the plain one (the setting took effect). EvaDB's `ray` extra asks for ray<2.5; the pinned ray runs its Ray mode all the same.
EvaDB starts Ray itself: the environment set below keeps that instance on loopback (see
cnnsql/placements/ray_local.py), since EvaDB passes no such option.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from cnnsql.bench.studies import check
from cnnsql.bench.studies._dbstudy import add_weights_and_dataset, open_dataset, query, server_roots, weights_path

NAME = "evadb_ray_mode"
NEEDS_DATABASE = True
SMOKE = ["--repetitions", "1"]


def arguments(ap) -> None:
    add_weights_and_dataset(ap)
    ap.add_argument("--engine", default="torch")
    ap.add_argument("--rows", type=int, default=0, help="the first N test images (default 0: the whole split; "
                                                          "in Ray mode EvaDB drops the WHERE filter, see the method)")
    ap.add_argument("--repetitions", type=int, default=3)


def run(ctx, args) -> dict:
    from cnnsql.placements import ray_local

    # the Ray instance EvaDB starts: loopback listeners, token authentication with a fresh token
    ray_local.use_environment(ray_local.loopback_environment())
    from cnnsql.engines import engine_class
    from cnnsql.measure import stats
    from cnnsql.placements import evadb_session
    from cnnsql.placements.pgfunctions import sql_name

    engine_class(args.engine)
    weights = weights_path(args)
    target, conn, ds = open_dataset(args, ctx)
    roots = server_roots(conn, target)
    conn.close()
    n = min(args.rows, ds.n_test) if args.rows > 0 else ds.n_test
    q = query("offline", ds, function=sql_name(args.engine), where=f" WHERE id < {int(n)}" if n < ds.n_test else "")
    with tempfile.TemporaryDirectory() as tmp:
        cursor = evadb_session.connect(target, evadb_dir=Path(tmp), weights=weights)
        catalog = cursor._evadb.catalog()
        evadb_session.run(cursor, "SET ray = True;")
        after_set = catalog.get_configuration_catalog_value("ray")

        def mode(on: bool):
            catalog.upsert_configuration_catalog_entry("ray", on)

        plans, outs = {}, {}
        for key, on in (("plain", False), ("ray", True)):
            mode(on)
            plans[key] = cursor.query("EXPLAIN " + q).df().iloc[0, 0].split()[1]

        def side(key: str):
            def call():
                outs[key] = evadb_session.run(cursor, q)
                return outs[key]
            return call
        ctx.say(f"`{q}`: 1 warm-up of each mode (Ray mode starts Ray), {args.repetitions} interleaved rounds")
        calls = {"plain": side("plain"), "ray": side("ray")}
        clock, _ = stats.interleave(calls, args.repetitions, 1, roots, around=lambda key: _Mode(mode, key == "ray"),
                                    warm={k: (lambda k=k: (mode(k == "ray"), calls[k]())) for k in calls})
        mode(False)
    timed = {}
    for key in calls:
        timed[key] = stats.timing(clock, key, n)
        ctx.record_noise(f"{key} EvaDB", timed[key])
    ratio = stats.paired_ratio(clock.walls["ray"], clock.walls["plain"])
    counts, agree, why = compare(outs.get("plain"), outs.get("ray"))
    checks = [check(f"{key} mode returns each of the query's {n} rows once", counts.get(key) == (n, n),
                    f"{counts.get(key, (0, 0))[0]} rows, {counts.get(key, (0, 0))[1]} distinct ids") for key in ("plain", "ray")]
    checks += [check("both modes give every id the same label", agree, why),
              check("Ray mode's plan differs from the plain one", plans["ray"] != plans["plain"],
                    f"plan roots: plain {plans['plain']}, ray {plans['ray']}")]
    rows = [{"mode": key, "rows_asked": n, "rows_returned": counts.get(key, (0, 0))[0], "wall_s": t["wall_s"],
             "images_per_s": t["per_s"], "range": t["per_s_range"], "plan_root": plans[key]} for key, t in timed.items()]
    return {"rows": rows, "checks": checks, "query": q, "after_set": repr(after_set), "ray_over_plain": ratio,
            "timing": timed, "dataset": ds.name, "weights": str(weights)}


def compare(plain, ray) -> tuple[dict, bool, str]:
    """({mode: (rows, distinct ids)}, whether every id both returned has the same label in both, detail)."""
    if plain is None or ray is None:
        return {}, False, "a mode returned nothing"
    labels, counts = {}, {}
    for key, df in (("plain", plain), ("ray", ray)):
        cols = [c for c in df.columns if c.split(".")[-1] in ("id", "label")]
        if len(cols) != 2:
            return {}, False, f"{key} columns: {list(df.columns)}"
        labels[key] = {int(i): int(lab) for i, lab in zip(df[cols[0]], df[cols[1]])}
        counts[key] = (len(df), len(labels[key]))
    common = labels["plain"].keys() & labels["ray"].keys()
    differ = sum(1 for k in common if labels["plain"][k] != labels["ray"][k])
    return counts, differ == 0 and bool(common), f"{len(common)} ids in both, labels differing {differ}"


class _Mode:
    """The `around` context of stats.interleave: sets EvaDB's `ray` setting before a side's timed call."""

    def __init__(self, mode, on: bool):
        self.mode, self.on = mode, on

    def __enter__(self):
        self.mode(self.on)

    def __exit__(self, *exc):
        return False
