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
import io
import os
import stat
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


def _refuse_links_and_specials(found: list[str], root: Path) -> None:
    if found:
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        raise CnnsqlError(f"image folder {root} holds {'; '.join(found[:5])}{more}: cnnsql reads only regular "
                          "files and folders inside DIR (no symbolic links, FIFOs, devices or sockets); nothing was "
                          "loaded", "copy the images themselves into DIR/<class>/")


def list_files(root: Path) -> tuple[list[str], list[tuple[Path, int]], list[str]]:
    """-> class names, (file, label) pairs, other files skipped (not .png/.jpg/.jpeg).

    Only what lies inside DIR is read: a class folder, sub-folder or image that is a symbolic link, and
    any file that is not a regular file (a FIFO would block the read, /dev/zero never ends), is refused
    by name before anything is read."""
    if not root.is_dir():
        raise CnnsqlError(f"image folder {root} not found or not a folder",
                          "give a folder with one sub-folder per class")
    odd: list[str] = []
    classes = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            odd.append(f"{entry.name} (a symbolic link to {os.readlink(entry.path)})")
        elif entry.is_dir(follow_symlinks=False):
            classes.append(entry.name)
    _refuse_links_and_specials(odd, root)
    if len(classes) < 2:
        raise CnnsqlError(f"image folder {root} has {len(classes)} class sub-folder(s), at least 2 are needed",
                          "put each class's images in its own sub-folder (DIR/<class>/<image>.png)")
    if len(classes) > MAX_CLASSES:
        raise CnnsqlError(f"image folder {root} has {len(classes)} class folders, at most {MAX_CLASSES}")
    files, skipped = [], []
    for label, name in enumerate(classes):
        for folder, dirs, names in os.walk(root / name, followlinks=False):
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for d in list(dirs):
                if (here / d).is_symlink():
                    odd.append(f"{(here / d).relative_to(root)} (a symbolic link to {os.readlink(here / d)})")
                    dirs.remove(d)
            for fname in sorted(names):
                if fname.startswith("."):
                    continue
                path = here / fname
                rel = str(path.relative_to(root))
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    odd.append(f"{rel} (a symbolic link to {os.readlink(path)})")
                elif not stat.S_ISREG(st.st_mode):
                    odd.append(f"{rel} (not a regular file)")
                elif path.suffix.lower() in EXTENSIONS:
                    files.append((path, label))
                    if len(files) > MAX_FILES:
                        raise CnnsqlError(f"image folder {root} has more than {MAX_FILES:,} images")
                else:
                    skipped.append(rel)
    _refuse_links_and_specials(odd, root)
    files.sort(key=lambda f: (f[1], f[0]))  # as sorted(rglob): ids stay what they were
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
    # Pass 1, headers only (format, pixel count, size, mode): memory is one file at a time.
    heads, bad = [], []
    for path, _ in files:
        try:
            heads.append(_header(_read(path)))
        except ValueError as exc:
            bad.append(f"{path.relative_to(root)} ({exc})")
    _refuse_bad(bad, root)
    channels = channels or (1 if all(mode in ("L", "1", "I;16", "I") for _, mode in heads) else 3)
    if channels not in (1, 3):
        raise CnnsqlError(f"channels must be 1 or 3, got {channels}")
    if size is None:
        sizes = {}
        for (path, _), (dims, _) in zip(files, heads):
            sizes.setdefault(dims, path)
            if len(sizes) > 1:
                (s1, p1), (s2, p2) = list(sizes.items())[:2]
                raise CnnsqlError(f"images of different sizes: {p1.relative_to(root)} is {s1[0]}x{s1[1]}, "
                                  f"{p2.relative_to(root)} is {s2[0]}x{s2[1]} (width x height); nothing was loaded",
                                  "resize them all on load with --size HxW (bilinear)")
        w, h = heads[0][0]
    else:
        h, w = size
    per_image = channels * h * w
    if per_image > MAX_IMAGE_BYTES or per_image * len(files) > MAX_TOTAL_BYTES:
        raise CnnsqlError(f"{len(files):,} images of {channels}x{h}x{w} exceed cnnsql's limits "
                          f"({MAX_IMAGE_BYTES:,} bytes per image, {MAX_TOTAL_BYTES:,} in all)",
                          "load them smaller with --size HxW")
    # Pass 2: each image decoded, converted and resized into the output as it is read (memory: the
    # output plus one decoded image), its bytes hashed.
    images = np.empty((len(files), channels, h, w), dtype=np.uint8)
    digests = []
    for i, (path, _) in enumerate(files):
        try:
            raw = _read(path)
            im = _decode(raw)
        except ValueError as exc:
            bad.append(f"{path.relative_to(root)} ({exc})")
            digests.append("")
            continue
        digests.append(hashlib.sha256(raw).hexdigest())
        im = im.convert("L" if channels == 1 else "RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
        images[i] = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
        del im, arr
    _refuse_bad(bad, root)
    rels = [str(p.relative_to(root)) for p, _ in files]
    return FolderData(root=root, class_names=classes, images=images,
                      labels=np.array([lab for _, lab in files], dtype=np.int64),
                      splits=np.array(["test" if test_split(r, test_fraction) else "train" for r in rels]),
                      files=rels, sha256=digests, resize=f"bilinear to {h}x{w}" if size else None, skipped=skipped)


def _refuse_bad(bad: list[str], root: Path) -> None:
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CnnsqlError(f"{len(bad)} unreadable image(s) in {root}: {'; '.join(bad[:5])}{more}; nothing was loaded",
                          "remove or replace them")


def _read(path: Path) -> bytes:
    """A regular file's bytes, at most MAX_FILE_BYTES: opened without following a link and without
    blocking (a FIFO put in its place is refused, not waited on); ValueError with the reason otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ValueError(f"cannot be opened as a regular file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ValueError(f"{st.st_size:,} bytes, more than {MAX_FILE_BYTES:,}")
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > MAX_FILE_BYTES:
                raise ValueError(f"more than {MAX_FILE_BYTES:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _header(raw: bytes):
    """((width, height), mode) from the image's header, before decoding; ValueError otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.format not in FORMATS:
                raise ValueError(f"a {im.format} image, not PNG or JPEG")
            if im.width * im.height > MAX_PIXELS:
                raise ValueError(f"{im.width}x{im.height} pixels, more than {MAX_PIXELS:,}")
            return im.size, im.mode
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable PNG or JPEG: {str(exc)[:120]}") from None


def _decode(raw: bytes):
    """The decoded image (its header checked again); ValueError for a corrupt or truncated one."""
    from PIL import Image, UnidentifiedImageError

    _header(raw)
    try:
        im = Image.open(io.BytesIO(raw))
        im.load()
        return im
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable PNG or JPEG: {str(exc)[:120]}") from None
