"""`cnnsql bench`: every engine, raw and through EvaDB SQL, timed, checked and logged to PostgreSQL.

Scenarios (after MLPerf Inference): offline (a whole split at the engine's best batch size:
images/s) and single-stream (one image per call: p50/p90/p99 latency). Every timed phase has
warm-up calls that are not timed, then `repetitions` timed calls; figures are medians.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import config, datasets, db, evadb_function, evadb_session, loader, model_spec, results
from .engines import ENGINES, engine_class
from .errors import CnnsqlError
from .bench_indb import InDatabase
from .monitor import ResourceMonitor

QUERY_DIR = db.SQL_DIR / "queries"


@dataclass
class BenchConfig:
    engines: list[str] = field(default_factory=lambda: list(ENGINES))
    weights: Path | None = None
    repetitions: int = 3
    warmup: int = 1
    threads: int = 2
    device: str = "cpu"
    limit: int | None = None            # test images for engines without a bench_sample (default: all)
    sample: int | None = None           # test images for engines with a bench_sample (default: theirs)
    full: bool = False                  # every engine on every test image
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16, 64, 256])
    sweep_images: int = 1024            # images per batch-size point (or the engine's bench_sweep_images)
    single_stream: int = 100            # one-image calls for the latency scenario (or bench_single_stream)
    sql_single_stream: int = 5          # one-image SQL queries
    train_epochs: int = 2               # when no weights exist: a short default model
    progress: bool = True
    dataset: str | None = None          # cifar10 (default) or a `cnnsql load --images` dataset
    model: str | None = None            # built-in name, description .json or weights .npz (default: study)
    skip_unable: bool = False           # drop engines that cannot run the model (else: refuse)

    def n_images(self, engine: str, available: int) -> int:
        """The first N test images: the engine's declared sample (a prefix, so shared by every engine)."""
        default = engine_class(engine).bench_sample
        if self.full:
            return available
        return min((self.limit or available) if default is None else (self.sample or default), available)


def query_text(name: str) -> str:
    """The statement of sql/queries/NAME.sql, comments stripped (the file runs as-is in EvaDB's shell)."""
    lines = (QUERY_DIR / f"{name}.sql").read_text().splitlines()
    return "\n".join(l for l in lines if not l.lstrip().startswith("--")).strip()


def percentile(values, q) -> float:
    return float(np.percentile(np.asarray(values), q))


class Bench:
    def __init__(self, cfg: BenchConfig, target: db.Target | None = None):
        self.cfg = cfg
        self.target = target or db.resolve()
        self.conn = db.connect(self.target)
        self.session = results.new_session_id()
        self.sql_predictions: dict[str, pd.Series] = {}
        self.sql_runs: dict[str, int] = {}
        self.rows: list[dict] = []

    def say(self, msg: str) -> None:
        if self.cfg.progress:
            print(msg, file=sys.stderr, flush=True)

    # --- set-up ---------------------------------------------------------------------------

    def prepare(self) -> None:
        db.ensure_schema(self.conn)
        if self.cfg.dataset not in (None, datasets.DEFAULT):
            return self._prepare_dataset(datasets.info(self.conn, self.cfg.dataset))
        info = results.dataset_info(self.conn)
        if "test" not in info or "train" not in info:
            self.say("no data in the database yet: loading CIFAR-10 (cnnsql load)")
            loader.load(self.target, progress=self.cfg.progress)
            info = results.dataset_info(self.conn)
        self.dataset_kind = info["test"]["kind"]
        self.data_version = results.dataset_version(self.conn)  # checked again before each run is logged
        if self.dataset_kind != "cifar-10":
            self.say(f"NOTE: the loaded data is {self.dataset_kind}, not CIFAR-10; accuracy figures mean nothing")
        self._prepare_dataset(datasets.info(self.conn, datasets.DEFAULT))

    def _prepare_dataset(self, ds: datasets.DatasetInfo) -> None:
        """Weights for the model on this dataset (trained briefly if missing), engines able to run it,
        the test split, and EvaDB with the functions registered."""
        self.ds = ds
        if ds.name != datasets.DEFAULT:
            self.dataset_kind, self.data_version = f"folder:{ds.name}", ds.version
        self.weights = self._weights_path()
        if not self.weights.exists():
            self._train_default()
        self.spec = model_spec.check_weights_model(self.weights, self.cfg.model, ds.shape, ds.num_classes)
        self._select_engines()
        self.ids, self.images, self.labels = datasets.fetch_split(self.conn, ds, "test")
        # The functions get the raw path's weights and threads as CREATE FUNCTION metadata.
        self.cursor = evadb_session.connect(self.target, weights=self.weights, threads=self.cfg.threads)

    def _weights_path(self) -> Path:
        """--weights; else a weights .npz given as --model; else default.npz for the study CNN on CIFAR-10;
        else <weights dir>/<dataset>-<model>.npz."""
        cfg = self.cfg
        if cfg.weights:
            return Path(cfg.weights).absolute()
        if cfg.model and cfg.model.endswith(".npz"):
            return Path(cfg.model).absolute()
        if cfg.model in (None, model_spec.DEFAULT_MODEL) and self.ds.name == datasets.DEFAULT:
            return Path(evadb_function.default_weights()).absolute()
        stem = cfg.model if cfg.model in model_spec.BUILTINS else Path(cfg.model or model_spec.DEFAULT_MODEL).stem
        return (config.default_weights_dir() / f"{self.ds.name}-{stem}.npz").absolute()

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
        from .training_cli import train_and_save

        self.say(f"no weights at {self.weights}: training a short default model first (tensorflow, "
                 f"{self.cfg.train_epochs} epochs; `cnnsql train` trains longer); pass --weights to use your own")
        # TensorFlow: 54 s/epoch here against PyTorch's 85 s, and 68% test accuracy after 2 epochs
        train_and_save(self.conn, "tensorflow", self.weights, epochs=self.cfg.train_epochs, device=self.cfg.device,
                       threads=self.cfg.threads, progress=self.cfg.progress, model=self.cfg.model,
                       dataset=self.ds.name)

    def close(self) -> None:
        self.conn.close()

    # --- measurement ----------------------------------------------------------------------

    def phase(self, spec: dict, call, reps: int, warmup: int, n_images: int, evaluate=None, warm=None,
              monitor_pid: int | None = None) -> dict:
        """Warm up (`warm`, default `call`), time `reps` calls under a resource monitor (of this process,
        or of `monitor_pid` and its children), log one run. Returns its results."""
        spec = {"split": "test", "threads": self.cfg.threads, "dataset_kind": self.dataset_kind,
                "weights": str(self.weights), "warmup": warmup, "repetitions": reps, "n_rows": n_images, **spec}
        run_id = results.start_run(self.conn, self.session, **spec)
        try:
            for _ in range(warmup):
                (warm or call)()
            walls, out = [], None
            with ResourceMonitor(pid=monitor_pid) as mon:
                for _ in range(reps):
                    t0 = time.perf_counter()
                    out = call()
                    walls.append(time.perf_counter() - t0)
            wall = statistics.median(walls)
            res = {"wall_s": wall, "images_per_s": n_images / wall, "latency_ms": 1000 * wall / n_images,
                   **mon.summary()}
            if spec["scenario"] == "single-stream":
                ms = [1000 * w for w in walls]
                res.update(p50_ms=percentile(ms, 50), p90_ms=percentile(ms, 90), p99_ms=percentile(ms, 99))
            if evaluate is not None:
                res.update(evaluate(out))
            datasets.check_version(self.conn, self.ds, self.data_version, f"run {run_id}")
            results.finish_run(self.conn, run_id, res, repetitions=walls)
        except BaseException as exc:
            results.fail_run(self.conn, run_id, repr(exc))
            raise
        res["run_id"] = run_id
        return res

    def bench_engine(self, name: str) -> dict:
        cfg = self.cfg
        device = cfg.device if cfg.device in engine_class(name).devices else "cpu"
        engine = evadb_function.cached_engine(name, str(self.weights), device, cfg.threads)
        n = cfg.n_images(name, len(self.ids))
        images, labels, bs = self.images[:n], self.labels[:n], engine.default_batch_size
        common = {"engine": name, "device": device, "batch_size": bs, "detail": {"engine": engine.describe()}}
        reps = cfg.repetitions
        warm_n = min(n, type(engine).bench_warmup_images or n)  # a slow engine warms up on fewer images
        self.say(f"[{name}] raw offline: {n} images, batch {bs}, {cfg.warmup} warm-up ({warm_n} images) + {reps} timed")
        last = {}

        def accuracy_of(probs):
            last["probs"] = probs
            return {"accuracy": float((probs.argmax(1) == labels).mean())}

        raw = self.phase({**common, "kind": "raw", "scenario": "offline"}, lambda: engine.predict(images, bs), reps,
                         cfg.warmup, n, accuracy_of, warm=lambda: engine.predict(images[:warm_n], bs))
        raw_probs = last["probs"]
        raw_pred = raw_probs.argmax(1)
        top2 = np.sort(raw_probs, axis=1)[:, -2:]
        near_tie = top2[:, 1] - top2[:, 0] < 1e-3  # the only rows where SQL and raw may round apart

        query = query_text(f"offline_{name}")
        if n < len(self.ids):  # a sample: the first n ids, filtered inside PostgreSQL (pushed down)
            query = query.replace("pg.cifar_test;", f"pg.cifar_test WHERE id < {int(n)};")
        query = self.on_dataset(query)
        self.say(f"[{name}] SQL offline: {query}")
        before = dict(evadb_function.STATS.get(name, {}))
        q1 = self.on_dataset(query_text(f"single_stream_{name}"))

        def sql_warm():  # the offline query, or the one-image query when the engine warms up on fewer images
            evadb_session.run(self.cursor, query if warm_n == n else q1)
            before.update(evadb_function.STATS.get(name, {}))

        def sql_eval(df):
            pred = pd.Series(df["label"].to_numpy(), index=df["id"].to_numpy()).sort_index()
            self.sql_predictions[name] = pred
            if len(pred) != n or not np.array_equal(pred.index.to_numpy(), self.ids[:n]):
                raise CnnsqlError(f"{name}: SQL query returned {len(pred)} rows, expected ids 0..{n - 1}")
            differ = int(((pred.to_numpy() != raw_pred) & ~near_tie).sum())
            if differ:
                raise CnnsqlError(f"{name}: the SQL output differs from the raw engine's on {differ} of {n} images "
                                  "(not near-ties); the run is marked failed",
                                  "the data or the function changed under the run; rerun it")
            after = evadb_function.STATS[name]
            split = {k: (after[k] - before.get(k, 0)) / reps for k in ("decode_s", "predict_s")}
            return {"accuracy": float((pred.to_numpy() == labels).mean()),
                    "detail": {**common["detail"], "sql_matches_raw": float((pred.to_numpy() == raw_pred).mean()), **split,
                               "raw_wall_s": raw["wall_s"], "bad_rows": after.get("bad_rows", 0)}}

        sq = self.phase({**common, "kind": "sql", "scenario": "offline", "query": query},
                        lambda: evadb_session.run(self.cursor, query), reps, cfg.warmup, n, sql_eval, warm=sql_warm)
        self.sql_runs[name] = sq["run_id"]

        sweep_n = min(n, type(engine).bench_sweep_images or cfg.sweep_images)
        for b in cfg.batch_sizes:
            self.say(f"[{name}] raw batch {b}: {sweep_n} images")
            self.phase({**common, "batch_size": b, "kind": "raw", "scenario": "batch-sweep"},
                       lambda: engine.predict(self.images[:sweep_n], b), max(1, reps - 1), 1, sweep_n)

        k = type(engine).bench_single_stream or cfg.single_stream
        self.say(f"[{name}] single-stream: {k} one-image calls")
        it = iter(range(10**9))
        single = self.phase({**common, "batch_size": 1, "kind": "raw", "scenario": "single-stream"},
                            lambda: engine.predict(self.images[next(it) % n][None], 1), k, 1, 1)

        self.say(f"[{name}] SQL single-stream: {cfg.sql_single_stream} x {q1}")
        single_sql = self.phase({**common, "batch_size": 1, "kind": "sql", "scenario": "single-stream", "query": q1},
                                lambda: evadb_session.run(self.cursor, q1), cfg.sql_single_stream, 1, 1)
        return {"engine": name, "n": n, "raw_ips": raw["images_per_s"], "sql_ips": sq["images_per_s"],
                "overhead": sq["wall_s"] / raw["wall_s"], "accuracy": sq["accuracy"],
                "p50_ms": single["p50_ms"], "p99_ms": single["p99_ms"], "sql_p50_ms": single_sql["p50_ms"],
                "cpu_pct": sq["cpu_pct"], "rss_mb": sq["peak_rss_mb"], "gpu_pct": sq["gpu_pct"],
                **self.indb.run(name, n, k, raw_probs)}

    def bench_fetch(self) -> None:
        query = self.on_dataset(query_text("fetch_only"))
        self.say(f"[fetch] SQL without a function: {query}")
        self.phase({"engine": "none", "kind": "sql", "scenario": "fetch-only", "query": query},
                   lambda: evadb_session.run(self.cursor, query), self.cfg.repetitions, self.cfg.warmup,
                   len(self.ids))

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
        self.prepare()
        self.say(f"session {self.session}: engines {', '.join(self.cfg.engines)}, weights {self.weights}")
        self.indb = InDatabase(self)
        self.bench_fetch()
        for name in self.cfg.engines:
            self.rows.append(self.bench_engine(name))
        self.record_agreement()
        return self.rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'engine':<11}{'images':>7}{'raw img/s':>11}{'SQL img/s':>11}{'SQL/raw':>9}{'accuracy':>10}"
            f"{'agree':>8}{'p50 ms':>9}{'p99 ms':>9}{'SQL 1-img ms':>14}{'CPU%':>7}{'RSS MB':>8}"
            f"{'PG img/s':>10}{'PG 1-img ms':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        fractions = [a["fraction"] for a in r.get("agreement", {}).values()]
        agree = f"{min(fractions):.3f}" if fractions else "-"
        lines.append(f"{r['engine']:<11}{r['n']:>7}{r['raw_ips']:>11.1f}{r['sql_ips']:>11.1f}{r['overhead']:>9.3f}"
                     f"{r['accuracy']:>10.4f}{agree:>8}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                     f"{r['sql_p50_ms']:>14.1f}{(r['cpu_pct'] or 0):>7.0f}{(r['rss_mb'] or 0):>8.0f}"
                     f"{_opt(r.get('indb_ips'), 10, 1)}{_opt(r.get('indb_p50_ms'), 13, 2)}")
    return "\n".join(lines)


def _opt(value, width: int, digits: int) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def run_bench(cfg: BenchConfig) -> list[dict]:
    for name in cfg.engines:
        if name not in ENGINES:
            raise CnnsqlError(f"unknown engine {name!r}", f"choose from: {', '.join(ENGINES)}")
    bench = Bench(cfg)
    try:
        rows = bench.run()
    finally:
        bench.close()
    print(format_table(rows))
    print(f"(session {bench.session}; medians of {cfg.repetitions} timed runs after {cfg.warmup} warm-up; "
          f"{cfg.threads} threads; agree = lowest top-1 agreement with another engine's SQL output; "
          "PG = inside PostgreSQL (cnnsql db functions): whole split through the batched function, and p50 "
          "of one-image queries; all runs are in table bench_run)")
    return rows

