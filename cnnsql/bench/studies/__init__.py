"""Studies: the measurements beyond `cnnsql bench` (raw speed per variant, agreement, Velox's ceiling,
the SQL path, inference inside PostgreSQL, growth, readers, listeners, ...), run by one runner.

A study is one module in this folder with
    NAME, the module docstring (its method: what is timed, on what data, how often),
    NEEDS_DATABASE (True: it reads the loaded dataset or a server),
    SMOKE (arguments of a run on a tiny input: tests/test_studies.py runs every study with them),
    arguments(parser), and run(ctx, args) -> {"rows": [...], "checks": [...], ...}; "tables": [keys]
    names further lists of rows to print.
The runner (`cnnsql study NAME [options]`) times through the harness's loop (measure.stats.interleave:
warm-up, interleaved repetitions, the noise verdict), takes engines from cnnsql.engines.ENGINES, and
writes one JSON file per run to results/studies/NAME/ (method, settings, machine, load, figures, checks)
with a verdict: VALID when every check passed and no measurement was noisy, else INVALID and why.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cnnsql.core import envinfo
from cnnsql.core.errors import CnnsqlError
from cnnsql.measure import stats
from cnnsql.results import render

STUDIES = ("raw_speed", "velox_ceiling", "agreement", "load_speed", "clients", "sql_path", "sql_memory", "indb_speed",
           "pg_readers", "growth", "listeners", "evadb_ray_mode")


def load(name: str):
    if name not in STUDIES:
        raise CnnsqlError(f"unknown study {name!r}", f"choose one of: {', '.join(STUDIES)} (`cnnsql study --list`)")
    return importlib.import_module(f"cnnsql.bench.studies.{name}")


def summary_line(module) -> str:
    return (module.__doc__ or "").strip().splitlines()[0]


@dataclass
class Context:
    """What a study gets from the runner: progress lines, the shared timing loop, its measurements' noise."""
    progress: bool = True
    noise: list[dict] = field(default_factory=list)

    def say(self, msg: str) -> None:
        if self.progress:
            print(msg, file=sys.stderr, flush=True)

    def interleaved(self, calls: dict, reps: int, warmup: int = 1, n_items: dict | int = 1, roots=(),
                    judge_spread: bool = True, label: str = "") -> dict:
        """Time `calls` interleaved (measure.stats.interleave) -> {key: stats.timing(...)}; every side's
        noise verdict counts toward the run's."""
        clock, _ = stats.interleave(calls, reps, warmup, roots)
        out = {}
        for key in calls:
            n = n_items[key] if isinstance(n_items, dict) else n_items
            out[key] = stats.timing(clock, key, n, judge_spread)
            self.noise.append({"measurement": f"{label} {key}".strip(), "noisy": out[key]["noisy"],
                               "reasons": out[key]["noise_reasons"]})
        return out

    def record_noise(self, label: str, verdict: dict) -> None:
        """A measurement timed outside `interleaved` (a child process, a whole command) with its verdict."""
        self.noise.append({"measurement": label, "noisy": verdict["noisy"], "reasons": verdict.get("noise_reasons", [])})


def results_dir() -> Path:
    """results/studies/ beside the benchmark's sessions ($CNNSQL_RESULTS_DIR/../studies when that is set)."""
    sessions = os.environ.get("CNNSQL_RESULTS_DIR")
    return (Path(sessions).parent if sessions else Path("results")) / "studies"


def parser_for(module) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"cnnsql study {module.NAME}", description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    module.arguments(ap)
    ap.add_argument("--out", type=Path, help="write the JSON result here (default: results/studies/NAME/STAMP.json)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    return ap


def run(name: str, argv: list[str]) -> dict:
    """Run one study; print its table and verdict; write its JSON. -> the result document."""
    module = load(name)
    args = parser_for(module).parse_args(argv)
    ctx = Context(progress=not args.quiet)
    started = datetime.now(timezone.utc)
    load0 = stats.load_average()
    t0 = time.perf_counter()
    figures = module.run(ctx, args)
    wall = time.perf_counter() - t0
    checks = figures.pop("checks", [])
    failed = [f"{c['name']}: {c.get('detail', 'failed')}" for c in checks if not c["ok"]]
    noisy = [f"{n['measurement']}: {'; '.join(n['reasons'])}" for n in ctx.noise if n["noisy"]]
    doc = {"study": name, "summary": summary_line(module), "method": (module.__doc__ or "").strip(),
           "command": "cnnsql study " + " ".join([name, *argv]),
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
           "machine": {"host": envinfo.host(), "cpu": envinfo.cpu_model(), "cpus": os.cpu_count(),
                       "commit": envinfo.git_commit(), "versions": envinfo.versions()},
           "started_at": started.isoformat(timespec="seconds"), "wall_s": round(wall, 3),
           "load_average": {"before": load0, "after": stats.load_average()},
           "verdict": "VALID" if not failed and not noisy else "INVALID", "invalid_because": failed + noisy,
           "checks": checks, "noise": ctx.noise, **figures}
    out = args.out or results_dir() / name / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=_plain) + "\n")
    for key in ("rows", *figures.get("tables", ())):  # a study names its further tables of rows
        rows = figures.get(key) or []
        if rows:
            if key != "rows":
                print(f"\n{key}:")
            print(render.text_table(list(rows[0]), [[r.get(k) for k in rows[0]] for r in rows]))
    print(f"{name}: {doc['verdict']} ({verdict_line(checks, ctx.noise)})")
    print(f"result: {out}")
    doc["path"] = str(out)
    return doc


def verdict_line(checks: list[dict], noise: list[dict]) -> str:
    """The verdict's reasons in one line (every reason is in the JSON file)."""
    failed = [c for c in checks if not c["ok"]]
    noisy = [n for n in noise if n["noisy"]]
    parts = [f"{len(checks) - len(failed)} of {len(checks)} checks passed"]
    if failed:
        parts.append("failed: " + "; ".join(f"{c['name']} ({c.get('detail', '')})" for c in failed[:3])
                     + (f"; and {len(failed) - 3} more" if len(failed) > 3 else ""))
    parts.append(f"{len(noisy)} of {len(noise)} measurements noisy")
    if noisy:
        reasons = sorted({r.split(" (")[0] for n in noisy for r in n["reasons"]})
        parts[-1] += ": " + "; ".join(reasons)
    return ", ".join(parts)


def check(name: str, ok: bool, detail: str = "") -> dict:
    return {"name": name, "ok": bool(ok), "detail": detail}


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")
