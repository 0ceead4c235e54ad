"""What the studies that read the loaded dataset share: the weights (--weights or the default file), the
dataset (the dataset API: its info, its test split, its view names) and the benchmark's query templates
(sql/queries/, the same text `cnnsql bench` runs) pointed at that dataset's view."""
from __future__ import annotations

from pathlib import Path

from cnnsql import db
from cnnsql.core import config
from cnnsql.core.errors import CnnsqlError
from cnnsql.data import datasets


def add_weights_and_dataset(ap) -> None:
    ap.add_argument("--weights", type=Path, help="weights file (default: the default weights file, "
                                                 "written by `cnnsql bench` or `cnnsql train`)")
    ap.add_argument("--dataset", default=None, help=f"loaded dataset (default: {datasets.DEFAULT})")


def weights_path(args) -> Path:
    """--weights, or the default weights file; one line naming the fix when neither exists."""
    path = Path(args.weights) if getattr(args, "weights", None) else config.default_weights()
    if not path.is_file():
        raise CnnsqlError(f"no weights file at {path}", "run `cnnsql bench` or `cnnsql train` first, or pass --weights")
    return path.absolute()


def open_dataset(args, ctx, target: db.Target | None = None):
    """-> (target, connection, DatasetInfo) of the loaded dataset (CIFAR-10 loaded first when missing)."""
    target = target or db.resolve()
    conn = db.connect(target)
    db.ensure_schema(conn)
    ds = datasets.ensure(conn, target, getattr(args, "dataset", None), ctx.progress, ctx.say)
    return target, conn, ds


def query(name: str, ds: datasets.DatasetInfo, **values) -> str:
    """The benchmark's query template NAME (sql/queries/NAME.sql) on the dataset's test view."""
    from cnnsql.bench.harness import query_text

    return query_text(name, **values).replace("pg.cifar_test", f"pg.{ds.view('test')}")


def server_roots(conn, target: db.Target) -> tuple[int, ...]:
    """The private cluster's postmaster: its processes' CPU is the measurement's own (stats.Clock roots)."""
    pid = db.private_server_pid(conn) if target.private else None
    return (pid,) if pid else ()
