"""Subcommands of the benchmark layer: bench, report, shell."""
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
    from .bench import BenchConfig, run_bench

    if args.cluster == "ray" and (args.dataset or args.model):
        from .errors import CnnsqlError

        raise CnnsqlError("the Ray runner runs the study CNN on CIFAR-10 only", "use --cluster local with --dataset/--model")
    cfg = BenchConfig(engines=args.engines or ["torch", "tensorflow", "velox"], weights=args.weights, repetitions=args.repetitions, warmup=args.warmup,
                      threads=args.threads, device=args.device, limit=args.limit, sample=args.sample, full=args.full,
                      batch_sizes=args.batch_sizes, single_stream=args.single_stream,
                      sql_single_stream=args.sql_single_stream, train_epochs=args.train_epochs,
                      progress=not args.quiet, dataset=args.dataset, model=args.model,
                      skip_unable=args.engines is None)
    if args.cluster == "ray":
        from .ray_runner import run_ray

        run_ray(cfg, args.workers, args.address, args.table)
    else:
        run_bench(cfg)
    return 0


def register_bench(sub) -> None:
    b = sub.add_parser("bench", help="run every benchmark query for every engine, log to PostgreSQL, print a table")
    b.add_argument("--engines", type=_engines, default=None,
                   help="comma-separated (default: torch,tensorflow,velox; those that can run the model)")
    b.add_argument("--dataset", default=None, metavar="NAME",
                   help="cifar10 (default) or a dataset loaded with `cnnsql load --images DIR --dataset NAME`")
    b.add_argument("--model", default=None, metavar="NAME|FILE",
                   help="built-in (study, lenet5, vgg; default study), a description .json, or a weights .npz; "
                        "without --weights, <weights dir>/<dataset>-<model>.npz is used, trained if missing")
    b.add_argument("--weights", type=Path, default=None,
                   help="weights file (default: $CNNSQL_WEIGHTS or .cnnsql/weights/default.npz, trained if missing)")
    b.add_argument("--repetitions", type=_count(1), default=3, help="timed repetitions per phase (default 3)")
    b.add_argument("--warmup", type=_count(0), default=1, help="untimed warm-up calls per phase (default 1)")
    b.add_argument("--threads", type=_count(1), default=2, help="intra-op threads / Velox drivers (default 2)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch/tensorflow device")
    b.add_argument("--limit", type=_count(1), default=None, help="test images for torch/tensorflow (default: all)")
    b.add_argument("--sample", "--velox-sample", dest="sample", type=_count(1), default=None,
                   help="test images for engines that declare a default sample (Velox: the first 1,000)")
    b.add_argument("--full", action="store_true", help="every engine on every test image (Velox too)")
    b.add_argument("--batch-sizes", type=_int_list, default=[1, 16, 64, 256], help="raw batch-size sweep")
    b.add_argument("--single-stream", type=_count(1), default=100, help="one-image raw calls (Velox: 10)")
    b.add_argument("--sql-single-stream", type=_count(1), default=5, help="one-image SQL queries per engine")
    b.add_argument("--train-epochs", type=_count(1), default=2, help="epochs of the default model if no weights exist (2)")
    b.add_argument("--cluster", choices=["local", "ray"], default="local",
                   help="local: EvaDB SQL benchmark in this process; ray: engines as Ray actors over shards")
    b.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray instance)")
    b.add_argument("--workers", type=_int_list, default=[2], help="Ray workers, e.g. 1,2 for a scaling run")
    b.add_argument("--table", default="ray_prediction", help="table for Ray predictions (default ray_prediction)")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)


def cmd_report(args) -> int:
    from .report import write_report

    index = write_report(args.out, args.session)
    print(f"report written: {index} (PNG plots beside it)")
    return 0


def register_report(sub) -> None:
    r = sub.add_parser("report", help="plots (PNG) and an HTML report from the results tables")
    r.add_argument("--out", type=Path, default=Path("results/report"), help="output folder (default results/report)")
    r.add_argument("--session", default=None, help="benchmark session id (default: the latest complete one)")
    r.set_defaults(func=cmd_report)


def cmd_shell(args) -> int:
    from .shell import run_shell

    run_shell(args.command_text)
    return 0


def register_shell(sub) -> None:
    s = sub.add_parser("shell", help="interactive EvaDB SQL shell with pg and the CNN functions registered")
    s.add_argument("-c", "--command", dest="command_text", action="append", default=None,
                   help="run this statement and exit (repeatable); without it, read statements from the terminal")
    s.set_defaults(func=cmd_shell)


REGISTER = [register_bench, register_report, register_shell]
