"""CIFAR-10 in its official python-version format: find it, verify it, read it without running code.

The archive is untrusted input. Its batches are pickles, so they are read with an unpickler
that only admits the handful of NumPy constructors a batch needs; any other global (os.system,
builtins.eval, ...) is refused before it can be imported or called.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnsql.core import config
from cnnsql.core.errors import CnnsqlError
from cnnsql.core.config import CIFAR10_IMAGE_BYTES

TOP = "cifar-10-batches-py"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
MEMBER_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
# Member sizes of the official archive: anything else is refused from its header, before reading.
MEMBER_SIZE = {
    "data_batch_1": 31035704, "data_batch_2": 31035320, "data_batch_3": 31035999, "data_batch_4": 31035696,
    "data_batch_5": 31035623, "test_batch": 31035526, "batches.meta": 158,
}
OPTIONAL_SIZE = {"readme.html": 4096}  # 88 bytes in the official archive; never read
MAX_MEMBER_BYTES = 256 << 20  # members of other (e.g. synthetic) datasets, whose sizes the caller may give
MAX_ENTRIES = 32              # tar entries read before giving up (the official archive has 9)
CHUNK = 1 << 20
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
OPTIONAL_MEMBERS = {"readme.html"}
IMAGE_BYTES = CIFAR10_IMAGE_BYTES

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return super().find_class(module, name)


def safe_unpickle(data: bytes, member: str):
    try:
        return _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # any failure of untrusted input is a data error
        raise CnnsqlError(f"CIFAR-10 member {member} is not a valid batch: {exc}",
                          "re-download the archive; only official CIFAR-10 python-version files are accepted") from None


@dataclass
class Split:
    name: str
    images: np.ndarray  # (N, 3072) uint8, channel-major
    labels: np.ndarray  # (N,) int16
    md5: dict[str, str]


@dataclass
class Dataset:
    source: str
    kind: str  # 'cifar-10' or 'synthetic'
    splits: dict[str, Split]
    class_names: list[str]


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class _CappedReader:
    """A read-only stream that refuses to deliver more than `cap` bytes in total (gzip bombs, huge
    tar headers that tarfile would read into memory at once)."""

    def __init__(self, raw, cap: int, source: Path):
        self.raw, self.cap, self.source, self.done = raw, cap, source, 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or self.done + size > self.cap:
            raise CnnsqlError(f"archive {self.source} expands beyond the {self.cap:,} bytes CIFAR-10 needs",
                              "it is not the official CIFAR-10 archive; download it again from " + URL)
        data = self.raw.read(size)
        self.done += len(data)
        return data


def _read_limited(stream, size: int, name: str, where: str) -> tuple[bytes, str]:
    """Exactly `size` bytes in 1 MiB chunks (hashed as they come): memory never exceeds the size."""
    buf, digest = bytearray(), hashlib.md5()
    while len(buf) < size:
        chunk = stream.read(min(CHUNK, size - len(buf)))
        if not chunk:
            raise CnnsqlError(f"{where}: member {name} is shorter than its {size:,} bytes",
                              "the archive is truncated or corrupt; download it again from " + URL)
        buf += chunk
        digest.update(chunk)
    return bytes(buf), digest.hexdigest()


def _check_size(name: str, size: int, limits: dict[str, int], where: str) -> None:
    limit = limits.get(name, OPTIONAL_SIZE.get(name, 0))
    exact = limits is MEMBER_SIZE and name in MEMBER_SIZE
    if size > limit or (exact and size != limit):
        raise CnnsqlError(f"{where}: member {name} is {size:,} bytes, expected {'' if exact else 'at most '}{limit:,}",
                          "it is not the official CIFAR-10; nothing was read from it")


def _read_members(source: Path, limits: dict[str, int]) -> dict[str, tuple[bytes, str]]:
    """(bytes, md5) of every member, from a .tar.gz or an extracted directory. Never extracts to disk;
    every size is checked against `limits` before a byte of the member is read."""
    if source.is_dir():
        return _read_dir(source, limits)
    cap = sum(limits.get(n, 0) for n in MEMBER_MD5) + sum(OPTIONAL_SIZE.values()) + (1 << 20)
    try:
        with open(source, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            raw = gzip.GzipFile(fileobj=f) if gz else f
            with tarfile.open(fileobj=_CappedReader(raw, cap, source), mode="r|") as tar:
                return _read_tar(tar, source, limits)
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as exc:
        raise CnnsqlError(f"archive {source} is truncated or corrupt: {exc}",
                          "download it again from " + URL) from None


def _read_tar(tar: tarfile.TarFile, source: Path, limits: dict[str, int]) -> dict[str, tuple[bytes, str]]:
    out, names, entries = {}, set(), 0
    for m in tar:
        entries += 1
        if entries > MAX_ENTRIES:
            raise CnnsqlError(f"archive {source} has more than {MAX_ENTRIES} entries", "expected CIFAR-10's 9")
        if m.isdir():
            if m.name.rstrip("/") != TOP:
                raise CnnsqlError(f"archive {source} has unexpected directory {m.name!r}", f"expected only {TOP}/")
            continue
        parent, _, base = m.name.partition("/")
        if parent != TOP or "/" in base or not m.isfile() or m.issparse():
            raise CnnsqlError(f"archive {source} has unexpected member {m.name!r}",
                              f"expected regular files under {TOP}/ only")
        _check_names({base}, str(source), complete=False)
        if base in names:
            raise CnnsqlError(f"archive {source} has member {base} twice", "use the official CIFAR-10 archive")
        names.add(base)
        _check_size(base, m.size, limits, str(source))
        if base in MEMBER_MD5:
            out[base] = _read_limited(tar.extractfile(m), m.size, base, str(source))
    _check_names(names, str(source))
    return out


def _read_dir(source: Path, limits: dict[str, int]) -> dict[str, tuple[bytes, str]]:
    top = source / TOP if (source / TOP).is_dir() else source
    names = {p.name for p in top.iterdir() if p.is_file()}
    _check_names(names, str(top), complete=False)
    for name in sorted(names & set(MEMBER_MD5)):  # every size before any read
        _check_size(name, (top / name).stat().st_size, limits, str(top))
    _check_names(names, str(top))
    out = {}
    for name in sorted(names & set(MEMBER_MD5)):
        with open(top / name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            _check_size(name, size, limits, str(top))
            out[name] = _read_limited(f, size, name, str(top))
    return out


def _check_names(names: set[str], where: str, complete: bool = True) -> None:
    unexpected = sorted(names - set(MEMBER_MD5) - OPTIONAL_MEMBERS)
    if unexpected:
        raise CnnsqlError(f"{where} has unexpected member(s) {', '.join(unexpected)}",
                          "use the official CIFAR-10 python-version archive")
    if not complete:
        return
    missing = sorted(set(MEMBER_MD5) - names)
    if missing:
        raise CnnsqlError(f"{where} is missing {', '.join(missing)}", "the archive is incomplete; download it again")


def _parse_batch(raw: bytes, member: str) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_unpickle(raw, member)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise CnnsqlError(f"CIFAR-10 member {member} lacks 'data' or 'labels'", "the file is not a CIFAR-10 batch")
    data = batch[b"data"]
    labels = np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        shape = getattr(data, "shape", None)
        raise CnnsqlError(f"CIFAR-10 member {member}: data has shape {shape}, expected (N, {IMAGE_BYTES}) uint8")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise CnnsqlError(f"CIFAR-10 member {member}: {labels.shape} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise CnnsqlError(f"CIFAR-10 member {member}: label out of range 0..9 ({labels.min()}..{labels.max()})")
    return data, labels.astype(np.int16)


def read_dataset(source: Path, expected_md5: dict[str, str] | None = None, kind: str = "cifar-10",
                 expected_size: dict[str, int] | None = None) -> Dataset:
    """Read and verify every member; return both splits and the class names.

    The official archive's members must have their official sizes; other datasets (expected_md5
    given) at most `expected_size` or MAX_MEMBER_BYTES each."""
    if expected_md5 is None:
        expected_md5, limits = MEMBER_MD5, MEMBER_SIZE
    else:
        limits = expected_size or {n: MAX_MEMBER_BYTES for n in MEMBER_MD5}
    members = _read_members(Path(source), limits)
    raw = {n: b for n, (b, _) in members.items()}
    md5 = {n: h for n, (_, h) in members.items()}
    for name, want in expected_md5.items():
        if md5.get(name) != want:
            raise CnnsqlError(f"checksum mismatch for {name} in {source}: md5 {md5.get(name)}, expected {want}",
                              "the file is damaged or not the official CIFAR-10; download it again from " + URL)
    splits = {}
    for split, members in SPLITS.items():
        parts = [_parse_batch(raw[m], m) for m in members]
        splits[split] = Split(split, np.concatenate([p[0] for p in parts]),
                              np.concatenate([p[1] for p in parts]), {m: md5[m] for m in members})
    meta = safe_unpickle(raw["batches.meta"], "batches.meta")
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != 10:
        raise CnnsqlError("batches.meta lacks 10 label_names", "the archive is not CIFAR-10")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return Dataset(str(source), kind, splits, class_names)


# --- where to find it ------------------------------------------------------------------

def candidate_sources() -> list[tuple[str, Path]]:
    """Places checked after --source, in order: $CIFAR10_PATH, Keras and torchvision caches."""
    home = Path.home()
    keras = Path(os.environ.get("KERAS_HOME", home / ".keras")) / "datasets"
    torch_home = Path(os.environ.get("TORCH_HOME", home / ".cache" / "torch"))
    out = []
    if os.environ.get("CIFAR10_PATH"):
        out.append(("$CIFAR10_PATH", Path(os.environ["CIFAR10_PATH"])))
    out += [
        ("Keras cache", keras / TOP),
        ("Keras cache", keras / "cifar-10-batches-py.tar.gz"),
        ("torchvision cache", torch_home / "datasets" / ARCHIVE_NAME),
        ("torchvision cache", torch_home / "datasets" / TOP),
        ("torchvision ./data", Path("data") / ARCHIVE_NAME),
        ("torchvision ./data", Path("data") / TOP),
        ("earlier download", config.state_dir() / "downloads" / ARCHIVE_NAME),
    ]
    return out


def resolve_source(source: str | None, download: bool = True, progress: bool = True) -> Path:
    if source:
        path = Path(source).expanduser()
        if not path.exists():
            raise CnnsqlError(f"--source {path} does not exist", "give the .tar.gz or the extracted cifar-10-batches-py folder")
        return _regular(path, "--source")
    for what, path in candidate_sources():
        if path.exists():
            return _regular(path, what)
        if what == "$CIFAR10_PATH":
            raise CnnsqlError(f"CIFAR10_PATH={path} does not exist", "point it at the .tar.gz or the extracted folder")
    if download:
        return _download(config.state_dir() / "downloads" / ARCHIVE_NAME, progress)
    raise CnnsqlError("CIFAR-10 not found", _where_to_put_it())


def _regular(path: Path, what: str) -> Path:
    """Only a regular file or a folder: a FIFO, socket or device would block or never end."""
    if not (path.is_file() or path.is_dir()):
        raise CnnsqlError(f"{what} {path} is not a regular file or folder (a FIFO, socket or device?)",
                          "give the .tar.gz or the extracted cifar-10-batches-py folder")
    return path


def _where_to_put_it() -> str:
    return (f"download {URL} (md5 {ARCHIVE_MD5}) and pass --source PATH or set CIFAR10_PATH; "
            f"also searched: {', '.join(str(p) for _, p in candidate_sources())}")


def _download(dest: Path, progress: bool) -> Path:
    from cnnsql.core.progress import progress_bar

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(URL, timeout=20) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with progress_bar(total=total, unit="B", unit_scale=True, desc="download CIFAR-10", disable=not progress) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CnnsqlError(f"CIFAR-10 not found locally and the download failed ({exc})", _where_to_put_it()) from None
    if digest.hexdigest() != ARCHIVE_MD5:
        tmp.unlink(missing_ok=True)
        raise CnnsqlError(f"downloaded archive has md5 {digest.hexdigest()}, expected {ARCHIVE_MD5}", _where_to_put_it())
    tmp.replace(dest)
    return dest


# --- synthetic data ----------------------------------------------------------------------

SYNTHETIC_CLASSES = [f"synthetic_{i}" for i in range(10)]


def write_synthetic(dest: Path, n_train: int, n_test: int | None = None, seed: int = 0) -> dict[str, str]:
    """Write a deterministic CIFAR-shaped dataset in the official format; return its member md5s.

    Each class has its own mean colour, so a model can learn something from it.
    """
    n_test = n_test if n_test is not None else max(1, n_train // 5)
    rng = np.random.default_rng(seed)
    top = Path(dest) / TOP
    top.mkdir(parents=True, exist_ok=True)
    centers = rng.integers(40, 216, size=(10, 3))

    def batch(n: int, label: str) -> dict:
        labels = np.arange(n) % 10
        noise = rng.normal(0, 30, size=(n, 3, 1024))
        data = np.clip(centers[labels][:, :, None] + noise, 0, 255).astype(np.uint8).reshape(n, IMAGE_BYTES)
        return {b"batch_label": label.encode(), b"labels": labels.tolist(), b"data": data,
                b"filenames": [f"synthetic_{i}.png".encode() for i in range(n)]}

    per = [n_train // 5 + (1 if i < n_train % 5 else 0) for i in range(5)]
    files = {f"data_batch_{i + 1}": batch(per[i], f"training batch {i + 1} of 5") for i in range(5)}
    files["test_batch"] = batch(n_test, "testing batch 1 of 1")
    files["batches.meta"] = {b"num_cases_per_batch": max(per), b"label_names": [c.encode() for c in SYNTHETIC_CLASSES],
                             b"num_vis": IMAGE_BYTES}
    md5 = {}
    for name, obj in files.items():
        payload = pickle.dumps(obj, protocol=4)
        (top / name).write_bytes(payload)
        md5[name] = _md5(payload)
    return md5
