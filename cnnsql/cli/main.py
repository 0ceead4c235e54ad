"""The `cnnsql` command. Errors are one line (problem and fix); tracebacks only with --debug."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cnnsql.core import config
from cnnsql.core.errors import CnnsqlError, first_line


def _positive(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


# --- db -----------------------------------------------------------------------------------

def cmd_db(args) -> int:
    from cnnsql import db

    if args.action == "functions":
        from cnnsql.placements.pgfunctions import functions_command

        return functions_command(args)
    if args.action == "pooler":
        return pooler_command(args)
    if args.what:
        raise CnnsqlError(f"`cnnsql db {args.action}` takes no {args.what!r}", "did you mean `cnnsql db functions "
                          f"{args.what}`?")
    cluster = db.private_cluster()
    external = config.external_dsn() is not None
    if args.action == "url":
        print(db.resolve(autostart=not external).url())
        return 0
    if external and args.action in ("start", "stop"):
        raise CnnsqlError("CNNSQL_DSN or PG* variables point at an external server; there is no private cluster to "
                          f"{args.action}", "unset them to use the private cluster")
    if args.action == "start":
        target = db.resolve(autostart=True)
        print(f"PostgreSQL running: {target.display()}")
    elif args.action == "stop":
        from cnnsql.db.pooler import Pooler

        if Pooler(cluster).stop():
            print("pooler stopped")
        print("stopped" if cluster.stop() else "not running")
    elif args.action == "status":
        if external:
            with db.connection() as conn:
                print(f"external server reachable: {db.resolve().display()} ({conn.server_version})")
        else:
            running = cluster.status()
            print(f"private cluster at {cluster.data}: {'running' if running else 'stopped'}")
            return 0 if running else 3
    return 0


def pooler_command(args) -> int:
    """`cnnsql db pooler start|stop|status|url`: PgBouncer in front of the private cluster."""
    from psycopg2.extensions import make_dsn

    from cnnsql import db
    from cnnsql.db.pooler import Pooler

    if config.external_dsn() is not None:
        raise CnnsqlError("CNNSQL_DSN or PG* variables point at an external server; the pooler fronts the private "
                          "cluster only", "unset them, or run PgBouncer beside your own server")
    action = args.what or "status"
    pooler = Pooler(db.private_cluster())
    if action == "start":
        db.resolve(autostart=True)  # the cluster running and its database created
        pooler.start(pool_size=args.pool_size)
        print(f"PgBouncer running on 127.0.0.1:{pooler.port} (transaction pooling, pool size "
              f"{args.pool_size or os.cpu_count()}); connect with: {db.Target(make_dsn(**pooler.conninfo(config.database_name())), True).url()}")
    elif action == "stop":
        print("pooler stopped" if pooler.stop() else "pooler not running")
    elif action == "status":
        running = pooler.status()
        print(f"pooler: {'running on 127.0.0.1:' + str(pooler.port) if running else 'stopped'}")
        return 0 if running else 3
    elif action == "url":
        if not pooler.status():
            raise CnnsqlError("the pooler is not running", "run `cnnsql db pooler start`")
        print(db.Target(make_dsn(**pooler.conninfo(config.database_name())), True).url())
    else:
        raise CnnsqlError(f"unknown pooler action {action!r}", "use start, stop, status or url")
    return 0


# --- load ---------------------------------------------------------------------------------

def _size(text: str) -> tuple[int, int]:
    """HxW (or one number for a square), each 1..1024."""
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        h = w = 0
    if not (1 <= h <= 1024 and 1 <= w <= 1024):
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 32x32), each 1..1024, got {text!r}")
    return h, w


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def cmd_load(args) -> int:
    from cnnsql.data import loader

    if args.images is not None or args.dataset is not None:
        return _load_images(args)
    if args.size or args.channels or args.test_fraction:
        raise CnnsqlError("--size, --channels and --test-fraction apply to image folders",
                          "use them with --images DIR --dataset NAME")
    loader.load(source=args.source, synthetic=args.synthetic, seed=args.seed,
                download=not args.no_download, progress=not args.quiet)
    return 0


def _load_images(args) -> int:
    from cnnsql.data import datasets

    if args.images is None or args.dataset is None:
        raise CnnsqlError("an image folder load needs both --images DIR and --dataset NAME",
                          "e.g. cnnsql load --images ./digits --dataset digits")
    if args.source or args.synthetic:
        raise CnnsqlError("--images cannot be combined with --source or --synthetic (those load CIFAR-10)",
                          "run two loads")
    datasets.load_images(None, args.images, args.dataset, size=args.size, channels=args.channels,
                         test_fraction=args.test_fraction, progress=not args.quiet)
    return 0


# --- train / predict ----------------------------------------------------------------------

def cmd_train(args) -> int:
    from cnnsql.cli import training_cli

    training_cli.train_command(args)
    return 0


def cmd_predict(args) -> int:
    from cnnsql.cli import predict

    predict.predict_command(args)
    return 0


# --- parser -------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """Usage errors in the project's one-line form (argparse prints the usage block first)."""

    def error(self, message: str):
        self.exit(2, f"cnnsql: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cnnsql", description="Compare PyTorch, TensorFlow, Velox and ONNX Runtime on images in PostgreSQL, "
                                              "driven by SQL.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("db", help="the private PostgreSQL cluster (or the external one in CNNSQL_DSN)")
    d.add_argument("action", choices=["start", "stop", "status", "url", "functions", "pooler"],
                   help="start/stop the private cluster; status; url prints a DSN for psql; "
                        "functions install|remove|status: the CNN as SQL functions inside PostgreSQL; "
                        "pooler start|stop|status|url: PgBouncer (transaction pooling) in front of it")
    d.add_argument("--pool-size", type=_positive, default=None,
                   help="pooler start: server connections shared by all clients (default: one per core)")
    from cnnsql.placements.pgfunctions import register as register_functions

    register_functions(d)
    d.set_defaults(func=cmd_db)

    ld = sub.add_parser("load", help="load CIFAR-10 (or --synthetic N, or an image folder) into PostgreSQL")
    ld.add_argument("--source", help="cifar-10-python.tar.gz or an extracted cifar-10-batches-py folder "
                    "(default: $CIFAR10_PATH, Keras/torchvision caches, then download)")
    ld.add_argument("--synthetic", type=_positive, metavar="N", help="load N deterministic synthetic train "
                    "images (N/5 test) instead of CIFAR-10, for smoke tests")
    ld.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    ld.add_argument("--no-download", action="store_true", help="never download; fail if not found locally")
    ld.add_argument("--quiet", action="store_true", help="no progress bars")
    ld.add_argument("--images", type=Path, metavar="DIR", help="an image folder: DIR/<class>/<image>.png|.jpg "
                    "(torchvision ImageFolder layout); needs --dataset")
    ld.add_argument("--dataset", metavar="NAME", help="name of the image-folder dataset (views pg.NAME_train, "
                    "pg.NAME_test); a reload replaces it")
    ld.add_argument("--size", type=_size, metavar="HxW", help="resize every image to HxW (bilinear); "
                    "default: refuse images of different sizes")
    ld.add_argument("--channels", type=int, choices=[1, 3], help="1 (greyscale) or 3 (RGB); default: 1 when "
                    "every image is greyscale")
    ld.add_argument("--test-fraction", type=_fraction, metavar="F", help="share of images in the test split "
                    "(default 0.2; chosen per file by a hash of its path)")
    ld.set_defaults(func=cmd_load)

    tr = sub.add_parser("train", help="train a CNN on the train split and write a weights file")
    tr.add_argument("--framework", choices=["torch", "tensorflow"], default="torch")
    tr.add_argument("--model", default=None, metavar="NAME|FILE", help="a built-in (study, lenet5, vgg, "
                    "resnet20, mobilenet_small; default study) sized to the dataset, or a model description .json")
    tr.add_argument("--dataset", default=None, metavar="NAME", help="cifar10 (default) or a dataset loaded "
                    "with `cnnsql load --images`")
    tr.add_argument("--epochs", type=_positive, default=None, help="default: the framework's tuned default")
    tr.add_argument("--batch-size", type=_positive, default=None)
    tr.add_argument("--out", type=Path, required=True, help="weights file to write (.npz; manifest beside it)")
    tr.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    tr.add_argument("--threads", type=_positive, default=None)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--limit", type=_positive, default=None, help="train on the first N images only")
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=cmd_train)

    pr = sub.add_parser("predict", help="classify a split with one engine into a CSV, or into a PostgreSQL table "
                        "(--into) at any size", description="Classify a split with one engine. --out writes a CSV "
                        "(the split is read into memory); --into TABLE writes a PostgreSQL table (id, label, "
                        "class_name, probability, probs) chunk by chunk in one transaction, the CNN running in this "
                        "process (--placement client), inside PostgreSQL (postgres) or through EvaDB (evadb).")
    pr.add_argument("--engine", required=True, help="torch, tensorflow, velox or onnxruntime")
    pr.add_argument("--weights", type=Path, required=True)
    pr.add_argument("--split", default="test", choices=["train", "test"])
    pr.add_argument("--dataset", default=None, metavar="NAME", help="cifar10 (default) or a `cnnsql load --images` dataset")
    pr.add_argument("--limit", type=_positive, default=None)
    pr.add_argument("--batch-size", type=_positive, default=None)
    pr.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    pr.add_argument("--threads", type=_positive, default=None)
    out = pr.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", type=Path, help="CSV: id, label, predicted, p0..p<classes-1>")
    out.add_argument("--into", metavar="[SCHEMA.]TABLE", help="a new PostgreSQL table of the predictions "
                     "(docs/in-postgres.md); with --limit N the images with id < N")
    pr.add_argument("--placement", default="client", choices=["client", "postgres", "evadb"],
                    help="--into: where the CNN runs (default client: this process; postgres: the installed "
                         "cnnsql.<E>cnn_batch function; evadb: an EvaDB query)")
    pr.add_argument("--replace", action="store_true", help="--into: replace an existing table once the new one "
                    "is complete")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=cmd_predict)

    for register in _extra_commands():
        register(sub)
    return p


def _extra_commands():
    from cnnsql.cli import bench_cli, study_cli
    from cnnsql.engines import importer

    return [*bench_cli.REGISTER, study_cli.register_study, importer.register]


def main(argv: list[str] | None = None) -> int:
    import psycopg2

    args = build_parser().parse_args(argv)
    try:
        from cnnsql.placements import ray_local

        ray_local.sweep_password_files()  # a killed Ray run's DSN password does not outlive it
        return args.func(args) or 0
    except CnnsqlError as exc:
        if args.debug:
            raise
        print(f"cnnsql: error: {exc}", file=sys.stderr)
        return 1
    except psycopg2.Error as exc:
        if args.debug:
            raise
        print(f"cnnsql: error: database error: {first_line(exc)} (rerun with --debug for details)", file=sys.stderr)
        return 1
    except OSError as exc:  # a read-only or full CNNSQL_HOME, a missing folder: the path and the reason
        if args.debug:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"cnnsql: error: {exc.strerror or exc}{where} (check that the path exists and is writable; state "
              f"lives in CNNSQL_HOME={config.state_dir()})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cnnsql: interrupted; nothing half-written was committed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
