"""`cnnsql bench`: every engine, raw and through EvaDB SQL, timed, checked and logged to PostgreSQL.

Scenarios (after MLPerf Inference): offline (a whole split at the engine's best batch size:
images/s) and single-stream (one image per call: p50/p90/p99 latency). A benchmark is a list of
phases (data: `Phase`) run by one loop (`Bench.measure`). A phase times its sides interleaved
(raw, SQL, fetch, raw, SQL, fetch, ...) after untimed warm-up calls, so drift on a shared machine
hits every side it compares; each side is one run in bench_run with the median, min and max of its
repetitions, the CPU time of the process tree, and a `noisy` flag (cnnsql/measure/stats.py says when).
Engine capabilities and defaults come from the engine classes: nothing here names an engine.
"""
from __future__ import annotations

import hashlib
import statistics
import string
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from cnnsql.data import datasets
from cnnsql import db
from cnnsql.placements import evadb_function
from cnnsql.placements import evadb_session
from cnnsql.placements import pgfunctions
from cnnsql import results
from cnnsql.results import render, results_doc
from cnnsql.measure import stats
from cnnsql.engines import ENGINES, engine_class
from cnnsql.models.weights import check_weights_model
from cnnsql.core.errors import CnnsqlError
from cnnsql.bench.bench_config import BenchConfig  # noqa: F401  (the defaults live there)
from cnnsql.bench.bench_indb import InDatabase
from cnnsql.measure.monitor import ResourceMonitor

QUERY_DIR = db.SQL_DIR / "queries"


def query_text(name: str, **values) -> str:
    """The statement of the template sql/queries/NAME.sql, comments stripped, $-placeholders filled."""
    lines = (QUERY_DIR / f"{name}.sql").read_text().splitlines()
    text = "\n".join(l for l in lines if not l.lstrip().startswith("--")).strip()
    return string.Template(text).substitute(values)


def sample_where(n: int, available: int) -> str:
    """The pushed-down filter of a sample: the first n ids (empty for the whole split)."""
    return f" WHERE id < {int(n)}" if n < available else ""


def percentile(values, q) -> float:
    return float(np.percentile(np.asarray(values), q))


@dataclass
class Side:
    """One thing a phase times: it becomes one run in bench_run."""
    key: str
    spec: dict                                  # bench_run fields (kind, scenario, engine, batch_size, ...)
    call: Callable[[], object]
    n_images: int
    warm: Callable[[], object] | None = None    # the warm-up call (default: `call`)
    evaluate: Callable[[object], dict] | None = None  # last call's output -> extra results (accuracy, ...)


@dataclass
class Phase:
    """Sides timed interleaved: after `warmup` untimed calls of each, `reps` rounds of one call each."""
    label: str
    sides: list[Side]
    reps: int
    warmup: int
    monitor_pid: int | None = None              # the process measured (default: this one); its tree is ours
    ratios: list[tuple[str, str]] = field(default_factory=list)  # (numerator, denominator) side keys
    after: Callable[[dict], None] | None = None  # called with {key: results} before the runs are logged
    note: str = ""                              # progress line printed when the phase starts


class Bench:
    def __init__(self, cfg: BenchConfig, target: db.Target | None = None):
        self.cfg = cfg
        self.target = target or db.resolve()
        self.conn = db.connect(self.target)
        self.server_pid = db.private_server_pid(self.conn) if self.target.private else None  # its CPU is ours
        self.session = results.new_session_id()
        self.sql_predictions: dict[str, pd.Series] = {}
        self.sql_runs: dict[str, int] = {}
        self.rows: list[dict] = []
        self.noise: list[dict] = []            # every run's noise verdict (stats.Clock.verdict)
        self.load_at_start: list[float] = []

    def say(self, msg: str) -> None:
        if self.cfg.progress:
            print(msg, file=sys.stderr, flush=True)

    # --- set-up ---------------------------------------------------------------------------

    def prepare(self) -> None:
        db.ensure_schema(self.conn)
        ds = datasets.ensure(self.conn, self.target, self.cfg.dataset, self.cfg.progress, self.say)
        if ds.kind == "synthetic":
            self.say(f"NOTE: the loaded data is {ds.kind}, not CIFAR-10; accuracy figures mean nothing")
        self._prepare_dataset(ds)

    def _prepare_dataset(self, ds: datasets.DatasetInfo) -> None:
        """Weights for the model on this dataset (trained briefly if missing), engines able to run it,
        the test split, and EvaDB with the functions registered."""
        self.ds = ds
        self.dataset_kind, self.data_version = ds.run_kind, ds.version  # the version is checked before each log
        self.weights = self._weights_path()
        if not self.weights.exists():
            self._train_default()
        self.weights_sha256 = file_sha256(self.weights)  # every run records which weights it measured
        self.spec = check_weights_model(self.weights, self.cfg.model, ds.shape, ds.num_classes)
        self._select_engines()
        self.ids, self.images, self.labels = datasets.fetch_split(self.conn, ds, "test")
        # The functions get the raw path's weights and threads as CREATE FUNCTION metadata.
        self.cursor = evadb_session.connect(self.target, weights=self.weights, threads=self.cfg.threads)

    def _weights_path(self) -> Path:
        return self.cfg.weights_path(self.ds.name)

    def _select_engines(self) -> None:
        for name in list(self.cfg.engines):
            reason = engine_class(name).cannot_run(self.spec)
            if reason and not self.cfg.skip_unable:
                raise CnnsqlError(reason, f"leave {name} out of --engines")
            if reason:
                print(f"cnnsql bench: NOTE: {name} left out: {reason}", file=sys.stderr, flush=True)
                self.cfg.engines.remove(name)
        if not self.cfg.engines:
            raise CnnsqlError(f"no engine can run model {self.spec.name!r}", "use --engines torch,tensorflow")

    def on_dataset(self, query: str) -> str:
        """A benchmark query (written for pg.cifar_test) on this dataset's test view."""
        return query.replace("pg.cifar_test", f"pg.{self.ds.view('test')}")

    def _train_default(self) -> None:
        from cnnsql.bench.training import train_and_save

        epochs = self.cfg.train_epochs
        self.say(f"no weights at {self.weights}: training a short default model first (tensorflow, {epochs} "
                 f"epoch{'s' if epochs != 1 else ''}; `cnnsql train` trains longer); pass --weights to use your own")
        # TensorFlow trains faster here than PyTorch (256 against 214 images/s, 8,000 images, 2026-11-27);
        # 1 epoch: 62.5% test accuracy in 205 s, 2 epochs: 68.3% in 381 s (same machine, same day)
        train_and_save(self.conn, "tensorflow", self.weights, epochs=self.cfg.train_epochs, device=self.cfg.device,
                       threads=self.cfg.threads, progress=self.cfg.progress, model=self.cfg.model,
                       dataset=self.ds.name)

    def close(self) -> None:
        self.conn.close()

    # --- measurement ----------------------------------------------------------------------

    def measure(self, phase: Phase) -> dict[str, dict]:
        """Run one phase: warm-up, interleaved timed rounds, one logged run per side. Returns
        {side key: results (with run_id)}. Any failure marks every unfinished run of the phase failed."""
        base = {"split": "test", "threads": self.cfg.threads, "dataset_kind": self.dataset_kind,
                "weights": str(self.weights), "warmup": phase.warmup, "repetitions": phase.reps}
        if phase.note:
            self.say(phase.note)
        monitors = {s.key: ResourceMonitor(pid=phase.monitor_pid) for s in phase.sides}
        with ExitStack() as stack:
            runs = {s.key: stack.enter_context(results.logged_run(self.conn, self.session,
                                                                  **{**base, "n_rows": s.n_images, **s.spec}))
                    for s in phase.sides}
            clock, last = stats.interleave({s.key: s.call for s in phase.sides}, phase.reps, phase.warmup,
                                           (phase.monitor_pid, self.server_pid), around=monitors.__getitem__,
                                           warm={s.key: s.warm for s in phase.sides if s.warm})
            out = {s.key: self._figures(s, clock, monitors[s.key]) for s in phase.sides}
            self.noise += [{"noisy": o["noisy"], **{k: o["detail"][k] for k in ("others_cpu_share", "spread",
                                                                               "noise_reasons")}}
                           for o in out.values()]
            for num, den in phase.ratios:
                out[num]["detail"][f"over_{den}"] = stats.paired_ratio(clock.walls[num], clock.walls[den])
            for s in phase.sides:
                if s.evaluate is not None:
                    extra = s.evaluate(last[s.key])
                    out[s.key]["detail"].update(extra.pop("detail", {}))
                    out[s.key].update(extra)
            if phase.after is not None:
                phase.after(out)
            datasets.check_version(self.conn, self.ds, self.data_version, f"phase {phase.label}")
            for s in phase.sides:
                runs[s.key].finish(out[s.key], repetitions=clock.walls[s.key], cpus=clock.cpus[s.key])
                out[s.key]["run_id"] = runs[s.key].id
        return out

    def _figures(self, side: Side, clock: stats.Clock, monitor: ResourceMonitor) -> dict:
        walls, cpus, n = clock.walls[side.key], clock.cpus[side.key], side.n_images
        wall = stats.summary(walls)
        single = side.spec["scenario"] == "single-stream"
        verdict = clock.verdict(side.key, judge_spread=not single)
        mon = monitor.summary()
        res = {"wall_s": wall["median"], "wall_min_s": wall["min"], "wall_max_s": wall["max"],
               "images_per_s": n / wall["median"], "latency_ms": 1000 * wall["median"] / n,
               "cpu_s": statistics.median(cpus), "cpu_pct": 100 * sum(cpus) / sum(walls),
               "peak_rss_mb": mon["peak_rss_mb"], "gpu_pct": mon["gpu_pct"], "noisy": verdict.pop("noisy"),
               "load_1m": (self.load_at_start or [None])[0],
               "detail": {**side.spec.get("detail", {}), **verdict, "load_at_start": self.load_at_start,
                          "weights_sha256": self.weights_sha256,
                          "images_per_s_range": [n / wall["max"], n / wall["min"]]}}
        if single:
            ms = [1000 * w for w in walls]
            res.update(p50_ms=percentile(ms, 50), p90_ms=percentile(ms, 90), p99_ms=percentile(ms, 99))
        return res

    def phase(self, spec: dict, call, reps: int, warmup: int, n_images: int, evaluate=None, warm=None,
              monitor_pid: int | None = None) -> dict:
        """A phase of one side (the in-database placement's)."""
        side = Side("run", spec, call, n_images, warm, evaluate)
        return self.measure(Phase(f"{spec['kind']} {spec['scenario']} {spec['engine']}", [side], reps, warmup,
                                  monitor_pid))["run"]

    # --- the phases of one engine --------------------------------------------------------------

    def offline_phase(self, name: str, engine, n: int, common: dict, keep: dict) -> Phase:
        """Raw, SQL and fetch-only on the first n test images, interleaved. `keep` receives the raw
        probabilities and the SQL predictions."""
        cfg, cls = self.cfg, type(engine)
        images, labels, bs = self.images[:n], self.labels[:n], engine.default_batch_size
        where = sample_where(n, len(self.ids))
        query = self.on_dataset(query_text("offline", function=pgfunctions.sql_name(name), where=where))
        fetch = self.on_dataset(query_text("fetch_only", where=where))
        q1 = self.on_dataset(query_text("single_stream", function=pgfunctions.sql_name(name),
                                        id=int(self.ids[self.single_index()])))
        warm_n = min(n, cls.bench_warmup_images or n)  # a slow engine warms up on fewer images
        before = {}

        def raw_eval(probs):
            keep["probs"] = probs
            return {"accuracy": float((probs.argmax(1) == labels).mean()),
                    "detail": accuracy_interval(probs.argmax(1), labels)}

        def sql_warm():  # the offline query, or the one-image query when the engine warms up on fewer images
            evadb_session.run(self.cursor, query if warm_n == n else q1)
            before.update(evadb_function.STATS.get(name, {}))

        def sql_eval(df):
            pred = pd.Series(df["label"].to_numpy(), index=df["id"].to_numpy()).sort_index()
            raw_probs = keep["probs"]
            raw_pred = raw_probs.argmax(1)
            top2 = np.sort(raw_probs, axis=1)[:, -2:]
            near_tie = top2[:, 1] - top2[:, 0] < 1e-3  # the only rows where SQL and raw may round apart
            if len(pred) != n or not np.array_equal(pred.index.to_numpy(), self.ids[:n]):
                raise CnnsqlError(f"{name}: SQL query returned {len(pred)} rows, expected ids 0..{n - 1}")
            differ = int(((pred.to_numpy() != raw_pred) & ~near_tie).sum())
            if differ:
                raise CnnsqlError(f"{name}: the SQL output differs from the raw engine's on {differ} of {n} images "
                                  "(not near-ties); the run is marked failed",
                                  "the data or the function changed under the run; rerun it")
            keep["sql"] = pred
            after = evadb_function.STATS[name]
            split = {k: (after[k] - before.get(k, 0)) / cfg.reps(name) for k in ("decode_s", "predict_s")}
            return {"accuracy": float((pred.to_numpy() == labels).mean()),
                    "detail": {**accuracy_interval(pred.to_numpy(), labels),
                               "sql_matches_raw": float((pred.to_numpy() == raw_pred).mean()), **split,
                               "bad_rows": after.get("bad_rows", 0)}}

        def components(out):  # where the SQL query's time goes; never a negative share
            sql, det = out["sql"], out["sql"]["detail"]
            fetch_s = out["fetch"]["wall_s"]
            det.update(raw_wall_s=out["raw"]["wall_s"], fetch_s=fetch_s, **split_other(sql["wall_s"], fetch_s,
                                                                                       det["decode_s"], det["predict_s"]))

        sides = [Side("raw", {**common, "kind": "raw", "scenario": "offline"}, lambda: engine.predict(images, bs), n,
                      warm=lambda: engine.predict(images[:warm_n], bs), evaluate=raw_eval),
                 Side("sql", {**common, "kind": "sql", "scenario": "offline", "query": query},
                      lambda: evadb_session.run(self.cursor, query), n, warm=sql_warm, evaluate=sql_eval),
                 Side("fetch", {**common, "kind": "sql", "scenario": "fetch-only", "query": fetch},
                      lambda: evadb_session.run(self.cursor, fetch), n)]
        note = (f"[{name}] offline on {n} images, interleaved raw (batch {bs}) / SQL `{query}` / fetch-only: "
                f"{cfg.warmup} warm-up ({warm_n} images) + {cfg.reps(name)} timed rounds")
        return Phase(f"{name} offline {n}", sides, cfg.reps(name), cfg.warmup,
                     ratios=[("sql", "raw"), ("fetch", "raw")], after=components, note=note)

    def sweep_phase(self, name: str, engine, common: dict, n: int) -> Phase:
        """Every batch size of the sweep, interleaved; labels say what the framework executed."""
        sweep_n = min(n, type(engine).bench_sweep_images or self.cfg.sweep_images)
        sides = []
        for b in self.cfg.batch_sizes:
            detail = {**common["detail"], "call_batch": b, "executed_batch": engine.executed_batch(b)}
            sides.append(Side(f"b{b}", {**common, "batch_size": b, "kind": "raw", "scenario": "batch-sweep",
                                        "detail": detail},
                              lambda b=b: engine.predict(self.images[:sweep_n], b), sweep_n))
        return Phase(f"{name} batch sweep", sides, max(1, self.cfg.reps(name) - 1), 1,
                     note=f"[{name}] raw batch sweep {self.cfg.batch_sizes} (interleaved): {sweep_n} images per point")

    def single_stream_phases(self, name: str, engine, common: dict, n: int) -> list[Phase]:
        k = type(engine).bench_single_stream or self.cfg.single_stream
        it = iter(range(10**9))
        at = self.single_index()
        single = int(self.ids[at])
        q1 = self.on_dataset(query_text("single_stream", function=pgfunctions.sql_name(name), id=single))
        one = {**common, "batch_size": 1, "scenario": "single-stream"}

        def sql_one_eval(df):  # the one-image query answers for that image, as the raw engine does
            want = int(engine.predict(self.images[at][None], 1)[0].argmax())
            if len(df) != 1 or int(df["id"].iloc[0]) != single or int(df["label"].iloc[0]) != want:
                raise CnnsqlError(f"{name}: the one-image SQL query returned {len(df)} row(s) "
                                  f"{df.to_dict('records')!r:.200}, expected id {single} with label {want}",
                                  "the data or the function changed under the run; rerun it")
            return {"detail": {"checked_id": single, "matches_raw": True}}
        return [Phase(f"{name} single-stream raw", [Side("raw", {**one, "kind": "raw"},
                                                         lambda: engine.predict(self.images[next(it) % n][None], 1),
                                                         1)], k, 1, note=f"[{name}] single-stream: {k} one-image raw calls"),
                Phase(f"{name} single-stream SQL", [Side("sql", {**one, "kind": "sql", "query": q1},
                                                         lambda: evadb_session.run(self.cursor, q1), 1,
                                                         evaluate=sql_one_eval)],
                      self.cfg.sql_single_stream, 1,
                      note=f"[{name}] SQL single-stream: {self.cfg.sql_single_stream} x `{q1}`")]

    def single_index(self) -> int:
        """Where in the test split the one-image queries' image is: the 8th (id 7 in CIFAR-10), or the
        last of a smaller split."""
        return min(7, len(self.ids) - 1)

    def bench_engine(self, name: str) -> list[dict]:
        """Every phase of one engine, in one loop. One table row per offline size: the engine's own
        sample, and the sample every selected engine runs (so one row compares all on identical work)."""
        cfg = self.cfg
        device = cfg.device if cfg.device in engine_class(name).devices else "cpu"
        engine = evadb_function.cached_engine(name, str(self.weights), device, cfg.threads)
        n = cfg.n_images(name, len(self.ids))
        common = {"engine": name, "device": device, "batch_size": engine.default_batch_size,
                  "detail": {"engine": engine.describe(),
                             "executed_batch": engine.executed_batch(engine.default_batch_size)}}
        sizes = sorted({n, min(n, self.shared_n)}, reverse=True)
        keeps = {m: {} for m in sizes}
        phases = [self.offline_phase(name, engine, m, common, keeps[m]) for m in sizes]
        phases += [self.sweep_phase(name, engine, common, n), *self.single_stream_phases(name, engine, common, n)]
        measured = [self.measure(p) for p in phases]
        self.sql_predictions[name] = keeps[n]["sql"]
        single, single_sql = measured[-2]["raw"], measured[-1]["sql"]
        shared = sizes[-1]  # in PostgreSQL: the sample every engine runs (identical work, and ~75 s less)
        indb = self.indb.run(name, shared, type(engine).bench_single_stream or cfg.single_stream,
                             keeps[shared]["probs"])
        rows = []
        for m, off in zip(sizes, measured):
            rows.append(row_of(name, m, off, single, single_sql, indb if m == shared else {}))
            self.sql_runs.setdefault(name, off["sql"]["run_id"])
        return rows

    def record_agreement(self) -> None:
        for name, run_id in self.sql_runs.items():
            mine = self.sql_predictions[name]
            agree = {}
            for other, theirs in self.sql_predictions.items():
                if other != name:
                    common = mine.index.intersection(theirs.index)
                    agree[other] = {"fraction": float((mine[common] == theirs[common]).mean()), "n": len(common)}
            with self.conn.cursor() as cur:
                cur.execute("UPDATE bench_run SET agreement = %s WHERE run_id = %s",
                            (results._jsonify("agreement", agree), run_id))
            for row in self.rows:
                if row["engine"] == name:
                    row["agreement"] = agree
        self.conn.commit()

    def run(self) -> list[dict]:
        self.load_at_start = stats.load_average()  # before this session adds its own load
        self.prepare()
        self.shared_n = min(self.cfg.n_images(e, len(self.ids)) for e in self.cfg.engines)
        self.say(f"session {self.session}: engines {', '.join(self.cfg.engines)}, weights {self.weights}, "
                 f"load average at start {self.load_at_start}")
        self.indb = InDatabase(self)
        for name in self.cfg.engines:
            self.rows += self.bench_engine(name)
        self.record_agreement()
        return self.rows


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def accuracy_interval(pred: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1 accuracy's Wilson 95% interval and sample size."""
    lo, hi = stats.wilson(int((pred == labels).sum()), len(labels))
    return {"accuracy_ci95": [lo, hi], "accuracy_n": int(len(labels))}


def split_other(sql_s: float, fetch_s: float, decode_s: float, predict_s: float) -> dict:
    """EvaDB's own share of a SQL query: the total less fetch, decode and predict. Those are medians
    and means of different repetitions, so on a noisy machine they can sum past the total: the share
    is then 0 and `components_exceed_s` says by how much (never a negative time)."""
    other = sql_s - fetch_s - decode_s - predict_s
    return {"evadb_other_s": max(0.0, other), "components_exceed_s": max(0.0, -other)}


def row_of(name: str, n: int, off: dict, single: dict, single_sql: dict, indb: dict) -> dict:
    """One table row: an engine on its first n test images."""
    raw, sql = off["raw"], off["sql"]
    ranges = {k: [n / v["wall_max_s"], n / v["wall_s"], n / v["wall_min_s"]] for k, v in off.items()}
    return {"engine": name, "n": n, "raw_ips": ranges["raw"], "sql_ips": ranges["sql"],
            "overhead": sql["detail"]["over_raw"], "accuracy": sql["accuracy"],
            "accuracy_ci95": sql["detail"]["accuracy_ci95"], "p50_ms": single["p50_ms"], "p99_ms": single["p99_ms"],
            "sql_p50_ms": single_sql["p50_ms"], "raw_cpu_s": raw["cpu_s"], "sql_cpu_s": sql["cpu_s"],
            "cpu_pct": sql["cpu_pct"], "rss_mb": sql["peak_rss_mb"], "gpu_pct": sql["gpu_pct"],
            "noisy": raw["noisy"] or sql["noisy"],  # the figures of the row (fetch-only is a component)
            "noise_reasons": sorted({r for v in (raw, sql) for r in v["detail"]["noise_reasons"]}), **indb}


def _range(v: list[float], digits: int = 0) -> str:
    lo, mid, hi = v
    return render.rng(mid, lo, hi, digits, sep=False)


def format_table(rows: list[dict]) -> str:
    """The bench table: medians with [min-max] over the timed repetitions; SQL/raw is the median of
    the interleaved pairs' ratios with their min and max; accuracy with its Wilson 95% interval."""
    cols = [("engine", "<11"), ("images", ">7"), ("raw img/s [min-max]", ">22"), ("SQL img/s [min-max]", ">22"),
            ("SQL/raw [min-max]", ">22"), ("accuracy [95% CI]", ">22"), ("agree", ">7"), ("p50 ms", ">8"),
            ("p99 ms", ">8"), ("SQL 1-img ms", ">13"), ("CPU s raw/SQL", ">14"), ("PG img/s", ">9"),
            ("PG 1-img ms", ">12"), ("noisy", ">7")]
    head = "  ".join(f"{c:{f}}" for c, f in cols)  # two spaces: a cell that fills its width stays apart
    lines = [head, "-" * len(head)]
    for r in rows:
        fractions = [a["fraction"] for a in r.get("agreement", {}).values()]
        o, (alo, ahi) = r["overhead"], r["accuracy_ci95"]
        cells = [r["engine"], r["n"], _range(r["raw_ips"], 1), _range(r["sql_ips"], 1),
                 f"{o['median']:.3f} [{o['min']:.3f}-{o['max']:.3f}]", f"{r['accuracy']:.4f} [{alo:.3f}-{ahi:.3f}]",
                 f"{min(fractions):.3f}" if fractions else "-", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                 f"{r['sql_p50_ms']:.1f}", f"{r['raw_cpu_s']:.2f}/{r['sql_cpu_s']:.2f}",
                 _opt(r.get("indb_ips"), 1), _opt(r.get("indb_p50_ms"), 2), "NOISY" if r["noisy"] else "no"]
        lines.append("  ".join(f"{c:{f}}" for c, (_, f) in zip(cells, cols)))
    return "\n".join(lines)


def _opt(value, digits: int) -> str:
    return render.fmt(value, digits, sep=False)


def noise_summary(verdicts: list[dict]) -> str:
    """One line for every run's noise figures: how many were flagged, the worst share and spread."""
    noisy = [v for v in verdicts if v["noisy"]]
    if not noisy:
        return f"no run was noisy ({len(verdicts)} runs)"
    shares = [v["others_cpu_share"] for v in noisy]
    spreads = [v["spread"] for v in noisy if any("spread" in r for r in v["noise_reasons"])]
    return (f"{len(noisy)} of {len(verdicts)} runs NOISY; other processes used up to {100 * max(shares):.0f}% of "
            f"the machine's CPU" + (f", repetitions spread up to {100 * max(spreads):.0f}%" if spreads else ""))


def run_bench(cfg: BenchConfig) -> list[dict]:
    for name in cfg.engines:
        if name not in ENGINES:
            raise CnnsqlError(f"unknown engine {name!r}", f"choose from: {', '.join(ENGINES)}")
    bench = Bench(cfg)
    try:
        rows = bench.run()
        exported = results.export_session(bench.conn, bench.session, cfg.results_dir, settings=cfg) \
            if cfg.results_dir else None
    finally:
        bench.close()
    print(format_table(rows))
    print(f"(session {bench.session}; load average at start {bench.load_at_start}; {cfg.threads} threads; medians "
          f"of timed rounds ({', '.join(f'{e} {cfg.reps(e)}' for e in cfg.engines)}) after {cfg.warmup} warm-up, "
          "raw / SQL / fetch-only interleaved, "
          "[min-max] over the rounds; SQL/raw = median of per-round ratios; accuracy with its Wilson 95% interval; "
          "agree = lowest top-1 agreement with another engine's SQL output on the ids both ran; CPU s = median "
          "user+system CPU per round of this process and its children, and of the private cluster's server "
          "(SQL rows: client plus server); PG = inside PostgreSQL (cnnsql db functions): the shared sample "
          f"through the batched function ({', '.join(f'{e} {cfg.reps(e, indb=True)}' for e in cfg.engines)} "
          "rounds), and p50 of one-image queries; all runs are in table bench_run)")
    print(f"noisy = other processes used more than {100 * stats.NOISY_OTHERS_CPU:.0f}% of the machine's CPU "
          f"during a run's timed rounds, or its rounds spread more than {100 * stats.NOISY_SPREAD:.0f}% "
          f"(max-min over median): {noise_summary(bench.noise)}")
    indb = getattr(bench, "indb", None)
    if indb is not None and indb.skipped:
        print(f"PG columns empty: the in-PostgreSQL placement was skipped: {indb.skipped}")
    if exported:
        local = Path(exported).resolve() in {p.resolve() for p in results_doc.session_files(Path(exported).parent)[1]}
        print(f"results: {exported}" + (" (not committed: README tables come from committed files only; "
                                        "git add it to make it part of the record)" if local else ""))
    return rows
