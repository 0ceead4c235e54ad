"""Read a labelled image folder (torchvision ImageFolder / Keras image_dataset_from_directory layout):

    DIR/<class name>/<any name>.png|.jpg|.jpeg   (sub-folders below a class folder are read too)

Classes are the sub-folder names in sorted order (label 0 is the first), as both libraries do.
Everything is read and checked before anything is loaded: a corrupt, truncated or non-PNG/JPEG
image is named by its file, and nothing is loaded. Limits are checked before reading: file count,
each file's size, and each image's pixel count from its header (before decoding).

Image size: every image of a dataset must have the same size, or the load is refused naming two
files that differ; with `size=(h, w)` every image is resized to it (Pillow bilinear, no crop, aspect
ratio not kept). Channels: 1 when every image is greyscale, else 3 (RGB; greyscale and palette images
converted, alpha dropped); `channels` forces one.

Split: deterministic per file, independent of the order of reading and stable when files are added:
an image is in the test split when the first 8 hex digits of sha256("<class>/<relative path>") / 2^32
< test_fraction.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnsql.core.errors import CnnsqlError

EXTENSIONS = (".png", ".jpg", ".jpeg")
FORMATS = ("PNG", "JPEG")
MAX_FILES = 1_000_000
MAX_FILE_BYTES = 32 << 20          # one compressed image
MAX_PIXELS = 4096 * 4096           # one image, from its header, before decoding
MAX_IMAGE_BYTES = 1 << 20          # one stored image (channels x height x width) after any resize
MAX_TOTAL_BYTES = 8 << 30          # all stored images together
MAX_CLASSES = 1000
DEFAULT_TEST_FRACTION = 0.2


@dataclass
class FolderData:
    """Images uint8 (N, C, H, W), labels (N,), split 'train'/'test' (N,), file paths relative to the
    folder, sha256 of each file's bytes; class names by label."""

    root: Path
    class_names: list[str]
    images: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    files: list[str]
    sha256: list[str]
    resize: str | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def digest(self) -> str:
        """sha256 over the sorted (file, file sha256) pairs: one checksum of the whole source."""
        h = hashlib.sha256()
        for f, s in sorted(zip(self.files, self.sha256)):
            h.update(f"{f}\0{s}\n".encode())
        return h.hexdigest()


def list_files(root: Path) -> tuple[list[str], list[tuple[Path, int]], list[str]]:
    """-> class names, (file, label) pairs, other files skipped (not .png/.jpg/.jpeg)."""
    if not root.is_dir():
        raise CnnsqlError(f"image folder {root} not found or not a folder",
                          "give a folder with one sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise CnnsqlError(f"image folder {root} has {len(classes)} class sub-folder(s), at least 2 are needed",
                          "put each class's images in its own sub-folder (DIR/<class>/<image>.png)")
    if len(classes) > MAX_CLASSES:
        raise CnnsqlError(f"image folder {root} has {len(classes)} class folders, at most {MAX_CLASSES}")
    files, skipped = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.is_dir() or any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            if path.suffix.lower() in EXTENSIONS:
                files.append((path, label))
                if len(files) > MAX_FILES:
                    raise CnnsqlError(f"image folder {root} has more than {MAX_FILES:,} images")
            else:
                skipped.append(str(path.relative_to(root)))
    empty = [c for i, c in enumerate(classes) if not any(lab == i for _, lab in files)]
    if empty:
        raise CnnsqlError(f"class folder(s) {', '.join(empty[:5])} in {root} hold no PNG or JPEG images",
                          "remove them or add images")
    return classes, files, skipped


def test_split(rel: str, fraction: float) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def read_folder(root: str | Path, *, size: tuple[int, int] | None = None, channels: int | None = None,
                test_fraction: float = DEFAULT_TEST_FRACTION) -> FolderData:
    """Read and check the whole folder. Raises CnnsqlError naming the bad files; nothing is returned then."""
    from PIL import Image

    root = Path(root)
    if not 0 < test_fraction < 1:
        raise CnnsqlError(f"test fraction {test_fraction} must be between 0 and 1")
    classes, files, skipped = list_files(root)
    decoded, bad, digests = [], [], []
    for path, _ in files:
        rel = str(path.relative_to(root))
        try:
            raw, im = _open(path)
        except ValueError as exc:
            bad.append(f"{rel} ({exc})")
            continue
        digests.append(hashlib.sha256(raw).hexdigest())
        decoded.append(im)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CnnsqlError(f"{len(bad)} unreadable image(s) in {root}: {'; '.join(bad[:5])}{more}; nothing was loaded",
                          "remove or replace them")
    channels = channels or (1 if all(im.mode in ("L", "1", "I;16", "I") for im in decoded) else 3)
    if channels not in (1, 3):
        raise CnnsqlError(f"channels must be 1 or 3, got {channels}")
    if size is None:
        sizes = {}
        for (path, _), im in zip(files, decoded):
            sizes.setdefault(im.size, path)
            if len(sizes) > 1:
                (s1, p1), (s2, p2) = list(sizes.items())[:2]
                raise CnnsqlError(f"images of different sizes: {p1.relative_to(root)} is {s1[0]}x{s1[1]}, "
                                  f"{p2.relative_to(root)} is {s2[0]}x{s2[1]} (width x height); nothing was loaded",
                                  "resize them all on load with --size HxW (bilinear)")
        w, h = decoded[0].size
    else:
        h, w = size
    per_image = channels * h * w
    if per_image > MAX_IMAGE_BYTES or per_image * len(decoded) > MAX_TOTAL_BYTES:
        raise CnnsqlError(f"{len(decoded):,} images of {channels}x{h}x{w} exceed cnnsql's limits "
                          f"({MAX_IMAGE_BYTES:,} bytes per image, {MAX_TOTAL_BYTES:,} in all)",
                          "load them smaller with --size HxW")
    images = np.empty((len(decoded), channels, h, w), dtype=np.uint8)
    for i, im in enumerate(decoded):
        im = im.convert("L" if channels == 1 else "RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
        images[i] = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    rels = [str(p.relative_to(root)) for p, _ in files]
    return FolderData(root=root, class_names=classes, images=images,
                      labels=np.array([lab for _, lab in files], dtype=np.int64),
                      splits=np.array(["test" if test_split(r, test_fraction) else "train" for r in rels]),
                      files=rels, sha256=digests, resize=f"bilinear to {h}x{w}" if size else None, skipped=skipped)


def _open(path: Path):
    """(file bytes, decoded PIL image) after the size limits; ValueError with the reason otherwise."""
    import io

    from PIL import Image, UnidentifiedImageError

    nbytes = path.stat().st_size
    if nbytes > MAX_FILE_BYTES:
        raise ValueError(f"{nbytes:,} bytes, more than {MAX_FILE_BYTES:,}")
    raw = path.read_bytes()
    try:
        im = Image.open(io.BytesIO(raw))
        if im.format not in FORMATS:
            raise ValueError(f"a {im.format} image, not PNG or JPEG")
        if im.width * im.height > MAX_PIXELS:
            raise ValueError(f"{im.width}x{im.height} pixels, more than {MAX_PIXELS:,}")
        im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable PNG or JPEG: {str(exc)[:120]}") from None
    return raw, im
