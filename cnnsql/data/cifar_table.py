"""Read images back from PostgreSQL as NumPy arrays (for training, prediction and raw timing)."""
from __future__ import annotations

import numpy as np

from cnnsql import db
from cnnsql.data.cifar import IMAGE_BYTES
from cnnsql.core.config import CIFAR10_SHAPE
from cnnsql.core.errors import CnnsqlError


def fetch_split(conn, split: str, limit: int | None = None, offset: int = 0):
    """-> ids (N,), images uint8 (N, *CIFAR10_SHAPE), labels (N,) ordered by id."""
    if split not in ("train", "test"):
        raise CnnsqlError(f"unknown split {split!r}", "use 'train' or 'test'")
    db.require_tables(conn, "cifar_image", creator="cnnsql load")
    with conn.cursor() as cur:
        cur.execute("SELECT id, label, img FROM cifar_image WHERE split = %s ORDER BY id LIMIT %s OFFSET %s",
                    (split, limit, offset))
        rows = cur.fetchall()
    conn.rollback()
    if not rows:
        raise CnnsqlError(f"split {split!r} is empty", "run `cnnsql load` first")
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    labels = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
    images = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.uint8).reshape(-1, *CIFAR10_SHAPE)
    assert images.shape[0] * IMAGE_BYTES == sum(len(r[2]) for r in rows)
    return ids, images, labels


def class_names(conn) -> list[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT name FROM cifar_class ORDER BY label")
        names = [r[0] for r in cur.fetchall()]
    conn.rollback()
    return names


def dataset_info(conn) -> dict:
    """Kind and checksums of the loaded data, for manifests and run records."""
    db.require_tables(conn, "cifar_dataset", creator="cnnsql load")
    with conn.cursor() as cur:
        cur.execute("SELECT split, kind, source, n_rows, md5 FROM cifar_dataset ORDER BY split")
        rows = cur.fetchall()
    conn.rollback()
    return {r[0]: {"kind": r[1], "source": r[2], "n_rows": r[3], "md5": r[4]} for r in rows}


def dataset_version(conn) -> tuple:
    """What identifies the loaded dataset: every load rewrites these rows (loaded_at included)."""
    with conn.cursor() as cur:
        cur.execute("SELECT split, kind, md5::text, n_rows, loaded_at FROM cifar_dataset ORDER BY split")
        rows = tuple(cur.fetchall())
    conn.rollback()
    return rows


def check_dataset(conn, version: tuple, what: str) -> None:
    """Refuse to log a run whose data was replaced while it ran (a concurrent `cnnsql load`)."""
    if dataset_version(conn) != version:
        raise CnnsqlError(f"{what}: the dataset was reloaded while the run was going, so its figures would mix "
                          "two datasets; the run is marked failed", "rerun it when no `cnnsql load` is running")
