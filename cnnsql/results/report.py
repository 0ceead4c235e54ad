"""`cnnsql report`: plots (PNG) and an HTML page from the results tables.

Every figure says its sample size and repetitions. The study's claims are set beside the
measured figures, with a plain statement of whether they reproduce.
"""
from __future__ import annotations

import functools
import html
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cnnsql import db
from cnnsql.core.errors import CnnsqlError
from cnnsql.engines import ALTERNATIVES, LABELS
from cnnsql.results import render

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
                        "AND scenario = 'offline' ORDER BY finished_at DESC LIMIT 1")
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
    mine = runs[runs.session_id == session]
    if mine.empty:
        raise CnnsqlError(f"no complete runs for session {session!r}", "see SELECT DISTINCT session_id FROM bench_run")
    if not ((mine.kind == "sql") & (mine.scenario == "offline")).any():
        raise CnnsqlError(f"session {session!r} has no complete SQL offline run to report",
                          "pass --session with a session that ran `cnnsql bench` to the end")
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


def shared_n(runs: pd.DataFrame) -> int:
    """The largest sample every engine of the session ran raw and through SQL (identical work)."""
    off = runs[(runs.kind == "sql") & (runs.scenario == "offline")]
    sizes = [set(g.n_rows) for _, g in off.groupby("engine")]
    common = set.intersection(*sizes) if sizes else set()
    return int(max(common)) if common else int(off.n_rows.max())


def fig_time(runs: pd.DataFrame, out: Path) -> Path:
    plt = _plt()
    off = runs[(runs.kind.isin(list(PLACEMENTS))) & (runs.scenario == "offline")]
    off = off[(off.n_rows == shared_n(runs)) | (off.kind == "indb")]
    kinds = [k for k in PLACEMENTS if k != "indb" or (off.kind == "indb").any()]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4))
    for ax, kind in zip(axes, kinds):
        d = off[off.kind == kind]
        bars = ax.bar(d.engine, d.latency_ms, color=[COLORS.get(e) for e in d.engine])
        lo = 1000 * d.wall_min_s.fillna(d.wall_s) / d.n_rows
        hi = 1000 * d.wall_max_s.fillna(d.wall_s) / d.n_rows
        ax.errorbar(d.engine, d.latency_ms, yerr=[d.latency_ms - lo, hi - d.latency_ms], fmt="none", ecolor="k",
                    capsize=4)
        _bar_labels(ax, bars, [f"{w:.2f} s / {n} img\n(median of {int(r)})" for w, n, r in zip(d.wall_s, d.n_rows, d.repetitions)])
        ax.set_yscale("log")
        if len(d):
            ax.set_ylim(top=d.latency_ms.max() * 20)  # room for the labels above the tallest bar
        ax.set_ylabel("milliseconds per image (log)")
        ax.set_title(f"{PLACEMENTS[kind]}: time per image")
    fig.suptitle("Inference time per engine (offline scenario, same test images for every engine)")
    fig.tight_layout()
    return _save(fig, out / "fig1_time_per_engine.png")


def fig_utilization(runs: pd.DataFrame, out: Path) -> Path:
    plt = _plt()
    d = runs[(runs.kind == "sql") & (runs.scenario == "offline")]
    d = d[d.n_rows == shared_n(runs)]
    x = np.arange(len(d))
    fig, ax = plt.subplots(figsize=(8, 4))
    b1 = ax.bar(x - 0.2, d.cpu_pct.fillna(0), 0.4, label="CPU % (100 = one core)", color="#4c72b0")
    gpu = d.gpu_pct
    b2 = ax.bar(x + 0.2, gpu.fillna(0), 0.4, label="GPU %", color="#55a868")
    _bar_labels(ax, b1, [f"{v:.0f}%" for v in d.cpu_pct.fillna(0)])
    _bar_labels(ax, b2, ["n/a (no GPU)" if pd.isna(v) else f"{v:.0f}%" for v in gpu])
    ax.set_xticks(x, d.engine)
    ax.set_ylabel("mean utilisation during the timed runs")
    ax.set_title(f"CPU and GPU utilisation per engine (SQL offline; {int(d.threads.max())} threads)")
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
        for _, r in g.iterrows():  # the batch the framework executed, where it differs from the call's
            det = _detail(r)
            if det.get("executed_batch") and int(det["executed_batch"]) != int(r.batch_size):
                ax.annotate(f"runs {int(det['executed_batch'])}", (r.batch_size, r.images_per_s), fontsize=7,
                            xytext=(3, -10), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s (log)")
    ax.set_title("Throughput against batch size (raw engine)")
    ax.legend()
    fig.tight_layout()
    return _save(fig, out / "throughput_vs_batch.png")


def _detail(r) -> dict:
    d = r.detail
    return d if isinstance(d, dict) else json.loads(d or "{}")


def overhead_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per SQL offline run: raw and SQL time, the ratio of the interleaved pairs, and where the SQL
    time goes. No share is ever negative (see bench.split_other)."""
    sqlr = runs[(runs.kind == "sql") & (runs.scenario == "offline")]
    raw = runs[(runs.kind == "raw") & (runs.scenario == "offline")]
    fetch = runs[runs.scenario == "fetch-only"]
    rows = []
    for _, r in sqlr.iterrows():
        det = _detail(r)
        same = raw[(raw.engine == r.engine) & (raw.n_rows == r.n_rows)]
        if same.empty:
            continue
        raw_s = float(same.wall_s.iloc[0])
        f = fetch[(fetch.engine == r.engine) & (fetch.n_rows == r.n_rows)]
        if "fetch_s" in det:
            fetch_s = det["fetch_s"]
        elif len(f):
            fetch_s = float(f.wall_s.iloc[0])
        elif len(fetch):  # sessions before the interleaved fetch: one whole-split fetch, scaled
            fetch_s = float(fetch.wall_s.iloc[0]) * r.n_rows / float(fetch.n_rows.iloc[0])
        else:
            fetch_s = 0.0
        decode, predict = det.get("decode_s", 0.0), det.get("predict_s", 0.0)
        other = r.wall_s - fetch_s - decode - predict
        ratio = det.get("over_raw") or {"median": r.wall_s / raw_s, "min": r.wall_s / raw_s, "max": r.wall_s / raw_s}
        rows.append({"engine": r.engine, "images": int(r.n_rows), "raw_s": raw_s, "sql_s": r.wall_s,
                     "sql_over_raw": ratio["median"], "ratio_min": ratio["min"], "ratio_max": ratio["max"],
                     "fetch_s": fetch_s, "decode_s": decode, "predict_s": predict,
                     "evadb_other_s": max(0.0, other), "components_exceed_s": max(0.0, -other),
                     "sql_matches_raw": det.get("sql_matches_raw"),
                     "noisy": bool(r.noisy) if pd.notna(r.get("noisy")) else False})
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
        ax.annotate(f"{r.sql_over_raw:.3f}x [{r.ratio_min:.2f}-{r.ratio_max:.2f}]\n({r.images} img)",
                    (x[i], bottom[i]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [f"{e}\n{n} img" for e, n in zip(table.engine, table.images)])
    ax.set_ylabel("time relative to the raw engine (1.0 = raw)")
    ax.set_title("SQL overhead: where the EvaDB query's time goes")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, out / "sql_overhead.png")


def fig_accuracy(runs: pd.DataFrame, out: Path) -> Path:
    plt = _plt()
    d = runs[(runs.kind == "sql") & (runs.scenario == "offline")]
    d = d[d.n_rows == shared_n(runs)]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bars = ax.bar(d.engine, d.accuracy, color=[COLORS.get(e) for e in d.engine], width=0.6)
    ci = [_detail(r).get("accuracy_ci95") or [r.accuracy, r.accuracy] for _, r in d.iterrows()]
    ax.errorbar(d.engine, d.accuracy, yerr=[[a - c[0] for a, c in zip(d.accuracy, ci)],
                                           [c[1] - a for a, c in zip(d.accuracy, ci)]], fmt="none", ecolor="k",
                capsize=4)
    texts = []
    full = runs[(runs.kind == "sql") & (runs.scenario == "offline")].sort_values("n_rows").groupby("engine").tail(1)
    for _, r in d.iterrows():
        big = full[full.engine == r.engine]
        ag = big.agreement.iloc[0] if len(big) else r.agreement
        ag = ag if isinstance(ag, dict) else json.loads(ag or "{}")
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
    off = d[d.scenario == "offline"].sort_values("n_rows").groupby(["engine", "kind"]).tail(1)  # largest sample
    off = off.set_index(["engine", "kind"])
    one = d[d.scenario == "single-stream"].set_index(["engine", "kind"])
    rows = [{"engine": e, "placement": PLACEMENTS[k], "images": off.loc[(e, k), "n_rows"],
             "offline images/s": off.loc[(e, k), "images_per_s"],
             "1-image p50 ms": one.loc[(e, k), "p50_ms"] if (e, k) in one.index else None,
             "1-image p99 ms": one.loc[(e, k), "p99_ms"] if (e, k) in one.index else None}
            for e, k in off.index]
    return pd.DataFrame(rows)


NAMES = LABELS


def _model_of(weights: str) -> str | None:
    """The model a weights file holds (its manifest), read once per file version for the whole report."""
    try:
        stamp = os.stat(weights).st_mtime_ns
    except OSError:
        return None
    return _model_cached(weights, stamp)


@functools.lru_cache(maxsize=16)
def _model_cached(weights: str, stamp: int) -> str | None:
    try:
        from cnnsql.models.weights import load_weights

        return load_weights(weights).spec.name
    except (CnnsqlError, OSError):
        return None


def setting(runs: pd.DataFrame) -> dict:
    """What the session measured: its dataset, its model and weights file (read from the file when it
    is still there; its manifest names the model)."""
    first = runs.iloc[0]
    kind = first.dataset_kind if isinstance(first.dataset_kind, str) and first.dataset_kind else "cifar-10"
    dataset = {"cifar-10": "CIFAR-10", "synthetic": "synthetic CIFAR-shaped data"}.get(
        kind, kind.split(":", 1)[1] if kind.startswith("folder:") else kind)
    weights = first.weights if isinstance(first.weights, str) and first.weights else None
    model = _model_of(weights) if weights else None
    engines = [NAMES.get(e, e) for e in sorted(set(runs.engine.dropna()) - {"none"})]
    return {"dataset": dataset, "kind": kind, "model": model, "weights": weights or "-", "engines": engines,
            "study_setting": kind == "cifar-10" and model == "study"}


def title(runs: pd.DataFrame) -> str:
    s = setting(runs)
    return (f"cnnsql: {' vs '.join(s['engines'])} on {s['dataset']}, model {s['model'] or 'of an unreadable weights file'}"
            " in PostgreSQL")


def claims(runs: pd.DataFrame) -> list[str]:
    s = setting(runs)
    if not s["study_setting"]:
        return [f"The study's claims concern its CNN on CIFAR-10; this session ran model {s['model'] or '?'} on "
                f"{s['dataset']}, so they are not compared here."]
    sqlr = runs[(runs.kind == "sql") & (runs.scenario == "offline")]
    sqlr = sqlr.sort_values("n_rows").groupby("engine").tail(1).set_index("engine")  # each engine's largest sample
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


def _fmt(value, digits: int = 2) -> str:
    return render.fmt(value, digits)


def _rng(mid, lo, hi, digits: int) -> str:
    return render.rng(mid, lo, hi, digits)


def html_table(rows: list[dict], columns: list[str], caption: str) -> str:
    """Cells are already text; every one escaped."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '-')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def offline_rows(runs: pd.DataFrame) -> list[dict]:
    """One row per engine and sample: raw and SQL images/s [min-max], SQL/raw [min-max], accuracy [95% CI]."""
    sqlr = runs[(runs.kind == "sql") & (runs.scenario == "offline")].sort_values(["n_rows", "engine"],
                                                                                   ascending=[False, True])
    raw = runs[(runs.kind == "raw") & (runs.scenario == "offline")]
    rows = []
    for _, r in sqlr.iterrows():
        rr = raw[(raw.engine == r.engine) & (raw.n_rows == r.n_rows)]
        det = _detail(r)
        ratio = det.get("over_raw") or {}
        ci = det.get("accuracy_ci95")

        def ips(run):
            return _rng(run.images_per_s, run.n_rows / (run.wall_max_s if pd.notna(run.wall_max_s) else run.wall_s),
                        run.n_rows / (run.wall_min_s if pd.notna(run.wall_min_s) else run.wall_s), 1)
        rows.append({"engine": r.engine, "images": _fmt(int(r.n_rows)),
                     "raw images/s [min-max]": ips(rr.iloc[0]) if len(rr) else "-",
                     "SQL images/s [min-max]": ips(r),
                     "SQL/raw [min-max]": _rng(ratio.get("median"), ratio.get("min"), ratio.get("max"), 3),
                     "accuracy [95% CI]": _rng(r.accuracy, *(ci or [None, None]), 4) if ci else _fmt(r.accuracy, 4),
                     "CPU s per pass raw / SQL": f"{_fmt(rr.cpu_s.iloc[0] if len(rr) else None)} / {_fmt(r.cpu_s)}",
                     "noisy": _fmt(bool(r.noisy) or bool(len(rr) and rr.noisy.iloc[0] is True))
                     if pd.notna(r.noisy) else "not measured"})
    return rows


def lo_hi(r) -> tuple[float, float]:
    """A run's slowest and fastest repetition in images/s."""
    lo = r.n_rows / (r.wall_max_s if pd.notna(r.wall_max_s) else r.wall_s)
    hi = r.n_rows / (r.wall_min_s if pd.notna(r.wall_min_s) else r.wall_s)
    return lo, hi


def pick(d: pd.DataFrame) -> str | None:
    """Whether a framework the study compares is the one to pick: its fastest against the fastest
    engine a user could pick instead (engines.ALTERNATIVES), on the runs in d (one per engine)."""
    study, alt = d[~d.engine.isin(ALTERNATIVES)], d[d.engine.isin(ALTERNATIVES)]
    if study.empty or alt.empty:
        return None
    a = study.sort_values("images_per_s").iloc[-1]
    b = alt.sort_values("images_per_s").iloc[-1]
    (alo, ahi), (blo, bhi) = lo_hi(a), lo_hi(b)
    ratio, rlo, rhi = b.images_per_s / a.images_per_s, blo / ahi, bhi / alo
    an, bn = NAMES.get(a.engine, a.engine), NAMES.get(b.engine, b.engine)
    if rlo > 1:
        verdict = f"{bn} is the pick here, not a framework the study compares"
    elif rhi < 1:
        verdict = f"the study's {an} remains the pick here"
    else:
        verdict = f"their repetitions overlap: no clear pick between {an} and {bn} here"
    return (f"{bn}, which a user could run instead, does {ratio:.2f}x the images/s of {an}, the fastest framework "
            f"the study compares (range {rlo:.2f}-{rhi:.2f}x, slowest against fastest repetitions): {verdict}.")


def _lead(d: pd.DataFrame) -> str | None:
    """'A is fastest: x images/s [range], k times B [range]' for the runs in d (one per engine)."""
    if len(d) < 1:
        return None
    d = d.sort_values("images_per_s", ascending=False)
    a = d.iloc[0]
    alo, ahi = lo_hi(a)
    text = f"{a.engine} ({_rng(a.images_per_s, alo, ahi, 1)} images/s)"
    if len(d) > 1:
        b = d.iloc[1]
        blo, bhi = lo_hi(b)
        text += (f", {a.images_per_s / b.images_per_s:.2f}x {b.engine} (range {alo / bhi:.2f}-{ahi / blo:.2f}x, "
                 "slowest against fastest repetitions)")
    return text


def answer(runs: pd.DataFrame) -> list[str]:
    """The opening of the report: who is fastest, by how much, how sure, and whether the run was noisy."""
    n = shared_n(runs)
    off = runs[(runs.scenario == "offline") & (runs.n_rows == n)]
    s = setting(runs)
    lines = [f"Measured: model {s['model'] or '?'} (weights {s['weights']}) on {s['dataset']}."]
    for kind, label in (("sql", "through SQL (EvaDB)"), ("raw", "raw (no SQL)")):
        lead = _lead(off[off.kind == kind])
        if lead:
            lines.append(f"Fastest {label} on the same {n:,} test images: {lead}.")
    choice = pick(off[off.kind == "sql"])
    if choice:
        lines.append(f"Through SQL, on this model, data and machine: {choice}")
    over = overhead_table(runs)
    if len(over):
        lines.append("SQL costs " + "; ".join(
            f"{r.engine} {r.sql_over_raw:.3f}x its raw time [{r.ratio_min:.3f}-{r.ratio_max:.3f}] on {r.images:,} images"
            for _, r in over.iterrows()) + " (median of interleaved raw/SQL pairs, with their min and max).")
    timed = runs[runs.kind.isin(["raw", "sql", "indb"])]
    if "noisy" in timed and timed.noisy.notna().any():
        noisy = timed[timed.noisy.fillna(False).astype(bool)]
        share = max([_detail(r).get("others_cpu_share") or 0 for _, r in noisy.iterrows()] or [0])
        spread = max([_detail(r).get("spread") or 0 for _, r in noisy.iterrows()
                      if any("spread" in x for x in _detail(r).get("noise_reasons", []))] or [0])
        why = f"other processes used up to {100 * share:.0f}% of the machine's CPU" + (
            f", repetitions spread up to {100 * spread:.0f}%" if spread else "")
        lines.append(f"NOISY: {len(noisy)} of {len(timed)} runs were flagged ({why}; thresholds 10% and 15%): "
                     "read the intervals, not the medians." if len(noisy) else
                     "No run was flagged noisy (other processes under 10% of the CPU, repetitions within 15%).")
    else:
        lines.append("This session predates the noise measurement: its figures carry no noise flag.")
    return lines


def history(conn) -> list[dict]:
    """Every benchmark session in the database, newest first: where, when, for how long (first run's
    start to last run's end: the benchmark itself, without data loading or training), SQL/raw."""
    with conn.cursor() as cur:
        cur.execute("""
            SELECT r.session_id, min(r.started_at), max(r.finished_at), max(r.host), max(r.git_commit),
                   string_agg(DISTINCT r.engine, ', ') FILTER (WHERE r.engine <> 'none'),
                   bool_or(r.noisy), count(*)
            FROM bench_run r WHERE r.status = 'complete' AND r.kind IN ('sql', 'raw', 'indb')
            GROUP BY r.session_id HAVING bool_or(r.kind = 'sql' AND r.scenario = 'offline')
            ORDER BY 2 DESC LIMIT 30""")
        sessions = cur.fetchall()
        cur.execute("SELECT session_id, engine, n_rows, sql_over_raw FROM bench_sql_overhead ORDER BY n_rows DESC")
        ratios: dict[str, dict] = {}
        for sid, eng, n, ratio in cur.fetchall():
            ratios.setdefault(sid, {}).setdefault(eng, (n, ratio))
    conn.rollback()
    return [{"session": sid, "started (UTC)": f"{start:%Y-%m-%d %H:%M}",
             "measured for": f"{(end - start).total_seconds() / 60:.1f} min" if end else "-",
             "machine": host, "git": git or "-",
             "engines": engines or "-", "SQL/raw (largest sample)": ", ".join(
                 f"{e} {r:.3f}" for e, (n, r) in sorted(ratios.get(sid, {}).items())) or "-",
             "noisy": "not measured" if noisy is None else _fmt(noisy), "runs": str(count)}
            for sid, start, end, host, git, engines, noisy, count in sessions]


CAPTIONS = {
    "fig1_time_per_engine": "Milliseconds per image, offline, on the same test images for every engine: the median "
                            "of the timed repetitions, whiskers from the fastest to the slowest (log scale).",
    "fig2_utilization": "Mean CPU (100% = one core) and GPU use during the timed SQL runs.",
    "throughput_vs_batch": "Raw images/s against the batch size of the call (all sizes timed interleaved); "
                           "'runs N' marks a call the framework executed in chunks of N.",
    "sql_overhead": "Where an EvaDB query's time goes, relative to the raw engine (1.0). The EvaDB share is what "
                    "remains of the total; never negative.",
    "accuracy_agreement": "Top-1 accuracy of each engine's SQL output with its Wilson 95% interval, and top-1 "
                          "agreement with the other engines on the ids both ran.",
    "training": "Training: seconds per epoch and test accuracy of the latest run of each framework.",
    "ray_scaling": "Ray: images/s end to end (predictions written back) against the number of workers.",
}


def write_report(out: Path, session: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with db.connection() as conn:
        runs, session = read_runs(conn, session)
        past = history(conn)
    current = runs[runs.session_id == session]
    figs = [fig_time(current, out), fig_utilization(current, out), fig_batch(current, out)]
    overhead = overhead_table(current)
    figs.append(fig_overhead(overhead, out))
    figs.append(fig_accuracy(current, out))
    figs += [f for f in (fig_training(runs, out), fig_scaling(runs, out)) if f]
    first = current.iloc[0]
    load = _detail(first).get("load_at_start")
    machine = [{"item": "session", "value": session}, {"item": "machine", "value": first.host},
               {"item": "git commit", "value": first.git_commit or "-"},
               {"item": "data", "value": first.dataset_kind},
               {"item": "threads", "value": _fmt(int(first.threads))},
               {"item": "each phase", "value": f"{int(first.warmup)} untimed warm-up call(s), then "
                                               f"{int(first.repetitions)} timed rounds, sides interleaved; medians"},
               {"item": "load average at start (1, 5, 15 min)", "value": ", ".join(map(str, load)) if load else "-"}]
    versions = first.versions if isinstance(first.versions, dict) else json.loads(first.versions or "{}")
    machine += [{"item": f"version: {k}", "value": v} for k, v in sorted(versions.items())]
    over_rows = [{"engine": r.engine, "images": _fmt(int(r.images)), "raw s": _fmt(r.raw_s, 3), "SQL s": _fmt(r.sql_s, 3),
                  "SQL/raw [min-max]": _rng(r.sql_over_raw, r.ratio_min, r.ratio_max, 3),
                  "fetch s": _fmt(r.fetch_s, 3), "decode s": _fmt(r.decode_s, 3), "predict s": _fmt(r.predict_s, 3),
                  "EvaDB other s": _fmt(r.evadb_other_s, 3),
                  "parts exceed total by s": _fmt(r.components_exceed_s, 3) if r.components_exceed_s else "-",
                  "SQL = raw top-1": _fmt(r.sql_matches_raw, 4)} for _, r in overhead.iterrows()]
    place = [{k: (_fmt(v, 2) if not isinstance(v, str) else v) for k, v in r.items()}
             for r in placement_table(current).to_dict("records")]
    queries = sorted(set(q for q in current["query"].dropna()))
    css = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 10px}"
           "table{border-collapse:collapse;font-size:12px;margin:8px 0;max-width:100%}"
           "caption{text-align:left;font-weight:bold;padding:4px 0}"
           "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child,th:first-child{text-align:left}"
           "figure{margin:16px 0}figure img{max-width:100%;height:auto}figcaption{font-size:13px;color:#333}"
           "code{overflow-wrap:anywhere;font-size:12px}.answer{background:#f4f6fa;padding:8px 16px}")
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title(current)) + "</title>",
            f"<style>{css}</style></head><body>",
            f"<h1>{html.escape(title(current))}</h1>",
            "<div class='answer'><h2>The answer</h2><ul>" + "".join(f"<li>{html.escape(a)}</li>" for a in answer(current))
            + "</ul><h3>The study's claims</h3><ul>" + "".join(f"<li>{html.escape(c)}</li>" for c in claims(current))
            + "</ul></div>",
            "<h2>Offline: images per second</h2>",
            html_table(offline_rows(current), ["engine", "images", "raw images/s [min-max]", "SQL images/s [min-max]",
                                               "SQL/raw [min-max]", "accuracy [95% CI]", "CPU s per pass raw / SQL",
                                               "noisy"],
                       "Medians of the timed rounds with [min-max]; SQL/raw is the median of per-round ratios of "
                       "interleaved raw/SQL calls; accuracy with its Wilson 95% interval."),
            "<h2>SQL overhead</h2>",
            html_table(over_rows, list(over_rows[0]) if over_rows else ["engine"],
                       "Where the EvaDB query's time goes (seconds per pass; fetch-only timed interleaved with raw "
                       "and SQL on the same rows)."),
            "<h2>Where inference runs</h2><p>raw: in the benchmark's process; EvaDB: the SQL query through "
            "EvaDB; inside PostgreSQL: the cnnsql.&lt;Engine&gt;CNN PL/Python functions (batched form for the "
            "offline figure, one-image queries through psycopg2 for the latency).</p>",
            html_table(place, list(place[0]) if place else ["engine"], "Offline images/s and one-image latency by placement."),
            "<h2>Figures</h2>"]
    for k, f in enumerate(figs, 1):
        cap = CAPTIONS.get(f.stem, f.stem)
        page.append(f"<figure><img src='{html.escape(f.name)}' alt='{html.escape(cap)}'>"
                    f"<figcaption>Figure {k}: {html.escape(cap)}</figcaption></figure>")
    page += ["<h2>Queries</h2><ul>" + "".join(f"<li><code>{html.escape(q)}</code></li>" for q in queries) + "</ul>",
             "<h2>Machine and versions</h2>", html_table(machine, ["item", "value"], "What this session ran on."),
             "<h2>Sessions</h2>",
             html_table(past, ["session", "started (UTC)", "measured for", "machine", "git", "engines",
                               "SQL/raw (largest sample)", "noisy", "runs"],
                        "Every benchmark session in this database, newest first; 'measured for': its first run's "
                        "start to its last run's end (without data loading or training)."),
             "</body></html>"]
    index = out / "index.html"
    index.write_text("\n".join(page))
    return index
