"""`cnnsql train`: read the train split from PostgreSQL, train, write weights, log the run."""
from __future__ import annotations

from cnnsql import db
from cnnsql.bench.training import train_and_save


def train_command(args) -> None:
    with db.connection() as conn:
        train_and_save(conn, args.framework, args.out, epochs=args.epochs, batch_size=args.batch_size,
                       seed=args.seed, device=args.device, threads=args.threads, limit=args.limit,
                       progress=not args.quiet, model=args.model, dataset=args.dataset)
