"""CIFAR-10 in its official python-version format: find it, verify it, read it without running code.

The archive is untrusted input. Its batches are pickles, so they are read with an unpickler
that only admits the handful of NumPy constructors a batch needs; any other global (os.system,
builtins.eval, ...) is refused before it can be imported or called.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import config
from .errors import CnnsqlError

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
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
OPTIONAL_MEMBERS = {"readme.html"}
IMAGE_BYTES = 3072

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


def _read_members(source: Path) -> dict[str, bytes]:
    """Raw bytes of every member, from a .tar.gz or an extracted directory. Never extracts to disk."""
    if source.is_dir():
        top = source / TOP if (source / TOP).is_dir() else source
        names = {p.name for p in top.iterdir() if p.is_file()}
        _check_names(names, str(top))
        return {n: (top / n).read_bytes() for n in names if n in MEMBER_MD5}
    try:
        with tarfile.open(source, "r:*") as tar:
            members = {}
            for m in tar:
                if m.isdir():
                    if m.name.rstrip("/") != TOP:
                        raise CnnsqlError(f"archive {source} has unexpected directory {m.name!r}",
                                          f"expected only {TOP}/")
                    continue
                parent, _, base = m.name.partition("/")
                if parent != TOP or "/" in base or not m.isfile():
                    raise CnnsqlError(f"archive {source} has unexpected member {m.name!r}",
                                      f"expected files under {TOP}/ only")
                members[base] = m
            _check_names(set(members), str(source))
            return {n: tar.extractfile(m).read() for n, m in members.items() if n in MEMBER_MD5}
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise CnnsqlError(f"archive {source} is truncated or corrupt: {exc}",
                          "download it again from " + URL) from None


def _check_names(names: set[str], where: str) -> None:
    unexpected = sorted(names - set(MEMBER_MD5) - OPTIONAL_MEMBERS)
    if unexpected:
        raise CnnsqlError(f"{where} has unexpected member(s) {', '.join(unexpected)}",
                          "use the official CIFAR-10 python-version archive")
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


def read_dataset(source: Path, expected_md5: dict[str, str] | None = None, kind: str = "cifar-10") -> Dataset:
    """Read and verify every member; return both splits and the class names."""
    expected_md5 = MEMBER_MD5 if expected_md5 is None else expected_md5
    raw = _read_members(Path(source))
    md5 = {n: _md5(b) for n, b in raw.items()}
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
        return path
    for what, path in candidate_sources():
        if path.exists():
            return path
        if what == "$CIFAR10_PATH":
            raise CnnsqlError(f"CIFAR10_PATH={path} does not exist", "point it at the .tar.gz or the extracted folder")
    if download:
        return _download(config.state_dir() / "downloads" / ARCHIVE_NAME, progress)
    raise CnnsqlError("CIFAR-10 not found", _where_to_put_it())


def _where_to_put_it() -> str:
    return (f"download {URL} (md5 {ARCHIVE_MD5}) and pass --source PATH or set CIFAR10_PATH; "
            f"also searched: {', '.join(str(p) for _, p in candidate_sources())}")


def _download(dest: Path, progress: bool) -> Path:
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(URL, timeout=20) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="download CIFAR-10", disable=not progress) as bar:
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
