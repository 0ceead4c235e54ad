"""Subcommands of the benchmark layer: bench, report, shell, results."""
from __future__ import annotations

import argparse
from pathlib import Path


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _count(minimum: int):
    """argparse type: an integer >= minimum (0 or negative repetitions, samples or limits mean nothing)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _engines(text: str) -> list[str]:
    return [e.strip() for e in text.split(",") if e.strip()]


def cmd_bench(args) -> int:
    from dataclasses import fields

    from cnnsql.bench.harness import run_bench
    from cnnsql.bench.bench_config import BenchConfig

    chosen = {f.name: getattr(args, f.name) for f in fields(BenchConfig) if hasattr(args, f.name)}
    cfg = BenchConfig(**{**chosen, "engines": args.engines or BenchConfig().engines},
                      progress=not args.quiet, skip_unable=args.engines is None)
    if args.cluster == "ray":
        from cnnsql.bench.ray_runner import run_ray

        run_ray(cfg, args.workers, args.address, args.table)
    else:
        run_bench(cfg)
    return 0


def register_bench(sub) -> None:
    from cnnsql.bench.bench_config import BenchConfig

    d = BenchConfig()  # the one place the defaults are defined

    def csv(values) -> str:
        return ",".join(map(str, values))

    b = sub.add_parser("bench", help="run every benchmark query for every engine, log to PostgreSQL, print a table")
    b.add_argument("--engines", type=_engines, default=None,
                   help=f"comma-separated (default: {csv(d.engines)}; those that can run the model)")
    b.add_argument("--dataset", default=d.dataset, metavar="NAME",
                   help="cifar10 (default) or a dataset loaded with `cnnsql load --images DIR --dataset NAME`")
    b.add_argument("--model", default=d.model, metavar="NAME|FILE",
                   help="built-in (study, lenet5, vgg, resnet20, mobilenet_small; default study), a description .json, "
                        "or a weights .npz; without --weights, <weights dir>/<dataset>-<model>.npz is used, trained if missing")
    b.add_argument("--weights", type=Path, default=d.weights,
                   help="weights file (default: $CNNSQL_WEIGHTS or .cnnsql/weights/default.npz, trained if missing)")
    b.add_argument("--repetitions", type=_count(1), default=d.repetitions,
                   help="timed rounds per phase, interleaved across what a phase compares (default 3, or the "
                        "engine's bench_repetitions and bench_indb_repetitions: Velox 2, and 1 in PostgreSQL)")
    b.add_argument("--warmup", type=_count(0), default=d.warmup,
                   help=f"untimed warm-up calls per phase (default {d.warmup})")
    b.add_argument("--threads", type=_count(1), default=d.threads,
                   help=f"intra-op threads / Velox drivers (default {d.threads})")
    b.add_argument("--device", default=d.device, choices=["cpu", "cuda"], help="torch/tensorflow device")
    b.add_argument("--limit", type=_count(1), default=d.limit,
                   help="test images for engines without a default sample (default: all)")
    b.add_argument("--sample", "--velox-sample", dest="sample", type=_count(1), default=d.sample,
                   help="test images for engines that declare a default sample (bench_sample); every other engine "
                        "also runs this sample, so one row compares all engines on identical work")
    b.add_argument("--full", action="store_true", help="every engine on every test image")
    b.add_argument("--batch-sizes", type=_int_list, default=d.batch_sizes,
                   help=f"raw batch-size sweep (default {csv(d.batch_sizes)})")
    b.add_argument("--single-stream", type=_count(1), default=d.single_stream,
                   help=f"one-image raw calls (default {d.single_stream}, or the engine's bench_single_stream)")
    b.add_argument("--sql-single-stream", type=_count(1), default=d.sql_single_stream,
                   help=f"one-image SQL queries per engine (default {d.sql_single_stream})")
    b.add_argument("--train-epochs", type=_count(1), default=d.train_epochs,
                   help=f"epochs of the default model if no weights exist (default {d.train_epochs})")
    b.add_argument("--results-dir", type=Path, default=d.results_dir,
                   help=f"folder for the session's JSON results file (default {d.results_dir})")
    b.add_argument("--no-results-file", dest="results_dir", action="store_const", const=None,
                   help="do not write the JSON results file")
    b.add_argument("--cluster", choices=["local", "ray"], default="local",
                   help="local: EvaDB SQL benchmark in this process; ray: engines as Ray actors over shards")
    b.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray instance)")
    b.add_argument("--workers", type=_int_list, default=[2], help="Ray workers, e.g. 1,2 for a scaling run")
    b.add_argument("--table", default="ray_prediction", help="table for Ray predictions (default ray_prediction)")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)


def cmd_report(args) -> int:
    from cnnsql.results.report import write_report

    index = write_report(args.out, args.session)
    print(f"report written: {index} (PNG plots beside it)")
    return 0


def register_report(sub) -> None:
    r = sub.add_parser("report", help="plots (PNG) and an HTML report from the results tables")
    r.add_argument("--out", type=Path, default=Path("results/report"), help="output folder (default results/report)")
    r.add_argument("--session", default=None, help="benchmark session id (default: the latest complete one)")
    r.set_defaults(func=cmd_report)


def cmd_shell(args) -> int:
    from cnnsql.cli.shell import run_shell

    run_shell(args.command_text)
    return 0


def register_shell(sub) -> None:
    s = sub.add_parser("shell", help="interactive EvaDB SQL shell with pg and the CNN functions registered")
    s.add_argument("-c", "--command", dest="command_text", action="append", default=None,
                   help="run this statement and exit (repeatable); without it, read statements from the terminal")
    s.set_defaults(func=cmd_shell)


def register_results(sub) -> None:
    from cnnsql.results.results_doc import register_results as register

    register(sub)


REGISTER = [register_bench, register_report, register_shell, register_results]
