"""`cnnsql report`: plots (PNG) and an HTML page from the results tables.

Every figure says its sample size and repetitions. The study's claims are set beside the
measured figures, with a plain statement of whether they reproduce.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import db
from .errors import CnnsqlError

STUDY = {  # the seed study's claims
    "time_s": {"velox": 0.13, "tensorflow": 1.6, "torch": 2.3},
    "cpu_pct": {"tensorflow": 51, "torch": 32},
    "gpu_pct": {"tensorflow": 38, "torch": 10},
}
# Where inference ran (bench_run.kind), as figure 1's panels.
PLACEMENTS = {"sql": "EvaDB SQL query", "raw": "raw engine, no SQL", "indb": "inside PostgreSQL (PL/Python)"}
COLORS = {"torch": "#ee4c2c", "tensorflow": "#ff8f00", "velox": "#1f77b4", "none": "#7f7f7f"}


def read_runs(conn, session: str | None) -> tuple[pd.DataFrame, str]:
    db.require_tables(conn, "bench_run", creator="cnnsql bench")
    with conn.cursor() as cur:
        if session is None:
            cur.execute("SELECT session_id FROM bench_run WHERE status = 'complete' AND kind = 'sql' "
                        "ORDER BY finished_at DESC LIMIT 1")
            row = cur.fetchone()
            if row is None:
                raise CnnsqlError("no complete benchmark run in bench_run", "run `cnnsql bench` first")
            session = row[0]
        cur.execute("SELECT * FROM bench_run WHERE status = 'complete' AND (session_id = %s OR kind IN ('train', 'ray')) "
                    "ORDER BY run_id", (session,))
        cols = [d[0] for d in cur.description]
        runs = pd.DataFrame(cur.fetchall(), columns=cols)
        cur.execute("SELECT e.* FROM train_epoch e JOIN bench_run r USING (run_id) WHERE r.status = 'complete'")
        epochs = pd.DataFrame(cur.fetchall(), columns=[d[0] for d in cur.description])
    conn.rollback()
    if runs[runs.session_id == session].empty:
        raise CnnsqlError(f"no complete runs for session {session!r}", "see SELECT DISTINCT session_id FROM bench_run")
    runs.attrs["epochs"] = epochs
    return runs, session


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bar_labels(ax, bars, texts):
    for b, t in zip(bars, texts):
        ax.annotate(t, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)


def fig_time(runs: pd.DataFrame, out: Path) -> Path:
    plt = _plt()
    off = runs[(runs.kind.isin(list(PLACEMENTS))) & (runs.scenario == "offline")]
    kinds = [k for k in PLACEMENTS if k != "indb" or (off.kind == "indb").any()]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4))
    for ax, kind in zip(axes, kinds):
        d = off[off.kind == kind]
        bars = ax.bar(d.engine, d.latency_ms, color=[COLORS.get(e) for e in d.engine])
        _bar_labels(ax, bars, [f"{w:.2f} s / {n} img\n(median of {int(r)})" for w, n, r in zip(d.wall_s, d.n_rows, d.repetitions)])
        ax.set_yscale("log")
        if len(d):
            ax.set_ylim(top=d.latency_ms.max() * 20)  # room for the labels above the tallest bar
        ax.set_ylabel("milliseconds per image (log)")
        ax.set_title(f"{PLACEMENTS[kind]}: time per image")
    fig.suptitle("Figure 1: inference time per engine (offline scenario, test split)")
    fig.tight_layout()
    return _save(fig, out / "fig1_time_per_engine.png")


def fig_utilization(runs: pd.DataFrame, out: Path) -> Path:
    plt = _plt()
    d = runs[(runs.kind == "sql") & (runs.scenario == "offline")]
    x = np.arange(len(d))
    fig, ax = plt.subplots(figsize=(8, 4))
    b1 = ax.bar(x - 0.2, d.cpu_pct.fillna(0), 0.4, label="CPU % (100 = one core)", color="#4c72b0")
    gpu = d.gpu_pct
    b2 = ax.bar(x + 0.2, gpu.fillna(0), 0.4, label="GPU %", color="#55a868")
    _bar_labels(ax, b1, [f"{v:.0f}%" for v in d.cpu_pct.fillna(0)])
    _bar_labels(ax, b2, ["n/a (no GPU)" if pd.isna(v) else f"{v:.0f}%" for v in gpu])
    ax.set_xticks(x, d.engine)
    ax.set_ylabel("mean utilisation during the timed runs")
    ax.set_title(f"Figure 2: CPU and GPU utilisation per engine (SQL offline; {int(d.threads.max())} threads)")
    ax.legend()
    fig.tight_layout()
    return _save(fig, out / "fig2_utilization.png")


def fig_batch(runs: pd.DataFrame, out: Path) -> Path:
    plt = _plt()
    d = runs[(runs.kind == "raw") & (runs.scenario == "batch-sweep")]
    fig, ax = plt.subplots(figsize=(7, 4))
    for eng, g in d.groupby("engine"):
        g = g.sort_values("batch_size")
        ax.plot(g.batch_size, g.images_per_s, "o-", label=f"{eng} ({int(g.n_rows.iloc[0])} img/point)",
                color=COLORS.get(eng))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s (log)")
    ax.set_title("Throughput against batch size (raw engine)")
    ax.legend()
    fig.tight_layout()
    return _save(fig, out / "throughput_vs_batch.png")


def overhead_table(runs: pd.DataFrame) -> pd.DataFrame:
    sqlr = runs[(runs.kind == "sql") & (runs.scenario == "offline")]
    raw = runs[(runs.kind == "raw") & (runs.scenario == "offline")].set_index("engine")
    fetch = runs[(runs.scenario == "fetch-only")]
    fetch_s = float(fetch.wall_s.iloc[0]) if len(fetch) else np.nan
    fetch_n = int(fetch.n_rows.iloc[0]) if len(fetch) else 1
    rows = []
    for _, r in sqlr.iterrows():
        det = r.detail if isinstance(r.detail, dict) else json.loads(r.detail or "{}")
        f = fetch_s * r.n_rows / fetch_n  # EvaDB reads the whole view; scaled to the rows used
        other = r.wall_s - f - det.get("decode_s", 0) - det.get("predict_s", 0)
        rows.append({"engine": r.engine, "images": r.n_rows, "raw_s": raw.loc[r.engine, "wall_s"],
                     "sql_s": r.wall_s, "sql_over_raw": r.wall_s / raw.loc[r.engine, "wall_s"],
                     "fetch_s": f, "decode_s": det.get("decode_s"), "predict_s": det.get("predict_s"),
                     "evadb_other_s": other, "sql_matches_raw": det.get("sql_matches_raw")})
    return pd.DataFrame(rows)


def fig_overhead(table: pd.DataFrame, out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(table))
    bottom = np.zeros(len(table))
    parts = [("predict_s", "engine inside the function"), ("decode_s", "base64 decode"),
             ("fetch_s", "PostgreSQL fetch via EvaDB"), ("evadb_other_s", "EvaDB other")]
    raw = table.raw_s.to_numpy()
    for col, label in parts:
        frac = table[col].fillna(0).to_numpy() / raw
        ax.bar(x, frac, bottom=bottom, label=label)
        bottom += frac
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    for i, r in table.iterrows():
        ax.annotate(f"{r.sql_over_raw:.3f}x\n({r.images} img)", (x[i], bottom[i]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, table.engine)
    ax.set_ylabel("time relative to the raw engine (1.0 = raw)")
    ax.set_title("SQL overhead: where the EvaDB query's time goes")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, out / "sql_overhead.png")


def fig_accuracy(runs: pd.DataFrame, out: Path) -> Path:
    plt = _plt()
    d = runs[(runs.kind == "sql") & (runs.scenario == "offline")]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bars = ax.bar(d.engine, d.accuracy, color=[COLORS.get(e) for e in d.engine], width=0.6)
    texts = []
    for _, r in d.iterrows():
        ag = r.agreement if isinstance(r.agreement, dict) else json.loads(r.agreement or "{}")
        agree = "".join(f"\nagrees with {k}: {v['fraction']:.3f} (n={v['n']})" for k, v in ag.items())
        texts.append(f"accuracy {r.accuracy:.4f} (n={r.n_rows}){agree}")
    _bar_labels(ax, bars, texts)
    ax.set_ylim(0, 1.3)
    ax.set_ylabel("top-1 accuracy (SQL output vs labels)")
    ax.set_title("Accuracy and top-1 agreement between engines")
    fig.tight_layout()
    return _save(fig, out / "accuracy_agreement.png")


def fig_training(runs: pd.DataFrame, out: Path) -> Path | None:
    epochs = runs.attrs.get("epochs")
    train = runs[runs.kind == "train"]
    if train.empty or epochs is None or epochs.empty:
        return None
    plt = _plt()
    latest = train.sort_values("run_id").groupby("engine").tail(1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for _, r in latest.iterrows():
        e = epochs[epochs.run_id == r.run_id].sort_values("epoch")
        axes[0].plot(e.epoch, e.seconds, "o-", label=f"{r.engine} ({r.n_rows} images/epoch)", color=COLORS.get(r.engine))
        axes[1].bar(r.engine, r.accuracy, color=COLORS.get(r.engine))
        axes[1].annotate(f"{r.accuracy:.4f} after {len(e)} epochs", (r.engine, r.accuracy), ha="center", va="bottom")
    axes[0].set_xlabel("epoch")
    axes[0].set_xticks(sorted(epochs.epoch.unique()))
    axes[0].set_ylim(bottom=0)
    axes[0].set_ylabel("seconds")
    axes[0].set_title("Training time per epoch")
    axes[0].legend()
    axes[1].set_ylim(0, 1)
    axes[1].set_title("Test accuracy after training")
    fig.tight_layout()
    return _save(fig, out / "training.png")


def fig_scaling(runs: pd.DataFrame, out: Path) -> Path | None:
    d = runs[runs.kind == "ray"]
    if d.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for eng, g in d.groupby("engine"):
        g = g.groupby("workers").images_per_s.median().sort_index()
        ax.plot(g.index, g.values, "o-", label=eng, color=COLORS.get(eng))
    ax.set_xlabel("Ray workers")
    ax.set_ylabel("images/s (end to end, predictions written back)")
    ax.set_title("Scaling on Ray")
    ax.set_xticks(sorted(d.workers.dropna().unique()))
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    return _save(fig, out / "ray_scaling.png")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def placement_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per engine and placement: offline images/s and single-stream p50/p99 (ms), from one session."""
    d = runs[runs.kind.isin(list(PLACEMENTS)) & runs.scenario.isin(["offline", "single-stream"])]
    off = d[d.scenario == "offline"].set_index(["engine", "kind"])
    one = d[d.scenario == "single-stream"].set_index(["engine", "kind"])
    rows = [{"engine": e, "placement": PLACEMENTS[k], "images": off.loc[(e, k), "n_rows"],
             "offline images/s": off.loc[(e, k), "images_per_s"],
             "1-image p50 ms": one.loc[(e, k), "p50_ms"] if (e, k) in one.index else None,
             "1-image p99 ms": one.loc[(e, k), "p99_ms"] if (e, k) in one.index else None}
            for e, k in off.index]
    return pd.DataFrame(rows)


def claims(runs: pd.DataFrame) -> list[str]:
    sqlr = runs[(runs.kind == "sql") & (runs.scenario == "offline")].set_index("engine")
    lines = []
    if not sqlr.empty:
        measured = {e: (f"{sqlr.loc[e, 'latency_ms'] * 10:.1f} s per 10,000 images ("
                        f"{sqlr.loc[e, 'wall_s']:.2f} s measured on {int(sqlr.loc[e, 'n_rows'])})") for e in sqlr.index}
        order = list(sqlr.sort_values("latency_ms").index)
        lines.append("Study: Velox 0.13 s < TensorFlow 1.6 s < PyTorch 2.3 s. Measured (SQL offline): "
                     + "; ".join(f"{e} {measured[e]}" for e in order) + ". Order here: " + " < ".join(order) + ". "
                     + ("The study's order reproduces." if order == ["velox", "tensorflow", "torch"] else
                        "The study's order does NOT reproduce."))
        cpu = "; ".join(f"{e} {sqlr.loc[e, 'cpu_pct']:.0f}% CPU" for e in sqlr.index if pd.notna(sqlr.loc[e, "cpu_pct"]))
        gpu = "; ".join(f"{e} {sqlr.loc[e, 'gpu_pct']:.0f}% GPU" for e in sqlr.index if pd.notna(sqlr.loc[e, "gpu_pct"]))
        lines.append("Study: TensorFlow 51% CPU / 38% GPU, PyTorch 32% / 10%. Measured: " + cpu + ". "
                     + (gpu if gpu else "No GPU on this machine, so the GPU figures cannot be checked here.")
                     + " (CPU% here is 100 per busy core, 200 = both cores; the study's figures are"
                     " percentages of the whole machine, so divide ours by 2 to compare.)")
    return lines


def write_report(out: Path, session: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with db.connection() as conn:
        runs, session = read_runs(conn, session)
    current = runs[runs.session_id == session]
    allruns = runs
    figs = [fig_time(current, out), fig_utilization(current, out), fig_batch(current, out)]
    overhead = overhead_table(current)
    figs.append(fig_overhead(overhead, out))
    figs.append(fig_accuracy(current, out))
    figs += [f for f in (fig_training(allruns, out), fig_scaling(allruns, out)) if f]
    first = current.iloc[0]
    how = (f"Session {session}, host {first.host}, git {first.git_commit}, data {first.dataset_kind}; "
           f"{int(first.threads)} threads; each phase: {int(first.warmup)} untimed warm-up call(s), then "
           f"{'/'.join(str(int(r)) for r in sorted(current.repetitions.dropna().unique()))} timed repetitions "
           "(per run in the table below), medians reported.")
    cols = ["engine", "kind", "scenario", "n_rows", "batch_size", "repetitions", "wall_s", "images_per_s",
            "latency_ms", "p50_ms", "p90_ms", "p99_ms", "accuracy", "cpu_pct", "gpu_pct", "peak_rss_mb", "query"]
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>cnnsql report</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;"
            "font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}</style></head><body>",
            "<h1>cnnsql: PyTorch vs TensorFlow vs Velox on CIFAR-10 in PostgreSQL</h1>",
            f"<p>{html.escape(how)}</p>", f"<p>Versions: {html.escape(json.dumps(first.versions))}</p>",
            "<h2>The study's claims</h2><ul>" + "".join(f"<li>{html.escape(c)}</li>" for c in claims(current)) + "</ul>",
            "<h2>Runs</h2>", current[cols].round(4).to_html(index=False, na_rep="")]
    page += ["<h2>SQL overhead</h2>", overhead.round(4).to_html(index=False, na_rep="")]
    page += ["<h2>Where inference runs</h2><p>raw: in the benchmark's process; EvaDB: the SQL query through "
             "EvaDB; inside PostgreSQL: the cnnsql.&lt;Engine&gt;CNN PL/Python functions (batched form for the "
             "offline figure, one-image queries through psycopg2 for the latency).</p>",
             placement_table(current).round(2).to_html(index=False, na_rep="")]
    for f in figs:
        page.append(f"<h3>{html.escape(f.stem)}</h3><img src='{f.name}' style='max-width:100%'>")
    page.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(page))
    return index
