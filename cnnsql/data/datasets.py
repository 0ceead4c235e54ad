"""Named image datasets in PostgreSQL: `cifar10` (the cifar_image table of `cnnsql load`) and image
folders loaded with `cnnsql load --images DIR --dataset NAME` (tables in sql/datasets.sql).

A folder dataset is loaded in ONE transaction: its old rows, its dataset row and its views are
replaced together, so a failed or interrupted load leaves the previous version (or nothing) entirely.
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg2
from psycopg2 import sql
from psycopg2.extras import execute_values

from cnnsql import db
from cnnsql.data import cifar_table
from cnnsql.core.config import CIFAR10_SHAPE
from cnnsql.core.errors import CnnsqlError
from cnnsql.data.image_folder import FolderData, read_folder

DEFAULT = "cifar10"                     # cifar_image, views cifar_train / cifar_test
RESERVED = {DEFAULT, "cifar", "user"}   # names whose views exist already (cifar_test, user_images)
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
BINARY_SCHEMA = "cnnsql_bytes"
INSERT_PAGE = 500


@dataclass
class DatasetInfo:
    name: str
    shape: tuple[int, int, int]      # (channels, height, width)
    class_names: list[str]
    n_train: int
    n_test: int
    kind: str                        # cifar-10 | synthetic | folder
    version: tuple                   # changes with every load (for check_dataset)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def view(self, split: str) -> str:
        """The EvaDB-visible view of a split (pg.<view>)."""
        return f"cifar_{split}" if self.name == DEFAULT else f"{self.name}_{split}"

    @property
    def run_kind(self) -> str:
        """What a run on it records as its data (bench_run.dataset_kind): cifar-10, synthetic, folder:<name>."""
        return f"folder:{self.name}" if self.kind == "folder" else self.kind

    def provenance(self, conn) -> dict:
        """Where the data came from, for a weights file's manifest: CIFAR-10's archive md5s, or the folder."""
        if self.name == DEFAULT:
            return cifar_table.dataset_info(conn)
        return {"dataset": self.name, "kind": self.kind}

    def bytes_relation(self, split: str) -> tuple[str, str]:
        """(schema, view) of a split's stored images as (id, label, img bytea), the same for every dataset:
        the binary twin of its view (for CIFAR-10 over the split's partition, so id ranges are pruned)."""
        return BINARY_SCHEMA, f"{self.view(split)}_bytes"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise CnnsqlError(f"dataset name {name!r} is not allowed",
                          "use 1-40 lower-case letters, digits and _, starting with a letter")
    if name in RESERVED:
        raise CnnsqlError(f"dataset name {name!r} is reserved", f"choose another name (not {', '.join(sorted(RESERVED))})")
    return name


# --- loading ---------------------------------------------------------------------------------------

def load_images(target: db.Target | None, folder: str | Path, name: str, *, size=None, channels=None,
                test_fraction: float | None = None, progress: bool = True) -> dict:
    """Read and check the folder (no database needed for that), then load it in one transaction."""
    check_name(name)
    t0 = time.perf_counter()
    opts = {} if test_fraction is None else {"test_fraction": test_fraction}
    data = read_folder(folder, size=size, channels=channels, **opts)
    read_s = time.perf_counter() - t0
    if data.skipped and progress:
        print(f"skipped {len(data.skipped)} file(s) that are not .png/.jpg/.jpeg (e.g. {data.skipped[0]})",
              file=sys.stderr)
    with db.connection(target or db.resolve()) as conn:
        stats = store(conn, name, data)
    stats["read_s"] = read_s
    c, h, w = data.shape
    print(f"loaded dataset {name}: {stats['n_train']} train + {stats['n_test']} test images of {c}x{h}x{w}, "
          f"{len(data.class_names)} classes, in {read_s + stats['store_s']:.1f} s (read {read_s:.1f} s, "
          f"store {stats['store_s']:.1f} s); views pg.{name}_train, pg.{name}_test"
          + (f"; resized {data.resize}" if data.resize else ""))
    return stats


def store(conn, name: str, data: FolderData) -> dict:
    db.ensure_schema(conn)
    t0 = time.perf_counter()
    n_test = int((data.splits == "test").sum())
    n_train = len(data.splits) - n_test
    if n_train == 0 or n_test == 0:
        raise CnnsqlError(f"dataset {name}: {n_train} train and {n_test} test images; both splits need images",
                          "add images or change --test-fraction")
    c, h, w = data.shape
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('cnnsql.load'))")
            cur.execute("DELETE FROM image_dataset WHERE name = %s", (name,))
            cur.execute("""INSERT INTO image_dataset (name, channels, height, width, class_names, source, resize,
                           n_train, n_test, sha256) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                        (name, c, h, w, json.dumps(data.class_names), str(data.root.resolve()), data.resize,
                         n_train, n_test, data.digest()))
            for split in ("train", "test"):
                idx = np.flatnonzero(data.splits == split)
                rows = ((name, split, i, int(data.labels[k]), data.files[k], data.sha256[k],
                         psycopg2.Binary(data.images[k].tobytes())) for i, k in enumerate(idx))
                execute_values(cur, "INSERT INTO image_dataset_image (dataset, split, id, label, file, sha256, img) "
                               "VALUES %s", rows, page_size=INSERT_PAGE)
            create_views(cur, name)
        conn.commit()
    except BaseException:
        if not conn.closed:
            try:
                conn.rollback()
            except psycopg2.Error:
                pass
        raise
    return {"n_train": n_train, "n_test": n_test, "store_s": time.perf_counter() - t0}


def create_views(cur, name: str) -> None:
    """<name>_train / <name>_test (base64 img, as cifar_train) and their binary twins."""
    for split in ("train", "test"):
        view = f"{name}_{split}"
        rows = sql.SQL("SELECT id, label, {img} AS img FROM image_dataset_image WHERE dataset = {ds} AND split = {sp}")
        common = {"ds": sql.Literal(name), "sp": sql.Literal(split)}
        cur.execute(sql.SQL("CREATE OR REPLACE VIEW {} AS ").format(sql.Identifier(view)) + rows.format(
            img=sql.SQL("replace(encode(img, 'base64'), E'\\n', '')"), **common))
        cur.execute(sql.SQL("CREATE OR REPLACE VIEW {} AS ").format(sql.Identifier(BINARY_SCHEMA, f"{view}_bytes"))
                    + rows.format(img=sql.Identifier("img"), **common))


# --- reading ---------------------------------------------------------------------------------------

def loaded(conn, name: str | None = None) -> bool:
    """Whether the dataset's test and train splits are in the database."""
    try:
        info(conn, name)
        return True
    except CnnsqlError:
        return False


def ensure(conn, target, name: str | None = None, progress: bool = True, say=print) -> DatasetInfo:
    """The dataset, loaded first when it can be fetched without the user (CIFAR-10 from its archive,
    found or downloaded by `cnnsql load`); an image folder must have been loaded by the user."""
    name = name or DEFAULT
    if name == DEFAULT and not loaded(conn, name):
        from cnnsql.data import loader

        say("no data in the database yet: loading CIFAR-10 (cnnsql load)")
        loader.load(target, progress=progress)
    return info(conn, name)


def info(conn, name: str | None = None) -> DatasetInfo:
    """What a dataset is; a clear error naming `cnnsql load` when it is not loaded."""
    name = name or DEFAULT
    if name == DEFAULT:

        db.require_tables(conn, "cifar_image", creator="cnnsql load")
        meta = cifar_table.dataset_info(conn)
        if "test" not in meta:
            raise CnnsqlError("CIFAR-10 is not loaded", "run `cnnsql load` first")
        names = cifar_table.class_names(conn)
        return DatasetInfo(DEFAULT, CIFAR10_SHAPE, names, meta.get("train", {}).get("n_rows", 0), meta["test"]["n_rows"],
                           meta["test"]["kind"], cifar_table.dataset_version(conn))
    check_name(name)
    db.require_tables(conn, "image_dataset", creator="cnnsql load --images DIR --dataset NAME")
    with conn.cursor() as cur:
        cur.execute("""SELECT channels, height, width, class_names, n_train, n_test, sha256, loaded_at
                       FROM image_dataset WHERE name = %s""", (name,))
        row = cur.fetchone()
    conn.rollback()
    if row is None:
        raise CnnsqlError(f"dataset {name!r} is not loaded", f"run `cnnsql load --images DIR --dataset {name}`")
    c, h, w, classes, n_train, n_test, digest, loaded_at = row
    return DatasetInfo(name, (c, h, w), list(classes), n_train, n_test, "folder", (digest, loaded_at))


def version(conn, dataset: DatasetInfo) -> tuple:
    return info(conn, dataset.name).version


def check_version(conn, dataset: DatasetInfo, loaded: tuple, what: str) -> None:
    """Refuse to log a run whose data was replaced while it ran (a concurrent `cnnsql load`)."""
    if dataset.name == DEFAULT:
        return cifar_table.check_dataset(conn, loaded, what)
    if version(conn, dataset) != loaded:
        raise CnnsqlError(f"{what}: dataset {dataset.name!r} was reloaded while the run was going, so its figures "
                          "would mix two datasets; the run is marked failed", "rerun it when no `cnnsql load` is running")


def fetch_split(conn, dataset: DatasetInfo, split: str, limit: int | None = None, offset: int = 0):
    """-> ids (N,), images uint8 (N, C, H, W), labels (N,) ordered by id."""
    if dataset.name == DEFAULT:
        return cifar_table.fetch_split(conn, split, limit=limit, offset=offset)
    if split not in ("train", "test"):
        raise CnnsqlError(f"unknown split {split!r}", "use 'train' or 'test'")
    with conn.cursor() as cur:
        cur.execute("""SELECT id, label, img FROM image_dataset_image WHERE dataset = %s AND split = %s
                       ORDER BY id LIMIT %s OFFSET %s""", (dataset.name, split, limit, offset))
        rows = cur.fetchall()
    conn.rollback()
    if not rows:
        raise CnnsqlError(f"split {split!r} of dataset {dataset.name!r} is empty",
                          f"run `cnnsql load --images DIR --dataset {dataset.name}`")
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    labels = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
    images = np.frombuffer(bytearray(b"".join(bytes(r[2]) for r in rows)), dtype=np.uint8).reshape(-1, *dataset.shape)
    return ids, images, labels
