"""Your own pictures in the CIFAR-10 layout: any image file -> 3,072 channel-major bytes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnsql.core.config import CIFAR10_SHAPE
from cnnsql.core.errors import CnnsqlError


def to_cifar_bytes(path: str | Path) -> bytes:
    """Decode an image (PNG, JPEG, ...), convert to RGB, resize to CIFAR-10's height and width, return CHW uint8 bytes."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB").resize((CIFAR10_SHAPE[2], CIFAR10_SHAPE[1]), Image.Resampling.BILINEAR)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise CnnsqlError(f"cannot read image {path}: {exc}", "give a PNG or JPEG file") from None
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).tobytes()


def insert_image(conn, path: str | Path) -> int:
    """Insert into user_image; returns its id."""
    data = to_cifar_bytes(path)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO user_image (name, img) VALUES (%s, %s) RETURNING id", (Path(path).name, data))
        image_id = cur.fetchone()[0]
    conn.commit()
    return image_id
